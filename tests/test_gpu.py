"""The GPU path (CuPy + the CUDA kernel): every fused elementwise chain against the CuPy reference it is compiled
from, a CuPy training run against the NumPy one, a training step replayed from a CUDA graph against the same step
run eagerly (and across a resume), the captured sampler against the eager one, and a tiny end-to-end run.
All skipped without CuPy, a GPU and the CUDA kernel (`pytest -m gpu` selects them)."""
import numpy as np
import pytest

from minidiff import fast as kernels
from minidiff.conditioning.unet import ConditionConfig
from minidiff.sample import sample
from minidiff.train import TrainConfig
from minidiff.unet import UNetConfig
from minidiff.utils import native as _native
from minidiff.utils.backend import cupy_status
from minidiff.utils.checkpoint import load_model
from test_layers import rel_error
from test_train import TINY, _cfg, _train, toy_data  # noqa: F401  (toy_data is a fixture)

CUPY_OK, CUPY_WHY = cupy_status()
STATUS = _native.native_status()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (CUPY_OK and STATUS["cuda_kernel"]),
                                 reason=f"needs CuPy, a GPU and the CUDA kernel ({CUPY_WHY}; "
                                        f"{STATUS['reason'] or 'CUDA kernel built'})")]


def _chain_args(key, cp, rng):
    """Arguments for each fused reference: CuPy arrays of a real use's shapes."""
    r = lambda *s: cp.asarray(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    x, d = r(3, 49, 24), r(3, 49, 24)
    return {"layers.silu": (x,), "layers.silu_backward": (x, d),
            "optim.adam_update": (r(24, 5), r(24, 5), r(24, 5), cp.abs(r(24, 5)), cp.float32(1e-3), 0.9, 0.999, 1e-8,
                                  cp.float32(0.1), cp.float32(0.001), 0.0),
            "optim.ema_update": (r(24, 5), r(24, 5), cp.float32(0.9))}[key]


@pytest.mark.parametrize("key", ["layers.silu", "layers.silu_backward", "optim.adam_update", "optim.ema_update"])
def test_fused_chain_equals_its_reference(key):
    import cupy as cp
    import minidiff.optim  # noqa: F401  (registers its references)
    assert key in kernels._fused
    rng = np.random.default_rng(0)
    fused = kernels._fast_path(key, "cupy")
    ref_args = _chain_args(key, cp, rng)
    fused_args = tuple(a.copy() if isinstance(a, cp.ndarray) else a for a in ref_args)
    want, got = kernels.references()[key](*ref_args), fused(*fused_args)
    if want is None:                                        # in-place updates: compare the updated arrays
        want, got = ref_args[:4], fused_args[:4]
    for w, g in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
        assert rel_error(cp.asnumpy(w), cp.asnumpy(g)) < 1e-6


def test_cupy_training_equals_numpy(toy_data, tmp_path):  # noqa: F811
    """A few steps of the tiny model: CuPy (eager and with the graph) and NumPy end with the same weights, to
    float32 rounding (the training noise comes from the CUDA Philox kernel there, within 1e-6 of NumPy's)."""
    mcfg = UNetConfig(**TINY)
    ref, _, _ = _train(_cfg(toy_data, tmp_path / "cpu", 4), mcfg, progress=False)
    for graphs in (False, True):
        cfg = _cfg(toy_data, tmp_path / f"gpu{graphs}", 4, device="cuda", cuda_graphs=graphs)
        gpu, _, _ = _train(cfg, mcfg, progress=False)
        for k, p in ref.params.items():
            assert rel_error(p, gpu.params[k].get()) < 1e-4, (graphs, k)


def test_captured_step_equals_eager_and_resumes_exactly(toy_data, tmp_path):  # noqa: F811
    mcfg = UNetConfig(**TINY)
    eager, _, _ = _train(_cfg(toy_data, tmp_path / "eager", 6, device="cuda", cuda_graphs=False), mcfg, progress=False)
    graph, _, _ = _train(_cfg(toy_data, tmp_path / "graph", 6, device="cuda"), mcfg, progress=False)
    for k, p in eager.params.items():
        assert rel_error(p.get(), graph.params[k].get()) < 1e-6, k
    _train(_cfg(toy_data, tmp_path / "split", 3, device="cuda"), mcfg, progress=False)
    resumed, _, _ = _train(_cfg(toy_data, tmp_path / "split", 6, device="cuda"), mcfg, resume=True, progress=False)
    for k, p in graph.params.items():
        assert np.array_equal(p.get(), resumed.params[k].get()), k


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver++"])
def test_end_to_end_and_captured_sampler(toy_data, tmp_path, sampler):  # noqa: F811
    """--device cuda train, load, sample: the captured sampler gives the eager sampler's images, guided too."""
    import cupy as cp
    _train(_cfg(toy_data, tmp_path, 3, device="cuda"), UNetConfig(**TINY), ConditionConfig(num_classes=4),
           progress=False)
    model, sched, _ = load_model(str(tmp_path / "checkpoint.npz"), device="cuda")
    kw = dict(sampler=sampler, num_steps=5, seed=1, batch_size=3, y=np.array([0, 1, 2, 3]), guidance=2.0,
              progress=False, xp=cp)
    eager = sample(model, sched, 4, cuda_graph=False, **kw)
    graphed = sample(model, sched, 4, cuda_graph=True, **kw)
    assert graphed.shape == (4, 1, 14, 14) and np.all(np.isfinite(graphed))
    np.testing.assert_allclose(graphed, eager, rtol=0, atol=1e-5)
    cpu_model, _, _ = load_model(str(tmp_path / "checkpoint.npz"))
    cpu = sample(cpu_model, sched, 4, **dict(kw, xp=np))
    np.testing.assert_allclose(graphed, cpu, rtol=0, atol=1e-3)


@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver++"])
def test_autoguided_captured_sampler(toy_data, tmp_path, sampler):  # noqa: F811
    """Autoguidance on the GPU: the guide kept by a CuPy run, the captured sampler running both networks, equal to
    the eager sampler and to the CPU."""
    import cupy as cp
    _train(_cfg(toy_data, tmp_path, 3, device="cuda", guide_step=1), UNetConfig(**TINY), progress=False)
    path = str(tmp_path / "checkpoint.npz")
    model, sched, _ = load_model(path, device="cuda")
    guide = load_model(path, weights="guide", device="cuda")[0]
    kw = dict(sampler=sampler, num_steps=5, seed=1, batch_size=3, guidance=2.0, progress=False, xp=cp)
    eager = sample(model, sched, 4, cuda_graph=False, guide=guide, **kw)
    graphed = sample(model, sched, 4, cuda_graph=True, guide=guide, **kw)
    np.testing.assert_allclose(graphed, eager, rtol=0, atol=1e-5)
    cpu = sample(load_model(path)[0], sched, 4, guide=load_model(path, weights="guide")[0],
                 **dict(kw, xp=np))
    np.testing.assert_allclose(graphed, cpu, rtol=0, atol=1e-3)


def test_train_config_has_the_graph_switch():
    assert TrainConfig().cuda_graphs is True


def test_the_graph_waits_for_uploads_and_keeps_tables_out_of_its_pool():
    """CudaGraph's stream does not wait for the default stream by itself: a large upload queued there just before the
    first call must be finished when the step reads it; and the schedule's device tables, made before the capture,
    stay valid after the graph (and its memory pool) are gone."""
    import cupy as cp
    from minidiff.fast.graphs import CudaGraph
    from minidiff.schedule import NoiseSchedule
    from minidiff.diffusion import prepare_tables, q_sample
    out = cp.zeros(1, cp.float32)

    def body(x):
        out[...] = x.sum()
    host = np.ones(1 << 24, np.float32)
    x = cp.asarray(host)                                   # queued on the default stream
    g = CudaGraph(body)
    g(x)
    g.synchronize()
    assert float(out.get()[0]) == float(1 << 24)
    sched = NoiseSchedule(50)
    prepare_tables(sched, cp, np.float32)
    x0 = cp.ones((2, 1, 4, 4), cp.float32)
    step = CudaGraph(lambda x, t: out.__setitem__(Ellipsis, q_sample(sched, x, t, x).sum()))
    step(x0, cp.asarray(np.array([3, 4])))
    step(x0, cp.asarray(np.array([3, 4])))
    step.synchronize()
    del step
    import gc
    gc.collect()
    want = float(q_sample(sched, np.ones((2, 1, 4, 4), np.float32), np.array([3, 4]), np.ones((2, 1, 4, 4))).sum())
    assert abs(float(q_sample(sched, x0, cp.asarray(np.array([3, 4])), x0).sum().get()) - want) < 1e-4
