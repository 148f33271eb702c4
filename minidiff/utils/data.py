"""Training data: MNIST, Fashion-MNIST, CIFAR-10 and folders of images, where to find them, and a resumable batch
sampler. Stage 1 of the pipeline (data -> schedule -> diffusion -> network -> train -> sample -> evaluate): the images.

NumPy and the standard library only (folders of images, in folder.py, use Pillow). The pieces:

- `read_idx(path)` (MNIST's IDX files) and `read_cifar10(path, split)` (CIFAR-10's binary archive): every length
  checked; a bad file raises `DataError` naming the file and the problem (all three live in datafiles.py, with
  `cache_dir` and `Dataset`; re-exported here).
- `load_dataset(name, split)`: finds the canonical files (see `search_dirs` for the order), checks their MD5
  against the published checksums, and downloads what is missing into the per-user cache, atomically. Any other
  name is a folder of images (`folder.load_image_folder`). It returns a `Dataset`: the pair (images, labels),
  which unpacks as before, with `.class_names`.
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
from .datafiles import (CIFAR10_MEMBERS, DataError, Dataset, _parse_idx, _read_bytes,  # noqa: F401 (re-exported)
                        cache_dir, read_cifar10, read_idx)
from .folder import load_image_folder

ENV_VAR = "MINIDIFF_DATA_DIR"
SYSTEM_DATA_DIR = Path("/usr/share/datasets")  # Debian's dataset-fashion-mnist installs here

# Canonical files: name -> (md5 of the published .gz, md5 of the uncompressed IDX content).
# Either checksum accepts a local file: repackagers recompress (Debian's dataset-fashion-mnist ships
# .gz files whose bytes differ from the published ones but whose content is identical, and so do other
# mirrors' copies of the MNIST train images). Downloads must match the .gz checksum.
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
        "classes": tuple("0123456789"),
    },
    "fashion-mnist": {
        "mirrors": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        "md5": {
            "train-images-idx3-ubyte": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
            "train-labels-idx1-ubyte": ("25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
            "t10k-images-idx3-ubyte": ("bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
            "t10k-labels-idx1-ubyte": ("bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
        },
        "classes": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                    "Ankle boot"),
    },
    # One archive holds both splits (datafiles.read_cifar10). Its MD5 and size are those of the authors' page
    # (https://www.cs.toronto.edu/~kriz/cifar.html); only the binary version, never the pickled python one.
    "cifar10": {
        "mirrors": ["https://www.cs.toronto.edu/~kriz/"],
        "archive": "cifar-10-binary.tar.gz",
        "md5": "c32a1d4ab5d03f1284b67883e8d87530",
        "size": 170_052_171,
        "classes": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    },
}
CIFAR10_CLASSES = DATASETS["cifar10"]["classes"]
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


def _md5_file(path):
    """MD5 of a file read in 1 MiB chunks (about 0.3 s for CIFAR-10's 170 MB archive)."""
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    return digest.hexdigest()


def _load_verified_archive(path, spec, split):
    """read_cifar10(path, split) after checking the archive's size and MD5 against the published ones."""
    size, want = path.stat().st_size, spec.get("size")
    if want is not None and size != want:
        why = "truncated (an interrupted download or copy?)" if size < want else "a different file"
        raise DataError(f"{path}: {size:,} bytes, but the published {spec['archive']} has {want:,}: {why}")
    digest = _md5_file(path)
    if digest != spec["md5"]:
        raise DataError(f"{path}: checksum mismatch: MD5 {digest}, published {spec['md5']}; a different or "
                        "damaged file")
    return read_cifar10(path, split)


def _fetch(name, names, read, md5, dirs, download, rejected, failed):
    """read(path) of the first copy in dirs (each dir tried with each of names, in order) that read accepts;
    failing that, if download, of names[0] downloaded from the data set's mirrors into cache_dir(name) and checked
    against md5. None if neither: bad copies are added to rejected and failed URLs to failed."""
    for d in dirs:
        for path in (d / n for n in names):
            if path.is_file():
                try:
                    return read(path)
                except DataError as e:
                    rejected.append(str(e))
    if download:
        dest = cache_dir(name) / names[0]
        for mirror in DATASETS[name]["mirrors"]:
            url = mirror + names[0]
            try:
                _download(url, dest, md5)
                return read(dest)
            except Exception as e:  # URLError, HTTPError, timeouts, IncompleteRead, DataError...
                failed.append(f"{url}: {type(e).__name__}: {e}")
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


def load_dataset(name, split="train", data_dir=None, download=True, *, resolution=None, channels=None,
                 progress=True):
    """Dataset (images, labels) of a data set split, with .class_names; unpacks as `images, labels`.

    name: "mnist" or "fashion-mnist" (uint8 (N, 28, 28), uint8 (N,)) or "cifar10" (uint8 (N, 3, 32, 32),
    uint8 (N,): 50,000 train, 10,000 test); split: "train" or "test".
    Any other name is a folder of images: folder.load_image_folder(name, resolution, channels, progress), uint8
    (N, C, resolution, resolution) and int64 (N,), split "train" only; data_dir and download do not apply (a
    folder named like a data set is reached as "./mnist").
    Each file (for MNIST the four IDX files, .gz or uncompressed; for CIFAR-10 cifar-10-binary.tar.gz) is looked
    for in search_dirs(name, data_dir) and accepted if its MD5 matches the published one (for IDX files: of the
    .gz or of its uncompressed content); a bad copy is skipped with a warning naming it. If no good copy is found
    and download is true, the file is downloaded from the data set's mirrors into cache_dir(name). Raises
    DataError saying where it looked, what it rejected, which URLs failed and how to provide the files.
    """
    if name not in DATASETS:
        return _load_folder(name, split, resolution, channels, progress)
    spec = _spec(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    if resolution is not None or channels is not None:
        raise ValueError(f"resolution= and channels= are for image folders; {name} comes as it was published")
    dirs = search_dirs(name, data_dir)
    rejected, failed = [], []
    if "archive" in spec:  # CIFAR-10: one archive holds both splits
        need = [spec["archive"]]
        read = functools.partial(_load_verified_archive, spec=spec, split=split)
        arrays = _fetch(name, need, read, spec["md5"], dirs, download, rejected, failed)
    else:  # MNIST, Fashion-MNIST: one IDX file for the images, one for the labels
        need, arrays = [f + "[.gz]" for f in SPLITS[split]], []
        for fname, expect in zip(SPLITS[split], ("images", "labels")):
            md5s = spec["md5"][fname]
            read = functools.partial(_load_verified, md5s=md5s, expect=expect)
            arrays.append(_fetch(name, [fname + ".gz", fname], read, md5s[0], dirs, download, rejected, failed))
        arrays = None if any(a is None for a in arrays) else arrays
    if arrays is None:
        raise DataError(_not_found_message(name, split, need, dirs, rejected, failed, download))
    if rejected:
        warnings.warn(f"minidiff: skipped bad copies of {name} files:\n  " + "\n  ".join(rejected),
                      stacklevel=2)
    images, labels = arrays
    if len(images) != len(labels):
        raise DataError(f"{name} {split}: {len(images)} images but {len(labels)} labels")
    return Dataset(images, labels, spec.get("classes"))


def _load_folder(path, split, resolution, channels, progress):
    """load_image_folder with load_dataset's checks: an existing folder, a resolution, the train split."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        what = (f"{folder.resolve()} is a file, not a folder of images" if folder.exists()
                else f"no folder {folder.resolve()} exists to read images from")
        raise DataError(f"unknown data set {str(path)!r}: not one of {sorted(DATASETS)}, and {what}")
    if resolution is None:
        raise ValueError(f"{folder} is an image folder: load_dataset needs resolution= (the side of the square "
                         "images it makes, e.g. 32 or 64)")
    if split != "train":
        raise ValueError(f"{folder} is an image folder: it has only the 'train' split, not {split!r}")
    return load_image_folder(folder, resolution, channels, progress)


def _not_found_message(name, split, need, dirs, rejected, failed, download):
    lines = [f"{name} {split} split not found: need {', '.join(need)}", "looked in:"]
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
    if "archive" in DATASETS[name]:
        url = DATASETS[name]["mirrors"][0] + DATASETS[name]["archive"]
        lines.append(f"  - fetch {url} where there is a network and copy it into one of the folders above")
    if name == "fashion-mnist":
        lines.append("  - on Debian/Ubuntu: apt-get install dataset-fashion-mnist "
                     f"(installs into {SYSTEM_DATA_DIR / name})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- pixel range

def to_model_range(images):
    """uint8 images -> float32 x_0 = x / 127.5 - 1 in [-1, 1] (NumPy or CuPy): (N, H, W) (MNIST) gains the
    channel axis, (N, 1, H, W); (N, C, H, W) (CIFAR-10, image folders) keeps its shape."""
    xp = array_module(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"to_model_range expects uint8 images of shape (N, H, W) or (N, C, H, W), got "
                         f"{images.dtype} {images.shape}")
    x = images[:, None] if images.ndim == 3 else images
    return x.astype(xp.float32) / xp.float32(127.5) - xp.float32(1.0)


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
