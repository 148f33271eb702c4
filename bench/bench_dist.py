"""Benchmark: data-parallel training over MPI against one process on the same cores, same run.

    python bench/bench_dist.py                      # C = 32, global batch 128: 1 process x 2 threads, 2 x 1
    python bench/bench_dist.py --layouts 1x2,2x1 --batch 64 --channels 24
    python bench/bench_dist.py --layouts 1x1,2x1,4x1 --mpiexec "mpiexec -bind-to core"   # more cores
    python bench/bench_dist.py --paper              # the model, on paper, of a step at 8, 64 and 512 processes

Each layout PxT runs P processes (mpiexec -n P, pip install ".[mpi]") of T threads each (OMP_NUM_THREADS) training
the same C-channel U-Net on the same global batch: each process takes its share of the batch, and one allreduce of
the flat gradient buffer per step sums the shares (minidiff/utils/distributed.py, train_step.TrainStep). A step is
what examples/train.py runs: q_sample, the network, L_simple, backward, the allreduce, clipping, Adam and the EMA.
Each layout warms up, then times whole steps until --seconds have passed; layouts alternate over --rounds, and the
table shows medians. Besides the images/s of the global batch it reports the time of one allreduce of the gradient
buffer on its own (timed after the steps, between barriers) and the scaling efficiency: images/s against the first
layout's. Check `uptime` first: another program on one of the cores slows the process on it, and every step waits
for the slowest process.

--paper prints no measurement but a model of the step time at many processes (weak scaling: each keeps its batch,
so its compute time stays): t = compute + allreduce, with a ring allreduce of S bytes over N processes taking
2 (N - 1) / N * S / bandwidth + 2 (N - 1) * latency (each of the 2 (N - 1) rounds sends S / N bytes to a
neighbour), for typical links and the gradient buffers of three networks.
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from statistics import median


def worker(batch, channels, seconds, allreduces):
    import numpy as np

    from minidiff.optim import EMA, Adam
    from minidiff.schedule import NoiseSchedule
    from minidiff.train_step import TrainStep, training_noise
    from minidiff.unet import UNet, UNetConfig
    from minidiff.utils.distributed import group as process_group
    group = process_group()
    lo, hi = group.share(batch)
    model = UNet(UNetConfig(base_channels=channels), seed=0)
    model.train(True)
    opt, ema = Adam(model.params, model.grads, lr=1e-4), EMA(model.params)
    ts = TrainStep(model, opt, ema, NoiseSchedule(1000), 1.0, group=None if group.size == 1 else group,
                   share=(hi - lo) / batch)
    rng = np.random.default_rng(0)                       # the same global batch on every process: each takes its rows
    x0 = rng.uniform(-1, 1, (batch, 1, 28, 28)).astype(np.float32)[lo:hi]
    t = rng.integers(0, 1000, batch)[lo:hi]
    noise = training_noise(0, 0, (batch, 1, 28, 28))[lo:hi]
    for _ in range(2):                                   # warm-up
        ts(x0, t, noise, None, 1e-4)
    group.barrier()
    n, t0 = 0, time.perf_counter()
    while True:
        ts(x0, t, noise, None, 1e-4)
        n += 1
        if group.any(int(n >= 3 and time.perf_counter() - t0 >= seconds)):   # every process stops at the same step
            break
    group.barrier()
    dt = time.perf_counter() - t0
    flat = model.grads.flat
    times = []
    for _ in range(allreduces if group.size > 1 else 0):
        group.barrier()
        a = time.perf_counter()
        group.average(flat, 1.0)
        times.append(time.perf_counter() - a)
    if group.main:
        print(json.dumps(dict(images_per_s=n * batch / dt, step_ms=1e3 * dt / n, steps=n,
                              allreduce_ms=1e3 * median(times) if times else None, buffer_mb=flat.nbytes / 2 ** 20)))


# Typical links: (name, bandwidth in bytes/s one way, latency per message in s, most processes it joins).
LINKS = [("10 Gb Ethernet (TCP)", 1.25e9, 30e-6, None), ("100 Gb InfiniBand", 12.5e9, 2e-6, None),
         ("400 Gb InfiniBand", 50e9, 2e-6, None), ("NVLink (the 8 GPUs of one node)", 450e9, 3e-6, 8)]
# (network, parameters, compute time of one rank's step in s: what it stands for)
PAPER_CASES = [("benchmark model, C = 32", 1_623_169, 0.48, "2 CPU cores, batch 64 per process"),
               ("benchmark model, C = 32", 1_623_169, 0.010, "one GPU, batch 128 per process (assumed)"),
               ("DDPM CIFAR-10, C = 128", 35_746_307, 0.100, "one GPU, batch 128 per process (assumed)")]


def ring_allreduce_s(nbytes, n, bandwidth, latency):
    """Time of a ring allreduce (reduce-scatter, then all-gather) of nbytes over n processes."""
    return 2 * (n - 1) / n * nbytes / bandwidth + 2 * (n - 1) * latency


def paper(ranks=(8, 64, 512)):
    print("Model of a data-parallel step: t = compute + ring allreduce of the float32 gradient buffer; efficiency = "
          "compute / t (no overlap of the two)")
    print("| network (buffer) | one rank's compute | link | " + " | ".join(f"{n} ranks: allreduce ms, efficiency"
                                                                      for n in ranks) + " |")
    print("| --- | --- | --- |" + " --- |" * len(ranks))
    for name, params, compute, what in PAPER_CASES:
        nbytes = 4 * params
        for link, bandwidth, latency, most in LINKS:
            if compute > 0.1 and most:
                continue                        # CPU processes are not joined by NVLink
            cells = []
            for n in ranks:
                ar = ring_allreduce_s(nbytes, n, bandwidth, latency)
                cells.append("-" if most and n > most else f"{1e3 * ar:.2f}, {compute / (compute + ar):.0%}")
            print(f"| {name} ({nbytes / 2 ** 20:.1f} MB) | {1e3 * compute:g} ms ({what}) | {link} | "
                  + " | ".join(cells) + " |")


def run_layout(layout, args):
    procs, threads = layout
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--batch", str(args.batch), "--channels",
           str(args.channels), "--seconds", str(args.seconds), "--allreduces", str(args.allreduces)]
    if procs > 1:
        cmd = shlex.split(args.mpiexec) + ["-n", str(procs)] + cmd
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(f"{procs} x {threads} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def parse_layouts(text):
    try:
        layouts = [tuple(int(v) for v in item.split("x")) for item in text.split(",")]
    except ValueError:
        layouts = []
    if not layouts or any(len(lt) != 2 or min(lt) < 1 for lt in layouts):
        raise argparse.ArgumentTypeError(f"layouts are PROCESSESxTHREADS, comma-separated (e.g. 1x2,2x1), got {text!r}")
    return layouts


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", type=parse_layouts, default=parse_layouts("1x2,2x1"),
                    help="PROCESSESxTHREADS, comma-separated; the first is the baseline of the efficiency")
    ap.add_argument("--batch", type=int, default=128, help="global batch (shared by the processes)")
    ap.add_argument("--channels", type=int, default=32, help="U-Net base channels C (32 is the benchmark model)")
    ap.add_argument("--seconds", type=float, default=10.0, help="time per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="measurements of each layout (medians are shown)")
    ap.add_argument("--allreduces", type=int, default=50, help="allreduces of the gradient buffer timed alone")
    ap.add_argument("--mpiexec", default="mpiexec", help="the launcher command, with any options of its own")
    ap.add_argument("--paper", action="store_true", help="print the model of a step at 8, 64 and 512 processes")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.paper:
        return paper()
    if args.worker:
        return worker(args.batch, args.channels, args.seconds, args.allreduces)
    if any(p > 1 for p, _ in args.layouts):
        launcher = shlex.split(args.mpiexec)[0]
        found = shutil.which(launcher, path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
        if found is None:
            sys.exit(f"error: no {launcher!r} found: pip install \".[mpi]\" brings mpi4py and MPICH's mpiexec")
        if launcher == "mpiexec":
            args.mpiexec = " ".join([shlex.quote(found)] + shlex.split(args.mpiexec)[1:])
        try:
            import mpi4py  # noqa: F401
        except ImportError:
            sys.exit('error: mpi4py is not installed: pip install ".[mpi]"')
    load = os.getloadavg()
    print(f"U-Net C={args.channels}, training step at global batch {args.batch}, {os.cpu_count()} cores; "
          f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    rounds = [{lt: run_layout(lt, args) for lt in args.layouts} for _ in range(max(1, args.rounds))]
    base = median(r[args.layouts[0]]["images_per_s"] for r in rounds)
    print("| processes x threads | images/s | ms per step | allreduce of the gradients (ms) | buffer MB | "
          "efficiency |\n| --- | --- | --- | --- | --- | --- |")
    for lt in args.layouts:
        ips = median(r[lt]["images_per_s"] for r in rounds)
        ar = [r[lt]["allreduce_ms"] for r in rounds if r[lt]["allreduce_ms"] is not None]
        print(f"| {lt[0]} x {lt[1]} | {ips:.1f} | {median(r[lt]['step_ms'] for r in rounds):.0f} | "
              f"{f'{median(ar):.2f}' if ar else '-'} | {rounds[0][lt]['buffer_mb']:.1f} | {ips / base:.0%} |",
              flush=True)
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
