"""Training data: IDX files (MNIST, Fashion-MNIST), where to find them, and a resumable batch sampler.
Stage 1 of the pipeline (data -> schedule -> diffusion -> network -> train -> sample -> evaluate): the images.

NumPy and the standard library only. The pieces:

- `read_idx(path)`: the IDX format (gzip-compressed or raw), every length checked; a bad file raises
  `DataError` naming the file and the problem (both live in datafiles.py, with `cache_dir`; re-exported here).
- `load_dataset(name, split)`: finds the four canonical files (see `search_dirs` for the order), checks
  their MD5 against the published checksums (of the .gz, or of the uncompressed content), and
  downloads what is missing into the per-user cache, atomically.
- `to_model_range` / `from_model_range`: uint8 pixels <-> the model's x_0 in [-1, 1] (DDPM, Ho et al.
  2020, sec. 3.3: "image data consists of integers in {0..255} scaled linearly to [-1, 1]").
- `batch_indices(n, batch_size, seed, step)`: the shuffled minibatch of a global training step, a pure
  function of its arguments, so a run resumed at step k sees exactly the batches it would have seen.
"""
import functools
import hashlib
import os
import sys
import tempfile
import urllib.request
import warnings
from pathlib import Path

import numpy as np

from .backend import array_module
from .datafiles import DataError, _parse_idx, _read_bytes, cache_dir, read_idx  # noqa: F401 (re-exported)

ENV_VAR = "MINIDIFF_DATA_DIR"
SYSTEM_DATA_DIR = Path("/usr/share/datasets")  # Debian's dataset-fashion-mnist installs here

