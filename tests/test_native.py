"""The fused native step (C++ now, CUDA with a GPU) against the readable reference, and its error handling."""
import sys
import types

import numpy as np
import pytest

from minidiff import step as step_mod
from minidiff.utils import native as _native
from minidiff.utils.backend import cupy_status
from minidiff.utils.philox import philox_normal
from minidiff.schedule import NoiseSchedule
from minidiff.step import (NativeUnavailableError, ddim_coefficients, ddim_step, ddpm_coefficients, ddpm_step,
                           dpmpp_2m_coefficients, dpmpp_2m_step, fused_step)

STATUS = _native.native_status()
needs_cpu = pytest.mark.skipif(not STATUS["cpu_kernel"], reason=f"native extension unavailable: {STATUS['reason']}")
CUPY_OK, CUPY_WHY = cupy_status()
needs_gpu = pytest.mark.skipif(not (CUPY_OK and STATUS["cuda_kernel"]),
                               reason=f"needs CuPy, a GPU and the CUDA kernel ({CUPY_WHY}; "
                                      f"{STATUS['reason'] or 'CUDA kernel built'})")

SCHEDULE = NoiseSchedule(1000)
SHAPES = [(2, 1, 28, 28), (3, 3, 32, 32), (7,)]


def _inputs(shape, seed=0, guided=False):
    rng = np.random.default_rng(seed)
    x_t = rng.standard_normal(shape).astype(np.float32)
    eps = rng.standard_normal(shape).astype(np.float32)
    eps_u = rng.standard_normal(shape).astype(np.float32) if guided else None
    return x_t, eps, eps_u


def _x0_prev(shape, seed=1):
    """A previous step's x_0 prediction for DPM-Solver++(2M) (beyond [-1, 1], as it is unclipped)."""
    return np.random.default_rng(seed).uniform(-1.5, 1.5, shape).astype(np.float32)


def _cases():
    for shape in SHAPES:
        for guided in (False, True):
            for clip in (True, False):
                for t in (0, 500, 999):
                    for vt in ("fixed_small", "fixed_large"):
                        yield pytest.param("ddpm", dict(t=t, variance_type=vt), shape, guided, clip,
                                           id=f"ddpm-{vt}-t{t}-clip{int(clip)}-g{int(guided)}-{'x'.join(map(str, shape))}")
                for eta in (0.0, 0.5, 1.0):
                    for t, t_prev in ((999, 979), (500, 499), (20, -1)):
                        yield pytest.param("ddim", dict(t=t, t_prev=t_prev, eta=eta), shape, guided, clip,
                                           id=f"ddim-eta{eta}-t{t}-{t_prev}-clip{int(clip)}-g{int(guided)}-"
                                              f"{'x'.join(map(str, shape))}")
                # DPM-Solver++(2M): the first step (no previous x_0), second-order steps (r about 1, 1 and 10), the
                # step into 0 and the last step to -1 (first order although a previous x_0 is given)
                for t_last, t, t_prev in ((None, 999, 899), (999, 899, 799), (550, 500, 450),
                                          (600, 500, 490), (111, 55, 0), (55, 0, -1), (None, 20, -1)):
                    yield pytest.param("dpmpp_2m", dict(t=t, t_prev=t_prev, t_last=t_last), shape, guided, clip,
                                       id=f"dpmpp2m-t{t_last}-{t}-{t_prev}-clip{int(clip)}-g{int(guided)}-"
                                          f"{'x'.join(map(str, shape))}")


def _reference(kind, kw, x_t, eps, z, clip, eps_u, w):
    if kind == "dpmpp_2m":  # deterministic: z unused
        x0_prev = None if kw["t_last"] is None else _x0_prev(x_t.shape)
        return dpmpp_2m_step(SCHEDULE, x_t, eps, kw["t"], kw["t_prev"], x0_prev, kw["t_last"], clip_sample=clip,
                             eps_uncond=eps_u, guidance=w, return_x0=True)
    if kind == "ddpm":
        return ddpm_step(SCHEDULE, x_t, eps, kw["t"], z, kw["variance_type"], clip_sample=clip, eps_uncond=eps_u,
                         guidance=w, return_x0=True)
    return ddim_step(SCHEDULE, x_t, eps, kw["t"], kw["t_prev"], kw["eta"], z, clip_sample=clip, eps_uncond=eps_u,
                     guidance=w, return_x0=True)


