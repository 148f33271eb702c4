"""The operation counter (minidiff/fast/count.py) counts what a GPU would launch, and a C = 32 training step stays
within the budget of array operations a captured CUDA graph replays (bench/bench_unet.py --count-ops)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from minidiff import fast
from minidiff.fast import count
from minidiff.layers import silu

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_unet", ROOT / "bench" / "bench_unet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_counter_counts_kernels_not_views():
    a = count.xp.asarray(np.arange(12, dtype=np.float32))
    with count.counting() as c:
        b = a.reshape(3, 4).T[1:]               # views: free
        d = a + 1.0                             # one elementwise kernel
        e = d.sum(axis=0)                       # one reduction
        f = count.xp.ascontiguousarray(b)       # a copy (b is not contiguous)
        a[2:5] = 0                              # one fill
        g = count.xp.zeros(7)                   # one memset
        h = count.xp.empty(7)                   # nothing
        k = a[count.xp.asarray(np.array([0, 3]))]   # a gather (and the index's upload)
        s = silu(d)                             # a fused reference on the CuPy path: one kernel
        count.xp.ascontiguousarray(d)           # already contiguous: nothing
    assert c["other"] == 1 + 1 + 1 + 1 + 1 + 2 + 1, c
    assert all(isinstance(v, count.CountingArray) for v in (b, d, e, f, g, h, k, s))
    assert fast.array_kind(a) == count.KIND and "layers.silu" in fast._tables[count.KIND]


@pytest.fixture(scope="module")
def counts():
    return _bench().count_ops(batch=2, channels=32)


def test_a_training_step_fits_the_budget(counts):
    train, sampling = counts["training step"], counts["sampling step"]
    assert sum(train.values()) <= 2500, train
    assert train["loss, optimizer (per step)"] <= 30      # zero_grad, clipping, Adam, EMA: a handful, not per tensor
    assert sum(sampling.values()) <= 900 and sampling["sampling step (fused kernel)"] <= 2, sampling
    assert train["Conv2d 3x3"] > 0 and train["GroupNormSiLU"] > 0


def test_the_gpu_path_has_no_einsum(monkeypatch):
    """GroupNorm's statistics and the pixel sums are plain reductions on CuPy: no einsum (which transposes copies
    of whole activations there)."""
    def refuse(*a, **k):
        raise AssertionError("einsum on the GPU path")
    monkeypatch.setattr(np, "einsum", refuse)
    _bench().count_ops(batch=1, channels=8)


def test_bench_reads_the_hosts_steal_from_proc_stat(tmp_path, monkeypatch):
    """bench_unet.cpu_times reads (steal, total) ticks from /proc/stat's first line, and steal_share is the share
    of the cores' time the host took between two readings; without /proc/stat neither is known."""
    bench = _bench()
    stat = tmp_path / "stat"
    real_open = open

    def fake_open(path, *args, **kw):
        return real_open(stat if path == "/proc/stat" else path, *args, **kw)

    monkeypatch.setattr("builtins.open", fake_open)
    stat.write_text("cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 50 0 25 400 5 0 0 20 0 0\n")
    before = bench.cpu_times()
    assert before == (40, 1000)
    stat.write_text("cpu  200 0 60 1000 10 0 0 130 0 0\n")
    after = bench.cpu_times()
    assert after == (130, 1400)
    assert bench.steal_share(before, after) == pytest.approx(90 / 400)
    assert bench.steal_share(before, before) is None and bench.steal_share(None, after) is None
    stat.unlink()
    assert bench.cpu_times() is None


@pytest.mark.parametrize("worker", [["minidiff", "backward", "64"], ["jax", "train", "64"],
                                    ["minidiff", "train", "0"], ["minidiff", "train", "x"]])
def test_bench_worker_rejects_bad_arguments(monkeypatch, capsys, worker):
    """bench_unet.py --worker IMPL MODE BATCH (one measurement, for comparing builds): a clear error, not a
    traceback from inside the step."""
    monkeypatch.setattr("sys.argv", ["bench_unet.py", "--worker", *worker])
    with pytest.raises(SystemExit):
        _bench().main()
    assert "--worker takes IMPL (minidiff or torch), MODE (forward or train)" in capsys.readouterr().err
