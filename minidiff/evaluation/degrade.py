"""Known degradations of real images, to calibrate the judge (evaluate.calibrate): a sample-quality measure is
only worth reading if it ranks these as a person would and separates each from real digits.
Stage 7 of the pipeline, in evaluate.py: the calibration of the judge.

Images are (N, C, H, W) in [-1, 1], background -1 (NumPy or CuPy); every random choice comes from a seed.
"""
import numpy as np

from ..utils.backend import array_module


def blur(x):
    """3x3 box blur: each pixel becomes the mean of its 3x3 neighbourhood (background outside the image)."""
    xp = array_module(x)
    H, W = x.shape[2:]
    p = xp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-1.0)
    return sum(p[:, :, i:i + H, j:j + W] for i in range(3) for j in range(3)) / x.dtype.type(9)


def add_noise(x, sigma, seed=0):
    """x + sigma * N(0, 1) per pixel, clipped to [-1, 1] (speckle on the background, grain on the strokes)."""
    xp = array_module(x)
    noise = xp.asarray(np.random.default_rng(seed).standard_normal(x.shape), dtype=x.dtype)
    return xp.clip(x + x.dtype.type(sigma) * noise, -1, 1)


def binarize(x):
    """Every pixel to -1 or 1 (threshold 0, mid-grey): hard edges, no anti-aliasing."""
    xp = array_module(x)
    return xp.where(x > 0, 1.0, -1.0).astype(x.dtype)


def translate(x, dy, dx):
    """Move image i of (B, C, H, W) by dy[i] rows down and dx[i] columns right, filling with background -1."""
    xp = array_module(x)
    B, C, H, W = x.shape
    dy, dx = (xp.asarray(d, dtype=xp.int64).reshape(B) for d in (dy, dx))
    m = int(max(abs(dy).max(), abs(dx).max())) if B else 0
    padded = xp.pad(x, ((0, 0), (0, 0), (m, m), (m, m)), constant_values=-1.0)
    rows = m - dy[:, None] + xp.arange(H)                               # (B, H) source rows in the padded image
    cols = m - dx[:, None] + xp.arange(W)
    return padded[xp.arange(B)[:, None, None, None], xp.arange(C)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def shift(x, pixels=2, seed=0):
    """Each image moved `pixels` pixels up, down, left or right (a random one of the four per image)."""
    d = np.array([(-1, 0), (1, 0), (0, -1), (0, 1)])[np.random.default_rng(seed).integers(0, 4, len(x))] * pixels
    return translate(x, d[:, 0], d[:, 1])


def one_class(images, labels, digit, n, seed=0):
    """n images of class `digit` only (a sampler collapsed onto one mode); drawn with replacement only when the
    class has fewer than n images."""
    idx = np.flatnonzero(np.asarray(labels) == digit)
    if len(idx) == 0:
        raise ValueError(f"no images of class {digit}")
    return images[np.random.default_rng(seed).choice(idx, size=n, replace=len(idx) < n)]


def pure_noise(n, shape=(1, 28, 28), seed=0):
    """n images of N(0, 1) pixels clipped to [-1, 1]: what a sampler starts from."""
    return np.clip(np.random.default_rng(seed).standard_normal((n, *shape)), -1, 1).astype(np.float32)
