"""Train a diffusion model on MNIST, Fashion-MNIST, CIFAR-10 or any folder of images, in one process or many.

    python examples/train.py --data mnist                                   # the main job (examples/mnist_train.py)
    python examples/train.py --data cifar10                                 # RGB 32x32, sized for 2 CPU cores
    python examples/train.py --data cifar10 --preset gpu --device cuda      # DDPM's CIFAR-10 network and recipe
    python examples/train.py --data path/to/photos --resolution 64 --class-conditional --hflip
    mpiexec -n 4 python examples/train.py --data cifar10 --preset gpu --device cuda   # pip install ".[mpi]"
    python examples/mnist_sample.py runs/cifar10/checkpoint.npz --sampler dpmsolver++ --steps 20

--data: "mnist", "fashion-mnist", "cifar10" (found in --data-dir, $MINIDIFF_DATA_DIR, the per-user cache or
/usr/share/datasets, else downloaded), or a folder of PNG/JPEG/WebP/BMP images (one subfolder per class; decoded once,
resized and centre-cropped to --resolution, cached). Writes <out-dir>/checkpoint.npz (weights, EMA weights, the guide
for autoguidance, optimizer state, step, config, class names), log.jsonl and PNG grids. Ctrl-C saves a checkpoint and
stops; --resume continues bit for bit. Under mpiexec, N processes train one model (each takes its share of every
batch; rank 0 writes the files): the run is the one a single process makes with the same --batch-size.
"""
import argparse
import os
import sys
import time

import numpy as np

from minidiff.conditioning.prompts import TEMPLATES, build_tokenizer, prompt_table
from minidiff.conditioning.unet import ConditionConfig, build_unet
from minidiff.sample import sample
from minidiff.train import TrainConfig, TrainingError, train
from minidiff.unet import UNetConfig
from minidiff.utils.backend import get_xp
from minidiff.utils.checkpoint import CheckpointError, load_model
from minidiff.utils.data import DATASETS, DataError, load_dataset
from minidiff.utils.distributed import group as process_group
from minidiff.utils.image import save_grid

# Presets by the data: "mnist" (MNIST, Fashion-MNIST: 28x28, one channel) and "cifar10" (CIFAR-10, and folders).
#   mnist/cpu: the main job, sized so that 2 CPU cores train and draw the grid within 30 minutes (docs/training.md has
#             the measured run and the recipes compared): C = 24, one ResBlock per level, a cosine learning rate,
#             EMA horizon ~1,000 steps, the EMA of step 1,000 kept as the guide of autoguidance; max_minutes stops a
#             slower machine in time.
#   mnist/gpu: the DDPM U-Net at C = 64, trained far longer.
#   cifar10/cpu: DDPM's CIFAR-10 layout (ch_mult 1, 2, 2, 2; attention at 16x16) scaled to C = 32 and one ResBlock per
#             level, for 30 minutes on 2 cores.
#   cifar10/gpu: DDPM's CIFAR-10 network and recipe (Ho et al. 2020, appendix B): C = 128, two ResBlocks per level,
#             dropout 0.1, Adam 2e-4 with 5,000 warm-up steps, batch 128, EMA 0.9999, random flips, 800k steps.
PRESETS = {
    ("mnist", "cpu"): dict(model=dict(base_channels=24, num_res_blocks=1),
                          train=dict(steps=6400, batch_size=64, lr=1e-3, warmup_steps=100, lr_schedule="cosine",
                                     ema_decay=0.999, max_minutes=28, guide_step=1000)),
    ("mnist", "gpu"): dict(model=dict(base_channels=64),
                          train=dict(steps=30000, batch_size=128, lr=2e-4, warmup_steps=1000, ema_decay=0.9999,
                                     sample_every=2500, ckpt_every=1000)),
    ("cifar10", "cpu"): dict(model=dict(base_channels=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, attn_resolutions=(16,)),
                         train=dict(steps=2700, batch_size=64, lr=1e-3, warmup_steps=100, lr_schedule="cosine",
                                    ema_decay=0.999, max_minutes=28, guide_step=500, hflip=True)),
    ("cifar10", "gpu"): dict(model=dict(base_channels=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                                    dropout=0.1),
                         train=dict(steps=800000, batch_size=128, lr=2e-4, warmup_steps=5000, ema_decay=0.9999,
                                    hflip=True, sample_every=10000, ckpt_every=5000)),
}
OPTIONS = ("batch_size", "lr", "steps", "lr_schedule", "warmup_steps", "ema_decay", "loss_weighting", "max_minutes")


