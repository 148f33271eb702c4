"""End to end on a tiny model and a synthetic IDX data set: train, checkpoint, resume bit for bit, sample, PNG."""
import gzip
import os
import signal
import struct

import numpy as np
import pytest

from minidiff import fast
from minidiff.conditioning.unet import ConditionConfig, build_unet
from minidiff.sample import sample
from minidiff.train import TrainConfig, TrainingError, train
from minidiff.unet import UNetConfig
from minidiff.utils import data
from minidiff.utils.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from minidiff.utils.image import save_grid

TINY = dict(base_channels=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(7,), resolution=14)


def _write_idx(path, arr, magic):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def toy_images(n, seed):
    """n 14x14 uint8 images of a bright square whose quadrant is the label (0..3), and the labels."""
    labels = np.random.default_rng(seed).integers(0, 4, n).astype(np.uint8)
    images = np.zeros((n, 14, 14), np.uint8)
    for i, y in enumerate(labels):  # a loop over a handful of test images
        r, c = divmod(int(y), 2)
        images[i, 2 + 6 * r:6 + 6 * r, 2 + 6 * c:6 + 6 * c] = 255
    return images, labels


@pytest.fixture
def toy_data(tmp_path, monkeypatch):
    """A 14x14 'toy' data set of 64 images (a bright square whose position is the label), as IDX files."""
    images, labels = toy_images(64, seed=0)
    d = tmp_path / "toy"
    d.mkdir()
    md5 = {}
    for name, arr, magic in (("train-images-idx3-ubyte", images, 0x803), ("train-labels-idx1-ubyte", labels, 0x801)):
        _write_idx(d / (name + ".gz"), arr, magic)
        md5[name] = (data._md5((d / (name + ".gz")).read_bytes()), "0" * 32)
    spec = dict(data.DATASETS["mnist"], md5=dict(data.DATASETS["mnist"]["md5"], **md5), mirrors=[])
    monkeypatch.setitem(data.DATASETS, "toy", spec)
    return str(d)


def _cfg(toy_data, out, steps, **kw):
    return TrainConfig(dataset="toy", data_dir=toy_data, out_dir=str(out), steps=steps, batch_size=8, lr=2e-3,
                       warmup_steps=2, num_train_timesteps=50, log_every=2, sample_every=0, ckpt_every=100,
                       num_sample_images=4, **kw)


def _train(cfg, mcfg, cond=None, **kw):
    """train() on a fresh network of this configuration, initialised from the run's seed."""
    return train(cfg, build_unet(mcfg, cond, seed=cfg.seed), **kw)


def reference_sample(*args, **kw):
    """sample() with the readable NumPy reference of the step instead of its fused kernel."""
    with fast.use_reference("step.step"):
        return sample(*args, **kw)


