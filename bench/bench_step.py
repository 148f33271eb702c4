"""Benchmark: one DDPM sampling step, the fused kernel vs the readable reference it replaces (noise included).

    pip install .                      # builds minidiff._core
    python bench/bench_step.py [--reps 30]
    python bench/bench_step.py --device cuda

Rows per input size (DDPM t = 500, fixed_small, clip_sample=True):
  philox + ddpm_step         the reference: philox_normal (same noise as the kernel) then ddpm_step
  rng + ddpm_step            the array library's own generator, then ddpm_step; different noise
  fused, 1 thread            step.step's C++ fast path (fast/cpu.py) on one thread: the step and its Philox noise in
                             one pass
  fused, all threads         the same on every core (threads=0); on the GPU the CUDA kernel
Times are medians (and the best) over --reps runs after warm-up (on the GPU each run is synchronised); speed-up
compares medians with the first row. On a shared machine the all-threads row waits for a free core: compare the
best times there.
"""
import argparse
import os
import sys
import time

import numpy as np

from minidiff.fast import cpu as fast_cpu
from minidiff.schedule import NoiseSchedule
from minidiff.step import StepParams, ddpm_coefficients, ddpm_step, step
from minidiff.utils import native as _native
from minidiff.utils.backend import get_xp
from minidiff.utils.philox import philox_normal


def time_ms(fn, reps, sync, warmup=3):
    """(median, best) wall time in ms; the best shows the kernel when the shared machine is busy."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times)), 1e3 * min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args()
    status = _native.native_status()
    kernel = "cpu_kernel" if args.device == "cpu" else "cuda_kernel"
    if not status[kernel]:
        sys.exit(f"error: the {'C++' if args.device == 'cpu' else 'CUDA'} kernel is unavailable: "
                 f"{status['reason'] or 'no GPU'}")
    try:
        xp = get_xp(args.device)
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    sync = (lambda: None) if xp is np else xp.cuda.Device().synchronize  # noqa: E731
    sched, t, seed = NoiseSchedule(1000), 500, 0
    params = StepParams(ddpm_coefficients(sched, t, "fixed_small"), seed=seed, t=t)
    rng = np.random.default_rng(0)
    where = (f"cores: {os.cpu_count()}, kernel threads (threads=0): {_native.core.max_threads()}" if xp is np else
             f"GPU: {xp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, CuPy {xp.__version__}")
    print(f"{where}, load average: {' '.join(f'{v:.2f}' for v in os.getloadavg())}, numpy {np.__version__}")
    print(f"{'input':>16} | {'method':<26} | {'median ms':>9} | {'best ms':>8} | {'speed-up':>8}")
    print("-" * 80)
    lib = "numpy" if xp is np else "cupy"
    gen = xp.random.default_rng(1)             # the library's own generator (float32)
    for batch in (64, 256):
        for chw in ((1, 28, 28), (3, 32, 32)):
            shape = (batch,) + chw
            x_t = xp.asarray(rng.standard_normal(shape, dtype=np.float32))
            eps = xp.asarray(rng.standard_normal(shape, dtype=np.float32))
            n = x_t.size

            def reference():
                z = philox_normal(seed, t, n, xp=xp).reshape(shape)
                return ddpm_step(sched, x_t, eps, t, z)

            def library_rng():
                return ddpm_step(sched, x_t, eps, t, gen.standard_normal(shape, dtype=np.float32))

            rows = [(f"{lib} philox + ddpm_step", reference), (f"{lib} rng + ddpm_step", library_rng)]
            if xp is np:
                rows += [("fused C++, 1 thread", lambda: fast_cpu.step(x_t, eps, params, threads=1)),
                         ("fused C++, all threads", lambda: fast_cpu.step(x_t, eps, params, threads=0))]
            else:
                rows += [("fused CUDA", lambda: step(x_t, eps, params))]
            base = None
            for name, fn in rows:
                ms, best = time_ms(fn, args.reps, sync)
                base = base or ms
                print(f"{'x'.join(map(str, shape)):>16} | {name:<26} | {ms:9.3f} | {best:8.3f} | {base / ms:7.1f}x")
            print("-" * 80)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