def channel_multipliers(text):
    """--ch-mult 1,2,4 -> (1, 2, 4)."""
    return tuple(int(m) for m in text.split(","))


def parser(default_data=None, description=None):
    p = argparse.ArgumentParser(description=description or __doc__.split("\n")[0])
    if default_data is None:
        p.add_argument("--data", required=True, help="mnist, fashion-mnist, cifar10, or a folder of images")
    else:
        p.add_argument("--dataset", dest="data", choices=["mnist", "fashion-mnist"], default=default_data)
    p.add_argument("--preset", choices=["cpu", "gpu"], default="cpu", help="default settings to start from")
    p.add_argument("--data-dir", default=None, help="folder holding the data set's files")
    p.add_argument("--resolution", type=int, default=32, help="image folders: the side the images are cut to")
    p.add_argument("--color", choices=["auto", "gray", "rgb"], default="auto",
                   help="image folders: one channel or three (auto: by the files)")
    p.add_argument("--out-dir", default=None, help="where checkpoint, log and PNGs go (default runs/<data>)")
    p.add_argument("--steps", type=int, help="total optimizer steps")
    p.add_argument("--epochs", type=float, help="alternative to --steps: passes over the training set")
    p.add_argument("--batch-size", type=int, help="the global batch (shared by the processes under mpiexec)")
    p.add_argument("--channels", type=int, help="U-Net base channels C")
    p.add_argument("--ch-mult", type=channel_multipliers,
                   help="channels C * m at each level, comma-separated: 1,2,4 (ch_mult; the level count too)")
    p.add_argument("--res-blocks", type=int, help="ResBlocks per level on the way down (num_res_blocks)")
    p.add_argument("--lr", type=float, help="Adam learning rate")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], help="after the warm-up: constant or cosine to 0")
    p.add_argument("--warmup-steps", type=int, help="linear learning-rate warm-up")
    p.add_argument("--ema-decay", type=float, help="EMA decay (after its warm-up); horizon ~ 1 / (1 - decay) steps")
    p.add_argument("--prediction", choices=["epsilon", "v_prediction"], help="what the network predicts")
    p.add_argument("--loss-weighting", choices=["uniform", "min_snr"], help="per-timestep loss weight (min_snr: "
                                                                           "Min-SNR-gamma, gamma 5)")
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None,
                   help="flip training images left-right at random (the cifar10 presets do)")
    p.add_argument("--class-conditional", action="store_true", help="learn p(x | class) with classifier-free guidance")
    p.add_argument("--text", nargs="?", const="add", choices=["add", "concat"], default=None,
                   help="learn p(x | prompt): the text vector added to the time embedding (add, the default: it "
                        "reaches every ResBlock, see docs/text_to_image.md) or joined to x_t as input channels (concat, "
                        "the article's section 3.3); MNIST and Fashion-MNIST")
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
                        "the run keeps (the cpu presets' guide_step; 1: none)")
    p.add_argument("--no-progress", action="store_true")
    return p


def configure(a, data):
    """(UNetConfig, ConditionConfig or None, TrainConfig) for the parsed options and the loaded data set."""
    images, _ = data
    channels = 1 if images.ndim == 3 else images.shape[1]
    kind = "mnist" if a.data in ("mnist", "fashion-mnist") else "cifar10"
    preset = PRESETS[kind, a.preset]
    tcfg = TrainConfig(**preset["train"])
    tcfg.dataset, tcfg.data_dir, tcfg.device, tcfg.seed = a.data, a.data_dir, a.device, a.seed
    tcfg.out_dir = a.out_dir or os.path.join("runs", os.path.basename(os.path.normpath(a.data)).replace("-", "_"))
    for name in OPTIONS:
        if getattr(a, name) is not None:
            setattr(tcfg, name, getattr(a, name))
    tcfg.cuda_graphs = not a.no_cuda_graphs
    if a.hflip is not None:
        tcfg.hflip = a.hflip
    tcfg.check()                                                   # the options' values, before any is used
    if a.epochs is not None:
        if not a.epochs > 0:
            raise ValueError(f"--epochs must be > 0, got {a.epochs}")
        tcfg.steps = max(1, round(a.epochs * len(images) / tcfg.batch_size))
    changes = {field: value for field, value in (("num_res_blocks", a.res_blocks), ("prediction_type", a.prediction),
                                                 ("base_channels", a.channels), ("ch_mult", a.ch_mult))
               if value is not None}
    mcfg = UNetConfig(**dict(preset["model"], in_channels=channels, resolution=images.shape[-1], **changes))
    cond = None
    if a.class_conditional:
        cond = ConditionConfig(num_classes=len(data.class_names or set(data[1].tolist())))
    if a.text:
        if a.data not in TEMPLATES:
            raise ValueError(f"--text needs prompt templates; they exist for {', '.join(sorted(TEMPLATES))}")
        cond = ConditionConfig(text_cond=a.text, prompt_set=a.data, vocab_size=len(build_tokenizer(a.data)))
    return mcfg, cond, tcfg