def _example(name):
    """The module of examples/<name>.py, imported from its file."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(f"{name}_example",
                                                  Path(__file__).resolve().parents[1] / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a) and set(a) == set(b)


def test_train_resume_is_bit_identical(toy_data, tmp_path):
    mcfg = UNetConfig(**TINY)
    full, _, step = _train(_cfg(toy_data, tmp_path / "full", 6), mcfg, progress=False)
    assert step == 6
    # interrupted at step 3 (run ends), then resumed to 6
    _train(_cfg(toy_data, tmp_path / "split", 3), mcfg, progress=False)
    resumed, _, step = _train(_cfg(toy_data, tmp_path / "split", 6), mcfg, resume=True, progress=False)
    assert step == 6
    assert _same(full.params, resumed.params)
    a = load_checkpoint(str(tmp_path / "full" / "checkpoint.npz"))
    b = load_checkpoint(str(tmp_path / "split" / "checkpoint.npz"))
    assert _same(a["ema"], b["ema"]) and _same(a["opt"], b["opt"])
    assert a["meta"]["step"] == 6 and a["meta"]["config"]["model"]["base_channels"] == 8
    # the training actually changed the weights
    fresh = load_model(str(tmp_path / "full" / "checkpoint.npz"), weights="raw")[0]
    assert _same(fresh.params, full.params)


def test_ctrl_c_saves_and_resume_continues(toy_data, tmp_path):
    mcfg = UNetConfig(**TINY)
    reference, _, _ = _train(_cfg(toy_data, tmp_path / "ref", 5), mcfg, progress=False)

    def interrupt(step, loss):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends

    _, _, step = _train(_cfg(toy_data, tmp_path / "int", 5), mcfg, progress=False, callback=interrupt)
    assert step == 2
    assert load_checkpoint(str(tmp_path / "int" / "checkpoint.npz"))["meta"]["step"] == 2
    resumed, _, step = _train(_cfg(toy_data, tmp_path / "int", 5), mcfg, resume=True, progress=False)
    assert step == 5 and _same(reference.params, resumed.params)


def test_resume_with_other_architecture_fails_clearly(toy_data, tmp_path):
    _train(_cfg(toy_data, tmp_path, 1), UNetConfig(**TINY), progress=False)
    with pytest.raises(CheckpointError, match="base_channels: checkpoint 8 vs now 16"):
        _train(_cfg(toy_data, tmp_path, 2), UNetConfig(**dict(TINY, base_channels=16)), resume=True, progress=False)
    with pytest.raises(CheckpointError, match="lr"):
        cfg = _cfg(toy_data, tmp_path, 2)
        cfg.lr = 1.0
        _train(cfg, UNetConfig(**TINY), resume=True, progress=False)


class NoSync(np.ndarray):
    """A NumPy array that refuses to become a Python number: reading a GPU array back costs a synchronisation.
    What NumPy functions return from it (einsum, vdot...) is a NoSync too."""
    def _refuse(self, *a, **k):
        raise AssertionError("the training step read a value back to the host")
    __float__ = __int__ = __bool__ = __index__ = item = tolist = _refuse

    def __array_function__(self, func, types, args, kwargs):
        out = super().__array_function__(func, types, args, kwargs)
        return np.asarray(out).view(NoSync) if isinstance(out, (np.ndarray, np.generic)) else out


def test_training_step_reads_nothing_back():
    """TrainStep (forward, loss, backward, clipping, Adam, EMA) with every array that lives on the device made a
    NoSync: no value is read back (on a GPU: no host synchronisation inside a step). Timesteps and labels are host
    arrays, checked before they are used."""
    from minidiff.optim import EMA, Adam
    from minidiff.schedule import NoiseSchedule
    from minidiff.train_step import TrainStep
    model = build_unet(UNetConfig(**TINY), ConditionConfig(num_classes=4), seed=0)
    model._set_flat(model.params.flat.view(NoSync), model.grads.flat.view(NoSync))   # every layer's views too
    assert type(model.conv_in.params["weight"]) is NoSync
    opt, ema = Adam(model.params, model.grads, lr=1e-3), EMA(model.params)
    assert type(opt.m.flat) is NoSync and type(ema.params.flat) is NoSync
    schedule = NoiseSchedule(50)
    ts = TrainStep(model, opt, ema, schedule, 1.0)
    assert {k[0] for k in schedule._tables} == {"sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"}  # made now
    ts.loss, ts.grad_norm = ts.loss.view(NoSync), ts.grad_norm.view(NoSync)
    rng = np.random.default_rng(0)
    before = model.params["conv_in.weight"].copy()
    x0, noise = (rng.standard_normal((3, 1, 14, 14)).astype(np.float32).view(NoSync) for _ in range(2))
    for _ in range(2):
        ts(x0, np.array([0, 7, 49]), noise, np.array([0, 4, 2]), 1e-3)
    assert type(ts.loss) is NoSync and not np.array_equal(np.asarray(model.params["conv_in.weight"]), before)
    with pytest.raises(ValueError, match="class labels"):
        ts(x0, np.array([0, 7, 49]), noise, np.array([0, 5, 2]), 1e-3)
    with pytest.raises(ValueError, match="ints in"):
        ts(x0, np.array([0, 7, 50]), noise, np.array([0, 4, 2]), 1e-3)


@pytest.mark.parametrize("ckpt_every", [1, 100])
def test_nan_loss_stops_and_keeps_last_checkpoint(toy_data, tmp_path, monkeypatch, ckpt_every):
    """The loss is read back only every log_every steps (or before a checkpoint or a sample grid); a non-finite
    one then stops training, naming its step, before anything is written from the non-finite state."""
    mcfg = UNetConfig(**TINY)
    cfg = _cfg(toy_data, tmp_path, 2)
    _train(cfg, mcfg, progress=False)
    before = (tmp_path / "checkpoint.npz").read_bytes()
    cfg.steps, cfg.log_every, cfg.ckpt_every = 6, 4, ckpt_every
    import minidiff.train_step
    real = minidiff.train_step.loss_simple

    def nan_loss(*a, **k):
        loss, dout = real(*a, **k)
        return loss * float("nan"), dout                 # the step itself still runs on finite gradients
    monkeypatch.setattr(minidiff.train_step, "loss_simple", nan_loss)
    with pytest.raises(TrainingError, match="loss became nan at step 2"):
        _train(cfg, mcfg, resume=True, progress=False)
    assert (tmp_path / "checkpoint.npz").read_bytes() == before


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver++"])
def test_sample_each_sampler_and_write_png(toy_data, tmp_path, sampler):
    _train(_cfg(toy_data, tmp_path, 2), UNetConfig(**TINY), progress=False)
    model, sched, meta = load_model(str(tmp_path / "checkpoint.npz"))
    kw = dict(sampler=sampler, num_steps=5, seed=1, batch_size=3, progress=False)
    imgs = sample(model, sched, 4, **kw)  # fused kernel when built, else the NumPy reference
    assert imgs.shape == (4, 1, 14, 14) and imgs.dtype == np.float32 and np.all(np.abs(imgs) <= 1)
    again = sample(model, sched, 4, **kw)
    assert np.array_equal(imgs, again)                      # seeded and reproducible
    ref = reference_sample(model, sched, 4, **kw)
    assert np.allclose(imgs, ref, atol=1e-4)                # same images from the kernel and the NumPy reference
    path = save_grid(imgs, str(tmp_path / f"{sampler}.png"))
    assert os.path.getsize(path) > 100


def test_checkpoint_atomic_and_corrupt(tmp_path):
    path = str(tmp_path / "c.npz")
    save_checkpoint(path, {"w": np.ones(3, np.float32)}, meta=dict(step=1))
    good = open(path, "rb").read()

    class Boom(Exception):
        pass

    class Exploding(dict):
        def items(self):
            raise Boom
    with pytest.raises(Boom):
        save_checkpoint(path, Exploding(w=1))
    assert open(path, "rb").read() == good and os.listdir(tmp_path) == ["c.npz"]  # no temp file left behind
    open(path, "wb").write(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.npz"))
    np.savez(path, x=np.zeros(2))
    with pytest.raises(CheckpointError, match="unexpected entry"):
        load_checkpoint(path)
    import pickle
    for garbage in (pickle.dumps({"params": 1}), None):      # a pickle, and an .npz holding a pickled object
        if garbage is None:
            np.savez(path, meta=np.array([{"a": 1}], dtype=object))
        else:
            open(path, "wb").write(garbage)
        with pytest.raises(CheckpointError, match="pickled Python objects") as e:
            load_checkpoint(path)
        assert "allow_pickle" not in str(e.value)


def test_sample_example_writes_png_and_npy(toy_data, tmp_path):
    """examples/mnist_sample.py end to end on a tiny checkpoint (EMA weights, DDIM)."""
    _train(_cfg(toy_data, tmp_path, 2), UNetConfig(**TINY), progress=False)
    mod = _example("mnist_sample")
    out = tmp_path / "grid.png"
    mod.main([str(tmp_path / "checkpoint.npz"), "--sampler", "ddim", "--steps", "3", "-n", "5", "--out", str(out)])
    assert out.stat().st_size > 100 and np.load(tmp_path / "grid.npy").shape == (5, 1, 14, 14)
    for n in ("0", "-3"):                                          # no silent default for a count of nothing
        with pytest.raises(SystemExit):
            mod.main([str(tmp_path / "checkpoint.npz"), "-n", n])
    with pytest.raises(SystemExit, match="class-conditional"):
        mod.main([str(tmp_path / "checkpoint.npz"), "--class-label", "3", "-n", "2"])
    with pytest.raises(SystemExit, match="no guide weights"):      # trained without guide_step
        mod.main([str(tmp_path / "checkpoint.npz"), "--autoguidance", "2", "-n", "2"])
    with pytest.raises(SystemExit, match="for conditional models"):   # classifier-free guidance needs a condition
        mod.main([str(tmp_path / "checkpoint.npz"), "--guidance", "2", "-n", "2"])


@pytest.mark.parametrize("args, message", [(["--steps", "20"], "--steps is for --sampler ddim or dpmsolver++"),
                                           (["--sampler", "ddim", "--variance", "fixed_large"], "--variance is for"),
                                           (["--sampler", "dpmsolver++", "--eta", "1"], "--eta is for --sampler ddim"),
                                           (["--guidance", "2", "--autoguidance", "2"], "not both")])
def test_sample_example_rejects_options_that_would_do_nothing(tmp_path, capsys, args, message):
    """mnist_sample.py: an option its sampler ignores is an error before any checkpoint is read (--steps 20 with the
    default DDPM sampler would silently take all 1,000 steps)."""
    with pytest.raises(SystemExit):
        _example("mnist_sample").main([str(tmp_path / "missing.npz")] + args)
    assert message in capsys.readouterr().err


def test_class_conditional_training_and_guided_sampling(toy_data, tmp_path):
    """Classifier-free guidance end to end: labels dropped to the null class with p_uncond during training;
    sampling runs the conditional and unconditional predictions in one doubled batch; w = 1 is conditional."""
    _train(_cfg(toy_data, tmp_path, 2, p_uncond=0.5), UNetConfig(**TINY), ConditionConfig(num_classes=4),
           progress=False)
    model, sched, _ = load_model(str(tmp_path / "checkpoint.npz"))
    y = np.array([0, 1, 2, 3])
    kw = dict(sampler="ddim", num_steps=4, seed=0, progress=False, y=y)
    guided = sample(model, sched, 4, guidance=3.0, **kw)
    assert guided.shape == (4, 1, 14, 14) and np.all(np.isfinite(guided))
    assert np.allclose(guided, reference_sample(model, sched, 4, guidance=3.0, **kw), atol=1e-4)
    assert not np.allclose(guided, sample(model, sched, 4, guidance=1.0, **kw))
    mod = _example("mnist_sample")                                 # no --class-label: the classes in turn
    mod.main([str(tmp_path / "checkpoint.npz"), "--sampler", "ddim", "--steps", "4", "-n", "6", "--no-progress"])
    drawn = np.load(tmp_path / "samples_ddim4_seed0.npy")
    assert np.allclose(drawn, sample(model, sched, 6, guidance=3.0, **dict(kw, y=np.arange(6) % 4)), atol=1e-6)


def test_guide_step_keeps_the_ema_of_that_step_and_resume_keeps_it(toy_data, tmp_path):
    """guide_step: the checkpoint's guide/ section is the EMA weights after that step (a run that ends there has
    them as its EMA), from then on, across a resume; load_model(path, "guide") loads them, and a checkpoint
    without them says so."""
    mcfg = UNetConfig(**TINY)
    _train(_cfg(toy_data, tmp_path / "short", 2), mcfg, progress=False)
    _train(_cfg(toy_data, tmp_path / "full", 5, guide_step=2), mcfg, progress=False)
    _train(_cfg(toy_data, tmp_path / "split", 3, guide_step=2), mcfg, progress=False)
    _train(_cfg(toy_data, tmp_path / "split", 5, guide_step=2), mcfg, resume=True, progress=False)
    short, full, split = (load_checkpoint(str(tmp_path / d / "checkpoint.npz")) for d in ("short", "full", "split"))
    assert short["guide"] == {} and _same(full["guide"], short["ema"]) and _same(split["guide"], full["guide"])
    assert not _same(full["ema"], full["guide"])                  # the EMA went on moving after the snapshot
    guide = load_model(str(tmp_path / "full" / "checkpoint.npz"), weights="guide")[0]
    assert _same(guide.params, short["ema"])
    with pytest.raises(CheckpointError, match="no guide weights"):
        load_model(str(tmp_path / "short" / "checkpoint.npz"), weights="guide")


def test_autoguidance_uses_the_guide_in_place_of_the_unconditional_model(toy_data, tmp_path):
    """sample(guide=g, guidance=w) steps with eps_g + w (eps - eps_g): w = 0 samples the guide alone, w = 1 the
    model alone, and a guide equal to the model changes nothing; the fused kernel equals the NumPy reference."""
    _train(_cfg(toy_data, tmp_path, 4, guide_step=1), UNetConfig(**TINY), progress=False)
    path = str(tmp_path / "checkpoint.npz")
    model, sched, _ = load_model(path)
    guide = load_model(path, weights="guide")[0]
    for sampler in ("ddim", "dpmsolver++"):
        kw = dict(sampler=sampler, num_steps=5, seed=2, progress=False, clip_sample=False)
        plain, of_guide = sample(model, sched, 3, **kw), sample(guide, sched, 3, **kw)
        assert not np.allclose(plain, of_guide, atol=1e-3)
        assert np.allclose(sample(model, sched, 3, guide=guide, guidance=0.0, **kw), of_guide, atol=1e-5)
        assert np.allclose(sample(model, sched, 3, guide=guide, guidance=1.0, **kw), plain, atol=1e-5)
        assert np.allclose(sample(model, sched, 3, guide=model, guidance=2.0, **kw), plain, atol=1e-5)
        kw["clip_sample"] = True
        guided = sample(model, sched, 3, guide=guide, guidance=2.0, **kw)
        assert np.allclose(guided, reference_sample(model, sched, 3, guide=guide, guidance=2.0, **kw),
                           atol=1e-4)
        assert not np.allclose(guided, sample(model, sched, 3, **kw), atol=1e-3)


def test_min_snr_weights_closed_form():
    """Min-SNR-gamma (Hang et al.): w_t = min(SNR, gamma) / SNR for eps, / (SNR + 1) for v; uniform is 1."""
    from minidiff.schedule import NoiseSchedule
    from minidiff.train_step import loss_weights
    sched = NoiseSchedule(1000)
    snr = sched.alphas_cumprod / (1 - sched.alphas_cumprod)
    w = loss_weights(sched, "epsilon", "min_snr", 5.0)
    assert snr[0] > 5 > snr[-1]
    assert w[0] == pytest.approx(5.0 / snr[0]) and w[-1] == 1.0                    # capped at high SNR, 1 below
    wv = loss_weights(sched, "v_prediction", "min_snr", 5.0)
    assert wv[0] == pytest.approx(5.0 / (snr[0] + 1)) and wv[-1] == pytest.approx(snr[-1] / (snr[-1] + 1))
    assert np.all(loss_weights(sched) == 1.0)
    with pytest.raises(ValueError, match="weighting"):
        loss_weights(sched, weighting="snr")


@pytest.mark.parametrize("prediction, weighting", [("v_prediction", "uniform"), ("epsilon", "min_snr"),
                                                    ("v_prediction", "min_snr")])
def test_train_other_targets_and_weightings(toy_data, tmp_path, prediction, weighting):
    """v-prediction and Min-SNR weighting train (the loss falls), resume exactly, and sample: the sampler turns the
    network's v into eps (diffusion.eps_from_velocity), kernel and reference alike."""
    mcfg = UNetConfig(**dict(TINY, prediction_type=prediction))
    losses = []
    cfg = _cfg(toy_data, tmp_path / "a", 12, loss_weighting=weighting, lr_schedule="cosine")
    full, _, _ = _train(cfg, mcfg, progress=False, callback=lambda s, loss: losses.append(float(loss)))
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    cfg_b = _cfg(toy_data, tmp_path / "b", 12, loss_weighting=weighting, lr_schedule="cosine")
    # interrupted half way (the cosine's horizon is the configured 12 steps), then resumed
    _train(cfg_b, mcfg, progress=False, callback=lambda s, loss: s == 6 and os.kill(os.getpid(), signal.SIGINT))
    resumed, _, _ = _train(cfg_b, mcfg, resume=True, progress=False)
    assert _same(full.params, resumed.params)
    model, sched, _ = load_model(str(tmp_path / "a" / "checkpoint.npz"))
    assert model.config.prediction_type == prediction
    kw = dict(sampler="ddim", num_steps=4, seed=0, progress=False)
    imgs = sample(model, sched, 3, **kw)
    assert np.all(np.isfinite(imgs)) and np.allclose(imgs, reference_sample(model, sched, 3, **kw),
                                                     atol=1e-4)


