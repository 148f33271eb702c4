"""Text-to-image: prompt templates, the text-conditional U-Net in both conditioning modes (whole-network gradient
check, float64), classifier-free guidance limits (w = 0 is unconditional, w = 1 conditional), and a tiny end-to-end
run: train with prompts, then sample from prompts with examples/mnist_sample.py."""
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest

from minidiff.conditioning import prompts
from minidiff.conditioning.prompts import build_tokenizer, class_prompts, draw_prompts, prompt_table
from minidiff.conditioning.text import Tokenizer, encode_prompts, tokenize
from minidiff.conditioning.unet import ConditionConfig, TextConditionalUNet
from minidiff.sample import predict_eps, sample
from minidiff.schedule import NoiseSchedule
from minidiff.step import StepParams, ddim_coefficients, ddim_step, step
from minidiff.unet import UNetConfig
from minidiff.utils.checkpoint import load_model
from test_layers import GRAD_TOL, numerical_grad, rel_error
from test_train import TINY, _cfg, _train, toy_data  # noqa: F401  (toy_data is a fixture)
from test_unet import randomize

TOY_TEXT = dict(text_cond="add", prompt_set="toy", text_len=8, text_dim=16, text_layers=1, text_heads=2)

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def toy_prompts(monkeypatch):
    """The toy data set's 4 classes get MNIST's words and templates for the digits 0..3."""
    monkeypatch.setitem(prompts.CLASS_WORDS, "toy", prompts.CLASS_WORDS["mnist"][:4])
    monkeypatch.setitem(prompts.TEMPLATES, "toy", prompts.TEMPLATES["mnist"])


def test_templates_cover_every_class_and_held_out_words_are_known():
    for dataset in prompts.TEMPLATES:
        tok = build_tokenizer(dataset)
        for split in ("train", "held_out"):
            table = class_prompts(dataset, split)
            assert len(table) == 10 and len({len(row) for row in table}) == 1
            _, unknown = tok.encode([p for row in table for p in row], 16)
            assert not any(unknown), f"{dataset} {split}: words outside the training vocabulary: {unknown}"
        train_set = {p for row in class_prompts(dataset, "train") for p in row}
        assert not train_set & {p for row in class_prompts(dataset, "held_out") for p in row}
    assert "a handwritten seven" in class_prompts("mnist")[7] and "手写数字七" in class_prompts("mnist")[7]
    assert max(len(tokenize(p)) for row in class_prompts("mnist") for p in row) < 16


def test_draw_prompts_uses_the_label_and_drops_to_the_empty_prompt():
    tok = build_tokenizer("mnist")
    table = prompt_table(tok, "mnist", "train", 16)
    labels = np.arange(2000) % 10
    ids = draw_prompts(table, labels, 0.1, np.random.default_rng(0))
    empty = (ids[:, 1:] == 0).all(axis=1)
    assert ids.shape == (2000, 16) and (ids[:, 0] == Tokenizer(tok.vocab[2:]).vocab.index("<cls>")).all()
    assert 0.07 < empty.mean() < 0.13                               # p_uncond = 0.1
    texts = tok.decode(ids[~empty])
    for text, c in zip(texts, labels[~empty]):
        assert text in class_prompts("mnist")[c]
    assert np.array_equal(table[:, :, 0], np.ones((10, table.shape[1])))


