"""Data files on disk: what a bad one raises (DataError), where downloads and caches live (cache_dir), and how
the bytes of a format become arrays (IDX for MNIST and Fashion-MNIST).

NumPy and the standard library only. Every length is checked: a truncated, corrupt or wrong-kind file raises
`DataError` naming the file and the problem. Finding, checking and downloading the files is data.py's job.
"""
import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A data file is missing, truncated, corrupt, of the wrong kind, or fails its checksum."""


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