def test_v_model_samples_like_the_eps_model_it_is_equivalent_to():
    """A network whose v output is exactly the v of an eps-network's prediction samples the same images."""
    from minidiff.diffusion import velocity
    from minidiff.schedule import NoiseSchedule
    from minidiff.unet import UNet
    sched = NoiseSchedule(50)
    eps_net = UNet(UNetConfig(**TINY), seed=0).train(False)
    rng = np.random.default_rng(0)
    for p in eps_net.params.values():
        p[...] = rng.standard_normal(p.shape) * 0.05

    class VNet:
        config = UNetConfig(**dict(TINY, prediction_type="v_prediction"))
        training = False

        def train(self, mode):
            return self

        def forward(self, x_t, t, y=None):              # v of the x_0 and eps that eps_net implies
            eps = eps_net.forward(x_t, t, y)
            a = np.sqrt(sched.alphas_cumprod[t]).reshape(-1, 1, 1, 1)
            x0 = (x_t - np.sqrt(1 - a ** 2) * eps) / a
            return velocity(sched, x0, t, eps).astype(np.float32)
    kw = dict(sampler="ddim", num_steps=5, seed=2, progress=False, clip_sample=False)
    np.testing.assert_allclose(sample(VNet(), sched, 2, **kw), sample(eps_net, sched, 2, **kw), atol=2e-4)


