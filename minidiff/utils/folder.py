"""Image folders: every PNG, JPEG, WebP and BMP file under a folder, as uint8 (N, C, R, R) images with class labels.

`load_image_folder(path, resolution, channels=None)` follows torchvision's ImageFolder convention:

    path/cat/001.png           classes = the sorted names of the immediate subfolders holding an image file;
    path/cat/more/002.jpg      a file deeper down belongs to its top subfolder (here "cat");
    path/dog/003.webp          labels are int64 indices into that list.

A folder with image files directly in it and no class subfolders is one class, named after the folder; loose
files beside class subfolders are an error that names them. Classes are listed before decoding, so a class whose
files all turn out unreadable keeps its place (no label shifts). Other extensions, and names starting with "." (hidden
files and folders), are ignored. Image order is the sorted relative paths, so batches are reproducible.

Each image: converted to grey (mode L) or RGB (alpha composited on white, 16-bit grey scaled to 8 bits), scaled so
its shorter side is `resolution` (Pillow's BICUBIC, with reducing_gap=3.0: a large image is first shrunk by an
integer factor with Image.reduce while staying >= 3x the target: much faster, and "indistinguishable from fair
resampling in most cases", Pillow's documentation says), then cut to the centre resolution x resolution square.

The folder is decoded once (a tqdm bar) into $XDG_CACHE_HOME/minidiff/folders/<key>/ (images.npy, labels.npy,
meta.json), written to a temporary folder and renamed into place; later runs memory-map images.npy. The key hashes
every image file's relative path, size and modification time, the folder's name, the resolution and the channels,
so a file added, removed, touched or rewritten means a new key and a fresh decode. Old entries are not deleted.
"""
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .datafiles import DataError, Dataset, cache_dir

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")          # matched case-insensitively
GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # every other mode is colour
REDUCING_GAP = 3.0
CACHE_VERSION = 1        # part of the key: bump it when decoding changes, so old caches are not reused
SHOW = 5                 # how many skipped files a message names