def _coefs(kind, kw):
    if kind == "dpmpp_2m":
        return dpmpp_2m_coefficients(SCHEDULE, kw["t"], kw["t_prev"], kw["t_last"])
    if kind == "ddpm":
        return ddpm_coefficients(SCHEDULE, kw["t"], kw["variance_type"])
    return ddim_coefficients(SCHEDULE, kw["t"], kw["t_prev"], kw["eta"])


# ------------------------------------------------------------------ loading and status (no extension needed)
def test_status_is_a_clear_dict():
    assert set(STATUS) == {"cpu_kernel", "cuda_kernel", "reason"}
    if not STATUS["cpu_kernel"]:
        assert "pip install ." in STATUS["reason"]


def test_missing_extension_is_reported_not_raised(monkeypatch):
    monkeypatch.setitem(sys.modules, "minidiff._core", None)  # makes `from . import _core` raise ImportError
    monkeypatch.delattr(sys.modules["minidiff"], "_core", raising=False)
    core, reason = _native._load()
    assert core is None and "pip install ." in reason and "not available" in reason


def test_stale_extension_is_reported(monkeypatch):
    stale = types.ModuleType("minidiff._core")
    stale.ABI_VERSION = _native.ABI_VERSION - 1
    monkeypatch.setitem(sys.modules, "minidiff._core", stale)
    monkeypatch.setattr(sys.modules["minidiff"], "_core", stale, raising=False)
    core, reason = _native._load()
    assert core is None and "stale" in reason and "pip install ." in reason


def test_fused_step_without_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_native, "core", None)
    monkeypatch.setattr(_native, "_reason", "the compiled extension minidiff._core is not available; "
                                            "build it with `pip install .`")
    x_t, eps, _ = _inputs((2, 3))
    with pytest.raises(NativeUnavailableError, match="pip install"):
        fused_step(x_t, eps, ddpm_coefficients(SCHEDULE, 10), seed=0, step=0)
    with pytest.raises(NativeUnavailableError, match="pip install"):
        step_mod.native_normal(0, 0, 8)
    # the reference path does not need it
    ddpm_step(SCHEDULE, x_t, eps, 10, philox_normal(0, 0, x_t.size).reshape(x_t.shape))


# ------------------------------------------------------------------ C++ kernel == reference
@needs_cpu
@pytest.mark.parametrize("kind, kw, shape, guided, clip", list(_cases()))
def test_cpu_kernel_matches_reference(kind, kw, shape, guided, clip):
    x_t, eps, eps_u = _inputs(shape, guided=guided)
    w = 3.0 if guided else 1.0
    coefs = _coefs(kind, kw)
    seed, step = 1234, kw["t"]
    z = philox_normal(seed, step, x_t.size).reshape(shape)
    ref, ref_x0 = _reference(kind, kw, x_t, eps, z, clip, eps_u, w)
    x0_prev = _x0_prev(shape) if kw.get("t_last") is not None else None

    # given z: the same float32 arithmetic, so equal to ~1e-6 relative (in practice bit for bit)
    x0 = np.empty_like(x_t)
    got, _ = fused_step(x_t, eps, coefs, clip_sample=clip, eps_uncond=eps_u, guidance=w, z=z, x0_prev=x0_prev,
                        x0_out=x0)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(x0, ref_x0, rtol=1e-6, atol=1e-6)

    # the kernel's own Philox noise: philox_normal to within 1e-6 (tests/test_philox.py), scaled by sigma <= 1
    own = fused_step(x_t, eps, coefs, seed=seed, step=step, clip_sample=clip, eps_uncond=eps_u, guidance=w,
                     x0_prev=x0_prev)
    np.testing.assert_allclose(own, ref, rtol=1e-6, atol=1e-6)