def test_time_budget_stops_and_saves(toy_data, tmp_path):
    """max_minutes: training stops once the budget is spent, with a checkpoint, like Ctrl-C; --resume continues."""
    cfg = _cfg(toy_data, tmp_path, 50, max_minutes=1e-9)
    _, _, step = _train(cfg, UNetConfig(**TINY), progress=False)
    assert step == 1 and load_checkpoint(str(tmp_path / "checkpoint.npz"))["meta"]["step"] == 1
    cfg.max_minutes, cfg.steps = None, 3
    assert _train(cfg, UNetConfig(**TINY), resume=True, progress=False)[2] == 3


@pytest.mark.parametrize("field, value", [("steps", 0), ("batch_size", 0), ("lr", -1e-3), ("lr", float("nan")),
                                          ("ema_decay", 1.0), ("lr_schedule", "linear"), ("max_minutes", -1.0)])
def test_settings_out_of_range_fail_by_name_before_any_work(toy_data, tmp_path, field, value):
    """A setting out of its range is a ValueError naming it: when TrainConfig is built, and in train() when the field
    was changed after (as the examples do), before a file is written; examples/train.py prints it as its error."""
    with pytest.raises(ValueError, match=f"{field} = "):
        TrainConfig(**{field: value})
    cfg = _cfg(toy_data, tmp_path / "run", 2)
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=f"{field} = "):
        _train(cfg, UNetConfig(**TINY), progress=False)
    assert not (tmp_path / "run").exists()
    option = {"steps": ["--steps", "0"], "batch_size": ["--batch-size", "0", "--epochs", "1"], "lr": ["--lr", "-1"],
              "max_minutes": ["--max-minutes", "-1"]}.get(field)
    if option:
        with pytest.raises(SystemExit, match=f"error: training settings out of range: {field} = "):
            _example("train").main(["--data", "toy", "--data-dir", toy_data, "--out-dir", str(tmp_path / "cli"),
                                    "--no-progress"] + option)
        assert not (tmp_path / "cli").exists()
    if field == "steps":                                           # --epochs sets the steps
        with pytest.raises(SystemExit, match="error: --epochs must be > 0, got -1.0"):
            _example("train").main(["--data", "toy", "--data-dir", toy_data, "--epochs", "-1", "--no-progress"])


