"""The text side of text-to-image: a tokenizer and a small Transformer text encoder, backward by hand.
Text-to-image, beside stage 4: the prompt's vector that the U-Net is conditioned on (unet.py).

Tokenization. English is split into words and Chinese into characters: a token is a lowercase word
``[a-z]+`` ("A Handwritten Seven" -> a, handwritten, seven), a single digit ``[0-9]`` ("17" -> 1, 7), or one
CJK Unified Ideograph U+4E00..U+9FFF ("手写数字七" -> 手, 写, 数, 字, 七: Chinese has no spaces, and
characters are a small closed set that covers every phrasing). Everything else (spaces, punctuation)
separates tokens and is dropped. Two special tokens come first in the vocabulary: ``<pad>`` (id 0) fills a
sequence up to its fixed length and is masked out of attention and pooling; ``<cls>`` (id 1) starts every
sequence, so no sequence is ever empty. The empty prompt "" (no tokens: just ``<cls>``) is the "no
condition" of classifier-free guidance: training replaces some prompts by "", and sampling mixes the
conditional and unconditional predictions  eps = eps(x, "") + w (eps(x, text) - eps(x, "")).

Why our own encoder. The article (sections 2.3 and 3.3) encodes the text with a pretrained encoder (it names
BERT; Stable Diffusion uses CLIP). minidiff instead trains a small Transformer jointly with the U-Net: nothing
to download, the prompts are templated descriptions of MNIST digits with a vocabulary of a few dozen tokens,
and the whole backward pass is visible here and gradient-checked. With a pretrained encoder the vocabulary
and the encoder would come with it (frozen or fine-tuned), the text vector would be far richer and would
generalise to phrasings never seen in training, and only the projection of that vector into the U-Net would
be trained from scratch. Ours knows exactly the words it was trained on; encode_prompts says so.

Layers work on (N, L, D) arrays, NumPy or CuPy (xp from the arrays), with the same forward/backward
conventions as layers.py; float32 in, float32 out.
"""
import math
import re
import warnings

import numpy as np

from ..utils.backend import array_module, to_numpy
from ..layers import Layer, Linear, SiLU, softmax

_TOKEN = re.compile(r"[a-z]+|[0-9]|[\u4e00-\u9fff]")


def _is_cjk(tok):
    return len(tok) == 1 and "\u4e00" <= tok <= "\u9fff"


# tokens = the matches of [a-z]+ | [0-9] | [U+4E00-U+9FFF] in lower(text)
def tokenize(text):
    """English words, single digits and Chinese characters of `text`, lowercased; the rest is dropped."""
    if not isinstance(text, str):
        raise ValueError(f"a prompt must be a str, got {type(text).__name__}")
    return _TOKEN.findall(text.lower())


