"""Write a folder of RGB images to try training on a folder: MNIST digits in random colours, 32x32 PNGs.

    python examples/make_image_folder.py runs/color_mnist                 # 60,000 train and 10,000 test images
    python examples/train.py --data runs/color_mnist/train --class-conditional --out-dir runs/color_train
    python examples/bound.py runs/color_train/checkpoint.npz --data runs/color_mnist/test

Each digit is drawn in a random colour on a random background colour (two independent uniform RGB colours per image,
blended by the digit's grey level), padded from 28 to 32 pixels: RGB images of CIFAR-10's shape whose content is
known. They go to <out>/train/<digit>/<index>.png and <out>/test/<digit>/<index>.png (ten class folders each).
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from minidiff.utils.data import DataError, load_dataset


def colour(images, seed):
    """uint8 (N, 28, 28) grey digits -> uint8 (N, 32, 32, 3): fg * g + bg * (1 - g), g the grey level in [0, 1]."""
    rng = np.random.default_rng(seed)
    g = np.pad(images, ((0, 0), (2, 2), (2, 2))).astype(np.float32)[..., None] / 255.0
    fg, bg = (rng.integers(0, 256, (len(images), 1, 1, 3)).astype(np.float32) for _ in range(2))
    return np.rint(fg * g + bg * (1.0 - g)).astype(np.uint8)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--data-dir", default=None, help="where MNIST is (else $MINIDIFF_DATA_DIR, the cache, a download)")
    p.add_argument("-n", type=int, default=None, help="images per split (default: all)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        for split in ("train", "test"):
            images, labels = load_dataset("mnist", split, data_dir=a.data_dir)
            images, labels = images[:a.n], labels[:a.n]
            rgb = colour(images, a.seed + (split == "test"))
            for d in range(10):
                os.makedirs(os.path.join(a.out, split, str(d)), exist_ok=True)
            for i in tqdm(range(len(rgb)), desc=split, unit="img"):
                Image.fromarray(rgb[i]).save(os.path.join(a.out, split, str(labels[i]), f"{i:05d}.png"))
    except DataError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {a.out}/train and {a.out}/test")


if __name__ == "__main__":
    main()
