"""The fused sampling step (step.step's fast paths: C++ now, CUDA with a GPU) against its readable reference and the
samplers' paper forms, and the extension's loading and error handling."""
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from minidiff import fast
from minidiff.fast.gpu import STEP_PARAMS, step_record
from minidiff.schedule import NoiseSchedule
from minidiff.step import (StepCoefficients, StepParams, ddim_coefficients, ddim_step, ddpm_coefficients, ddpm_step,
                           dpmpp_2m_coefficients, dpmpp_2m_step, sampler_steps, step)
from minidiff.utils import native as _native
from minidiff.utils.backend import cupy_status
from minidiff.utils.distributed import SIZE_VARIABLES
from minidiff.utils.philox import philox_normal

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


@pytest.mark.parametrize("user, want", [
    ({}, ("passive", "3000")),                                              # a short spin, then sleep
    ({"OMP_WAIT_POLICY": "active"}, ("active", None)),                      # the user's policy, its own spin
    ({"OMP_WAIT_POLICY": "passive"}, ("passive", None)),                    # sleep at once
    ({"GOMP_SPINCOUNT": "50"}, ("passive", "50")),                          # the user's spin
    ({"PMI_SIZE": "2"}, ("passive", None)),                                 # mpiexec's processes share the cores
])
def test_openmp_wait_defaults_leave_the_users_settings(user, want):
    unset = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") + SIZE_VARIABLES
    env = {k: v for k, v in os.environ.items() if k not in unset}
    code = ("import os, minidiff.utils.native; "
            "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")
    out = subprocess.run([sys.executable, "-c", code], env={**env, **user}, capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == [str(w) for w in want]


def test_stale_extension_is_reported(monkeypatch):
    stale = types.ModuleType("minidiff._core")
    stale.ABI_VERSION = _native.ABI_VERSION - 1
    monkeypatch.setitem(sys.modules, "minidiff._core", stale)
    monkeypatch.setattr(sys.modules["minidiff"], "_core", stale, raising=False)
    core, reason = _native._load()
    assert core is None and "stale" in reason and "pip install ." in reason


def test_without_the_extension_the_step_runs_its_reference(monkeypatch):
    monkeypatch.setitem(fast._tables, "numpy", {})              # what fast/cpu.py gives without minidiff._core
    x_t, eps, _ = _inputs((2, 3))
    params = StepParams(ddpm_coefficients(SCHEDULE, 10), seed=0, t=10)
    got, _ = step(x_t, eps, params)
    np.testing.assert_array_equal(got, step.reference(x_t, eps, params)[0])


# ------------------------------------------------------------------ C++ kernel == reference == the paper's form
@needs_cpu
@pytest.mark.parametrize("kind, kw, shape, guided, clip", list(_cases()))
def test_cpu_kernel_matches_reference(kind, kw, shape, guided, clip):
    x_t, eps, eps_u = _inputs(shape, guided=guided)
    w = 3.0 if guided else 1.0
    seed, t = 1234, kw["t"]
    params = StepParams(_coefs(kind, kw), w, clip, seed, t)
    paper, paper_x0 = _reference(kind, kw, x_t, eps, philox_normal(seed, t, x_t.size).reshape(shape), clip, eps_u, w)
    x0_prev = _x0_prev(shape) if kw.get("t_last") is not None else None
    ref, ref_x0 = step.reference(x_t, eps, params, eps_uncond=eps_u, x0_prev=x0_prev)
    np.testing.assert_allclose(ref, paper, rtol=1e-6, atol=1e-6)        # one formula = each sampler's own
    np.testing.assert_allclose(ref_x0, paper_x0, rtol=1e-6, atol=1e-6)
    # the kernel draws its own Philox noise: philox_normal to within 1e-6 (tests/test_philox.py), times sigma <= 1
    x0 = np.empty_like(x_t)
    got, got_x0 = fast.cpu.step(x_t, eps, params, eps_uncond=eps_u, x0_prev=x0_prev, x0_out=x0)
    assert got.dtype == np.float32 and got.shape == shape and got_x0 is x0
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(x0, ref_x0, rtol=1e-6, atol=1e-6)
    assert step(x_t, eps, params, eps_uncond=eps_u, x0_prev=x0_prev)[0].tobytes() == got.tobytes()   # dispatched


@needs_cpu
def test_kernel_noise_is_philox_normal():
    # c_x0 = c_xt = c_eps = 0, sigma = 1: x_prev is the kernel's z
    n = 4099
    zero = np.zeros(n, dtype=np.float32)
    coefs = StepCoefficients(a=1.0, b=1.0, c_x0=0.0, c_xt=0.0, c_eps=0.0, sigma=1.0)
    z, _ = fast.cpu.step(zero, zero, StepParams(coefs, seed=2 ** 40 + 3, t=2 ** 33 + 5))
    np.testing.assert_allclose(z, philox_normal(2 ** 40 + 3, 2 ** 33 + 5, n), rtol=0, atol=1e-6)
    assert not np.array_equal(z, fast.cpu.step(zero, zero, StepParams(coefs, seed=2 ** 40 + 3, t=2 ** 33 + 6))[0])


@needs_cpu
def test_thread_count_does_not_change_results():
    x_t, eps, eps_u = _inputs((64, 3, 32, 32), guided=True)  # large enough to run in parallel
    params = StepParams(ddpm_coefficients(SCHEDULE, 700, "fixed_large"), 2.0, True, 9, 700)
    runs = [fast.cpu.step(x_t, eps, params, eps_uncond=eps_u, threads=th)[0] for th in (1, 0, 2, 5)]
    for r in runs[1:]:
        np.testing.assert_array_equal(r, runs[0])


@needs_cpu
def test_in_place_outputs():
    """out may be x_t and x0_out may be x0_prev (each element is read before it is written)."""
    x_t, eps, _ = _inputs((4, 1, 28, 28))
    x0_prev = _x0_prev(x_t.shape)
    params = StepParams(dpmpp_2m_coefficients(SCHEDULE, 500, 400, 600), seed=1, t=500)
    expected = step(x_t, eps, params, x0_prev=x0_prev)
    y, p = x_t.copy(), x0_prev.copy()
    out, x0 = step(y, eps, params, x0_prev=p, out=y, x0_out=p)
    assert out is y and x0 is p
    np.testing.assert_array_equal(y, expected[0])
    np.testing.assert_array_equal(p, expected[1])


# ------------------------------------------------------------------ validation
def test_bad_arrays_get_the_reference_or_a_clear_error():
    """The kernel declines what it does not cover (another dtype, a strided array): the reference runs; what cannot
    be a step (shapes that differ, a missing previous x_0) is a clear error."""
    x_t, eps, _ = _inputs((4, 2, 6))
    params = StepParams(ddpm_coefficients(SCHEDULE, 100), seed=0, t=100)
    want = step.reference(x_t, eps, params)[0]
    np.testing.assert_allclose(step(x_t.astype(np.float64), eps, params)[0], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(step(x_t, np.asfortranarray(eps), params)[0], want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="eps has shape"):
        step(x_t, eps[:, :1], params)
    with pytest.raises(ValueError, match="x0_prev .* is required"):
        step(x_t, eps, StepParams(dpmpp_2m_coefficients(SCHEDULE, 500, 400, 600)))
    with pytest.raises(ValueError, match="x0_prev has shape"):
        step(x_t, eps, StepParams(dpmpp_2m_coefficients(SCHEDULE, 500, 400, 600)), x0_prev=eps[:1])
    for bad in (-1, 2 ** 64, 0.5):
        with pytest.raises(ValueError, match="seed"):
            step(x_t, eps, StepParams(ddpm_coefficients(SCHEDULE, 100), seed=bad, t=100))
    step(x_t, eps, StepParams(dpmpp_2m_coefficients(SCHEDULE, 500, 400)), x0_prev=eps)  # c_x0prev = 0: unused


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
    read_only = x.copy()
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        core.step_cpu(x, x, None, None, None, read_only, None, **args)


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
    params = StepParams(_coefs(kind, kw), 3.0 if guided else 1.0, True, 5, kw["t"])
    cpu, cpu_x0 = fast.cpu.step(x_t, eps, params, eps_uncond=eps_u, x0_prev=x0_prev)
    g = lambda a: None if a is None else cupy.asarray(a)  # noqa: E731
    gpu, gpu_x0 = step(g(x_t), g(eps), params, eps_uncond=g(eps_u), x0_prev=g(x0_prev))
    # same header (our own log/sin/cos too), no FMA contraction on either side: expected bit for bit,
    # asserted to 1e-6 in case a compiler rounds differently
    np.testing.assert_allclose(gpu.get(), cpu, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(gpu_x0.get(), cpu_x0)
    # the same with the scalars read from a record in device memory (what a captured sampling step does)
    rec = cupy.asarray(step_record(params).reshape(1).view(np.uint8))
    gpu2, _ = step(g(x_t), g(eps), rec, eps_uncond=g(eps_u), x0_prev=g(x0_prev))
    np.testing.assert_array_equal(gpu2.get(), gpu.get())
    np.testing.assert_allclose(philox_normal(5, 6, 10001, xp=cupy).get(), philox_normal(5, 6, 10001),
                               rtol=0, atol=1e-6)
    with fast.use_reference():                                 # and the readable reference runs on CuPy as well
        np.testing.assert_allclose(philox_normal(5, 6, 10001, xp=cupy).get(), philox_normal(5, 6, 10001), rtol=0,
                                   atol=1e-6)


def test_mixed_devices_rejected():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    if not CUPY_OK:
        pytest.skip(f"CuPy has no usable GPU: {CUPY_WHY}")
    x = np.zeros((2, 3), np.float32)
    with pytest.raises((TypeError, ValueError)):
        step(x, cupy.asarray(x), StepParams(ddpm_coefficients(SCHEDULE, 5), seed=0, t=5))


# ------------------------------------------------------------------ the step record a CUDA graph reads
@needs_cpu
def test_step_params_record_matches_the_kernel_struct():
    """fast.gpu.STEP_PARAMS lays its fields out at the byte offsets of csrc/step_math.h's StepParams."""
    layout = _native.core.step_params_layout()
    assert layout.pop("itemsize") == STEP_PARAMS.itemsize
    assert layout == {name: STEP_PARAMS.fields[name][1] for name in STEP_PARAMS.names}


@needs_cpu
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver++"])
def test_step_records_drive_the_kernel_to_the_same_images(sampler):
    """What a replayed GPU graph reads each step (fast.gpu.step_record of each step's StepParams), fed to the CPU
    kernel, gives the images of the eager sampler: the records carry the right coefficients, seeds and steps."""
    from minidiff.conditioning.unet import ClassConditionalUNet, ConditionConfig
    from minidiff.sample import batch_seed, predict_eps, sample
    from minidiff.unet import UNetConfig
    sched = NoiseSchedule(20)
    model = ClassConditionalUNet(UNetConfig(resolution=8, base_channels=8, ch_mult=(1, 2), num_res_blocks=1,
                                            attn_resolutions=()), ConditionConfig(num_classes=3), seed=0).train(False)
    rng = np.random.default_rng(0)
    for p in model.params.values():
        p[...] = rng.standard_normal(p.shape) * 0.1
    y, w = np.array([0, 2]), 2.0
    want = sample(model, sched, 2, sampler=sampler, num_steps=6, seed=3, y=y, guidance=w, progress=False)
    key = batch_seed(3, 0)
    x = philox_normal(key, 20, 2 * 64).reshape(2, 1, 8, 8)
    x0_prev = np.zeros_like(x)
    for t, coefs in sampler_steps(sched, sampler, 6):
        rec = step_record(StepParams(coefs, w, True, key, t))
        eps, eps_u = predict_eps(model, sched, x, np.full(2, t), y, model.null_condition(2))
        scalars = {f: rec[f].item() for f in ("a", "b", "c_x0", "c_x0prev", "c_xt", "c_eps", "sigma", "guidance",
                                              "seed", "step")}
        x_next, x0 = np.empty_like(x), np.empty_like(x)
        _native.core.step_cpu(x, eps, eps_u, None, x0_prev, x_next, x0, clip=bool(rec["clip"]), threads=0, **scalars)
        x, x0_prev = x_next, x0
    np.testing.assert_allclose(x, want, rtol=1e-6, atol=1e-6)