@needs_cpu
def test_kernel_noise_is_philox_normal():
    # c_x0 = c_xt = c_eps = 0, sigma = 1: x_prev is the kernel's z
    n = 4099
    zero = np.zeros(n, dtype=np.float32)
    coefs = step_mod.StepCoefficients(a=1.0, b=1.0, c_x0=0.0, c_xt=0.0, c_eps=0.0, sigma=1.0)
    z = fused_step(zero, zero, coefs, seed=2 ** 40 + 3, step=2 ** 33 + 5)
    np.testing.assert_allclose(z, philox_normal(2 ** 40 + 3, 2 ** 33 + 5, n), rtol=0, atol=1e-6)
    assert not np.array_equal(z, fused_step(zero, zero, coefs, seed=2 ** 40 + 3, step=2 ** 33 + 6))


@needs_cpu
def test_no_noise_needed_when_sigma_is_zero():
    # deterministic DDIM (eta = 0) and the last DDPM step draw no noise: seed and step may be omitted
    x_t, eps, _ = _inputs((3, 1, 28, 28))
    for kind, kw in [("ddim", dict(t=300, t_prev=250, eta=0.0)), ("ddpm", dict(t=0, variance_type="fixed_large"))]:
        coefs = _coefs(kind, kw)
        assert coefs.sigma == 0.0
        ref = _reference(kind, kw, x_t, eps, None, True, None, 1.0)[0]
        np.testing.assert_allclose(fused_step(x_t, eps, coefs), ref, rtol=1e-6, atol=1e-6)


@needs_cpu
def test_thread_count_does_not_change_results():
    x_t, eps, eps_u = _inputs((64, 3, 32, 32), guided=True)  # large enough to run in parallel
    coefs = ddpm_coefficients(SCHEDULE, 700, "fixed_large")
    runs = [fused_step(x_t, eps, coefs, seed=9, step=700, eps_uncond=eps_u, guidance=2.0, threads=th)
            for th in (1, 0, 2, 5)]
    for r in runs[1:]:
        np.testing.assert_array_equal(r, runs[0])


@needs_cpu
def test_in_place_output():
    x_t, eps, _ = _inputs((4, 1, 28, 28))
    coefs = ddim_coefficients(SCHEDULE, 600, 580, 0.5)
    expected = fused_step(x_t, eps, coefs, seed=1, step=2)
    y = x_t.copy()
    assert fused_step(y, eps, coefs, seed=1, step=2, out=y) is y
    np.testing.assert_array_equal(y, expected)


