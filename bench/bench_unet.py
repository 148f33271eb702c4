"""Benchmark: minidiff's U-Net against the same architecture in PyTorch (tests/torch_unet.py), float32, same run.

    python bench/bench_unet.py                     # CPU, C = 32: forward at batch 64 and 256, train step at 64 and 128
    python bench/bench_unet.py --isa avx2          # both sides limited to AVX2 (what a machine without AVX-512 runs)
    python bench/bench_unet.py --shape cifar10     # RGB 32x32 with DDPM's CIFAR-10 layout (ch_mult 1,2,2,2, attn 16)
    python bench/bench_unet.py --reference         # minidiff's readable NumPy references (MINIDIFF_REFERENCE=1)
    python bench/bench_unet.py --device cuda       # GPU: forward at 256 and 1024, train step at 128 and 512
    python bench/bench_unet.py --only minidiff --rounds 1 --seconds 3
    python bench/bench_unet.py --profile           # where minidiff's CPU training step at batch 64 spends its time
    python bench/bench_unet.py --count-ops         # array operations (GPU kernel launches) per step, by layer type

Each measurement runs in its own subprocess (so its peak memory is its own) on all of the machine's cores. A
training step is forward, MSE loss against a fixed noise target, backward and an Adam update; on the GPU minidiff's
is train_step.TrainStep (loss, clipping, Adam and EMA included) replayed from a CUDA graph, PyTorch's is eager. Each
measurement warms up, then times whole steps until --seconds have passed (at least 3). Speed drifts on a shared
machine, so each case runs --rounds times, minidiff and PyTorch back to back in each round: the table shows the
median images/s of each and the median (range) of the per-round ratios. Peak memory: resident set (CPU) or the
memory pools' high-water mark / torch.cuda.max_memory_allocated (GPU). On the CPU, check `uptime` first (the table
prints the load average before and after, and on Linux the share of the cores' time the host of a VM took, steal):
under load PyTorch slows down more than minidiff does, so a ratio measured on a busy machine flatters minidiff.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from statistics import median

# The environment as the user set it, before anything imports minidiff (which sets OMP_WAIT_POLICY and GOMP_SPINCOUNT
# for its own threads, minidiff/utils/native.py): PyTorch's workers get this one, so PyTorch runs as it would alone.
USER_ENV = dict(os.environ)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CASES = {"cpu": [("forward", 64), ("forward", 256), ("train", 64), ("train", 128)],
         "cuda": [("forward", 256), ("forward", 1024), ("train", 128), ("train", 512)]}
# The network and image of each --shape: the benchmark model (MNIST's 28x28, C = 32, three levels, attention at 7)
# and DDPM's CIFAR-10 layout (RGB 32x32, four levels, attention at 16), both with 2 ResBlocks per level.
SHAPES = {"mnist": dict(in_channels=1, resolution=28),
          "cifar10": dict(in_channels=3, resolution=32, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,))}
# PyTorch's own switches for its instruction set (ATen's vectorised kernels, oneDNN's convolutions)
TORCH_ISA = {"avx2": dict(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")}


def minidiff_step(mode, batch, config, device, x, noise, t):
    from minidiff.optim import EMA, Adam
    from minidiff.schedule import NoiseSchedule
    from minidiff.train_step import TrainStep
    from minidiff.unet import UNet, UNetConfig
    from minidiff.utils.backend import get_xp
    xp = get_xp(device)
    model = UNet(UNetConfig(**config), seed=0).to(xp)
    model.train(mode == "train")
    if mode == "forward":
        xd, td = xp.asarray(x), xp.asarray(t)
        return lambda: model.forward(xd, td)
    opt = Adam(model.params, model.grads, lr=1e-4)
    if device == "cpu":                         # what the PyTorch twin does: forward, MSE, backward, Adam
        def step():
            model.zero_grad()
            out = model.forward(x, t)
            model.backward((2.0 / out.size) * (out - noise))    # d/d out of mean((out - noise)^2)
            opt.step()
        return step
    ts = TrainStep(model, opt, EMA(model.params), NoiseSchedule(1000), 1.0, cuda_graph=True)
    xd, nd = xp.asarray(x), xp.asarray(noise)

    def graphed_step():                         # the training step as minidiff trains: q_sample, clipping, EMA too
        with ts.stream_context():
            ts(xd, t, nd, None, 1e-4)
    return graphed_step


def torch_step(mode, batch, config, device, x, noise, t):
    import torch
    if device == "cpu":
        torch.set_num_threads(os.cpu_count())
    else:
        torch.set_default_device("cuda")
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from torch_unet import TorchUNet
    model = TorchUNet(**config)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    xt, nt, tt = (torch.as_tensor(a, device=device) for a in (x, noise, t))
    model.train(mode == "train")

    def step():
        if mode == "forward":
            with torch.no_grad():
                model(xt, tt)
            return
        opt.zero_grad()
        loss = torch.mean((model(xt, tt) - nt) ** 2)
        loss.backward()
        opt.step()
    return step


def worker(impl, mode, batch, config, seconds, device):
    import numpy as np
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, config["in_channels"], config["resolution"], config["resolution"]))
    x = x.astype(np.float32)
    noise = rng.standard_normal(x.shape).astype(np.float32)
    t = rng.integers(0, 1000, batch)
    step = (minidiff_step if impl == "minidiff" else torch_step)(mode, batch, config, device, x, noise, t)
    sync = lambda: None  # noqa: E731
    if device == "cuda":
        if impl == "minidiff":
            import cupy
            sync = cupy.cuda.Device().synchronize
        else:
            import torch
            sync = torch.cuda.synchronize
    for _ in range(3):                                           # warm-up (and, on the GPU, the graph capture)
        step()
    sync()
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        step()
        n += 1
    sync()
    dt = time.perf_counter() - t0
    print(json.dumps(dict(images_per_s=n * batch / dt, step_s=dt / n, peak_mb=peak_mb(impl, device))))


def peak_mb(impl, device):
    if device == "cpu":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: KiB
    if impl == "torch":
        import torch
        return torch.cuda.max_memory_allocated() / 2 ** 20
    import gc

    import cupy
    gc.collect()                                # pools only grow: what they hold is the high-water mark
    pools = [o for o in gc.get_objects() if isinstance(o, cupy.cuda.MemoryPool)]
    return sum(p.total_bytes() for p in pools) / 2 ** 20


def profile(batch, config, steps=5):
    """Self time per step of the functions that take most of a minidiff training step (cProfile), in this process."""
    import cProfile
    import pstats

    import numpy as np
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, config["in_channels"], config["resolution"], config["resolution"]))
    x = x.astype(np.float32)
    step = minidiff_step("train", batch, config, "cpu", x, rng.standard_normal(x.shape).astype(np.float32),
                         rng.integers(0, 1000, batch))
    step()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    total = (time.perf_counter() - t0) / steps
    rows = sorted(pstats.Stats(prof).stats.items(), key=lambda kv: -kv[1][2])
    print(f"training step, batch {batch}, C = {config['base_channels']}: {1e3 * total:.0f} ms "
          f"({batch / total:.0f} images/s, under the profiler); self time per step:")
    print("| function | calls per step | ms per step | share |\n| --- | --- | --- | --- |")
    for (path, line, name), (_, calls, self_time, _, _) in rows[:14]:
        where = name if path == "~" else f"{os.path.basename(path)}:{name}"
        print(f"| `{where}` | {calls // steps} | {1e3 * self_time / steps:.1f} | {self_time / steps / total:.0%} |")


def count_ops(batch, channels):
    """The array operations (kernel launches on a GPU) of one training step (train_step.TrainStep: q_sample, the
    network, the loss, backward, clipping, Adam, EMA) and of one sampling step (the network, the fused step), counted
    on NumPy through CuPy's code path (minidiff/fast/count.py): {"training step": Counter, "sampling step": Counter}
    by layer type."""
    import numpy as np
    from minidiff.fast import count
    from minidiff.optim import EMA, Adam
    from minidiff.sample import predict_eps
    from minidiff.schedule import NoiseSchedule
    from minidiff.step import StepParams, ddim_coefficients, step
    from minidiff.train_step import TrainStep
    from minidiff.unet import UNet, UNetConfig
    rng = np.random.default_rng(0)
    host = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
    x, noise, t = count.xp.asarray(host), count.xp.asarray(host[::-1].copy()), rng.integers(0, 1000, batch)
    model = UNet(UNetConfig(base_channels=channels), seed=0).to(count.xp)
    opt, ema, schedule = Adam(model.params, model.grads, lr=1e-4), EMA(model.params), NoiseSchedule(1000)
    ts = TrainStep(model, opt, ema, schedule, 1.0)
    ts(x, t, noise, None, 1e-4)                 # the first step makes what later steps reuse (tables, buffers)
    out = {}
    with count.counting(model) as counts, count.phase("loss, optimizer (per step)"):
        ts(x, t, noise, None, 1e-4)
    out["training step"] = counts
    model.train(False)
    tt = count.xp.asarray(np.full(batch, 500))
    params = StepParams(ddim_coefficients(schedule, 500, 480, 0.0), 1.0, True, 0, 500)
    with count.counting(model) as counts, count.phase("sampling step (fused kernel)"):
        eps, _ = predict_eps(model, schedule, x, tt)
        step(x, eps, params, out=x, x0_out=count.xp.zeros_like(x))
    out["sampling step"] = counts
    return out


def print_counts(batch, channels):
    counts = count_ops(batch, channels)
    labels = sorted(set().union(*counts.values()), key=lambda k: -counts["training step"].get(k, 0))
    print(f"array operations (kernel launches on a GPU) per step, C = {channels}, batch {batch}, counted on NumPy "
          f"through CuPy's code path (minidiff/fast/count.py):")
    print("| layer type | training step | sampling step |\n| --- | --- | --- |")
    for k in labels:
        print(f"| {k} | {counts['training step'].get(k, 0)} | {counts['sampling step'].get(k, 0)} |")
    print(f"| all | {sum(counts['training step'].values())} | {sum(counts['sampling step'].values())} |")


def cpu_times():
    """(steal, total) clock ticks of all cores since boot from /proc/stat (Linux), or None elsewhere. Steal is the time
    a virtual machine's cores were runnable but the host ran something else: a VM can look idle (load average,
    vmstat's idle column) while its host takes a share of every second."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_share(before, after):
    """The share of the cores' time that the host took between two cpu_times() readings (None: not known)."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def device_name(device):
    if device == "cpu":
        try:
            from minidiff.utils import native as _native
            isa = _native.core.cpu_isa() if _native.core else "reference only (no extension)"
        except ImportError:
            isa = "?"
        return f"CPU, {os.cpu_count()} threads, minidiff kernels: {isa}"
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(0)
    return f"GPU: {props['name'].decode()}, CuPy {cupy.__version__}"


def run_case(impl, mode, batch, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, mode, str(batch), "--channels",
           str(args.channels), "--shape", args.shape, "--seconds", str(args.seconds), "--device", args.device]
    env = dict(USER_ENV if impl == "torch" else os.environ)
    if args.isa:
        env.update(MINIDIFF_CPU_ISA=args.isa, **TORCH_ISA.get(args.isa, {}))
    if args.reference:
        env["MINIDIFF_REFERENCE"] = "1"
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(f"{impl} {mode} batch {batch} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, default=32, help="base channels C (32 is the benchmark model)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="mnist",
                    help="the images and the network's layout: MNIST's (the benchmark model) or DDPM's CIFAR-10")
    ap.add_argument("--seconds", type=float, default=6.0, help="time per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="measurements of each case (medians are shown)")
    ap.add_argument("--only", choices=["minidiff", "torch"], help="run one implementation")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--isa", choices=["avx512", "avx2", "base"], help="CPU: the instruction set of minidiff's kernels "
                                                                      "(and, for avx2, PyTorch's)")
    ap.add_argument("--reference", action="store_true", help="minidiff runs its readable NumPy references")
    ap.add_argument("--profile", action="store_true", help="profile minidiff's CPU training step at batch 64 instead")
    ap.add_argument("--count-ops", action="store_true", help="count the array operations (GPU kernel launches) of a "
                                                             "training step and a sampling step instead, by layer type")
    ap.add_argument("--worker", nargs=3, metavar=("IMPL", "MODE", "BATCH"),
                    help="one measurement in this process, printed as JSON (what each round runs): IMPL minidiff or "
                         "torch, MODE forward or train; for comparing two builds, one process each")
    args = ap.parse_args()
    config = dict(SHAPES[args.shape], base_channels=args.channels)
    if args.profile:
        return profile(64, config)
    if args.count_ops:
        return print_counts(128, args.channels)
    if args.worker:
        impl, mode, batch = args.worker
        if impl not in ("minidiff", "torch") or mode not in ("forward", "train") or not batch.isdigit() \
                or int(batch) < 1:
            ap.error(f"--worker takes IMPL (minidiff or torch), MODE (forward or train) and a batch size of at "
                     f"least 1, got {' '.join(args.worker)}")
        worker(impl, mode, int(batch), config, args.seconds, args.device)
        return
    if args.device == "cuda":
        from minidiff.utils.backend import get_xp
        try:
            get_xp("cuda")
        except RuntimeError as e:
            sys.exit(f"error: {e}")
    impls = [args.only] if args.only else ["minidiff", "torch"]
    if "torch" in impls:
        try:
            import torch
            if args.device == "cuda" and not torch.cuda.is_available():
                raise ImportError("no CUDA in this PyTorch")
        except ImportError as e:
            print(f"PyTorch not usable ({e}): minidiff only")
            impls = ["minidiff"]
    load, ticks = os.getloadavg(), cpu_times()
    print(f"U-Net C={args.channels}, {args.shape} shape, float32, {device_name(args.device)}"
          f"{', minidiff references' if args.reference else ''}{', ISA ' + args.isa if args.isa else ''}; "
          f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"| measure | batch | minidiff img/s | minidiff peak MB |"
          + (" torch img/s | torch peak MB | ratio (range) |" if "torch" in impls else ""))
    print("| --- | --- | --- | --- |" + (" --- | --- | --- |" if "torch" in impls else ""))
    for mode, batch in CASES[args.device]:
        rounds = [{impl: run_case(impl, mode, batch, args) for impl in impls} for _ in range(max(1, args.rounds))]
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
    load, stolen = os.getloadavg(), steal_share(ticks, cpu_times())
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
          + ("" if stolen is None else f"; time stolen by the host (steal): {stolen:.0%} of the cores' time"))
    if stolen is not None and stolen > 0.03:
        print("warning: this VM's host took part of the cores' time during the run; its ratios are not a fair "
              "comparison (PyTorch slows more under contention): measure again when steal is near 0%")


if __name__ == "__main__":
    main()