@pytest.mark.parametrize("mode", ["add", "concat"])
def test_text_unet_gradcheck(mode):
    """Finite differences (float64) through the U-Net and the text encoder, both conditioning modes."""
    rng = np.random.default_rng(0)
    cfg = UNetConfig(in_channels=1, resolution=8, base_channels=16, ch_mult=(1, 2), num_res_blocks=1,
                     attn_resolutions=(4,))
    cond = ConditionConfig(text_cond=mode, vocab_size=7, text_len=5, text_dim=8, text_layers=1, text_heads=2,
                           text_channels=3)
    m = TextConditionalUNet(cfg, cond, seed=1, dtype=np.float64)
    randomize(m, rng)
    x = rng.standard_normal((2, 1, 8, 8))
    t, y = np.array([3, 900]), np.array([[1, 2, 5, 0, 0], [1, 6, 3, 4, 2]])
    R = rng.standard_normal(x.shape)
    loss = lambda: float(np.sum(m.forward(x, t, y) * R))  # noqa: E731
    m.zero_grad()
    m.forward(x, t, y)
    dx = m.backward(R)
    errors = {"x": rel_error(dx.ravel()[:40], numerical_grad(loss, x, range(40), h=1e-4))}
    text_params = [k for k in m.params if k.startswith("text_")]
    for name in text_params:
        p = m.params[name]
        entries = rng.choice(p.size, size=min(4, p.size), replace=False)
        errors[name] = rel_error(m.grads[name].ravel()[entries], numerical_grad(loss, p, entries, h=1e-4))
    errors = {k: v for k, v in errors.items() if not (k.endswith(".k.bias") and np.abs(m.grads[k]).max() < 1e-12)}
    assert len(text_params) > 15 and any("text_enc" in k for k in errors)
    bad = {k: v for k, v in errors.items() if not v < GRAD_TOL}
    assert not bad, bad


@pytest.mark.parametrize("mode", ["add", "concat"])
def test_the_prompt_changes_the_prediction_and_none_means_the_empty_prompt(mode):
    cfg = UNetConfig(in_channels=1, resolution=8, base_channels=16, ch_mult=(1, 2), num_res_blocks=1,
                     attn_resolutions=())
    m = TextConditionalUNet(cfg, ConditionConfig(text_cond=mode, vocab_size=7, text_len=5, text_dim=8, text_layers=1,
                                                 text_heads=2), seed=1)
    randomize(m, np.random.default_rng(1))
    m.train(False)
    x = np.random.default_rng(2).standard_normal((2, 1, 8, 8)).astype(np.float32)
    t = np.array([10, 10])
    a = m.forward(x, t, np.array([[1, 2, 0, 0, 0]] * 2))
    b = m.forward(x, t, np.array([[1, 3, 0, 0, 0]] * 2))
    assert not np.allclose(a, b)
    assert np.array_equal(m.forward(x, t), m.forward(x, t, m.null_condition(2)))
    with pytest.raises(ValueError, match="token ids"):
        m.forward(x, t, np.array([1, 2]))


def test_guidance_limits_in_the_kernel_and_the_sampler(toy_data, toy_prompts, tmp_path):
    """eps_u + w (eps_c - eps_u): w = 0 gives the unconditional model, w = 1 the conditional one, both in the
    fused step and in whole sampling runs (doubled batch vs. a single conditional or unconditional batch)."""
    rng = np.random.default_rng(0)
    eps_c, eps_u, x = (rng.standard_normal((2, 1, 6, 6)).astype(np.float32) for _ in range(3))
    z = rng.standard_normal(x.shape).astype(np.float32)
    s10 = NoiseSchedule(10)
    coefs = ddim_coefficients(s10, 7, 3, 0.5)
    steps = [lambda e, eps_u=None, w=1.0: ddim_step(s10, x, e, 7, 3, 0.5, z, True, eps_u, w),    # the paper's form
             lambda e, eps_u=None, w=1.0: step(x, e, StepParams(coefs, w, True, 4, 7), eps_uncond=eps_u)[0],
             lambda e, eps_u=None, w=1.0: step.reference(x, e, StepParams(coefs, w, True, 4, 7), eps_uncond=eps_u)[0]]
    for one_step in steps:
        assert np.allclose(one_step(eps_c, eps_u, 0.0), one_step(eps_u), atol=1e-6)
        assert np.allclose(one_step(eps_c, eps_u, 1.0), one_step(eps_c), atol=1e-6)
        assert not np.allclose(one_step(eps_c, eps_u, 3.0), one_step(eps_c), atol=1e-3)

    cond = ConditionConfig(**TOY_TEXT, vocab_size=len(build_tokenizer("toy")))
    _train(_cfg(toy_data, tmp_path, 2), UNetConfig(**TINY), cond, progress=False)
    model, sched, meta = load_model(str(tmp_path / "checkpoint.npz"))
    ids = encode_prompts(model.tokenizer, ["a handwritten two", "数字3"], 8)
    kw = dict(sampler="ddim", num_steps=3, seed=0, progress=False)
    w0 = sample(model, sched, 2, y=ids, guidance=0.0, **kw)
    assert np.allclose(w0, sample(model, sched, 2, **kw), atol=1e-5)                    # unconditional
    w1 = sample(model, sched, 2, y=ids, guidance=1.0 - 1e-7, **kw)    # doubled batch (w <= 1: eps kept)
    assert np.allclose(w1, sample(model, sched, 2, y=ids, guidance=1.0, **kw), atol=1e-5)  # conditional only
    e_c, e_u = predict_eps(model, sched, w0, np.array([5, 5]), ids, model.null_condition(2))
    assert e_u is not None and not np.allclose(e_c, e_u)