def list_image_folder(path):
    """(relative paths, class names, labels) of the image files under path, sorted by relative path.

    Raises DataError if path is not a folder, holds no image file, or mixes loose image files with class
    subfolders (naming the loose files)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "no such folder"
        raise DataError(f"{path}: {what} (an image folder holds images, or one subfolder of images per class)")
    files = []
    for root, dirs, names in os.walk(path, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(root).relative_to(path)
        files += [(rel / n).as_posix() for n in names
                  if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
    files.sort(key=lambda f: f.split("/"))
    if not files:
        raise DataError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in the folder or its subfolders")
    loose = [f for f in files if "/" not in f]
    if loose and len(loose) < len(files):
        raise DataError(f"{path}: image files directly in the folder beside class subfolders: "
                        f"{_some(loose)}; move them into a class subfolder or out of the folder")
    if loose:  # no class subfolders: one class, named after the folder
        return files, [path.resolve().name], np.zeros(len(files), np.int64)
    classes = sorted({f.split("/", 1)[0] for f in files})
    index = {c: i for i, c in enumerate(classes)}
    return files, classes, np.array([index[f.split("/", 1)[0]] for f in files], np.int64)


def _some(items, n=SHOW):
    """The first n items, comma-separated, and how many more there are."""
    return ", ".join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


def resize_and_crop(img, resolution):
    """Scale a Pillow image so its shorter side is `resolution` (BICUBIC, reducing_gap=3.0), then cut out the
    centre resolution x resolution square (left/top offset (size - resolution) // 2: odd leftovers go right/down)."""
    w, h = img.size
    s = resolution / min(w, h)
    size = (max(resolution, round(w * s)), max(resolution, round(h * s)))  # the shorter side exactly resolution
    img = img.resize(size, Image.BICUBIC, reducing_gap=REDUCING_GAP)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def _convert(img, mode):
    """img in mode "L" or "RGB": 16-bit grey scaled to 8 bits (x / 257, which Pillow's own conversion would
    clip instead), transparency composited on white, then Pillow's conversion (ITU-R 601-2 luma for L)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        img = Image.fromarray(np.clip(np.rint(np.asarray(img, np.float64) / 257), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    return img.convert(mode)


def decode_image(file, resolution, channels=None):
    """(uint8 (C, R, R), is_colour) of one image file. channels: 1 (grey), 3 (RGB) or None (the file's own kind:
    grey for modes 1, L, LA, I, I;16..., RGB for every other mode, palettes included). Raises whatever Pillow
    raises for an unreadable, corrupt or truncated file."""
    with Image.open(file) as img:
        img.load()  # decode it all now: a truncated file fails here, not later
        colour = img.mode not in GREY_MODES
        mode = {1: "L", 3: "RGB"}.get(channels, "RGB" if colour else "L")
        img = _convert(img, mode)
    arr = np.asarray(resize_and_crop(img, resolution), np.uint8)
    return (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)), colour


def folder_cache_key(path, files, resolution, channels):
    """Hex key of a folder's decoded cache: the files' relative paths, sizes and modification times (ns), the
    folder's name (a flat folder's class name), the resolution, the channels and the cache version."""
    stats = []
    for f in files:
        try:
            st = os.stat(path / f)
            stats.append([f, st.st_size, st.st_mtime_ns])
        except OSError:  # a broken link, say: decoding will skip it and say why
            stats.append([f, None, None])
    what = dict(version=CACHE_VERSION, name=path.resolve().name, resolution=resolution, channels=channels,
                resample=f"BICUBIC reducing_gap={REDUCING_GAP}", files=stats)
    return hashlib.sha256(json.dumps(what, separators=(",", ":")).encode()).hexdigest()[:32]


def load_image_folder(path, resolution, channels=None, progress=True):
    """Dataset (images, labels) of an image folder, with .class_names (see the module's docstring).

    images: uint8 (N, C, resolution, resolution), memory-mapped from the cache (read-only); labels: int64 (N,).
    channels: 1 (grey), 3 (RGB) or None: 3 if any file is in colour, else 1. Unreadable or corrupt files are
    skipped and named in one warning; a folder with no readable image raises DataError saying why.
    """
    if not isinstance(resolution, (int, np.integer)) or isinstance(resolution, bool) or resolution < 1:
        raise ValueError(f"resolution must be a positive integer (the side of the square images), got {resolution!r}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 (grey), 3 (RGB) or None (decided by the files), got {channels!r}")
    path = Path(path).expanduser()
    files, classes, labels = list_image_folder(path)
    entry = cache_dir("folders") / folder_cache_key(path, files, int(resolution), channels)
    if (entry / "meta.json").is_file():
        try:
            return _read_cache(path, entry, int(resolution))
        except (OSError, ValueError, KeyError, TypeError) as e:  # a damaged entry: decode again, replacing it
            warnings.warn(f"minidiff: cache {entry} unreadable ({type(e).__name__}: {e}); decoding {path} again",
                          stacklevel=2)
    images, keep, skipped = [], [], []
    for i, f in enumerate(tqdm(files, desc=f"decoding {path.resolve().name}", unit="img", disable=not progress)):
        try:
            images.append(decode_image(path / f, int(resolution), channels))
            keep.append(i)
        except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, struct.error...
            skipped.append([f, f"{type(e).__name__}: {e}"])
    if not images:
        raise DataError(f"{path}: none of its {len(files)} image files could be read; e.g. "
                        + "; ".join(f"{f}: {why}" for f, why in skipped[:SHOW]))
    c = channels or (3 if any(colour for _, colour in images) else 1)
    stacked = np.stack([np.broadcast_to(a, (c,) + a.shape[1:]) for a, _ in images])  # grey -> RGB: 3 equal planes
    meta = dict(version=CACHE_VERSION, folder=str(path.resolve()), class_names=classes, count=len(keep),
                files=len(files), skipped=len(skipped), skipped_files=skipped[:SHOW])
    _write_cache(entry, stacked, labels[keep], meta)
    return _read_cache(path, entry, int(resolution))


def _write_cache(entry, images, labels, meta):
    """Write images.npy, labels.npy and meta.json into a temporary folder beside entry, then rename it to entry:
    an interrupted run never leaves a partial entry (if another run got there first, its entry is kept)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".part", dir=entry.parent))
    try:
        for name, arr in (("images.npy", images), ("labels.npy", labels)):
            with open(tmp / name, "wb") as f:
                np.save(f, arr)
                f.flush()
                os.fsync(f.fileno())
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if entry.exists():  # a damaged entry (it failed to read) or one another run just wrote
            shutil.rmtree(entry, ignore_errors=True)
        try:
            os.replace(tmp, entry)
        except OSError:
            if not (entry / "meta.json").is_file():  # not a concurrent run's complete entry: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_cache(path, entry, resolution):
    """The Dataset held in a cache entry (images memory-mapped), warning again about the files it skipped."""
    meta = json.loads((entry / "meta.json").read_text())
    images = np.load(entry / "images.npy", mmap_mode="r")
    labels = np.load(entry / "labels.npy")
    n = meta["count"]
    if (images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != n or images.shape[2:] != (resolution,) * 2
            or images.shape[1] not in (1, 3) or labels.shape != (n,)):
        raise ValueError(f"images {images.dtype} {images.shape} and labels {labels.shape} do not match "
                         f"{n} images at {resolution}x{resolution}")
    if meta["skipped"]:
        shown = "\n  ".join(f"{f}: {why}" for f, why in meta["skipped_files"])
        more = meta["skipped"] - len(meta["skipped_files"])
        warnings.warn(f"minidiff: skipped {meta['skipped']} of the {meta['files']} image files in {path} that could "
                      f"not be read:\n  {shown}" + (f"\n  (and {more} more)" if more else ""), stacklevel=3)
    return Dataset(images, labels, meta["class_names"])
