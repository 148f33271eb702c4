"""Evaluate a checkpoint (or a .npy of samples): bits per dimension of the bound and sample quality, as a table.

    python examples/mnist_classifier.py --out-dir runs/classifier   # once
    python examples/mnist_eval.py runs/mnist/checkpoint.npz \\
        --samplers ddim10,ddim20,ddim50,ddim100,ddpm --bpd-exact 4 --bpd-mc 1000 --json eval.json
    python examples/mnist_eval.py runs/mnist/checkpoint.npz --samplers dpmsolver++20 --autoguidance 1,2   # guided
    python examples/mnist_eval.py samples.npy --labels labels.npy          # judge samples made elsewhere
    python examples/mnist_eval.py runs/text/checkpoint.npz --prompts train,held_out --guidance 0,1,2,3,5
    python examples/mnist_eval.py --calibrate -n 1000   # the judge on known defects

For each sampler (ddpm = all T steps; ddimS = S DDIM steps, eta 0; dpmsolver++S = S DPM-Solver++(2M) steps on the
same timesteps, e.g. dpmsolver++20) it draws -n images (default 1,000: compare
samplers at this count; at n = 100 the floor is 5x higher and faint defects hide in it) and reports seconds per
image, the Frechet distance to the MNIST test set in the classifier's judge features with its floor (real training
images at the same count) and their ratio, the classifier's mean confidence, the fraction of samples it classifies
with confidence >= 0.9, the predicted-class histogram (largest fraction, entropy and the ten percentages), and
which of the project's targets for a good sampler the row misses (evaluate.TARGET). For class- or
prompt-conditional checkpoints, images are drawn for the digits 0..9 in turn (with each prompt template of the
split in turn) at every guidance weight w, and the fraction recognised as the prompted digit is reported too.
--autoguidance w1,w2,... draws each sampler at each weight with the checkpoint's guide (its early EMA weights;
rows "<sampler>/guide"; w = 1 is the model alone).
Writes the per-term bits-per-dimension plot (bpd_terms.png) and sample grids to --out-dir. --calibrate judges
real training images and known degradations of them instead (evaluate.calibration_sets, docs/evaluation.md),
with a grid of each (calibration.png).
"""
import argparse
import json
import os
import sys
import time

import numpy as np

from minidiff.conditioning.prompts import class_prompts
from minidiff.conditioning.text import encode_prompts
from minidiff.evaluation.classifier import load_classifier, predict
from minidiff.evaluation.evaluate import TARGET, bound, calibration_sets, frechet_floor, sample_quality, target_misses
from minidiff.sample import sample
from minidiff.utils.checkpoint import CheckpointError, load_model
from minidiff.utils.data import DataError, load_dataset, to_model_range
from minidiff.utils.distributed import group as process_group
from minidiff.utils.image import save_figure, save_grid, save_line_plot


def parse_sampler(name):
    """"ddpm" -> ("ddpm", None); "ddim50" -> ("ddim", 50); "dpmsolver++20" -> ("dpmsolver++", 20)."""
    if name == "ddpm":
        return "ddpm", None
    for sampler in ("ddim", "dpmsolver++"):
        steps = name[len(sampler):]
        if name.startswith(sampler) and steps.isdigit() and int(steps) > 0:
            return sampler, int(steps)
    raise ValueError(f"unknown sampler {name!r}: use ddpm, ddimS or dpmsolver++S with S the number of steps "
                     f"(e.g. ddim50, dpmsolver++20)")


