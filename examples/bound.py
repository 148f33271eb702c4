"""The article's objective for any trained model: the variational bound L = E[sum_t L_t] in bits per dimension.

    python examples/bound.py runs/cifar10/checkpoint.npz --data cifar10                # on the test split
    python examples/bound.py runs/photos/checkpoint.npz --data path/to/held_out_photos    # on a folder of images
    mpiexec -n 4 python examples/bound.py runs/cifar10/checkpoint.npz --data cifar10 -n 10000   # shared by 4

Prints the exact bound (all T terms) on the first --exact images and its Monte Carlo estimate (one timestep per
image, with its standard error) on the first -n images (minidiff/evaluation/likelihood.py; DDPM reports 3.70-3.75
bits/dim on CIFAR-10's test set). A folder is read at the model's resolution and channels. Under mpiexec the
processes share the work and print one process's numbers.
"""
import argparse
import json
import time

from minidiff.evaluation.evaluate import bound
from minidiff.utils.checkpoint import CheckpointError, load_model
from minidiff.utils.data import DATASETS, DataError, load_dataset, to_model_range
from minidiff.utils.distributed import group as process_group


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="mnist, fashion-mnist, cifar10 (their test split) or a folder")
    p.add_argument("--data-dir", default=None)
    p.add_argument("-n", "--num-images", type=int, default=1000, help="images of the Monte Carlo estimate")
    p.add_argument("--exact", type=int, default=4, help="images of the exact bound (0: skip)")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the figures as JSON to this path")
    a = p.parse_args(argv)
    if a.num_images < 1 or a.exact < 0:
        p.error("-n must be at least 1 and --exact at least 0")
    group = process_group()
    try:
        model, schedule, _ = load_model(a.checkpoint, a.weights)
        cfg = model.config
        if a.data in DATASETS:
            images, _ = load_dataset(a.data, "test", data_dir=a.data_dir)
        else:
            with group.main_first():
                images, _ = load_dataset(a.data, resolution=cfg.resolution, channels=cfg.in_channels,
                                         progress=group.main)
        x = to_model_range(images)
        if tuple(x.shape[1:]) != (cfg.in_channels, cfg.resolution, cfg.resolution):
            raise ValueError(f"the data's images are {tuple(x.shape[1:])}, the model's "
                             f"({cfg.in_channels}, {cfg.resolution}, {cfg.resolution})")
        t0 = time.perf_counter()
        b = bound(model, schedule, x, a.exact, a.num_images, seed=a.seed, batch_size=a.batch_size, group=group)
    except (CheckpointError, DataError, ValueError) as e:
        group.fail(f"error: {e}")
    if not group.main:
        return
    b.pop("exact_terms", None)
    b["seconds"] = time.perf_counter() - t0
    if "exact_bpd" in b:
        print(f"bound, exact (all T terms, {b['exact_images']} images): {b['exact_bpd']:.3f} bits/dim")
    print(f"bound, Monte Carlo ({b['mc_images']} images, one t each): {b['mc_bpd']:.3f} +- {b['mc_se']:.3f} "
          f"(standard error) bits/dim; {b['seconds']:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(b, f, indent=1)


if __name__ == "__main__":
    main()
