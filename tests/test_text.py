"""Tokenizer round trips and prompt checks; the text encoder's layers against centred finite differences
(float64) and PyTorch autograd (float32, skipped without torch); masking and padding invariance."""
import json

import numpy as np
import pytest

from minidiff.conditioning.text import (LayerNorm, MLP, MultiHeadSelfAttention, TextEncoder, Tokenizer, TransformerBlock,
                           encode_prompts, tokenize)
from test_layers import assert_small, gradcheck, randomize, rel_error, zero_grads

PROMPTS = ["a handwritten seven", "the digit 7", "手写数字七", "数字一", "a digit one"]


@pytest.fixture
def tok():
    return Tokenizer.from_texts(PROMPTS)


# ---------------------------------------------------------------------------------------------------
# tokenizer

def test_tokenize_rules():
    assert tokenize("A Handwritten Seven") == ["a", "handwritten", "seven"]
    assert tokenize("digit 17, 七!") == ["digit", "1", "7", "七"]
    assert tokenize("  ...  ") == [] and tokenize("") == []


def test_vocabulary_layout(tok):
    v = tok.vocab
    assert v[Tokenizer.PAD_ID] == Tokenizer.PAD == "<pad>" and v[Tokenizer.CLS_ID] == Tokenizer.CLS == "<cls>"
    assert v[2:] == sorted(v[2:]) and len(tok) == len(v)
    assert {"a", "seven", "7", "七", "手"} <= set(v)
    with pytest.raises(ValueError, match="added automatically"):
        Tokenizer(["<pad>", "a"])
    with pytest.raises(ValueError, match="single tokens"):
        Tokenizer(["two words"])


def test_english_round_trip(tok):
    ids, unknown = tok.encode(["A Handwritten Seven"], 6)
    assert ids.dtype == np.int64 and ids.shape == (1, 6) and unknown == [[]]
    assert ids[0, 0] == 1 and list(ids[0, 4:]) == [0, 0]
    assert [tok.vocab[i] for i in ids[0, 1:4]] == ["a", "handwritten", "seven"]
    assert tok.decode(ids) == ["a handwritten seven"]


def test_chinese_round_trip(tok):
    ids, _ = tok.encode(["手写数字七"], 8)
    assert (ids[0, 1:6] > 1).all() and list(ids[0, 6:]) == [0, 0]
    assert tok.decode(ids[0]) == ["手写数字七"]


def test_mixed_round_trip(tok):
    assert tokenize("The digit 7 数字七!") == ["the", "digit", "7", "数", "字", "七"]
    ids, _ = tok.encode(["The digit 7 数字七"], 10)
    assert tok.decode(ids) == ["the digit 7数字七"]          # no space next to a Chinese character
    np.testing.assert_array_equal(encode_prompts(tok, "The digit 7 数字七", 10), ids)


def test_empty_prompt_is_cls_then_padding(tok):
    ids, unknown = tok.encode(["", "a digit"], 4)
    assert list(ids[0]) == [1, 0, 0, 0] and unknown == [[], []]
    assert tok.decode(ids) == ["", "a digit"]


def test_unknown_words_reported_and_dropped(tok):
    ids, unknown = tok.encode(["a fluffy seven", "猫"], 5)
    assert unknown == [["fluffy"], ["猫"]]
    assert tok.decode(ids) == ["a seven", ""]


def test_encode_prompts_checks(tok):
    with pytest.raises(ValueError, match=r"'purple cats'.*vocabulary is: .*handwritten.*seven"):
        encode_prompts(tok, ["a seven", "purple cats"], 8)
    with pytest.warns(UserWarning, match="unknown words ignored: fluffy"):
        ids = encode_prompts(tok, ["a fluffy seven"], 8)
    assert tok.decode(ids) == ["a seven"]
    with pytest.warns(UserWarning, match="truncated"):
        ids = encode_prompts(tok, ["a handwritten digit seven"], 3)
    assert tok.decode(ids) == ["a handwritten"]
    ids = encode_prompts(tok, ["", "a seven"], 4)              # "" is the unconditional prompt: no error
    assert list(ids[0]) == [1, 0, 0, 0]


def test_to_dict_from_dict_round_trip(tok):
    back = Tokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert back.vocab == tok.vocab
    assert np.array_equal(back.encode(PROMPTS, 7)[0], tok.encode(PROMPTS, 7)[0])