def conditions(model, meta, split, n):
    """(labels (n,), model inputs y) for a conditional model: digits 0..9 in turn, and for text models the
    templates of the prompt split in turn."""
    labels = np.arange(n) % 10
    if model.cond.num_classes:
        return labels, labels
    prompts = class_prompts(meta["config"]["train"]["dataset"], split)
    texts = [prompts[c][(i // 10) % len(prompts[c])] for i, c in enumerate(labels)]
    return labels, encode_prompts(model.tokenizer, texts, model.cond.text_len)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", nargs="?",
                   help="a minidiff checkpoint (.npz) or generated images (.npy, (N, 1, 28, 28) in [-1, 1])")
    p.add_argument("--calibrate", action="store_true",
                   help="instead of a source: judge -n real training images and known degradations of them")
    p.add_argument("--classifier", default="runs/classifier/classifier.npz")
    p.add_argument("--dataset", default="mnist", help="the real images to compare with (the classifier's data set)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--labels", default=None, help=".npy of prompted classes for a .npy of samples")
    p.add_argument("--samplers", default="ddim50", help="comma-separated: ddpm, ddim10, ddim50, dpmsolver++20, ...")
    p.add_argument("-n", "--num-images", type=int, default=1000,
                   help="samples per sampler (and guidance weight); compare samplers at 1000, not at 100")
    p.add_argument("--guidance", default=None, help="conditional models: comma-separated weights w (default 3)")
    p.add_argument("--autoguidance", default=None,
                   help="comma-separated weights w of autoguidance by the checkpoint's early EMA weights (1: none; "
                        "replaces classifier-free guidance)")
    p.add_argument("--prompts", default="train", help="text models: comma-separated prompt splits (train, held_out)")
    p.add_argument("--bpd-exact", type=int, default=4, help="images for the exact bound (0: skip)")
    p.add_argument("--bpd-mc", type=int, default=1000, help="images for the Monte Carlo bound (0: skip)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity of ddimS (0: deterministic)")
    p.add_argument("--spacing", choices=["linspace", "logsnr"], default="linspace",
                   help="timesteps of ddimS and dpmsolver++S: even in t, or even in log-SNR")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema", help="the checkpoint's EMA or raw weights")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out-dir", default=None, help="PNGs go here (default: next to the source)")
    p.add_argument("--json", default=None, help="also write the results as JSON to this path")
    a = p.parse_args(argv)
    if (a.source is None) == (not a.calibrate):
        p.error("give either a source (checkpoint or .npy of samples) or --calibrate")
    if a.guidance is not None and a.autoguidance is not None:
        p.error("--autoguidance replaces classifier-free guidance: give --guidance or --autoguidance, not both")
    out_dir = a.out_dir or (os.path.join(os.path.dirname(os.path.abspath(a.source)), "eval") if a.source
                            else os.path.join("runs", "calibration"))
    os.makedirs(out_dir, exist_ok=True)
    group = process_group()                     # under mpiexec: the samplers' batches and the bound are shared
    try:
        clf, clf_meta = load_classifier(a.classifier)
        x_test, _ = load_dataset(a.dataset, "test", a.data_dir)
        x_train, y_train = load_dataset(a.dataset, "train", a.data_dir)
        x_test, x_train = to_model_range(x_test), to_model_range(x_train)
        _, _, ref = predict(clf, x_test)
        results = dict(classifier_test_accuracy=clf_meta.get("test_accuracy"), rows=[])
        floors = {}

        def judge(images, labels, row):
            if not group.main:
                return
            n = len(images)
            floors.setdefault(n, frechet_floor(clf, x_train, ref, n, seed=a.seed))
            row.update(sample_quality(clf, images, ref, labels), frechet_floor=floors[n])
            row["frechet_over_floor"] = row["frechet"] / floors[n] if floors[n] > 0 else float("inf")
            row["misses_target"] = target_misses(row)
            results["rows"].append(row)
            print(format_row(row), flush=True)

        if group.main:
            print(HEADER)
        if a.calibrate:
            sets = calibration_sets(x_train, y_train, a.num_images, seed=a.seed)
            save_figure(np.stack([images[:10] for _, images in sets]), os.path.join(out_dir, "calibration.png"),
                        row_labels=[name for name, _ in sets])
            for name, images in sets:
                judge(images, None, dict(source=name))
        elif a.source.endswith(".npy"):
            images = np.load(a.source)
            if images.ndim != 4 or images.shape[1:] != x_test.shape[1:]:
                raise ValueError(f"{a.source} holds {images.shape}, expected (N, {', '.join(map(str, x_test.shape[1:]))})"
                                 f" images in [-1, 1]")
            judge(images, None if a.labels is None else np.load(a.labels), dict(source=a.source))
        else:
            model, schedule, meta = load_model(a.source, a.weights)
            guide = None if a.autoguidance is None else load_model(a.source, "guide")[0]
            if a.bpd_exact or a.bpd_mc:
                t0 = time.perf_counter()
                b = bound(model, schedule, x_test, a.bpd_exact, a.bpd_mc, seed=a.seed, batch_size=a.batch_size,
                          group=group)
                if "exact_terms" in b and group.main:
                    save_line_plot(b.pop("exact_terms"), os.path.join(out_dir, "bpd_terms.png"), xlabel="t",
                                   title=f"bits/dim of each term L_t of the bound (t = 0: decoder L_0), "
                                         f"mean of {b['exact_images']} test images")
                b["seconds"] = time.perf_counter() - t0
                results["bound"] = b
            cond = getattr(model, "cond", None)
            conditional = cond is not None
            if a.guidance is not None and not conditional:
                raise ValueError("--guidance is classifier-free guidance, for conditional models; this checkpoint is "
                                 "unconditional (--autoguidance W guides it by its early EMA weights)")
            for name in a.samplers.split(","):
                sampler, steps = parse_sampler(name)
                for split in (a.prompts.split(",") if conditional and cond.text_cond else ["-"]):
                    weights = ([float(g) for g in a.autoguidance.split(",")] if guide is not None else
                               [float(g) for g in (a.guidance or "3").split(",")] if conditional else [None])
                    for w in weights:
                        labels, y = conditions(model, meta, split, a.num_images) if conditional else (None, None)
                        t0 = time.perf_counter()
                        images = sample(model, schedule, a.num_images, sampler=sampler, num_steps=steps, y=y,
                                        guidance=1.0 if w is None else w, guide=guide, seed=a.seed,
                                        batch_size=a.batch_size,
                                        timestep_spacing=a.spacing, progress=not a.no_progress and group.main,
                                        eta=a.eta if sampler == "ddim" else 0.0, group=group)
                        sec = (time.perf_counter() - t0) / a.num_images
                        label = name if a.spacing == "linspace" or sampler == "ddpm" else f"{name}/{a.spacing}"
                        label += f"/eta{a.eta:g}" if a.eta and sampler == "ddim" else ""
                        label += "/guide" if guide is not None and w != 1.0 else ""   # w = 1: the model alone
                        tag = (label.replace("/", "_") + ("" if w is None else f"_w{w:g}")
                               + ("" if split == "-" else f"_{split}"))
                        if group.main:
                            save_grid(images[:100], os.path.join(out_dir, f"samples_{tag}.png"), nrow=10)
                        judge(images, labels, dict(sampler=label, guidance=w, prompts=None if split == "-" else split,
                                                   seconds_per_image=sec))
    except (CheckpointError, DataError, ValueError, OSError) as e:   # OSError: a missing or unreadable .npy
        group.fail(f"error: {e}")
    if not group.main:
        return
    if "bound" in results:
        b = results["bound"]
        if "exact_bpd" in b:
            print(f"bound, exact (all T terms, {b['exact_images']} test images): {b['exact_bpd']:.3f} bits/dim "
                  f"(prior L_T {b['prior_bpd']:.2e}); per-term plot {os.path.join(out_dir, 'bpd_terms.png')}")
        if "mc_bpd" in b:
            print(f"bound, Monte Carlo ({b['mc_images']} test images, one t each): {b['mc_bpd']:.3f} "
                  f"+- {b['mc_se']:.3f} (standard error) bits/dim")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {a.json}")


HEADER = (f"{'sampler/set':<21}{'w':>4}{'prompts':>9}{'n':>7}{'s/img':>7}{'FD':>9}{'floor':>8}{'FD/fl':>7}{'conf':>6}"
          f"{'>=0.9':>7}{'max cls':>8}{'H(cls)':>7}  {'class %: 0   1   2 ...':<40}{'prompted':>9}  target")


def format_row(r):
    def f(key, fmt, width):
        v = r.get(key)
        return f"{'-' if v is None else format(v, fmt):>{width}}"
    hist = "".join(f"{100 * c:4.0f}" for c in r["class_fractions"])
    return (f"{r.get('sampler', r.get('source', '')):<21}" + f("guidance", "g", 4) + f("prompts", "", 9)
            + f("n", "d", 7) + f("seconds_per_image", ".3f", 7) + f("frechet", ".3g", 9) + f("frechet_floor", ".3g", 8)
            + f("frechet_over_floor", ".4g", 7) + f("confidence", ".3f", 6) + f("confident_fraction", ".1%", 7)
            + f("max_class_fraction", ".1%", 8) + f("class_entropy", ".2f", 7) + f"  {hist:<40}"
            + f("prompted_accuracy", ".1%", 9) + "  " + (" ".join(MISS[k] for k in r["misses_target"]) or "met"))


MISS = dict(frechet_over_floor=f"FD>{TARGET['frechet_over_floor']:g}x",        # how a missed target is printed
            max_class_fraction=f"class>{TARGET['max_class_fraction']:.0%}",
            confident_fraction=f"conf<{TARGET['confident_fraction']:.0%}")


if __name__ == "__main__":
    main()