# Canonical files: name -> (md5 of the published .gz, md5 of the uncompressed IDX content).
# Either checksum accepts a local file: repackagers recompress (Debian's dataset-fashion-mnist ships
# .gz files whose bytes differ from the published ones but whose content is identical, and so does
# the train-images file in ../shared/data/mnist). Downloads must match the .gz checksum.
DATASETS = {
    "mnist": {
        "mirrors": [
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ],
        "md5": {
            "train-images-idx3-ubyte": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
            "train-labels-idx1-ubyte": ("d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
            "t10k-images-idx3-ubyte": ("9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
            "t10k-labels-idx1-ubyte": ("ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"),
        },
    },
    "fashion-mnist": {
        "mirrors": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        "md5": {
            "train-images-idx3-ubyte": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
            "train-labels-idx1-ubyte": ("25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
            "t10k-images-idx3-ubyte": ("bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
            "t10k-labels-idx1-ubyte": ("bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
        },
    },
}
SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_urlopen = urllib.request.urlopen  # replaced in tests: they never touch the network


# --------------------------------------------------------------------------- finding the files

def search_dirs(name, data_dir=None):
    """The directories load_dataset looks in, in order: data_dir; $MINIDIFF_DATA_DIR/<name> and
    $MINIDIFF_DATA_DIR itself; the per-user cache; /usr/share/datasets/<name>."""
    _spec(name)
    dirs = []
    if data_dir is not None:
        dirs.append(Path(data_dir))
    env = os.environ.get(ENV_VAR)
    if env:
        dirs += [Path(env) / name, Path(env)]
    dirs += [cache_dir(name), SYSTEM_DATA_DIR / name]
    return dirs


def _spec(name):
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


def _md5(data):
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _load_verified(path, md5s, expect):
    """Parse path after checking its .gz or content MD5 (about 0.1 s for MNIST's 47 MB train images)."""
    data, raw = _read_bytes(path)
    gz_md5, raw_md5 = md5s
    digest = _md5(data)
    if digest != gz_md5 and (digest if raw is data else _md5(raw)) != raw_md5:
        raise DataError(f"{path}: checksum mismatch: MD5 matches neither the published .gz "
                        f"({gz_md5}) nor its uncompressed content ({raw_md5}); a different or "
                        "damaged file")
    return _parse_idx(raw, path, expect)


def _find(name, fname, expect, dirs, rejected):
    """The first valid copy of fname (.gz or raw) in dirs, or None; bad copies go to rejected."""
    md5s = _spec(name)["md5"][fname]
    for d in dirs:
        for path in (d / (fname + ".gz"), d / fname):
            if path.is_file():
                try:
                    return _load_verified(path, md5s, expect)
                except DataError as e:
                    rejected.append(str(e))
    return None


def _download(url, dest, md5):
    """Download url to dest via a temporary file in the same directory, renamed into place only
    once its MD5 is verified: an interrupted or bad download never leaves a file named dest."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        print(f"minidiff: downloading {url}", file=sys.stderr)
        with _urlopen(url, timeout=60) as response:
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
            digest = hashlib.md5(usedforsecurity=False)
            with os.fdopen(fd, "wb") as f:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        if digest.hexdigest() != md5:
            raise DataError(f"checksum mismatch: MD5 {digest.hexdigest()}, expected {md5}; discarded")
        os.replace(tmp, dest)
        tmp = None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def load_dataset(name, split="train", data_dir=None, download=True):
    """(images, labels) of a data set split: uint8 (N, 28, 28) and uint8 (N,).

    name: "mnist" or "fashion-mnist"; split: "train" or "test". Each file (.gz or uncompressed) is
    looked for in search_dirs(name, data_dir) and accepted if its MD5 matches the published .gz
    or its uncompressed content; if none is found and download is true, it is downloaded from the
    data set's mirrors into cache_dir(name). Raises DataError saying where it looked, what it
    rejected, which URLs failed and how to provide the files.
    """
    spec = _spec(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    dirs = search_dirs(name, data_dir)
    rejected, failed, arrays = [], [], {}
    for fname, expect in zip(SPLITS[split], ("images", "labels")):
        arr = _find(name, fname, expect, dirs, rejected)
        if arr is None and download:
            dest = cache_dir(name) / (fname + ".gz")
            for mirror in spec["mirrors"]:
                url = mirror + fname + ".gz"
                try:
                    _download(url, dest, spec["md5"][fname][0])
                    arr = _load_verified(dest, spec["md5"][fname], expect)
                    break
                except Exception as e:  # URLError, HTTPError, timeouts, IncompleteRead, DataError...
                    failed.append(f"{url}: {type(e).__name__}: {e}")
        if arr is not None:
            arrays[expect] = arr
    if len(arrays) < 2:
        raise DataError(_not_found_message(name, split, dirs, rejected, failed, download))
    if rejected:
        warnings.warn(f"minidiff: skipped bad copies of {name} files:\n  " + "\n  ".join(rejected),
                      stacklevel=2)
    images, labels = arrays["images"], arrays["labels"]
    if len(images) != len(labels):
        raise DataError(f"{name} {split}: {len(images)} images but {len(labels)} labels")
    return images, labels


def _not_found_message(name, split, dirs, rejected, failed, download):
    files = ", ".join(f + "[.gz]" for f in SPLITS[split])
    lines = [f"{name} {split} split not found: need {files}", "looked in:"]
    lines += [f"  {d}" for d in dirs]
    if rejected:
        lines += ["rejected:"] + [f"  {r}" for r in rejected]
    if not download:
        lines.append("download: disabled (download=False)")
    elif failed:
        lines += ["download failed:"] + [f"  {f}" for f in failed]
    lines += [
        "to provide the files, either:",
        "  - pass the directory holding them: data_dir=DIR (the examples' --data-dir DIR)",
        f"  - set {ENV_VAR}=DIR (files directly in DIR, or in DIR/{name}/)",
        f"  - copy them into {cache_dir(name)}, or let them download there (needs network)",
    ]
    if name == "fashion-mnist":
        lines.append("  - on Debian/Ubuntu: apt-get install dataset-fashion-mnist "
                     f"(installs into {SYSTEM_DATA_DIR / name})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- pixel range

def to_model_range(images):
    """uint8 images (N, H, W) -> float32 (N, 1, H, W) in [-1, 1]: x_0 = x / 127.5 - 1 (NumPy or CuPy)."""
    xp = array_module(images)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"to_model_range expects uint8 images of shape (N, H, W), got "
                         f"{images.dtype} {images.shape}")
    return (images[:, None].astype(xp.float32) / xp.float32(127.5) - xp.float32(1.0))


def from_model_range(x):
    """Model-range x in [-1, 1] -> uint8 pixels: round((x + 1) * 127.5), clipped to [0, 255]."""
    xp = array_module(x)
    return xp.clip(xp.rint((x + 1.0) * 127.5), 0, 255).astype(xp.uint8)


# --------------------------------------------------------------------------- batch sampler

def steps_per_epoch(n, batch_size):
    """Full batches per epoch (the last partial batch is dropped)."""
    if not (isinstance(n, (int, np.integer)) and isinstance(batch_size, (int, np.integer))):
        raise TypeError(f"n and batch_size must be integers, got {n!r} and {batch_size!r}")
    if batch_size < 1 or batch_size > n:
        raise ValueError(f"batch_size must be in 1..n={n}, got {batch_size}")
    return int(n) // int(batch_size)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n, seed, epoch):
    perm = np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)
    perm.flags.writeable = False
    return perm


def batch_indices(n, batch_size, seed, step):
    """int64 indices (batch_size,) of the minibatch for global training step `step`.

    Stateless: epoch = step // steps_per_epoch, shuffled by np.random.default_rng([seed, epoch]),
    batch = position step % steps_per_epoch of that permutation. Each epoch visits every index at
    most once (exactly once when batch_size divides n), and resuming at any step gives the same
    batches. The current epoch's permutation is cached, so a step costs O(batch_size).
    """
    spe = steps_per_epoch(n, batch_size)
    if int(seed) < 0 or int(step) < 0:
        raise ValueError(f"seed and step must be >= 0, got seed={seed}, step={step}")
    epoch, pos = divmod(int(step), spe)
    return _epoch_permutation(int(n), int(seed), epoch)[pos * batch_size:(pos + 1) * batch_size].copy()
