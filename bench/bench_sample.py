"""Sampling speed: DDIM (S steps), DPM-Solver++(2M) and DDPM (all T steps), in images/s and seconds per image.

    python bench/bench_sample.py                               # C = 32 U-Net, CPU, batch 256, DDIM-50; DDPM estimated
    python bench/bench_sample.py --checkpoint runs/mnist/checkpoint.npz --ddpm-steps 1000
    python bench/bench_sample.py --device cuda                 # GPU: the captured step (CUDA graph) and eager
    python bench/bench_sample.py --reference                   # the NumPy reference step, for comparison

The network dominates: one DDIM-50 image costs 50 forward passes. DDPM's time is measured over --ddpm-steps reverse
steps (default 20) and scaled to T, since every step costs the same. The first batch (kernel compilation, graph
capture) is not timed.
"""
import argparse
import os
import sys
import time

import numpy as np

from minidiff import fast
from minidiff.sample import sample
from minidiff.schedule import NoiseSchedule
from minidiff.unet import UNet, UNetConfig
from minidiff.utils.backend import get_xp
from minidiff.utils.checkpoint import load_model


def timed(fn):
    fn()                                                # warm-up: kernel caches, the graph's memory pool
    t0 = time.perf_counter()
    fn()                                                # sample() returns host arrays: the GPU has finished
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--ddpm-steps", type=int, default=20, help="reverse steps actually timed for DDPM")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--reference", action="store_true", help="also time the readable reference step (step.step)")
    a = p.parse_args()
    try:
        xp = get_xp(a.device)
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    if a.checkpoint:
        model, sched, _ = load_model(a.checkpoint, device=a.device)
    else:
        model, sched = UNet(UNetConfig(), seed=0).to(xp), NoiseSchedule()
    if a.device == "cuda":
        import cupy
        where = f"GPU: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}"
    else:
        from minidiff.utils import native as _native
        where = f"CPU: {os.cpu_count()} threads, kernels {_native.core.cpu_isa() if _native.core else 'none'}"
    print(f"{where}; {model.num_parameters():,} parameters; load average {os.getloadavg()[0]:.2f}")
    T = sched.num_train_timesteps
    kw = dict(batch_size=a.batch, progress=False, xp=xp)
    cases = [(f"DDIM S={a.ddim_steps}", sched, dict(sampler="ddim", num_steps=a.ddim_steps), 1.0),
             (f"DPM-Solver++(2M) S={a.ddim_steps // 2}", sched, dict(sampler="dpmsolver++",
                                                                     num_steps=a.ddim_steps // 2), 1.0),
             (f"DDPM T={T} (scaled from {a.ddpm_steps} steps)", NoiseSchedule(betas=sched.betas[:a.ddpm_steps]),
              dict(sampler="ddpm"), T / a.ddpm_steps)]
    ways = [("fused kernel" + (", CUDA graph" if a.device == "cuda" else ""), {}, ())]
    if a.device == "cuda":
        ways.append(("fused kernel, eager", dict(cuda_graph=False), ()))
    if a.reference:
        ways.append(("reference step", {}, ("step.step",)))
    print("| sampler | step | batch | images/s | s per image |\n| --- | --- | --- | --- | --- |")
    for name, s, case, scale in cases:
        for way, opts, reference in ways:
            with fast.use_reference(*reference, on=bool(reference)):
                dt = timed(lambda: sample(model, s, a.batch, **case, **opts, **kw)) * scale
            print(f"| {name} | {way} | {a.batch} | {a.batch / dt:.1f} | {dt / a.batch:.4f} |", flush=True)


if __name__ == "__main__":
    main()
