"""Benchmark: one DDPM sampling step, fused C++ kernel vs the readable NumPy reference (noise included).

    pip install .                      # builds minidiff._core
    cd /tmp && python /path/to/minidiff/bench/bench_step.py [--reps 30]

Rows per input size (DDPM t = 500, fixed_small, clip_sample=True):
  numpy philox + ddpm_step   the reference: philox_normal (same noise as the kernel) then ddpm_step
  numpy rng + ddpm_step      NumPy's own generator (float32 ziggurat), then ddpm_step; different noise
  fused C++, 1 thread        fused_step(..., threads=1): guidance-free step + Philox noise in one pass
  fused C++, all threads     fused_step(..., threads=0)
Times are medians (and the best) over --reps runs after warm-up; speed-up compares medians with the first
row. On a shared machine the all-threads row waits for a free core: compare the best times there.
"""
import argparse
import os
import time

import numpy as np

from minidiff import _native
from minidiff.philox import philox_normal
from minidiff.schedule import NoiseSchedule
from minidiff.step import ddpm_coefficients, ddpm_step, fused_step


def time_ms(fn, reps, warmup=3):
    """(median, best) wall time in ms; the best shows the kernel when the shared machine is busy."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times)), 1e3 * min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args()
    status = _native.native_status()
    if not status["cpu_kernel"]:
        raise SystemExit(f"the C++ kernel is unavailable: {status['reason']}")
    sched, t, seed = NoiseSchedule(1000), 500, 0
    coefs = ddpm_coefficients(sched, t, "fixed_small")
    rng = np.random.default_rng(0)
    print(f"cores: {os.cpu_count()}, kernel threads (threads=0): {_native.core.max_threads()}, "
          f"load average: {' '.join(f'{v:.2f}' for v in os.getloadavg())}, numpy {np.__version__}")
    print(f"{'input':>16} | {'method':<26} | {'median ms':>9} | {'best ms':>8} | {'speed-up':>8}")
    print("-" * 80)
    for batch in (64, 256):
        for chw in ((1, 28, 28), (3, 32, 32)):
            shape = (batch,) + chw
            x_t = rng.standard_normal(shape, dtype=np.float32)
            eps = rng.standard_normal(shape, dtype=np.float32)
            n = x_t.size

            def reference():
                z = philox_normal(seed, t, n).reshape(shape)
                return ddpm_step(sched, x_t, eps, t, z)

            def numpy_rng():
                return ddpm_step(sched, x_t, eps, t, rng.standard_normal(shape, dtype=np.float32))

            rows = [("numpy philox + ddpm_step", reference), ("numpy rng + ddpm_step", numpy_rng),
                    ("fused C++, 1 thread", lambda: fused_step(x_t, eps, coefs, seed=seed, step=t, threads=1)),
                    ("fused C++, all threads", lambda: fused_step(x_t, eps, coefs, seed=seed, step=t, threads=0))]
            base = None
            for name, fn in rows:
                ms, best = time_ms(fn, args.reps)
                base = base or ms
                print(f"{'x'.join(map(str, shape)):>16} | {name:<26} | {ms:9.3f} | {best:8.3f} | {base / ms:7.1f}x")
            print("-" * 80)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
