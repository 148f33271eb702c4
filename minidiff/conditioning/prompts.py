"""Prompt templates: the descriptions a text-to-image model learns from (article sections 2.3 and 3.3).
Text-to-image, beside stage 1: the prompts that stand in for captions (train.py draws them).

Our data sets have labels, not captions, so each training image gets a prompt made from a template for its label,
in English or Chinese, drawn afresh at every step:

    MNIST (digit 7)   "a handwritten seven", "the digit 7", "the number seven", "a picture of the digit seven",
                      "seven", "a handwritten digit 7", "手写数字七", "数字7", "一个手写的七", "七"
    Fashion-MNIST     "a sneaker", "a photo of a sneaker", "sneaker", "an item of clothing: sneaker",
                      "一个运动鞋", "运动鞋", "一张运动鞋的照片", ...

HELD_OUT phrasings are never seen in training; they use only words the training prompts contain, in new
combinations ("a picture of a handwritten 7", "手写的数字七"), and measure whether the encoder generalises.
With probability p_uncond the prompt is replaced by the empty prompt "" (classifier-free guidance: one network
learns eps(x_t, t, text) and eps(x_t, t)).

Every template has the same slots for every class, so the prompts of a split form a table (classes x templates)
that is tokenized once; a training step then only indexes it.
"""
import numpy as np

from .text import Tokenizer

MNIST_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
MNIST_ZH = list("零一二三四五六七八九")
FASHION_WORDS = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
FASHION_ZH = ["T恤", "裤子", "套头衫", "连衣裙", "外套", "凉鞋", "衬衫", "运动鞋", "包", "踝靴"]

# What fills the slots of a template for each class: {w} English word, {d} digit, {z} Chinese, {a} "a"/"an" before {w}
CLASS_WORDS = {
    "mnist": [dict(w=w, d=str(c), z=z, a="a") for c, (w, z) in enumerate(zip(MNIST_WORDS, MNIST_ZH))],
    "fashion-mnist": [dict(w=w, d=str(c), z=z, a="an" if w[0] in "aeiou" else "a")
                      for c, (w, z) in enumerate(zip(FASHION_WORDS, FASHION_ZH))],
}

TEMPLATES = {
    "mnist": dict(
        train=["a handwritten {w}", "the digit {d}", "the number {w}", "a picture of the digit {w}", "{w}",
               "a handwritten digit {d}", "手写数字{z}", "数字{d}", "一个手写的{z}", "{z}"],
        held_out=["a picture of a handwritten {d}", "the handwritten number {w}", "手写的数字{z}", "一个数字{d}"],
    ),
    "fashion-mnist": dict(
        train=["{a} {w}", "a photo of {a} {w}", "{w}", "an item of clothing: {w}", "一个{z}", "{z}", "一张{z}的照片"],
        held_out=["an item of clothing: {a} {w}", "{z}的照片"],
    ),
}


def class_prompts(dataset, split="train"):
    """prompts[label][j]: template j of the split ("train" or "held_out") filled in for the label."""
    if dataset not in TEMPLATES:
        raise ValueError(f"no prompt templates for data set {dataset!r}; known: {sorted(TEMPLATES)}")
    if split not in ("train", "held_out"):
        raise ValueError(f"unknown prompt split {split!r}; choose 'train' or 'held_out'")
    return [[tpl.format(**words) for tpl in TEMPLATES[dataset][split]] for words in CLASS_WORDS[dataset]]


def build_tokenizer(dataset):
    """The vocabulary of a data set's training prompts (held-out phrasings add no words)."""
    return Tokenizer.from_texts([p for row in class_prompts(dataset, "train") for p in row])


def prompt_table(tokenizer, dataset, split, max_len):
    """Token ids of every prompt of a split, (10 classes, templates, max_len)."""
    prompts = class_prompts(dataset, split)
    ids, _ = tokenizer.encode([p for row in prompts for p in row], max_len)
    return ids.reshape(len(prompts), len(prompts[0]), max_len)


def draw_prompts(table, labels, p_uncond, rng):
    """One random template per label, replaced by the empty prompt with probability p_uncond: ids (B, max_len)."""
    labels = np.asarray(labels)
    ids = table[labels, rng.integers(0, table.shape[1], size=labels.shape[0])]
    drop = rng.random(labels.shape[0]) < p_uncond
    ids[drop] = Tokenizer.PAD_ID
    ids[drop, 0] = Tokenizer.CLS_ID
    return ids
