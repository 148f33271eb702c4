"""Train a DDPM on MNIST (or Fashion-MNIST) with minidiff: the main job.

    pip install .
    python examples/mnist_train.py --data-dir ../shared/data/mnist            # the default: ~30 min on 2 CPU cores
    python examples/mnist_train.py --resume                                    # continue an interrupted run exactly
    python examples/mnist_train.py --text --out-dir runs/text                  # text-to-image (prompts.py)
    python examples/mnist_train.py --preset large --device cuda                # bigger model, longer (GPU)
    python examples/mnist_sample.py runs/mnist/checkpoint.npz --sampler ddpm   # then sample from it

Writes runs/mnist/checkpoint.npz (weights, EMA weights, the guide for autoguidance, optimizer state, step, config),
log.jsonl and PNG sample grids. Ctrl-C saves a checkpoint and stops; --resume continues bit for bit. The data set
is found in --data-dir, $MINIDIFF_DATA_DIR, the per-user cache or /usr/share/datasets/<name>, else downloaded
(see README).
"""
import argparse
import os
import sys
import time

import numpy as np

from minidiff.conditioning.prompts import build_tokenizer, prompt_table
from minidiff.conditioning.unet import ConditionConfig, build_unet
from minidiff.sample import sample
from minidiff.train import TrainConfig, TrainingError, train
from minidiff.unet import UNetConfig
from minidiff.utils.backend import get_xp
from minidiff.utils.checkpoint import CheckpointError, load_model
from minidiff.utils.data import DataError
from minidiff.utils.image import save_grid