# vocab = [<pad>, <cls>] + sorted(tokens);  id(token) = its index in vocab
class Tokenizer:
    PAD, CLS = "<pad>", "<cls>"
    PAD_ID, CLS_ID = 0, 1

    def __init__(self, vocab_tokens):
        tokens = list(vocab_tokens)
        bad = [t for t in tokens if not isinstance(t, str) or tokenize(t) != [t]]
        if bad:
            raise ValueError(f"vocabulary entries must be single tokens (a lowercase word, a digit or one "
                             f"Chinese character; {self.PAD} and {self.CLS} are added automatically), got {bad[:5]}")
        self._vocab = [self.PAD, self.CLS] + sorted(set(tokens))
        self._index = {t: i for i, t in enumerate(self._vocab)}

    @classmethod
    def from_texts(cls, texts):
        return cls({t for text in texts for t in tokenize(text)})

    @property
    def vocab(self):
        return list(self._vocab)

    def __len__(self):
        return len(self._vocab)

    def to_dict(self):
        return {"tokens": self.vocab}

    @classmethod
    def from_dict(cls, d):
        tokens = d.get("tokens") if isinstance(d, dict) else None
        if (not isinstance(tokens, list) or tokens[:2] != [cls.PAD, cls.CLS]
                or not all(isinstance(t, str) for t in tokens) or tokens[2:] != sorted(set(tokens[2:]))):
            raise ValueError(f"not a tokenizer dict: expected {{'tokens': ['{cls.PAD}', '{cls.CLS}', "
                             f"<sorted unique tokens>...]}}, got {str(d)[:200]}")
        return cls(tokens[2:])

    # ids[n] = [CLS, known tokens of texts[n] (at most max_len - 1), PAD, ...]
    def encode(self, texts, max_len):
        """(ids (N, max_len) int64, unknown: per text, the tokens not in the vocabulary, dropped from ids)."""
        if isinstance(texts, str):
            raise ValueError("encode takes a list of texts, got a single str (wrap it in a list)")
        max_len = int(max_len)
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1 (room for {self.CLS}), got {max_len}")
        texts = list(texts)
        ids = np.full((len(texts), max_len), self.PAD_ID, dtype=np.int64)
        ids[:, 0] = self.CLS_ID
        unknown = []
        for n, text in enumerate(texts):
            toks = tokenize(text)
            known = [self._index[t] for t in toks if t in self._index][:max_len - 1]
            ids[n, 1:1 + len(known)] = known
            unknown.append([t for t in toks if t not in self._index])
        return ids, unknown

    def decode(self, ids):
        """Texts from ids (N, L) (or (L,)): tokens without PAD/CLS, spaced unless a Chinese character is next."""
        ids = np.atleast_2d(to_numpy(ids))
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise ValueError(f"token ids must be in [0, {len(self)}), got range [{ids.min()}, {ids.max()}]")
        texts = []
        for row in ids:
            toks = [self._vocab[i] for i in row if i not in (self.PAD_ID, self.CLS_ID)]
            texts.append("".join(t if j == 0 or _is_cjk(t) or _is_cjk(toks[j - 1]) else " " + t
                                 for j, t in enumerate(toks)))
        return texts