# ------------------------------------------------------------------ validation
@needs_cpu
def test_validation_errors():
    x_t, eps, _ = _inputs((4, 2, 6))
    c = ddpm_coefficients(SCHEDULE, 100)
    kw = dict(seed=0, step=0)
    with pytest.raises(TypeError, match="float32"):
        fused_step(x_t.astype(np.float64), eps, c, **kw)
    with pytest.raises(TypeError, match="float32"):
        fused_step(x_t, eps.astype(np.float16), c, **kw)
    with pytest.raises(TypeError, match="eps must be a NumPy or CuPy array"):
        fused_step(x_t, eps.tolist(), c, **kw)
    with pytest.raises(ValueError, match="shape"):
        fused_step(x_t, eps[:, :1], c, **kw)
    with pytest.raises(ValueError, match="shape"):
        fused_step(x_t, eps, c, z=np.zeros(x_t.size, np.float32), **kw)
    with pytest.raises(ValueError, match="C-contiguous"):
        fused_step(x_t, np.asfortranarray(eps), c, **kw)
    strided = np.zeros((4, 2, 12), np.float32)[:, :, ::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        fused_step(x_t, eps, c, out=strided, **kw)
    with pytest.raises(ValueError, match="seed and step are required"):
        fused_step(x_t, eps, c)
    for bad in (-1, 2 ** 64, 0.5):
        with pytest.raises(ValueError, match="seed"):
            fused_step(x_t, eps, c, seed=bad, step=0)
    with pytest.raises(ValueError, match="threads"):
        fused_step(x_t, eps, c, threads=-1, **kw)
    read_only = np.empty_like(x_t)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fused_step(x_t, eps, c, out=read_only, **kw)
    # DPM-Solver++(2M)'s previous x_0: checked like the other arrays, and required when its coefficient is not 0
    c2 = dpmpp_2m_coefficients(SCHEDULE, 500, 400, 600)
    with pytest.raises(ValueError, match="x0_prev .* is required"):
        fused_step(x_t, eps, c2)
    with pytest.raises(TypeError, match="x0_prev must be float32"):
        fused_step(x_t, eps, c2, x0_prev=eps.astype(np.float64))
    with pytest.raises(ValueError, match="x0_prev has shape"):
        fused_step(x_t, eps, c2, x0_prev=eps[:1])
    with pytest.raises(ValueError, match="x0_prev must be C-contiguous"):
        fused_step(x_t, eps, c2, x0_prev=np.zeros((4, 2, 12), np.float32)[:, :, ::2])
    fused_step(x_t, eps, dpmpp_2m_coefficients(SCHEDULE, 500, 400), x0_prev=eps)  # c_x0prev = 0: allowed, unused


@needs_cpu
def test_core_checks_arrays_itself():
    # the bindings never trust the caller: bad arrays give Python errors, not memory errors
    core = _native.core
    x = np.zeros(8, np.float32)
    args = dict(a=1.0, b=1.0, c_x0=1.0, c_x0prev=0.5, c_xt=0.0, c_eps=0.0, sigma=0.0, guidance=1.0, clip=True, seed=0,
                step=0, threads=1)
    with pytest.raises(TypeError, match="float32"):
        core.step_cpu(x, np.zeros(8), None, None, None, x.copy(), None, **args)
    with pytest.raises(ValueError, match="elements"):
        core.step_cpu(x, np.zeros(7, np.float32), None, None, None, x.copy(), None, **args)
    with pytest.raises(ValueError, match="C-contiguous"):
        core.step_cpu(x, x, None, None, None, np.zeros(16, np.float32)[::2], None, **args)
    with pytest.raises(TypeError, match="x0_prev must be float32"):
        core.step_cpu(x, x, None, None, np.zeros(8), x.copy(), None, **args)
    with pytest.raises(ValueError, match="x0_prev has 7 elements"):
        core.step_cpu(x, x, None, None, np.zeros(7, np.float32), x.copy(), None, **args)
    with pytest.raises(ValueError, match="x0_prev must be C-contiguous"):
        core.step_cpu(x, x, None, None, np.zeros(16, np.float32)[::2], x.copy(), None, **args)


def test_cupy_array_without_cuda_kernel(monkeypatch):
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    if not CUPY_OK:
        pytest.skip(f"CuPy has no usable GPU: {CUPY_WHY}")
    monkeypatch.setattr(_native, "native_status",
                        lambda: dict(cpu_kernel=True, cuda_kernel=False, reason="built without CUDA; `pip install .`"))
    x = cupy.zeros((2, 3), cupy.float32)
    with pytest.raises(NativeUnavailableError, match="CUDA kernel"):
        fused_step(x, x, ddpm_coefficients(SCHEDULE, 5), seed=0, step=0)


def test_mixed_devices_rejected():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    if not CUPY_OK:
        pytest.skip(f"CuPy has no usable GPU: {CUPY_WHY}")
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="same device"):
        fused_step(x, cupy.asarray(x), ddpm_coefficients(SCHEDULE, 5), seed=0, step=0)


