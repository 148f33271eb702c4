"""Sampling time per image: DDIM (S steps) and DDPM (all T steps), fused kernel vs the NumPy reference step.

    python bench/bench_sample.py                               # C = 32 U-Net, batch 256, DDIM-50; DDPM estimated
    python bench/bench_sample.py --checkpoint runs/mnist/checkpoint.npz --ddpm-steps 1000

The network dominates: one DDIM-50 image costs 50 forward passes. DDPM's time is measured over --ddpm-steps
reverse steps (default 20) and scaled to T, since every step costs the same.
"""
import argparse
import time

import numpy as np

from minidiff.sample import sample
from minidiff.schedule import NoiseSchedule
from minidiff.unet import UNet, UNetConfig


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--ddpm-steps", type=int, default=20, help="reverse steps actually timed for DDPM")
    a = p.parse_args()
    if a.checkpoint:
        from minidiff.train import load_model
        model, tcfg, _ = load_model(a.checkpoint)
        sched = tcfg.schedule()
    else:
        model, sched = UNet(UNetConfig(), seed=0), NoiseSchedule()
    T = sched.num_train_timesteps
    rows = []
    for backend in ("native", "numpy"):
        t0 = time.perf_counter()
        sample(model, sched, a.batch, sampler="ddim", num_steps=a.ddim_steps, batch_size=a.batch, backend=backend,
               progress=False)
        dt = time.perf_counter() - t0
        rows.append((f"DDIM S={a.ddim_steps}", backend, dt / a.batch))
    # DDPM: time a truncated schedule of the same per-step cost, scaled to T steps.
    short = NoiseSchedule(betas=sched.betas[: a.ddpm_steps])
    t0 = time.perf_counter()
    sample(model, short, a.batch, sampler="ddpm", batch_size=a.batch, progress=False)
    dt = (time.perf_counter() - t0) * T / a.ddpm_steps
    rows.append((f"DDPM T={T} (scaled from {a.ddpm_steps} steps)", "native", dt / a.batch))
    print(f"| sampler | step | batch | s per image |\n| --- | --- | --- | --- |")
    for name, backend, s in rows:
        print(f"| {name} | {backend} | {a.batch} | {s:.3f} |")


if __name__ == "__main__":
    main()