def encode_prompts(tokenizer, prompts, max_len):
    """tokenizer.encode with the user-facing checks: a prompt the encoder cannot read is an error, unknown
    words and truncation are warnings; "" is the unconditional prompt."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids, unknown = tokenizer.encode(prompts, max_len)
    for p, unk in zip(prompts, unknown):
        n_known = len(tokenize(p)) - len(unk)
        if n_known == 0 and p.strip():
            raise ValueError(f"prompt {p!r} contains no word the text encoder knows; its vocabulary is: "
                             f"{', '.join(tokenizer.vocab[2:])}")
        if unk:
            warnings.warn(f"prompt {p!r}: unknown words ignored: {', '.join(unk)}", stacklevel=2)
        if n_known > max_len - 1:
            warnings.warn(f"prompt {p!r} has {n_known} known tokens; truncated to max_len - 1 = {max_len - 1}",
                          stacklevel=2)
    return ids


# ----------------------------------------------------------------------------------------------------
# Embedding table:  y = W[idx].  Its gradient adds each row of dout into the row it was read from
# (a scatter-add: repeated indices accumulate; shared with the text encoder's token table).

class Embedding(Layer):
    def __init__(self, num_embeddings, dim, rng, dtype=np.float32):
        super().__init__()
        self.new_param("weight", rng.standard_normal((num_embeddings, dim)).astype(dtype))  # N(0, 1) like PyTorch

    def forward(self, idx):                     # idx (N,) int
        self.save(idx)
        return self.params["weight"][idx]       # (N, dim)

    def backward(self, dout):                   # dout (N, dim): row idx[i] of the table receives dout[i]
        scatter_add(self.grads["weight"], self.cache, dout)
        return None                             # integer input: no gradient


def scatter_add(a, idx, values):
    """a[idx[i]] += values[i], repeated indices accumulating (np.add.at; cupyx.scatter_add on the GPU)."""
    if array_module(a) is np:
        np.add.at(a, idx, values)
    else:
        import cupyx
        cupyx.scatter_add(a, idx, values)


# ----------------------------------------------------------------------------------------------------
# LayerNorm over the last axis:  y = (x - mean) / sqrt(var + eps) * weight + bias

class LayerNorm(Layer):
    def __init__(self, dim, eps=1e-5, dtype=np.float32):
        super().__init__()
        self.eps = float(eps)
        self.new_param("weight", np.ones(dim, dtype=dtype))
        self.new_param("bias", np.zeros(dim, dtype=dtype))

    def forward(self, x):                       # x (..., D)
        xp = array_module(x)
        xc = x - x.mean(axis=-1, keepdims=True)
        rstd = 1.0 / xp.sqrt((xc * xc).mean(axis=-1, keepdims=True) + self.eps)
        xhat = xc * rstd
        self.save((xhat, rstd))
        return xhat * self.params["weight"] + self.params["bias"]

    def backward(self, dout):                   # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dout * w
        xhat, rstd = self.cache
        D = dout.shape[-1]
        self.grads["weight"] += (dout * xhat).reshape(-1, D).sum(axis=0)
        self.grads["bias"] += dout.reshape(-1, D).sum(axis=0)
        g = dout * self.params["weight"]
        return rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))


# ----------------------------------------------------------------------------------------------------
# Multi-head self-attention with a key-padding mask, per head h:
#   A_h = softmax(q_h k_h^T / sqrt(d_head) + M) over keys (M = -1e9 at padded keys),  y = out(concat_h A_h v_h)

MASKED = -1e9   # exp(MASKED - max) underflows to exactly 0: padded keys get zero weight and zero gradient


class MultiHeadSelfAttention(Layer):
    def __init__(self, dim, num_heads, rng, dtype=np.float32):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = self.add("q", Linear(dim, dim, rng, dtype=dtype))
        self.k = self.add("k", Linear(dim, dim, rng, dtype=dtype))
        self.v = self.add("v", Linear(dim, dim, rng, dtype=dtype))
        self.out = self.add("out", Linear(dim, dim, rng, dtype=dtype))

    def _split(self, t, N, L):                  # (N*L, D) -> (N, H, L, d_head)
        return t.reshape(N, L, self.num_heads, -1).transpose(0, 2, 1, 3)

    def forward(self, x, mask=None):            # x (N, L, D), mask (N, L) bool, True = real token
        xp = array_module(x)
        N, L, D = x.shape
        x2 = x.reshape(N * L, D)
        q, k, v = (self._split(lin.forward(x2), N, L) for lin in (self.q, self.k, self.v))
        scale = 1.0 / math.sqrt(D // self.num_heads)
        s = (q @ k.transpose(0, 1, 3, 2)) * scale                  # (N, H, L, L): query rows, key columns
        if mask is not None:
            s = xp.where(mask[:, None, None, :], s, MASKED)
        a = softmax(s)
        o = (a @ v).transpose(0, 2, 1, 3).reshape(N * L, D)        # heads merged
        self.save((q, k, v, a, scale))
        return self.out.forward(o).reshape(N, L, D)

    def backward(self, dout):                   # dout (N, L, D)
        q, k, v, a, scale = self.cache
        N, L, D = dout.shape
        do = self._split(self.out.backward(dout.reshape(N * L, D)), N, L)   # (N, H, L, d_head)
        da = do @ v.transpose(0, 1, 3, 2)
        dv = a.transpose(0, 1, 3, 2) @ do
        ds = a * (da - (da * a).sum(axis=-1, keepdims=True))      # softmax backward; 0 at masked keys
        ds *= scale
        dq, dk = ds @ k, ds.transpose(0, 1, 3, 2) @ q
        merge = lambda t: t.transpose(0, 2, 1, 3).reshape(N * L, D)  # noqa: E731
        dx = self.q.backward(merge(dq)) + self.k.backward(merge(dk)) + self.v.backward(merge(dv))
        return dx.reshape(N, L, D)


# ----------------------------------------------------------------------------------------------------
# MLP:  y = fc2(SiLU(fc1(x)))  per position

class MLP(Layer):
    def __init__(self, dim, hidden, rng, dtype=np.float32):
        super().__init__()
        self.fc1 = self.add("fc1", Linear(dim, hidden, rng, dtype=dtype))
        self.act = self.add("act", SiLU())
        self.fc2 = self.add("fc2", Linear(hidden, dim, rng, dtype=dtype))

    def forward(self, x):                       # x (N, L, D)
        N, L, D = x.shape
        return self.fc2.forward(self.act.forward(self.fc1.forward(x.reshape(N * L, D)))).reshape(N, L, D)

    def backward(self, dout):
        N, L, D = dout.shape
        return self.fc1.backward(self.act.backward(self.fc2.backward(dout.reshape(N * L, D)))).reshape(N, L, D)


# ----------------------------------------------------------------------------------------------------
# Pre-LN Transformer block:  x = x + MHA(LN1(x), mask);  y = x + MLP(LN2(x))

class TransformerBlock(Layer):
    def __init__(self, dim, num_heads, rng, mlp_ratio=4, dtype=np.float32):
        super().__init__()
        self.ln1 = self.add("ln1", LayerNorm(dim, dtype=dtype))
        self.attn = self.add("attn", MultiHeadSelfAttention(dim, num_heads, rng, dtype=dtype))
        self.ln2 = self.add("ln2", LayerNorm(dim, dtype=dtype))
        self.mlp = self.add("mlp", MLP(dim, mlp_ratio * dim, rng, dtype=dtype))

    def forward(self, x, mask=None):
        x = x + self.attn.forward(self.ln1.forward(x), mask)
        return x + self.mlp.forward(self.ln2.forward(x))

    def backward(self, dout):                   # each residual: dx = dy + branch backward
        dx = dout + self.ln2.backward(self.mlp.backward(dout))
        return dx + self.ln1.backward(self.attn.backward(dx))


# ----------------------------------------------------------------------------------------------------
# Text encoder:  h = LN(blocks(E_tok[ids] + E_pos[:L]));  c = sum_l m_l h_l / sum_l m_l,  m = (ids != PAD)

class TextEncoder(Layer):
    def __init__(self, vocab_size, max_len, dim, num_layers, num_heads, rng, dtype=np.float32):
        super().__init__()
        self.vocab_size, self.max_len = vocab_size, max_len
        self.new_param("token_embedding", (rng.standard_normal((vocab_size, dim)) * 0.02).astype(dtype))
        self.new_param("position_embedding", (rng.standard_normal((max_len, dim)) * 0.02).astype(dtype))
        self.blocks = [self.add(f"blocks.{i}", TransformerBlock(dim, num_heads, rng, dtype=dtype))
                       for i in range(num_layers)]
        self.ln = self.add("ln", LayerNorm(dim, dtype=dtype))

    def forward(self, ids):                     # ids (N, L) int, L <= max_len -> (N, dim)
        xp = array_module(ids)
        ids = xp.asarray(ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"token ids must be a 2-D integer array (N, L), got {ids.ndim}-D {ids.dtype}")
        N, L = ids.shape
        if L > self.max_len:
            raise ValueError(f"sequence length {L} exceeds the encoder's max_len {self.max_len}")
        # (checked for ids on the host: reading ids on a GPU would stall it; TrainStep checks them before)
        if xp is np and ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]"
                             " (a tokenizer with another vocabulary?)")
        mask = ids != Tokenizer.PAD_ID
        x = self.params["token_embedding"][ids] + self.params["position_embedding"][:L]
        for blk in self.blocks:
            x = blk.forward(x, mask)
        h = self.ln.forward(x)
        w = mask[..., None].astype(h.dtype)
        w /= w.sum(axis=1, keepdims=True)       # pooling weights m_l / sum m (CLS is real: never 0 / 0)
        self.save((ids, w))
        return (h * w).sum(axis=1)

    def backward(self, dout):                   # dout (N, dim); integer input: returns None
        ids, w = self.cache
        dx = self.ln.backward(dout[:, None, :] * w)
        for blk in reversed(self.blocks):
            dx = blk.backward(dx)
        N, L, D = dx.shape
        self.grads["position_embedding"][:L] += dx.sum(axis=0)
        scatter_add(self.grads["token_embedding"], ids.reshape(-1), dx.reshape(N * L, D))
        return None
