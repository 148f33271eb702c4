"""Benchmark: the native CPU kernels (csrc/nn_*.cpp) in GFLOP/s on the U-Net's convolution shapes, per instruction
set, beside PyTorch's conv2d (channels_last) on the same shapes and threads, and the NumPy reference form.

    python bench/bench_kernels.py                  # batch 64, every instruction set this CPU runs
    python bench/bench_kernels.py --batch 128 --reps 10
    python bench/bench_kernels.py --rounds 3       # three passes, each cell's best: steadier on a noisy VM
    python bench/bench_kernels.py --direct         # every convolution by the direct sum (no Winograd)

A 3x3 convolution of a (B, H, W, Cin) batch to Cout channels costs 2 B H W Cin Cout 9 FLOP forward and twice that
backward (input and weight gradients). Times are the best of at least --reps calls spread over at least --seconds,
after a warm-up (the machine's other load shows as spread, not in the best). Each cell also gives the share of the
instruction set's peak, measured first by core.fma_peak_gflops (independent FMAs in registers on all threads:
2 FMA units x vector width x 2 FLOP x clock x cores); PyTorch's share is of the best instruction set's peak.
The shapes marked "Winograd 4x4" take Winograd F(4x4, 3x3) forward and for the input gradient (36 products per
4 x 4 output tile instead of 144), those marked "Winograd 2x2" F(2x2, 3x3) (16 per 2 x 2 tile instead of 36), and
"+ dW" for the weight gradient too (followed by the instruction sets that do, when not all do): they are counted
at the direct sum's FLOPs too, so their figures are the rate the direct sum would need for the same time, and
their shares can pass 100%.
"""
import argparse
import os
import time

import numpy as np

try:                # before minidiff sets its OpenMP wait (utils/native.py): PyTorch's threads start as alone
    import torch
except ImportError:
    torch = None

from minidiff import fast as kernels, layers
from minidiff.utils import native as _native

SHAPES = [(28, 32, 32), (28, 64, 32), (28, 96, 32), (14, 64, 64), (14, 128, 64), (7, 64, 64), (7, 128, 64),
          (4, 64, 64), (28, 24, 24), (14, 48, 48)]   # (H = W, Cin, Cout) of the C = 32 (MNIST, CIFAR-10) and C = 24 U-Nets


def best_ms(fn, reps, seconds):
    """the best time of at least `reps` calls spread over at least `seconds` (a VM's host takes the cores in
    bursts: a short window can fall inside one)"""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.2:       # warm-up: caches, the cores' clocks, the other library's threads idle
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def cell(fwd, bwd, peak):
    """forward / backward GFLOP/s and their shares of the peak"""
    return f"{fwd:.0f} / {bwd:.0f} ({fwd / peak:.0%} / {bwd / peak:.0%})"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seconds", type=float, default=0.5, help="least time over which each cell's calls spread")
    p.add_argument("--rounds", type=int, default=1, help="passes over the table; each cell shows its best")
    p.add_argument("--direct", action="store_true", help="Winograd off: every convolution by the direct sum")
    a = p.parse_args()
    if a.reps < 1 or a.rounds < 1 or a.seconds < 0:
        p.error(f"--reps and --rounds must be at least 1 and --seconds at least 0, got {a.reps}, {a.rounds}, "
                f"{a.seconds:g}")
    core = _native.core
    if core is None:
        raise SystemExit(f"error: {_native.native_status()['reason']}")
    if torch is not None:
        torch.set_num_threads(os.cpu_count())
    if a.direct:
        core.set_conv_winograd(False)
    isas = core.cpu_isas()
    peak = {isa: core.fma_peak_gflops(isa) for isa in isas}
    print(f"{os.cpu_count()} threads; instruction sets {', '.join(isas)}; load average {os.getloadavg()[0]:.2f}; "
          f"GFLOP/s (forward / backward) and share of the peak, best of {a.reps}+ calls over {a.seconds:g}+ s"
          f"{f' in each of {a.rounds} rounds' if a.rounds > 1 else ''}; "
          "peak (FMAs in registers): "
          + ", ".join(f"{isa} {g:.0f}" for isa, g in peak.items()))
    print("| H x W, Cin -> Cout | " + " | ".join(isas) + " | NumPy reference | PyTorch channels_last |")
    print("| --- " * (len(isas) + 3) + "|")
    best = {}                                   # (shape, column) -> the best (forward, backward) GFLOP/s so far
    for r in range(a.rounds):
        for shape in SHAPES:
            for col, gflops in measure(shape, a, core, isas, reference=r == 0).items():
                old = best.get((shape, col), (0.0, 0.0))
                best[shape, col] = (max(old[0], gflops[0]), max(old[1], gflops[1]))
            if r == a.rounds - 1:
                hw, cin, cout = shape
                cells = [cell(*best[shape, isa], peak[isa]) for isa in isas]
                cells.append("{:.0f} / {:.0f}".format(*best[shape, "reference"]))
                cells.append(cell(*best[shape, "torch"], peak[isas[0]]) if torch is not None else "-")
                print(f"| {hw} x {hw}, {cin} -> {cout}{winograd_mark(core, isas, shape)} | " + " | ".join(cells)
                      + " |", flush=True)


