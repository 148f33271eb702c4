"""What tests/test_distributed.py runs under mpiexec (and alone, for the one-process reference): a tiny RGB model
trained on a folder of images, or its bound, with faults to inject.

    mpi_run.py train FOLDER OUT STEPS [--resume] [--fail-rank R --fail-step S] [--nan-rank R] [--minutes-rank R]
                                      [--interrupt-rank R --interrupt-step S] [--device cuda]
    mpi_run.py bound CKPT FOLDER OUT
    mpi_run.py average OUT            # each rank's mean of its rows of a fixed batch, then group.average
    mpi_run.py fail MESSAGE           # every rank calls group.fail(MESSAGE, together=True)
"""
import argparse
import json
import os
import signal
import sys

import numpy as np

from minidiff.conditioning.unet import build_unet
from minidiff.evaluation.evaluate import bound
from minidiff.train import TrainConfig, train
from minidiff.unet import UNetConfig
from minidiff.utils.backend import to_numpy
from minidiff.utils.checkpoint import load_model
from minidiff.utils.data import load_dataset, to_model_range
from minidiff.utils.distributed import group as process_group

TINY = dict(in_channels=3, resolution=8, base_channels=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
            dropout=0.2)                # dropout masks too must not depend on the number of processes


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["train", "bound", "average", "fail"])
    p.add_argument("args", nargs="+")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--fail-rank", type=int, default=-1)
    p.add_argument("--fail-step", type=int, default=-1)
    p.add_argument("--nan-rank", type=int, default=-1)
    p.add_argument("--minutes-rank", type=int, default=-1)
    p.add_argument("--interrupt-rank", type=int, default=-1)
    p.add_argument("--interrupt-step", type=int, default=-1)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    group = process_group()
    if a.mode == "fail":
        group.fail(a.args[0], code=3, together=True)
    if a.mode == "average":                     # the batch's mean from each share's mean, weighted by its rows
        x = np.random.default_rng(0).standard_normal((8, 5)).astype(np.float32)
        lo, hi = group.share(len(x))
        flat = x[lo:hi].mean(axis=0)
        group.average(flat, (hi - lo) / len(x))
        everyone = group.gather(flat.tolist())
        if group.main:
            json.dump(dict(ranks=everyone, want=x.mean(axis=0).tolist()), open(a.args[0], "w"))
        return
    if a.mode == "bound":
        ckpt, folder, out = a.args
        model, schedule, _ = load_model(ckpt)
        x = to_model_range(load_dataset(folder, resolution=8, channels=3, progress=False)[0])
        b = bound(model, schedule, x[:16], exact_images=2, mc_images=16, batch_size=8, group=group)
        if group.main:
            json.dump(dict(exact=b["exact_bpd"], mc=b["mc_bpd"], se=b["mc_se"]), open(out, "w"))
        return
    folder, out, steps = a.args
    cfg = TrainConfig(dataset=folder, out_dir=out, steps=int(steps), batch_size=8, lr=2e-3, warmup_steps=2,
                      num_train_timesteps=50, log_every=2, sample_every=0, ckpt_every=2, hflip=True, guide_step=1,
                      device=a.device)
    if group.rank == a.minutes_rank:
        cfg.max_minutes = 1e-9                  # only this process runs out of time: all must stop with it

    def callback(step, loss):
        if group.rank == a.fail_rank and step == a.fail_step:
            raise RuntimeError(f"injected failure on rank {group.rank} at step {step}")
        if group.rank == a.interrupt_rank and step == a.interrupt_step:
            os.kill(os.getpid(), signal.SIGINT)     # what Ctrl-C sends, here to one process only

    if group.rank == a.nan_rank:                # this process's loss is NaN from its first step on
        import minidiff.train_step as ts
        real = ts.loss_simple
        ts.loss_simple = lambda *args, **kw: (real(*args, **kw)[0] * float("nan"), real(*args, **kw)[1])
    model, _, step = train(cfg, build_unet(UNetConfig(**TINY), seed=cfg.seed), resume=a.resume, progress=False,
                           callback=callback, group=group)
    if group.main:
        np.savez(os.path.join(out, "final.npz"), step=step, **{k: to_numpy(v) for k, v in model.params.items()})
    print(f"rank {group.rank} of {group.size} stopped at step {step}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
