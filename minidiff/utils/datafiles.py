"""Data files on disk: what a bad one raises (DataError), where downloads and caches live (cache_dir), and how
the bytes of a format become arrays (IDX for MNIST and Fashion-MNIST, the binary records of CIFAR-10) and what
loading returns (Dataset).

NumPy and the standard library only. Every length is checked: a truncated, corrupt or wrong-kind file raises
`DataError` naming the file and the problem. Finding, checking and downloading the files is data.py's job.
"""
import gzip
import math
import os
import tarfile
import zlib
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A data file is missing, truncated, corrupt, of the wrong kind, or fails its checksum."""


class Dataset(tuple):
    """What loading returns: the pair (images, labels), so `images, labels = load_dataset(...)` unpacks as it
    always has, plus `.class_names`: label i is class_names[i] (None when the data set names no classes).

    A 2-tuple with an attribute rather than a 3-field namedtuple, which would break that 2-name unpacking.
    """

    def __new__(cls, images, labels, class_names=None):
        self = super().__new__(cls, (images, labels))
        self.class_names = None if class_names is None else tuple(class_names)
        return self

    def __getnewargs__(self):  # pickling (multiprocessing) rebuilds it through __new__
        return self[0], self[1], self.class_names

    images = property(lambda self: self[0], doc="uint8 (N, H, W) or (N, C, H, W)")
    labels = property(lambda self: self[1], doc="(N,) class indices")

    def __repr__(self):
        classes = "None" if self.class_names is None else f"<{len(self.class_names)} names>"
        return (f"Dataset(images={self[0].dtype} {self[0].shape}, labels={self[1].dtype} {self[1].shape}, "
                f"class_names={classes})")


def cache_dir(name):
    """The per-user download cache for a data set: $XDG_CACHE_HOME/minidiff/<name> (~/.cache/...)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "minidiff" / name


# --------------------------------------------------------------------------- IDX format

# IDX: magic = 0x00 0x00 <type code> <ndim>, then ndim big-endian int32 sizes, then the data,
# big-endian, row-major. MNIST uses type 0x08 (uint8): images 0x00000803, labels 0x00000801.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_KINDS = {"images": 3, "labels": 1}  # expect= -> ndim (both uint8)


def _read_bytes(path):
    """The file's bytes, gunzipped if it starts with the gzip magic."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    return data, _gunzip(data, path) if data[:2] == b"\x1f\x8b" else data


def _gunzip(data, path):
    try:
        return gzip.decompress(data)
    except EOFError:
        raise DataError(f"{path}: truncated gzip stream (the file ends early; delete it and "
                        "download or copy it again)") from None
    except (OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError: CRC, trailing garbage...
        raise DataError(f"{path}: corrupt gzip data ({e})") from None


def _parse_idx(raw, path, expect=None):
    if expect is not None and expect not in _KINDS:
        raise ValueError(f"expect must be one of {sorted(_KINDS)} or None, not {expect!r}")
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, need at least 4)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise DataError(f"{path}: not an IDX file (magic number 0x{raw[:4].hex()}; expected "
                        "0x00000803 for images or 0x00000801 for labels)")
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header} for {ndim} sizes)")
    shape = tuple(int(s) for s in np.frombuffer(raw, ">i4", ndim, 4))
    if min(shape) < 0:
        raise DataError(f"{path}: negative size in IDX header {shape}")
    if expect is not None:
        want = _KINDS[expect]
        if dtype != np.uint8 or ndim != want:
            raise DataError(f"{path}: expected {expect} (uint8, {want}-D, magic 0x0000080{want}) but the "
                            f"file holds {dtype.name} data of shape {shape} (magic 0x{raw[:4].hex()})")
    count = math.prod(shape)
    need, have = count * dtype.itemsize, len(raw) - header
    if have != need:
        what = "truncated" if have < need else "trailing bytes after the data"
        raise DataError(f"{path}: {what}: header says shape {shape} = {need} bytes of data, "
                        f"file has {have}")
    return np.frombuffer(raw, dtype, count, header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path, expect=None):
    """Read an IDX file (gzip-compressed or raw) into a NumPy array.

    expect: None (any IDX type), "images" (uint8, 3-D: N x rows x cols) or "labels" (uint8, 1-D).
    Raises DataError, naming the file, if it is truncated, corrupt or of the wrong kind.
    """
    return _parse_idx(_read_bytes(path)[1], path, expect)


# --------------------------------------------------------------------------- CIFAR-10 binary records

# cifar-10-binary.tar.gz holds six members of 10,000 records each. A record is 1 label byte (0..9), then 3,072
# pixel bytes: the 1,024 red values of the 32x32 image (row-major), then the 1,024 green, then the 1,024 blue:
# the record's pixels are already (3, 32, 32), channel-first.
CIFAR10_RECORD = 1 + 3 * 32 * 32
CIFAR10_MEMBERS = {
    "train": tuple(f"cifar-10-batches-bin/data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("cifar-10-batches-bin/test_batch.bin",),
}


def read_cifar10(path, split):
    """(images uint8 (N, 3, 32, 32), labels uint8 (N,)) of a split ("train": data_batch_1..5 in order, "test":
    test_batch), read from the binary archive itself (cifar-10-binary.tar.gz): nothing is extracted to disk.

    Decoding is one np.frombuffer and reshape per member, no loop over records. Raises DataError, naming the file,
    when the archive is corrupt or truncated, lacks a member, or holds one whose length is not a whole number of
    3,073-byte records or whose labels are not 0..9.
    """
    if split not in CIFAR10_MEMBERS:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    wanted, raw, seen = CIFAR10_MEMBERS[split], {}, []
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        with f, tarfile.open(fileobj=f, mode="r:gz") as tar:
            for member in tar:  # in archive order: the gzip stream is read forward once, never rewound
                seen.append(member.name)
                if member.name in wanted and member.isfile():
                    raw[member.name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: corrupt or truncated archive ({type(e).__name__}: {e}); delete it and "
                        "download or copy it again") from None
    missing = [m for m in wanted if m not in raw]
    if missing:
        holds = ", ".join(seen[:8]) + (", ..." if len(seen) > 8 else "") if seen else "nothing"
        raise DataError(f"{path}: no member {', '.join(missing)} (the archive holds: {holds}); expected the "
                        "binary version of CIFAR-10, cifar-10-binary.tar.gz")
    images, labels = [], []
    for name in wanted:
        data = raw[name]
        if len(data) % CIFAR10_RECORD:
            raise DataError(f"{path}: member {name} is {len(data):,} bytes, not a whole number of "
                            f"{CIFAR10_RECORD:,}-byte records (1 label byte + 3,072 pixel bytes)")
        records = np.frombuffer(data, np.uint8).reshape(-1, CIFAR10_RECORD)  # (n, 3073)
        if len(records) and records[:, 0].max() > 9:
            i = int(np.argmax(records[:, 0] > 9))
            raise DataError(f"{path}: member {name}: record {i} has label {records[i, 0]}; CIFAR-10 labels are 0..9")
        labels.append(records[:, 0])
        images.append(records[:, 1:].reshape(-1, 3, 32, 32))  # red, green, blue planes, each row-major
    return np.concatenate(images), np.concatenate(labels)  # writable copies of their own
