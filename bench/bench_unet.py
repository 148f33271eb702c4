"""Benchmark: minidiff's U-Net against the same architecture in PyTorch, float32 on the CPU, same run.

    python bench/bench_unet.py                     # C = 32: forward at batch 64 and 256, train step at 64 and 128
    python bench/bench_unet.py --channels 64 --seconds 10
    python bench/bench_unet.py --only minidiff     # without PyTorch
    python bench/bench_unet.py --rounds 5          # more rounds on a noisy machine

Each measurement runs in its own subprocess so its peak resident memory (ru_maxrss) is its own; the
subprocess uses all of the machine's cores (OpenBLAS threads for NumPy, torch.set_num_threads for PyTorch).
A training step is forward, MSE loss against a fixed noise target, backward and an Adam update. Each
measurement warms up with one step, then times whole steps until --seconds have passed (at least 2).
On a shared machine the speed drifts by tens of percent within minutes, so each case runs --rounds times,
minidiff and PyTorch back to back in each round: the table shows the median images/s of each and the
median of the per-round ratios, with their range.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from statistics import median

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CASES = [("forward", 64), ("forward", 256), ("train", 64), ("train", 128)]


def worker(impl, mode, batch, channels, seconds):
    import numpy as np
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
    noise = rng.standard_normal(x.shape).astype(np.float32)
    t = rng.integers(0, 1000, batch)
    if impl == "minidiff":
        sys.path.insert(0, ROOT)
        from minidiff.optim import Adam
        from minidiff.unet import UNet, UNetConfig
        model = UNet(UNetConfig(base_channels=channels), seed=0)
        opt = Adam(model.params, model.grads, lr=1e-4)

        def step():
            if mode == "forward":
                model.forward(x, t)
                return
            model.zero_grad()
            out = model.forward(x, t)
            model.backward((2.0 / out.size) * (out - noise))    # d/d out of mean((out - noise)^2)
            opt.step()
        model.train(mode == "train")
    else:
        import torch
        torch.set_num_threads(os.cpu_count())
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from torch_unet import TorchUNet
        model = TorchUNet(base_channels=channels)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        xt, nt, tt = torch.from_numpy(x), torch.from_numpy(noise), torch.from_numpy(t)

        def step():
            if mode == "forward":
                with torch.no_grad():
                    model(xt, tt)
                return
            opt.zero_grad()
            loss = torch.mean((model(xt, tt) - nt) ** 2)
            loss.backward()
            opt.step()
        model.train(mode == "train")
    step()                                                       # warm-up
    n, t0 = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t0 < seconds:
        step()
        n += 1
    dt = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: KiB
    print(json.dumps(dict(images_per_s=n * batch / dt, step_s=dt / n, peak_mb=peak_mb)))


def run_case(impl, mode, batch, channels, seconds):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, mode, str(batch),
           "--channels", str(channels), "--seconds", str(seconds)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{impl} {mode} batch {batch} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, default=32, help="base channels C (32 is the default model)")
    ap.add_argument("--seconds", type=float, default=6.0, help="time per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="measurements of each case (medians are shown)")
    ap.add_argument("--only", choices=["minidiff", "torch"], help="run one implementation")
    ap.add_argument("--worker", nargs=3, metavar=("IMPL", "MODE", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        impl, mode, batch = args.worker
        worker(impl, mode, int(batch), args.channels, args.seconds)
        return
    impls = [args.only] if args.only else ["minidiff", "torch"]
    if "torch" in impls:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("PyTorch not importable: minidiff only")
            impls = ["minidiff"]
    load = os.getloadavg()
    print(f"U-Net C={args.channels}, float32, {os.cpu_count()} threads, load average before: "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"| measure | batch | minidiff img/s | minidiff peak MB |"
          + (" torch img/s | torch peak MB | ratio (range) |" if "torch" in impls else ""))
    print("| --- | --- | --- | --- |" + (" --- | --- | --- |" if "torch" in impls else ""))
    for mode, batch in CASES:
        rounds = [{impl: run_case(impl, mode, batch, args.channels, args.seconds) for impl in impls}
                  for _ in range(max(1, args.rounds))]
        row = f"| {'training step' if mode == 'train' else 'forward'} | {batch} |"
        for impl in ["minidiff", "torch"] if "torch" in impls else ["minidiff"]:
            row += (f" {median([r[impl]['images_per_s'] for r in rounds]):.1f} |"
                    f" {max(r[impl]['peak_mb'] for r in rounds):.0f} |" if impl in impls else " - | - |")
        if len(impls) == 2:
            ratios = sorted(r["minidiff"]["images_per_s"] / r["torch"]["images_per_s"] for r in rounds)
            row += f" {median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f}) |"
        elif "torch" in impls:
            row += " - |"
        print(row, flush=True)
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