def test_final_grid_is_silent_with_no_progress(toy_data, tmp_path, capsys):
    """examples/train.py (and mnist_train.py) --no-progress: no progress bar from the final grid's sampler."""
    from types import SimpleNamespace
    mod = _example("train")
    tcfg = _cfg(toy_data, tmp_path, 2, guide_step=1)
    _train(tcfg, UNetConfig(**TINY), progress=False)
    for quiet in (False, True):
        capsys.readouterr()
        args = SimpleNamespace(final_images=4, final_sampler="dpmsolver++", device="cpu", seed=0, autoguidance=2.0,
                               no_progress=quiet)
        mod.final_grid(args, tcfg, 2)
        assert ("img-step" in capsys.readouterr().err) is not quiet
    assert (tmp_path / "final_dpmsolver++.png").stat().st_size > 100


def test_network_options_reach_the_network(toy_data, tmp_path, capsys):
    """examples/train.py --channels, --ch-mult and --res-blocks set the U-Net's layout; a --ch-mult that is not a
    list of integers is a usage error, and one with a level of no channels an error naming ch_mult, before any work."""
    mod = _example("train")
    a = mod.parser().parse_args(["--data", "toy", "--channels", "16", "--ch-mult", "1,2", "--res-blocks", "2"])
    mcfg, _, _ = mod.configure(a, data.load_dataset("toy", "train", data_dir=toy_data, progress=False))
    assert (mcfg.base_channels, mcfg.ch_mult, mcfg.num_res_blocks) == (16, (1, 2), 2)
    with pytest.raises(SystemExit):
        mod.parser().parse_args(["--data", "toy", "--ch-mult", "1,x"])
    assert "argument --ch-mult: invalid channel_multipliers value: '1,x'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="error: ch_mult must be one or more positive channel multipliers"):
        mod.main(["--data", "toy", "--data-dir", toy_data, "--ch-mult", "1,0", "--out-dir", str(tmp_path / "cli"),
                  "--no-progress"])
    assert not (tmp_path / "cli").exists()
