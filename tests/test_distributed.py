"""Data-parallel training over MPI (utils/distributed.py): N processes train the run one process trains with the same
global batch, a checkpoint resumes at another N, a failure on any process ends them all, Ctrl-C / the time budget
and a NaN loss stop every process at the same step, and parallel sampling and the bound give one process's numbers.
The multi-process tests run tests/mpi_run.py under mpiexec (pip install ".[mpi]"); they skip without it."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minidiff.utils.distributed import MPIGroup, Single, launched_size

HERE = Path(__file__).resolve().parent
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
try:
    import mpi4py  # noqa: F401
    HAVE_MPI = MPIEXEC is not None
except ImportError:
    HAVE_MPI = False
needs_mpi = pytest.mark.skipif(not HAVE_MPI, reason='needs mpi4py and mpiexec (pip install ".[mpi]")')


def test_shares_cover_the_batch_in_order():
    assert Single().share(8) == (0, 8) and launched_size() == 1
    for size, n in ((2, 8), (3, 8), (4, 5), (3, 3)):
        shares = []
        for rank in range(size):
            g = object.__new__(MPIGroup)
            g.rank, g.size = rank, size
            shares.append(g.share(n))
        assert shares[0][0] == 0 and shares[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
        assert max(hi - lo for lo, hi in shares) - min(hi - lo for lo, hi in shares) <= 1


@needs_mpi
def test_average_weights_each_share_by_its_rows(tmp_path):
    """MPIGroup.average over 3 processes sharing a batch of 8 unevenly (3, 3, 2 rows, MPIGroup.share): each
    process's mean of its rows, weighted by its share of the batch and summed, is the whole batch's mean, on every
    process (what one allreduce of the flat gradient buffer does for the gradient of the mean loss)."""
    run(3, "average", tmp_path / "avg.json", tmp=tmp_path)
    got = json.loads((tmp_path / "avg.json").read_text())
    assert len(got["ranks"]) == 3
    for flat in got["ranks"]:
        np.testing.assert_allclose(flat, got["want"], rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder of 48 RGB 12x12 PNGs in 3 class subfolders (a coloured square whose corner is the class)."""
    root = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(0)
    for i in range(48):
        c = i % 3
        img = np.zeros((12, 12, 3), np.uint8)
        r0, c0 = (c // 2) * 6, (c % 2) * 6
        img[r0:r0 + 6, c0:c0 + 6] = rng.integers(100, 256, 3)
        (root / f"class{c}").mkdir(exist_ok=True)
        Image.fromarray(img).save(root / f"class{c}" / f"{i:03d}.png")
    return root


def run(n, *args, tmp, timeout=240, check=True):
    cmd = [sys.executable, str(HERE / "mpi_run.py"), *map(str, args)]
    if n > 1:
        cmd = [MPIEXEC, "-n", str(n)] + cmd
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp / "cache"), OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and res.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def params(out):
    z = np.load(Path(out) / "final.npz")
    return {k: z[k] for k in z.files if k != "step"}, int(z["step"])


def close(a, b):
    """The same run up to the order of floating-point sums: Adam divides each gradient by its own size, so where a
    gradient is near zero (a bias whose pixel sum cancels) rounding can move that weight by up to ~lr per step; every
    weight within 1e-3 of the other run (lr 2e-3, 4 steps) and the typical one within 1e-6."""
    diffs = np.concatenate([np.abs(a[k] - b[k]).ravel() for k in a])
    return bool(diffs.max() < 1e-3 and np.median(diffs) < 1e-6), (float(diffs.max()), float(np.median(diffs)))


@needs_mpi
def test_n_processes_train_the_one_process_run_and_resume_at_another_n(folder, tmp_path):
    run(1, "train", folder, tmp_path / "one", 4, tmp=tmp_path)
    run(2, "train", folder, tmp_path / "two", 4, tmp=tmp_path)
    one, step1 = params(tmp_path / "one")
    two, step2 = params(tmp_path / "two")
    assert step1 == step2 == 4
    ok, worst = close(one, two)
    assert ok, f"2 processes vs 1: relative difference {worst}"
    for n in (1, 3):                           # written at N = 2 (step 2), resumed at N = 1 and at N = 3 (3 + 3 + 2)
        out = tmp_path / f"two_then_{n}"
        run(2, "train", folder, out, 2, tmp=tmp_path)
        run(n, "train", folder, out, 4, "--resume", tmp=tmp_path)
        resumed, step = params(out)
        ok, worst = close(one, resumed)
        assert step == 4 and ok, f"N = 2 then {n}: relative difference {worst}"


