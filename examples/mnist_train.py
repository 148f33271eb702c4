"""Train a DDPM on MNIST (or Fashion-MNIST) with minidiff: the main job.

    pip install .
    python examples/mnist_train.py                                             # the default: 20-28 min on 2 CPU cores
    python examples/mnist_train.py --data-dir DIR                              # MNIST from a folder (offline)
    python examples/mnist_train.py --resume                                    # continue an interrupted run exactly
    python examples/mnist_train.py --text --out-dir runs/text                  # text-to-image (conditioning/prompts.py)
    python examples/mnist_train.py --preset gpu --device cuda                  # bigger model, longer (GPU)
    mpiexec -n 2 python examples/mnist_train.py                                # two processes, one model
    python examples/mnist_sample.py runs/mnist/checkpoint.npz --sampler ddpm   # then sample from it

Writes runs/mnist/checkpoint.npz (weights, EMA weights, the guide for autoguidance, optimizer state, step, config),
log.jsonl and PNG sample grids. Ctrl-C saves a checkpoint and stops; --resume continues bit for bit. MNIST is found in
--data-dir, $MINIDIFF_DATA_DIR, the per-user cache or /usr/share/datasets/<name>, else downloaded (docs/data.md).
It is examples/train.py with --data mnist: that script trains on any data set (CIFAR-10, folders of images).
"""
import sys

from train import main

if __name__ == "__main__":
    sys.exit(main(default_data="mnist", description=__doc__.split("\n")[0]))