# "cpu": the main job, sized so that 2 CPU cores train and draw the grid within 30 minutes (docs/training.md has
#        the measured run and the recipes compared): the U-Net at C = 24 with one ResBlock per level (627k
#        parameters, ~320 training images/s on 2 cores with the native kernels), 8,000 steps with a cosine
#        learning rate after the warm-up, EMA horizon ~1,000 steps; max_minutes stops a slower machine in time.
#        It keeps the EMA weights of step 1,000 as the guide of autoguidance: the final grid is DPM-Solver++ 20 with
#        eps_guide + 2 (eps - eps_guide) (docs/sampling.md).
# "large": the full-size DDPM U-Net at C = 64, trained far longer: for a GPU or a long CPU run.
PRESETS = {
    "cpu": dict(model=dict(base_channels=24, num_res_blocks=1),
                train=dict(steps=8000, batch_size=64, lr=1e-3, warmup_steps=100, lr_schedule="cosine",
                               ema_decay=0.999, max_minutes=28, guide_step=1000)),
    "large": dict(model=dict(base_channels=64), train=dict(steps=30000, batch_size=128, lr=2e-4, warmup_steps=1000,
                                                           ema_decay=0.9999, sample_every=2500, ckpt_every=1000)),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="default settings to start from")
    p.add_argument("--dataset", choices=["mnist", "fashion-mnist"], default="mnist")
    p.add_argument("--data-dir", default=None, help="folder with the four IDX files (.gz or raw)")
    p.add_argument("--out-dir", default=None, help="where checkpoint, log and PNGs go (default runs/<dataset>)")
    p.add_argument("--steps", type=int, help="total optimizer steps")
    p.add_argument("--epochs", type=float, help="alternative to --steps: passes over the training set")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--channels", type=int, help="U-Net base channels C")
    p.add_argument("--res-blocks", type=int, help="ResBlocks per level on the way down (num_res_blocks)")
    p.add_argument("--lr", type=float, help="Adam learning rate")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], help="after the warm-up: constant or cosine to 0")
    p.add_argument("--warmup-steps", type=int, help="linear learning-rate warm-up")
    p.add_argument("--ema-decay", type=float, help="EMA decay (after its warm-up); horizon ~ 1 / (1 - decay) steps")
    p.add_argument("--prediction", choices=["epsilon", "v_prediction"], help="what the network predicts")
    p.add_argument("--loss-weighting", choices=["uniform", "min_snr"], help="per-timestep loss weight (min_snr: "
                                                                           "Min-SNR-gamma, gamma 5)")
    p.add_argument("--class-conditional", action="store_true", help="learn p(x | digit) with classifier-free guidance")
    p.add_argument("--text", nargs="?", const="add", choices=["add", "concat"], default=None,
                   help="learn p(x | prompt): the text vector added to the time embedding (add, the default: it "
                        "reaches every ResBlock, see docs/text_to_image.md) or joined to x_t as input channels (concat, "
                        "the article's section 3.3)")
    p.add_argument("--max-minutes", type=float, help="stop training (saving) after this long, then draw the grid")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--no-cuda-graphs", action="store_true", help="with --device cuda: run every step eagerly instead "
                                                                 "of replaying a captured CUDA graph")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from <out-dir>/checkpoint.npz")
    p.add_argument("--final-sampler", choices=["ddpm", "ddim", "dpmsolver++", "none"], default="dpmsolver++",
                   help="sampler for the final grid (dpmsolver++: 20 steps, the best measured, see docs/sampling.md; "
                        "ddim: 100 steps; ddpm: all 1000)")
    p.add_argument("--final-images", type=int, default=36)
    p.add_argument("--autoguidance", type=float, default=2.0,
                   help="unconditional models: weight w of the final grid's autoguidance by the early EMA weights "
                        "the run keeps (the cpu preset's guide_step; 1: none)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    preset = PRESETS[a.preset]
    mcfg = UNetConfig(**preset["model"])
    tcfg = TrainConfig(**preset["train"])
    tcfg.dataset, tcfg.data_dir, tcfg.device, tcfg.seed = a.dataset, a.data_dir, a.device, a.seed
    tcfg.out_dir = a.out_dir or os.path.join("runs", a.dataset.replace("-", "_"))
    for name in ("batch_size", "lr", "steps", "lr_schedule", "warmup_steps", "ema_decay", "loss_weighting",
                 "max_minutes"):
        if getattr(a, name) is not None:
            setattr(tcfg, name, getattr(a, name))
    tcfg.cuda_graphs = not a.no_cuda_graphs
    if a.res_blocks is not None:
        mcfg.num_res_blocks = a.res_blocks
    if a.prediction is not None:
        mcfg.prediction_type = a.prediction
    if a.epochs is not None:
        tcfg.steps = max(1, round(a.epochs * 60000 / tcfg.batch_size))
    if a.channels is not None:
        mcfg.base_channels = a.channels
    cond = None
    if a.class_conditional:
        cond = ConditionConfig(num_classes=10)
    if a.text:
        cond = ConditionConfig(text_cond=a.text, prompt_set=a.dataset, vocab_size=len(build_tokenizer(a.dataset)))
    if a.final_images < 1:
        p.error(f"--final-images must be at least 1, got {a.final_images}")

    try:
        model = build_unet(mcfg, cond, seed=tcfg.seed)
        print(f"model: {mcfg}\n       {cond or 'unconditional'}\n       {model.num_parameters():,} parameters\n"
              f"training: {tcfg}")
        t0 = time.perf_counter()
        _, _, step = train(tcfg, model, resume=a.resume, progress=not a.no_progress)
        elapsed = time.perf_counter() - t0
        print(f"trained to step {step} in {elapsed:.0f} s")
        out_of_time = tcfg.max_minutes and elapsed >= 60 * tcfg.max_minutes     # stopped by the budget: draw anyway
        if a.final_sampler != "none" and (step >= tcfg.steps or out_of_time):
            final_grid(a, tcfg, step)
    except (DataError, CheckpointError, TrainingError, ValueError, RuntimeError) as e:   # RuntimeError: no GPU
        sys.exit(f"error: {e}")


def final_grid(a, tcfg, step):
    """The run's final grid from the checkpoint just written: its EMA weights, and for unconditional models
    autoguidance by the run's early EMA weights; conditional models: classifier-free guidance, w = 3, one digit per
    column."""
    t0 = time.perf_counter()
    ckpt = os.path.join(tcfg.out_dir, "checkpoint.npz")
    model, schedule, _ = load_model(ckpt, "ema", a.device)
    labels = np.arange(a.final_images) % 10
    cond = getattr(model, "cond", None)
    y = (None if cond is None else labels if cond.num_classes else
         prompt_table(model.tokenizer, cond.prompt_set, "train", cond.text_len)[labels, 0])
    guide = (load_model(ckpt, "guide", a.device)[0] if y is None and tcfg.guide_step and step >= tcfg.guide_step
             else None)
    w = 3.0 if y is not None else a.autoguidance if guide is not None else 1.0
    imgs = sample(model, schedule, a.final_images, sampler=a.final_sampler,
                  num_steps={"ddpm": None, "ddim": 100, "dpmsolver++": 20}[a.final_sampler], seed=a.seed,
                  y=y, guidance=w, guide=guide, xp=get_xp(a.device), progress=not a.no_progress)
    path = save_grid(imgs, os.path.join(tcfg.out_dir, f"final_{a.final_sampler}.png"),
                     nrow=10 if y is not None else 6)
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s of sampling)")


if __name__ == "__main__":
    main()
