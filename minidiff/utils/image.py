"""Pictures: sample grids as PNG (what people look at), via Pillow.

Output of stages 5-7: the PNG grids people look at.
"""
import math
import os

import numpy as np
from PIL import Image

from .backend import to_numpy


def to_uint8(x):
    """Model-range images in [-1, 1] -> uint8 in [0, 255] (clipped, rounded)."""
    return np.clip(np.rint((to_numpy(x).astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images, nrow=None, padding=2, pad_value=255):
    """(N, C, H, W) images in [-1, 1] (C = 1 or 3) -> one uint8 (rows*H', cols*W'[, 3]) image, row-major."""
    images = to_uint8(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 1 or 3, H, W), got {images.shape}")
    n, c, h, w = images.shape
    ncol = nrow or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncol)
    grid = np.full((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), pad_value, np.uint8)
    for i in range(n):  # a loop over grid cells, not pixels
        r, q = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, y:y + h, x:x + w] = images[i]
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


def save_grid(images, path, nrow=None, scale=2):
    """Write a PNG grid of model-range images; ``scale`` enlarges pixels (nearest) for viewing."""
    grid = make_grid(images, nrow)
    img = Image.fromarray(grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    img.save(path)
    return path


def save_figure(images, path, col_labels=(), row_labels=(), scale=3):
    """A labelled figure: images (rows, cols, C, H, W) in [-1, 1] laid out as a grid, with a text label above each
    column and left of each row (Pillow's built-in font)."""
    from PIL import ImageDraw
    images = np.asarray(images)
    rows, cols = images.shape[:2]
    grid = Image.fromarray(make_grid(images.reshape((-1,) + images.shape[2:]), nrow=cols))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    left = 8 + 7 * max((len(s) for s in row_labels), default=0)
    top = 16 if col_labels else 0
    canvas = Image.new(grid.mode, (grid.width + left, grid.height + top), 255)
    canvas.paste(grid, (left, top))
    draw = ImageDraw.Draw(canvas)
    cell_w = grid.width / cols
    cell_h = grid.height / rows
    for j, s in enumerate(col_labels):
        draw.text((left + j * cell_w + 4, 2), str(s), fill=0)
    for i, s in enumerate(row_labels):
        draw.text((2, top + i * cell_h + cell_h / 2 - 5), str(s), fill=0)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return path


def save_line_plot(y, path, title="", xlabel="", size=(640, 360)):
    """A minimal line chart of positive values y[0..n-1] on a log10 y axis (Pillow only, no matplotlib)."""
    from PIL import ImageDraw
    y = np.asarray(y, dtype=np.float64)
    ly = np.log10(np.clip(y, 1e-12, None))
    lo, hi = math.floor(ly.min()), math.ceil(ly.max())
    hi = hi if hi > lo else lo + 1
    W, H = size
    left, right, top, bottom = 60, 15, 25, 35
    img = Image.new("L", size, 255)
    draw = ImageDraw.Draw(img)
    px = left + np.arange(len(y)) / max(len(y) - 1, 1) * (W - left - right)
    py = top + (hi - ly) / (hi - lo) * (H - top - bottom)
    draw.rectangle([left, top, W - right, H - bottom], outline=0)
    for e in range(lo, hi + 1):                                      # decades on the y axis
        yy = top + (hi - e) / (hi - lo) * (H - top - bottom)
        draw.line([left - 4, yy, W - right, yy], fill=200)
        draw.text((4, yy - 5), f"1e{e}", fill=0)
    for k in range(5):                                               # ticks on the x axis
        i = round(k * (len(y) - 1) / 4)
        draw.text((px[i] - 8, H - bottom + 4), str(i), fill=0)
    draw.line(list(zip(px.tolist(), py.tolist())), fill=0, width=2)
    draw.text((left, 6), title, fill=0)
    draw.text((W // 2 - 3 * len(xlabel), H - 16), xlabel, fill=0)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path