@needs_mpi
def test_a_failure_on_any_process_ends_them_all(folder, tmp_path):
    res = run(2, "train", folder, tmp_path / "f", 6, "--fail-rank", 1, "--fail-step", 3, tmp=tmp_path, timeout=120,
              check=False)
    # the failing rank's traceback must reach the launcher's output before its Abort ends every rank
    assert res.returncode != 0 and "injected failure on rank 1" in res.stderr + res.stdout, \
        (res.returncode, res.stdout[-2000:], res.stderr[-2000:])


@needs_mpi
def test_the_time_budget_or_ctrl_c_of_one_process_stops_every_process_at_the_same_step(folder, tmp_path):
    res = run(2, "train", folder, tmp_path / "t", 6, "--minutes-rank", 1, tmp=tmp_path)
    assert res.stdout.count("of 2 stopped at step 1") == 2, res.stdout
    assert params(tmp_path / "t")[1] == 1
    res = run(2, "train", folder, tmp_path / "c", 6, "--interrupt-rank", 1, "--interrupt-step", 3, tmp=tmp_path)
    assert res.stdout.count("of 2 stopped at step 3") == 2, res.stdout
    from minidiff.utils.checkpoint import load_checkpoint
    assert load_checkpoint(str(tmp_path / "c" / "checkpoint.npz"))["meta"]["step"] == 3   # rank 0 saved that step


@needs_mpi
def test_a_nan_on_one_process_stops_all_before_any_checkpoint(folder, tmp_path):
    out = tmp_path / "n"
    run(2, "train", folder, out, 2, tmp=tmp_path)
    before = (out / "checkpoint.npz").read_bytes()
    res = run(2, "train", folder, out, 6, "--resume", "--nan-rank", 1, tmp=tmp_path, timeout=120, check=False)
    # every process finds the NaN in the summed loss: rank 0 reports it once, and all leave after it is printed
    assert res.returncode != 0 and (res.stderr + res.stdout).count("loss became nan at step 2") == 1
    assert (out / "checkpoint.npz").read_bytes() == before


@needs_mpi
def test_an_error_every_process_finds_together_is_reported_once_with_its_exit_code(tmp_path):
    res = run(3, "fail", "error: the same on every rank", tmp=tmp_path, timeout=60, check=False)
    assert res.returncode == 3 and (res.stderr + res.stdout).count("error: the same on every rank") == 1


@needs_mpi
def test_parallel_sampling_and_bound_are_one_process_s(folder, tmp_path):
    run(1, "train", folder, tmp_path / "m", 2, tmp=tmp_path)
    ckpt = tmp_path / "m" / "checkpoint.npz"
    script = HERE.parent / "examples" / "mnist_sample.py"
    for n in (1, 2):
        cmd = [sys.executable, str(script), str(ckpt), "--sampler", "ddim", "--steps", "3", "-n", "7",
               "--batch-size", "2", "--out", str(tmp_path / f"s{n}.png"), "--no-progress"]
        res = subprocess.run(([MPIEXEC, "-n", "2"] if n > 1 else []) + cmd, capture_output=True, text=True,
                             timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert res.returncode == 0, res.stderr[-2000:]
    assert np.array_equal(np.load(tmp_path / "s1.npy"), np.load(tmp_path / "s2.npy"))   # image for image
    run(1, "bound", ckpt, folder, tmp_path / "b1.json", tmp=tmp_path)
    run(2, "bound", ckpt, folder, tmp_path / "b2.json", tmp=tmp_path)
    b1, b2 = (json.loads((tmp_path / f).read_text()) for f in ("b1.json", "b2.json"))
    assert all(abs(b1[k] - b2[k]) < 1e-6 * abs(b1[k]) for k in b1), (b1, b2)


def _gpus():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


@pytest.mark.gpu
@needs_mpi
@pytest.mark.skipif(_gpus() < 2, reason="needs two GPUs")
def test_two_gpus_with_nccl_train_the_one_gpu_run(folder, tmp_path):
    """Each rank on its own GPU, the gradients summed by NCCL inside the captured training step."""
    run(1, "train", folder, tmp_path / "one", 4, "--device", "cuda", tmp=tmp_path)
    run(2, "train", folder, tmp_path / "two", 4, "--device", "cuda", tmp=tmp_path)
    ok, worst = close(params(tmp_path / "one")[0], params(tmp_path / "two")[0])
    assert ok, worst