@pytest.mark.parametrize("bad", [None, [], {"words": []}, {"tokens": "abc"}, {"tokens": ["a", "b"]},
                                 {"tokens": ["<pad>", "<cls>", "b", "a"]}, {"tokens": ["<pad>", "<cls>", 3]},
                                 {"tokens": ["<pad>", "<cls>", "<pad>"]}])
def test_from_dict_rejects_garbage(bad):
    with pytest.raises(ValueError):
        Tokenizer.from_dict(bad)


# ---------------------------------------------------------------------------------------------------
# finite-difference gradient checks, float64

def _pop_key_bias(lyr, errors):
    """softmax(q (k + b)^T) = softmax(q k^T): the key bias's gradient is exactly 0 (see test_layers)."""
    for name, layer, key in lyr.named_params():
        if name.endswith("k.bias"):
            errors.pop(name)
            assert np.max(np.abs(layer.grads[key])) < 1e-12
    return errors


MASK = np.array([[True, True, True, False, False],
                 [True, True, True, True, True],
                 [True, False, True, True, False]])


def test_layernorm_gradcheck():
    rng = np.random.default_rng(0)
    lyr = LayerNorm(6, dtype=np.float64)
    randomize(lyr, rng)
    x = rng.standard_normal((2, 3, 6)) * 2 + 1
    assert_small(gradcheck(lyr, [x], lyr.forward, lyr.backward))


def test_attention_gradcheck_with_mask():
    rng = np.random.default_rng(1)
    lyr = MultiHeadSelfAttention(8, 2, rng, dtype=np.float64)
    randomize(lyr, rng)
    x = rng.standard_normal((3, 5, 8))
    assert_small(_pop_key_bias(lyr, gradcheck(lyr, [x], lambda x: lyr.forward(x, MASK), lyr.backward)))


def test_mlp_gradcheck():
    rng = np.random.default_rng(2)
    lyr = MLP(4, 8, rng, dtype=np.float64)
    randomize(lyr, rng)
    assert_small(gradcheck(lyr, [rng.standard_normal((2, 3, 4))], lyr.forward, lyr.backward))


def test_transformer_block_gradcheck():
    rng = np.random.default_rng(3)
    lyr = TransformerBlock(8, 2, rng, mlp_ratio=2, dtype=np.float64)
    randomize(lyr, rng)
    x = rng.standard_normal((3, 5, 8))
    assert_small(_pop_key_bias(lyr, gradcheck(lyr, [x], lambda x: lyr.forward(x, MASK), lyr.backward)))


def test_text_encoder_gradcheck():
    """Every parameter; ids with padding and a repeated token (the embedding scatter-add must accumulate)."""
    rng = np.random.default_rng(4)
    enc = TextEncoder(vocab_size=7, max_len=6, dim=8, num_layers=2, num_heads=2, rng=rng, dtype=np.float64)
    randomize(enc, rng)
    ids = np.array([[1, 3, 3, 5, 0, 0], [1, 2, 6, 4, 3, 2], [1, 0, 0, 0, 0, 0]])
    errors = gradcheck(enc, [], lambda: enc.forward(ids), lambda d: enc.backward(d) or ())
    assert len(errors) == 2 + 2 * 16 + 2          # embeddings, 2 blocks x (2 LN + 4 Linear + 2 Linear) x 2, final LN
    assert_small(_pop_key_bias(enc, errors))


# ---------------------------------------------------------------------------------------------------
# masking, padding, bad input, dtypes, evaluation mode

def test_masked_keys_do_not_influence_real_positions():
    rng = np.random.default_rng(5)
    lyr = MultiHeadSelfAttention(8, 4, rng, dtype=np.float64)
    x = rng.standard_normal((3, 5, 8))
    y = lyr.forward(x, MASK)
    x2 = np.where(MASK[..., None], x, rng.standard_normal(x.shape) * 10)
    y2 = lyr.forward(x2, MASK)
    np.testing.assert_allclose(y2[MASK], y[MASK], rtol=0, atol=1e-12)
    assert not np.allclose(y2[~MASK], y[~MASK])                 # padded queries still see their own input


def test_text_encoder_output_independent_of_padding_length(tok):
    rng = np.random.default_rng(6)
    enc = TextEncoder(len(tok), 12, 16, 2, 4, rng, dtype=np.float64)
    randomize(enc, rng, scale=0.3)
    short, _ = tok.encode(PROMPTS, 6)
    long, _ = tok.encode(PROMPTS, 12)
    assert (long[:, 6:] == 0).all()
    np.testing.assert_allclose(enc.forward(long), enc.forward(short), rtol=1e-12, atol=1e-12)