def winograd_mark(core, isas, shape):
    """' (Winograd 4x4)' or ' (Winograd 2x2)' (the tile, forward and input gradient), with ' + dW' when the weight
    gradient takes it too, followed by the instruction sets that do when not all of them do (the rules depend on the
    vector width), or ''"""
    hw, cin, cout = shape
    kinds = {}
    for isa in isas:
        core.set_cpu_isa(isa)
        m, dw = core.conv_winograd_tile(hw, hw, cin, cout, 1), core.conv_winograd_tile(hw, hw, cin, cout, 1, wgrad=True)
        kinds[isa] = f"Winograd {m}x{m}" + (" + dW" if dw else "") if m else ""
    core.set_cpu_isa("auto")
    marks = []
    for kind in dict.fromkeys(kinds.values()):
        if kind:
            which = [isa for isa in isas if kinds[isa] == kind]
            marks.append(kind if len(which) == len(isas) else f"{kind}: {', '.join(which)}")
    return f" ({'; '.join(marks)})" if marks else ""


def measure(shape, a, core, isas, reference):
    """{column: (forward, backward) GFLOP/s} of one shape: each instruction set, the NumPy reference (when
    `reference`: it is slow), PyTorch"""
    hw, cin, cout = shape
    rng = np.random.default_rng(hw * 1000 + cin + cout)
    x = rng.standard_normal((a.batch, hw, hw, cin)).astype(np.float32)
    w = (rng.standard_normal((cout, cin, 3, 3)) * 0.1).astype(np.float32)
    b = np.zeros(cout, np.float32)
    d = rng.standard_normal((a.batch, hw, hw, cout)).astype(np.float32)
    flop = 2 * a.batch * hw * hw * cin * cout * 9
    gflops = lambda f, bw: (flop / f / 1e6, 2 * flop / bw / 1e6)   # noqa: E731 (times in ms)
    out = {}
    for isa in isas:
        core.set_cpu_isa(isa)
        out[isa] = gflops(*(best_ms(lambda: fn(*args), a.reps, a.seconds) for fn, args in
                            ((layers.conv2d, (x, w, b, 1, 1)), (layers.conv2d_backward, (x, w, d, 1, 1)))))
    core.set_cpu_isa("auto")
    if reference:
        with kernels.use_reference():
            out["reference"] = gflops(best_ms(lambda: layers.conv2d(x, w, b, 1, 1), max(1, a.reps // 2), 0),
                                      best_ms(lambda: layers.conv2d_backward(x, w, d, 1, 1), max(1, a.reps // 2), 0))
    if torch is not None:
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)      # NCHW view of NHWC: channels_last
        wt = torch.from_numpy(w).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        gt = torch.from_numpy(d).permute(0, 3, 1, 2)

        def fwd():
            with torch.no_grad():
                torch.nn.functional.conv2d(xt, wt, padding=1)

        def bwd():                              # forward + backward, less the forward
            torch.autograd.grad(torch.nn.functional.conv2d(xt, wt, padding=1), (xt, wt), gt)
        tf = best_ms(fwd, a.reps, a.seconds)
        out["torch"] = gflops(tf, best_ms(bwd, a.reps, a.seconds) - tf)
    return out


if __name__ == "__main__":
    main()