@pytest.mark.parametrize("mode", ["add", "concat"])
def test_train_with_prompts_and_sample_from_prompts(toy_data, toy_prompts, tmp_path, mode):
    cond = ConditionConfig(**dict(TOY_TEXT, text_cond=mode), vocab_size=len(build_tokenizer("toy")))
    losses = []
    _train(_cfg(toy_data, tmp_path, 3), UNetConfig(**TINY), cond, progress=False,
           callback=lambda s, l: losses.append(l))
    assert len(losses) == 3 and all(np.isfinite(losses))
    model, _, meta = load_model(str(tmp_path / "checkpoint.npz"))
    assert model.tokenizer.vocab == build_tokenizer("toy").vocab          # the vocabulary is in the checkpoint
    mod = _script("mnist_sample")
    out = tmp_path / "p.png"
    mod.main([str(tmp_path / "checkpoint.npz"), "--sampler", "ddim", "--steps", "2", "-n", "3", "--out", str(out),
              "--prompt", "a handwritten three", "--prompt", "手写数字一", "--guidance", "3"])
    assert np.load(tmp_path / "p.npy").shape == (6, 1, 14, 14) and out.stat().st_size > 100
    with pytest.raises(SystemExit, match="no word the text encoder knows.*handwritten"):
        mod.main([str(tmp_path / "checkpoint.npz"), "--prompt", "purple cat", "-n", "1", "--out", str(out)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod.main([str(tmp_path / "checkpoint.npz"), "--sampler", "ddim", "--steps", "2", "-n", "1", "--out",
                  str(out), "--prompt", "a fluffy handwritten three"])
    assert any("fluffy" in str(w.message) for w in caught)


@pytest.fixture
def toy_split(toy_data, monkeypatch):
    """Adds a 'test' split (16 more squares) to the toy data set."""
    from minidiff.utils import data
    from test_train import _write_idx, toy_images
    images, labels = toy_images(16, seed=1)
    md5 = dict(data.DATASETS["toy"]["md5"])
    for name, arr, magic in (("t10k-images-idx3-ubyte", images, 0x803), ("t10k-labels-idx1-ubyte", labels, 0x801)):
        path = Path(toy_data) / (name + ".gz")
        _write_idx(path, arr, magic)
        md5[name] = (data._md5(path.read_bytes()), "0" * 32)
    monkeypatch.setitem(data.DATASETS, "toy", dict(data.DATASETS["toy"], md5=md5))
    return toy_data


def test_eval_command_on_a_checkpoint_and_on_samples(toy_split, toy_prompts, tmp_path):
    """examples/mnist_eval.py end to end: classifier, bound (exact and Monte Carlo), samplers, JSON, plot."""
    import json
    from minidiff.evaluation.classifier import save_classifier, train_classifier
    from minidiff.utils.data import load_dataset, to_model_range
    x, y = load_dataset("toy", "train", toy_split)
    clf = train_classifier(to_model_range(x), y.astype(np.int64), epochs=1, batch_size=16, progress=False)
    save_classifier(clf, str(tmp_path / "clf.npz"), meta=dict(test_accuracy=1.0))
    _train(_cfg(toy_split, tmp_path / "uncond", 2, guide_step=1), UNetConfig(**TINY), progress=False)
    mod = _script("mnist_eval")
    common = ["--classifier", str(tmp_path / "clf.npz"), "--dataset", "toy", "--data-dir", toy_split,
              "--out-dir", str(tmp_path / "eval")]
    mod.main([str(tmp_path / "uncond" / "checkpoint.npz"), "--samplers", "ddim2,ddpm", "-n", "8", "--bpd-exact", "2",
              "--bpd-mc", "8", "--json", str(tmp_path / "e.json")] + common)
    res = json.loads((tmp_path / "e.json").read_text())
    assert [r["sampler"] for r in res["rows"]] == ["ddim2", "ddpm"]
    for r in res["rows"]:
        assert r["n"] == 8 and r["frechet"] >= 0 and r["frechet_floor"] >= 0 and 0 < r["confidence"] <= 1
        assert 0 <= r["class_entropy"] <= 2 and "prompted_accuracy" not in r
        assert len(r["class_fractions"]) == 10 and r["max_class_fraction"] == max(r["class_fractions"])
        assert 0 <= r["confident_fraction"] <= 1 and r["frechet_over_floor"] == r["frechet"] / r["frechet_floor"]
    mod.main([str(tmp_path / "uncond" / "checkpoint.npz"), "--samplers", "dpmsolver++2", "-n", "8", "--bpd-exact", "0",
              "--bpd-mc", "0", "--autoguidance", "1,2", "--json", str(tmp_path / "g.json")] + common)
    rows = json.loads((tmp_path / "g.json").read_text())["rows"]      # w = 1 is the model alone, unguided
    assert [(r["sampler"], r["guidance"]) for r in rows] == [("dpmsolver++2", 1), ("dpmsolver++2/guide", 2)]
    b = res["bound"]
    assert b["exact_bpd"] > 0 and b["mc_se"] > 0 and (tmp_path / "eval" / "bpd_terms.png").stat().st_size > 500

    np.save(tmp_path / "s.npy", to_model_range(x[:8]))
    np.save(tmp_path / "l.npy", y[:8].astype(np.int64))
    mod.main([str(tmp_path / "s.npy"), "--labels", str(tmp_path / "l.npy"), "--json", str(tmp_path / "s.json")]
             + common)
    row = json.loads((tmp_path / "s.json").read_text())["rows"][0]
    assert row["prompted_accuracy"] == pytest.approx(float((predict_labels(clf, x[:8]) == y[:8]).mean()))

    cond = ConditionConfig(**TOY_TEXT, vocab_size=len(build_tokenizer("toy")))
    _train(_cfg(toy_split, tmp_path / "text", 2), UNetConfig(**TINY), cond, progress=False)
    mod.main([str(tmp_path / "text" / "checkpoint.npz"), "--samplers", "ddim2", "-n", "4", "--bpd-exact", "0",
              "--bpd-mc", "0", "--guidance", "0,3", "--prompts", "train,held_out", "--json", str(tmp_path / "t.json")]
             + common)
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [(r["prompts"], r["guidance"]) for r in rows] == [("train", 0), ("train", 3), ("held_out", 0),
                                                             ("held_out", 3)]
    assert all(0 <= r["prompted_accuracy"] <= 1 for r in rows)
    np.save(tmp_path / "l_short.npy", y[:3].astype(np.int64))
    with pytest.raises(SystemExit, match="labels must have one class per image"):
        mod.main([str(tmp_path / "s.npy"), "--labels", str(tmp_path / "l_short.npy")] + common)
    (tmp_path / "bad.npy").write_bytes(b"not a numpy file")
    with pytest.raises(SystemExit, match="error:"):
        mod.main([str(tmp_path / "bad.npy")] + common)
    with pytest.raises(SystemExit, match="unknown sampler"):
        mod.main([str(tmp_path / "uncond" / "checkpoint.npz"), "--samplers", "ddim", "--bpd-mc", "0",
                  "--bpd-exact", "0"] + common)
    with pytest.raises(SystemExit, match="for conditional models"):     # not silently ignored
        mod.main([str(tmp_path / "uncond" / "checkpoint.npz"), "--samplers", "ddim2", "--guidance", "2",
                  "--bpd-mc", "0", "--bpd-exact", "0"] + common)
    with pytest.raises(SystemExit, match="bpd_exact|exact_images must be an integer >= 0"):
        mod.main([str(tmp_path / "uncond" / "checkpoint.npz"), "--samplers", "ddim2", "--bpd-exact", "-1",
                  "--bpd-mc", "0"] + common)


def predict_labels(clf, x_uint8):
    from minidiff.evaluation.classifier import predict
    from minidiff.utils.data import to_model_range
    return predict(clf, to_model_range(x_uint8))[0]