def test_text_encoder_rejects_bad_ids():
    enc = TextEncoder(5, 4, 8, 1, 2, np.random.default_rng(0))
    for ids, match in [(np.zeros(4, np.int64), "got 1-D"), (np.zeros((2, 4)), "got 2-D float64"),
                       (np.zeros((2, 5), np.int64), "max_len"), (np.full((2, 3), 5), r"\[0, 5\)"),
                       (np.full((2, 3), -1), r"\[0, 5\)")]:
        with pytest.raises(ValueError, match=match):
            enc.forward(ids)


def test_text_encoder_float32_and_eval_mode(tok):
    rng = np.random.default_rng(7)
    enc = TextEncoder(len(tok), 8, 16, 2, 4, rng)
    ids, _ = tok.encode(PROMPTS, 8)
    c = enc.forward(ids)
    assert c.shape == (len(PROMPTS), 16) and c.dtype == np.float32
    assert enc.backward(np.ones_like(c)) is None
    assert all(lyr.grads[k].dtype == np.float32 and np.abs(lyr.grads[k]).max() > 0
               for name, lyr, k in enc.named_params() if not name.endswith("k.bias"))
    for _, layer in enc.named_layers():
        layer.training = False
    assert np.array_equal(enc.forward(ids), c)
    assert all(layer.cache is None for _, layer in enc.named_layers())


# ---------------------------------------------------------------------------------------------------
# PyTorch autograd, float32, same weights

def test_layernorm_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    lyr = LayerNorm(16)
    randomize(lyr, rng)
    x = (rng.standard_normal((3, 5, 16)) * 3 + 1).astype(np.float32)
    d = rng.standard_normal(x.shape).astype(np.float32)
    y = lyr.forward(x)
    dx = lyr.backward(d)
    xt = torch.from_numpy(x).requires_grad_(True)
    w, b = (torch.from_numpy(lyr.params[k].copy()).requires_grad_(True) for k in ("weight", "bias"))
    yt = torch.nn.functional.layer_norm(xt, (16,), w, b, eps=1e-5)
    yt.backward(torch.from_numpy(d))
    for ours, theirs in [(y, yt), (dx, xt.grad), (lyr.grads["weight"], w.grad), (lyr.grads["bias"], b.grad)]:
        assert rel_error(ours, theirs.detach().numpy()) < 1e-5


def test_attention_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    lyr = MultiHeadSelfAttention(16, 4, rng)
    x = rng.standard_normal((3, 5, 16)).astype(np.float32)
    d = rng.standard_normal(x.shape).astype(np.float32)
    zero_grads(lyr)
    y = lyr.forward(x, MASK)
    dx = lyr.backward(d)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.from_numpy(np.concatenate([lyr.q.params["weight"], lyr.k.params["weight"],
                                                                  lyr.v.params["weight"]])))
        mha.in_proj_bias.copy_(torch.from_numpy(np.concatenate([lyr.q.params["bias"], lyr.k.params["bias"],
                                                                lyr.v.params["bias"]])))
        mha.out_proj.weight.copy_(torch.from_numpy(lyr.out.params["weight"]))
        mha.out_proj.bias.copy_(torch.from_numpy(lyr.out.params["bias"]))
    xt = torch.from_numpy(x).requires_grad_(True)
    yt, _ = mha(xt, xt, xt, key_padding_mask=torch.from_numpy(~MASK), need_weights=False)
    yt.backward(torch.from_numpy(d))
    assert rel_error(y, yt.detach().numpy()) < 1e-5
    assert rel_error(dx, xt.grad.numpy()) < 1e-5
    gw, gb = mha.in_proj_weight.grad.numpy(), mha.in_proj_bias.grad.numpy()
    for i, lin in enumerate([lyr.q, lyr.k, lyr.v]):
        assert rel_error(lin.grads["weight"], gw[16 * i:16 * (i + 1)]) < 1e-5
        if lin is not lyr.k:                                    # k.bias: exactly zero in exact arithmetic
            assert rel_error(lin.grads["bias"], gb[16 * i:16 * (i + 1)]) < 1e-5
    assert max(np.abs(lyr.k.grads["bias"]).max(), np.abs(gb[16:32]).max()) < 1e-4
    assert rel_error(lyr.out.grads["weight"], mha.out_proj.weight.grad.numpy()) < 1e-5
    assert rel_error(lyr.out.grads["bias"], mha.out_proj.bias.grad.numpy()) < 1e-5