def main(argv=None, default_data=None, description=None):
    p = parser(default_data, description)
    a = p.parse_args(argv)
    if a.final_images < 1:
        p.error(f"--final-images must be at least 1, got {a.final_images}")
    group = process_group()
    try:
        folder = ({} if a.data in DATASETS else
                  dict(resolution=a.resolution, channels=dict(auto=None, gray=1, rgb=3)[a.color]))
        with group.main_first():                 # rank 0 downloads or decodes a folder first, the others reuse it
            data = load_dataset(a.data, "train", data_dir=a.data_dir, progress=not a.no_progress and group.main,
                                **folder)
        mcfg, cond, tcfg = configure(a, data)
        model = build_unet(mcfg, cond, seed=tcfg.seed)
        if group.main:
            print(f"model: {mcfg}\n       {cond or 'unconditional'}\n       {model.num_parameters():,} parameters\n"
                  f"training: {tcfg}\n       {group.size} process(es), {len(data[0]):,} training images")
        t0 = time.perf_counter()
        _, _, step = train(tcfg, model, resume=a.resume, progress=not a.no_progress, group=group)
        elapsed = time.perf_counter() - t0
        if group.main:
            print(f"trained to step {step} in {elapsed:.0f} s")
        out_of_time = tcfg.max_minutes and elapsed >= 60 * tcfg.max_minutes     # stopped by the budget: draw anyway
        if a.final_sampler != "none" and (step >= tcfg.steps or out_of_time):
            final_grid(a, tcfg, step, group)
    except (DataError, CheckpointError, TrainingError, ValueError, RuntimeError) as e:   # RuntimeError: no GPU
        group.fail(f"error: {e}", together=getattr(e, "every_rank", False))


def final_grid(a, tcfg, step, group=None):
    """The run's final grid from the checkpoint just written: its EMA weights, and for unconditional models
    autoguidance by the run's early EMA weights; conditional models: classifier-free guidance, w = 3, one class per
    column. Drawn by all processes (each its share of the batches), written by rank 0."""
    t0 = time.perf_counter()
    ckpt = os.path.join(tcfg.out_dir, "checkpoint.npz")
    model, schedule, _ = load_model(ckpt, "ema", a.device)
    cond = getattr(model, "cond", None)
    columns = min(10, cond.num_classes) if cond is not None and cond.num_classes else 10
    labels = np.arange(a.final_images) % columns
    y = (None if cond is None else labels if cond.num_classes else
         prompt_table(model.tokenizer, cond.prompt_set, "train", cond.text_len)[labels, 0])
    guide = (load_model(ckpt, "guide", a.device)[0] if y is None and tcfg.guide_step and step >= tcfg.guide_step
             else None)
    w = 3.0 if y is not None else a.autoguidance if guide is not None else 1.0
    imgs = sample(model, schedule, a.final_images, sampler=a.final_sampler,
                  num_steps={"ddpm": None, "ddim": 100, "dpmsolver++": 20}[a.final_sampler], seed=a.seed,
                  y=y, guidance=w, guide=guide, xp=get_xp(a.device), progress=not a.no_progress and
                  (group is None or group.main), group=group)
    if group is None or group.main:
        path = save_grid(imgs, os.path.join(tcfg.out_dir, f"final_{a.final_sampler}.png"),
                         nrow=columns if y is not None else 6)
        print(f"wrote {path} ({time.perf_counter() - t0:.0f} s of sampling)")


if __name__ == "__main__":
    sys.exit(main())