# ------------------------------------------------------------------ CUDA kernel == C++ kernel (GPU machines)
@pytest.mark.parametrize("kind, kw", [("ddpm", dict(t=500, variance_type="fixed_small")),
                                      ("ddpm", dict(t=0, variance_type="fixed_large")),
                                      ("ddim", dict(t=999, t_prev=979, eta=0.5)),
                                      ("dpmpp_2m", dict(t=500, t_prev=450, t_last=550)),
                                      ("dpmpp_2m", dict(t=20, t_prev=-1, t_last=None))])
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.gpu
@needs_gpu
def test_cuda_kernel_matches_cpu(kind, kw, guided):
    import cupy
    x_t, eps, eps_u = _inputs((64, 3, 32, 32), guided=guided)
    x0_prev = _x0_prev(x_t.shape) if kw.get("t_last") is not None else None
    coefs, w = _coefs(kind, kw), (3.0 if guided else 1.0)
    cpu, cpu_x0 = fused_step(x_t, eps, coefs, seed=5, step=kw["t"], eps_uncond=eps_u, guidance=w, x0_prev=x0_prev,
                             x0_out=np.empty_like(x_t))
    g = lambda a: None if a is None else cupy.asarray(a)  # noqa: E731
    gpu, gpu_x0 = fused_step(g(x_t), g(eps), coefs, seed=5, step=kw["t"], eps_uncond=g(eps_u), guidance=w,
                             x0_prev=g(x0_prev), x0_out=cupy.empty(x_t.shape, cupy.float32))
    # same header (our own log/sin/cos too), no FMA contraction on either side: expected bit for bit,
    # asserted to 1e-6 in case a compiler rounds differently
    np.testing.assert_allclose(gpu.get(), cpu, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(gpu_x0.get(), cpu_x0)
    np.testing.assert_allclose(step_mod.native_normal(5, 6, 10001, xp=cupy).get(), philox_normal(5, 6, 10001),
                               rtol=0, atol=1e-6)
    # and the readable reference runs on CuPy as well
    np.testing.assert_allclose(philox_normal(5, 6, 10001, xp=cupy).get(), philox_normal(5, 6, 10001), rtol=0,
                               atol=1e-6)


# ------------------------------------------------------------------ the step record a CUDA graph reads
@needs_cpu
def test_step_params_record_matches_the_kernel_struct():
    """minidiff.step.STEP_PARAMS lays its fields out at the byte offsets of csrc/step_math.h's StepParams."""
    layout = _native.core.step_params_layout()
    assert layout.pop("itemsize") == step_mod.STEP_PARAMS.itemsize
    assert layout == {name: step_mod.STEP_PARAMS.fields[name][1] for name in step_mod.STEP_PARAMS.names}


@needs_cpu
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver++"])
def test_step_records_drive_the_kernel_to_the_same_images(sampler):
    """What a replayed GPU graph reads each step (sample._step_records) gives, fed to the CPU kernel, the images of
    the eager sampler: the records carry the right coefficients, seeds and steps."""
    from minidiff.sample import _step_records, ddim_timesteps, sample
    from minidiff.unet import UNet, UNetConfig
    sched = NoiseSchedule(20)
    model = UNet(UNetConfig(resolution=8, base_channels=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                            num_classes=3), seed=0).train(False)
    rng = np.random.default_rng(0)
    for p in model.params.values():
        p[...] = rng.standard_normal(p.shape) * 0.1
    y, w = np.array([0, 2]), 2.0
    steps = np.arange(19, -1, -1) if sampler == "ddpm" else ddim_timesteps(20, 6)
    kw = dict(sampler=sampler, num_steps=6, seed=3, y=y, guidance=w, progress=False)
    want = sample(model, sched, 2, **kw)
    from minidiff.sample import batch_seed, predict_eps
    x = philox_normal(batch_seed(3, 0), 20, 2 * 64).reshape(2, 1, 8, 8)
    x0_prev = np.zeros_like(x)
    for t, rec in zip(steps, _step_records(sched, sampler, steps, batch_seed(3, 0), "fixed_small", 0.0, True, w)):
        eps, eps_u = predict_eps(model, sched, x, int(t), y, w)
        coefs = step_mod.StepCoefficients(*(float(rec[f]) for f in step_mod.StepCoefficients._fields))
        x, x0_prev = fused_step(x, eps, coefs, seed=int(rec["seed"]), step=int(rec["step"]), clip_sample=bool(rec["clip"]),
                                eps_uncond=eps_u, guidance=float(rec["guidance"]), x0_prev=x0_prev,
                                x0_out=np.empty_like(x))
    np.testing.assert_allclose(x, want, rtol=0, atol=1e-6)
