"""minidiff.utils.data: IDX reading and its error paths, finding/downloading data sets, pixel range, batch sampler.

Everything runs on small synthetic IDX files written into tmp_path; downloads use file:// mirrors, and
any other URL fails the test (no test touches the network). The last test loads the real MNIST when it is
found ($MINIDIFF_DATA_DIR, the cache or /usr/share/datasets).
"""
import gzip
import os
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

import minidiff.utils.data as D
from minidiff.utils.data import (DataError, batch_indices, from_model_range, load_dataset, read_idx,
                           search_dirs, steps_per_epoch, to_model_range)

CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
         np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}


def idx_bytes(arr):
    """arr in the IDX format: 0x00 0x00 type ndim, big-endian int32 sizes, big-endian data."""
    arr = np.asarray(arr)
    head = bytes([0, 0, CODES[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def gz(raw, level=9):
    return gzip.compress(raw, compresslevel=level, mtime=0)


def md5(b):
    return hashlib.md5(b).hexdigest()


# --------------------------------------------------------------------------- fixtures

rng = np.random.default_rng(0)
TOY_ARRAYS = {  # a tiny data set with the canonical file names
    "train-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
    "train-labels-idx1-ubyte": rng.integers(0, 10, 12, dtype=np.uint8),
    "t10k-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
    "t10k-labels-idx1-ubyte": rng.integers(0, 10, 5, dtype=np.uint8),
}
TOY = {name: idx_bytes(a) for name, a in TOY_ARRAYS.items()}


def write_toy(d, raw=False, only=None, content=None):
    """Write the toy files (gzipped unless raw) into directory d; return d."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    for name, data in (content or TOY).items():
        if only is None or name in only:
            (d / name).write_bytes(data) if raw else (d / (name + ".gz")).write_bytes(gz(data))
    return d


@pytest.fixture(autouse=True)
def isolated(offline, tmp_path, monkeypatch):
    """No real cache, env var, /usr/share or network (conftest.py); a 'toy' data set served by a file:// mirror."""
    mirror = write_toy(tmp_path / "mirror")
    monkeypatch.setitem(D.DATASETS, "toy", {
        "mirrors": [(tmp_path / "no-such-mirror").as_uri() + "/", mirror.as_uri() + "/"],
        "md5": {name: (md5(gz(data)), md5(data)) for name, data in TOY.items()},
    })
    D._epoch_permutation.cache_clear()
    return tmp_path


def files_in(d):
    return sorted(p.name for p in Path(d).iterdir()) if Path(d).exists() else []


# --------------------------------------------------------------------------- read_idx

@pytest.mark.parametrize("compressed", [True, False])
@pytest.mark.parametrize("arr", [
    np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
    np.array([3, 1, 4, 1, 5], dtype=np.uint8),
    np.array([[-2, 300], [7, -32768]], dtype=np.int16),
    np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2),
    np.zeros((0, 28, 28), dtype=np.uint8),
])
def test_read_idx_round_trip(tmp_path, arr, compressed):
    raw = idx_bytes(arr)
    p = tmp_path / "f.idx"
    p.write_bytes(gz(raw) if compressed else raw)
    out = read_idx(p)
    assert out.dtype == arr.dtype and out.dtype.isnative and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)
    out[...] = 0  # a writable array of its own


def test_read_idx_expect_kinds(tmp_path):
    (tmp_path / "i").write_bytes(idx_bytes(np.zeros((2, 28, 28), np.uint8)))
    (tmp_path / "l").write_bytes(gz(idx_bytes(np.zeros(2, np.uint8))))
    assert read_idx(tmp_path / "i", expect="images").shape == (2, 28, 28)
    assert read_idx(tmp_path / "l", expect="labels").shape == (2,)
    with pytest.raises(ValueError, match="expect"):
        read_idx(tmp_path / "i", expect="pictures")


IMG = idx_bytes(np.arange(3 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(3, 28, 28))
LAB = idx_bytes(np.array([1, 2, 3], np.uint8))
GZ = gz(IMG)


def flip(b, i):
    return b[:i] + bytes([b[i] ^ 0xFF]) + b[i + 1:]


ERROR_CASES = [  # (file content, expect=, words the message must contain)
    (b"", None, "truncated IDX header"),
    (IMG[:3], None, "truncated IDX header"),
    (IMG[:10], None, "truncated IDX header"),                 # magic + 1.5 of 3 sizes
    (IMG[:-1], None, "truncated: header says shape (3, 28, 28) = 2352 bytes of data, file has 2351"),
    (IMG[:16], "images", "truncated"),                        # header only
    (IMG + b"\0", None, "trailing bytes"),
    (b"\x1f\x8bxx" + IMG[4:], None, "corrupt gzip"),          # gzip magic, garbage after
    (b"\x00\x00\x08\x00" + IMG[4:], None, "not an IDX file"),  # ndim 0
    (b"\x00\x00\x07\x03" + IMG[4:], None, "not an IDX file"),  # unknown type code
    (b"\x01\x00\x08\x03" + IMG[4:], None, "magic number 0x01000803"),
    (b"PK\x03\x04" + IMG[4:], None, "not an IDX file"),
    (IMG, "labels", "expected labels"),                       # wrong kind
    (LAB, "images", "expected images"),
    (b"\x00\x00\x08\x02" + IMG[4:12] + IMG[16:], "images", "expected images"),  # wrong ndim
    (idx_bytes(np.zeros((1, 28, 28), np.int16)), "images", "int16"),
    (b"\x00\x00\x08\x01\xff\xff\xff\xff", None, "negative size"),
    (GZ[:len(GZ) // 2], None, "truncated gzip"),
    (GZ[:-2], None, "truncated gzip"),
    (flip(GZ, len(GZ) - 6), None, "corrupt gzip"),            # CRC field
    (flip(GZ, len(GZ) - 2), None, "corrupt gzip"),            # ISIZE field
    (flip(GZ, 30), None, "corrupt gzip"),                     # deflate stream
    (GZ + b"garbage", None, "corrupt gzip"),                  # trailing garbage
]


@pytest.mark.parametrize("content, expect, words", ERROR_CASES,
                         ids=[f"{i:02d}-{c[2][:20]}" for i, c in enumerate(ERROR_CASES)])
def test_read_idx_errors_name_file_and_problem(tmp_path, content, expect, words):
    p = tmp_path / "bad-file.gz"
    p.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_idx(p, expect=expect)
    msg = str(info.value)
    assert str(p) in msg and words in msg, msg
    assert isinstance(info.value, ValueError)
    e = info.value  # raised cleanly, not chained onto a zlib/EOFError/struct traceback
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "absent")


# --------------------------------------------------------------------------- load_dataset

def check_toy(images, labels, split="train"):
    """The loaded arrays are exactly the toy split's."""
    names = D.SPLITS[split]
    assert images.dtype == np.uint8 and labels.dtype == np.uint8
    np.testing.assert_array_equal(images, TOY_ARRAYS[names[0]])
    np.testing.assert_array_equal(labels, TOY_ARRAYS[names[1]])


@pytest.mark.parametrize("raw", [False, True])
@pytest.mark.parametrize("split", ["train", "test"])
def test_load_from_data_dir(tmp_path, raw, split):
    d = write_toy(tmp_path / "mine", raw=raw)
    images, labels = load_dataset("toy", split, data_dir=d, download=False)
    assert images.shape == ((12, 28, 28) if split == "train" else (5, 28, 28))
    assert labels.shape == (len(images),)
    check_toy(images, labels, split)


def test_recompressed_file_accepted_by_content_checksum(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    for name, data in TOY.items():
        (d / (name + ".gz")).write_bytes(gz(data, level=1))
        assert md5(gz(data, level=1)) != D.DATASETS["toy"]["md5"][name][0]
    check_toy(*load_dataset("toy", "train", data_dir=d, download=False))


def test_returns_a_pair_with_class_names(tmp_path):
    """load_dataset returns a Dataset: it unpacks as (images, labels) and names the classes from the spec."""
    d = write_toy(tmp_path / "mine")
    ds = load_dataset("toy", "test", data_dir=d, download=False)
    images, labels = ds
    check_toy(images, labels, "test")
    assert len(ds) == 2 and ds.class_names is None        # the toy spec names no classes
    assert D.DATASETS["mnist"]["classes"] == tuple("0123456789")
    assert D.DATASETS["fashion-mnist"]["classes"][9] == "Ankle boot"


def test_count_mismatch(tmp_path, monkeypatch):
    content = dict(TOY, **{"train-labels-idx1-ubyte": idx_bytes(np.zeros(11, np.uint8))})
    monkeypatch.setitem(D.DATASETS["toy"], "md5", {n: (md5(gz(c)), md5(c)) for n, c in content.items()})
    d = write_toy(tmp_path / "mine", content=content)
    with pytest.raises(DataError, match="12 images but 11 labels"):
        load_dataset("toy", "train", data_dir=d, download=False)


def test_wrong_kind_in_place_of_images_is_rejected(tmp_path, monkeypatch):
    content = dict(TOY, **{"train-images-idx3-ubyte": TOY["train-labels-idx1-ubyte"]})
    monkeypatch.setitem(D.DATASETS["toy"], "md5", {n: (md5(gz(c)), md5(c)) for n, c in content.items()})
    d = write_toy(tmp_path / "mine", content=content)
    with pytest.raises(DataError, match="expected images"):
        load_dataset("toy", "train", data_dir=d, download=False)


def test_checksum_mismatch_local_file_rejected(tmp_path):
    d = write_toy(tmp_path / "mine")
    other = idx_bytes(np.ones((12, 28, 28), np.uint8))  # a valid IDX file, but not the published one
    (d / "train-images-idx3-ubyte.gz").write_bytes(gz(other))
    with pytest.raises(DataError) as info:
        load_dataset("toy", "train", data_dir=d, download=False)
    msg = str(info.value)
    assert "train-images-idx3-ubyte.gz: checksum mismatch" in msg and str(d) in msg


def test_search_dirs_order(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIDIFF_DATA_DIR", str(tmp_path / "env"))
    assert search_dirs("toy", tmp_path / "explicit") == [
        tmp_path / "explicit", tmp_path / "env" / "toy", tmp_path / "env",
        tmp_path / "xdg" / "minidiff" / "toy", tmp_path / "usr-share-datasets" / "toy"]
    monkeypatch.delenv("MINIDIFF_DATA_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert search_dirs("toy") == [tmp_path / "home" / ".cache" / "minidiff" / "toy",
                                  tmp_path / "usr-share-datasets" / "toy"]


def test_search_order_data_dir_env_cache_system(tmp_path, monkeypatch):
    """Each location holds the files; the first in order is read; remove it and the next is read."""
    explicit = write_toy(tmp_path / "explicit")
    env_sub = write_toy(tmp_path / "env" / "toy", raw=True)  # uncompressed names work everywhere
    env_flat = write_toy(tmp_path / "env")
    cache = write_toy(tmp_path / "xdg" / "minidiff" / "toy", raw=True)
    system = write_toy(tmp_path / "usr-share-datasets" / "toy")
    monkeypatch.setenv("MINIDIFF_DATA_DIR", str(tmp_path / "env"))
    read = []
    real = D._read_bytes
    monkeypatch.setattr(D, "_read_bytes", lambda p: (read.append(Path(p)), real(p))[1])
    for d in (explicit, env_sub, env_flat, cache, system):
        read.clear()
        check_toy(*load_dataset("toy", "train", data_dir=explicit, download=False))
        assert {p.parent for p in read} == {d}, read
        for f in list(d.iterdir()):
            if f.is_file():
                f.unlink()
    with pytest.raises(DataError, match="not found"):
        load_dataset("toy", "train", data_dir=explicit, download=False)


def test_gz_preferred_to_raw_in_same_dir(tmp_path, monkeypatch):
    d = write_toy(tmp_path / "mine")
    write_toy(d, raw=True)
    read = []
    real = D._read_bytes
    monkeypatch.setattr(D, "_read_bytes", lambda p: (read.append(Path(p).name), real(p))[1])
    load_dataset("toy", "train", data_dir=d, download=False)
    assert read == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]


def test_bad_copy_skipped_with_warning_next_location_used(tmp_path, monkeypatch):
    d = write_toy(tmp_path / "mine")
    (d / "train-images-idx3-ubyte.gz").write_bytes(GZ[:100])  # truncated
    write_toy(tmp_path / "usr-share-datasets" / "toy")
    with pytest.warns(UserWarning, match="truncated gzip"):
        check_toy(*load_dataset("toy", "train", data_dir=d, download=False))


def test_download_via_file_mirror_into_cache(tmp_path):
    cache = tmp_path / "xdg" / "minidiff" / "toy"
    images, labels = load_dataset("toy", "train")  # first mirror does not exist, second serves
    check_toy(images, labels)
    assert files_in(cache) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    # now found in the cache without downloading
    check_toy(*load_dataset("toy", "train", download=False))


def test_download_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch):
    bad = {n: (m[0][::-1], m[1]) for n, m in D.DATASETS["toy"]["md5"].items()}
    monkeypatch.setitem(D.DATASETS["toy"], "md5", bad)
    with pytest.raises(DataError) as info:
        load_dataset("toy", "test")
    msg = str(info.value)
    assert "checksum mismatch" in msg and (tmp_path / "mirror").as_uri() in msg
    assert files_in(tmp_path / "xdg" / "minidiff" / "toy") == []


class _BrokenResponse:
    """A response that delivers some bytes, then fails (connection reset or Ctrl-C)."""

    def __init__(self, exc):
        self.exc, self.sent = exc, False

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def read(self, n=-1):
        if not self.sent:
            self.sent = True
            return GZ[:100]
        raise self.exc


@pytest.mark.parametrize("exc", [ConnectionResetError("reset by peer"), KeyboardInterrupt()])
def test_interrupted_download_leaves_no_file(tmp_path, monkeypatch, exc):
    monkeypatch.setattr(D, "_urlopen", lambda url, timeout=None: _BrokenResponse(exc))
    with pytest.raises(DataError if isinstance(exc, Exception) else KeyboardInterrupt) as info:
        load_dataset("toy", "train")
    if isinstance(exc, Exception):
        assert "ConnectionResetError: reset by peer" in str(info.value)
    assert files_in(tmp_path / "xdg" / "minidiff" / "toy") == []  # no final file, no .part


def test_not_found_message_lists_places_urls_and_remedies(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIDIFF_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setitem(D.DATASETS, "fashion-mnist",
                        dict(D.DATASETS["fashion-mnist"], mirrors=[(tmp_path / "gone").as_uri() + "/"]))
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", "test", data_dir=tmp_path / "explicit")
    msg = str(info.value)
    for d in search_dirs("fashion-mnist", tmp_path / "explicit"):
        assert f"  {d}\n" in msg
    assert (tmp_path / "gone").as_uri() + "/t10k-images-idx3-ubyte.gz" in msg
    assert (tmp_path / "gone").as_uri() + "/t10k-labels-idx1-ubyte.gz" in msg
    for remedy in ("data_dir=", "--data-dir", "MINIDIFF_DATA_DIR=", "apt-get install dataset-fashion-mnist"):
        assert remedy in msg


def test_download_false_touches_no_url(monkeypatch):
    monkeypatch.setattr(D, "_urlopen", lambda *a, **k: pytest.fail("download attempted"))
    with pytest.raises(DataError, match=r"download: disabled \(download=False\)"):
        load_dataset("toy", "train", download=False)


def test_unknown_name_or_split():
    with pytest.raises(ValueError, match="unknown data set 'cifar'"):
        load_dataset("cifar")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_dataset("toy", "val")


# --------------------------------------------------------------------------- pixel range

def test_model_range_round_trip():
    images = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    x = to_model_range(images)
    assert x.dtype == np.float32 and x.shape == (1, 1, 16, 16)
    assert x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_allclose(x.ravel(), np.arange(256) / 127.5 - 1, atol=1e-6)
    back = from_model_range(x)
    assert back.dtype == np.uint8 and back.shape == (1, 1, 16, 16)
    np.testing.assert_array_equal(back[:, 0], images)


def test_from_model_range_clips_and_rounds():
    x = np.array([-3.0, -1.0, -0.999, 0.0, 0.004, 1.0, 7.0], dtype=np.float32)
    np.testing.assert_array_equal(from_model_range(x), [0, 0, 0, 128, 128, 255, 255])


def test_to_model_range_keeps_channels_of_nchw():
    images = np.arange(2 * 3 * 4 * 5, dtype=np.uint8).reshape(2, 3, 4, 5)  # (N, C, H, W): CIFAR-10, image folders
    x = to_model_range(images)
    assert x.dtype == np.float32 and x.shape == (2, 3, 4, 5)
    np.testing.assert_allclose(x, images / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(from_model_range(x), images)


def test_to_model_range_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        to_model_range(np.zeros((2, 28, 28), np.float32))
    for shape in ((28, 28), (1, 1, 1, 28, 28)):
        with pytest.raises(ValueError, match=r"\(N, H, W\) or \(N, C, H, W\)"):
            to_model_range(np.zeros(shape, np.uint8))


# --------------------------------------------------------------------------- batch sampler

def test_batches_deterministic_and_int64():
    a = batch_indices(100, 8, seed=3, step=5)
    D._epoch_permutation.cache_clear()
    b = batch_indices(100, 8, seed=3, step=5)
    assert a.dtype == np.int64 and a.shape == (8,)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, batch_indices(100, 8, seed=4, step=5))


@pytest.mark.parametrize("n, bs", [(96, 8), (100, 8), (7, 7), (10, 1)])
def test_each_epoch_covers_indices_once(n, bs):
    spe = steps_per_epoch(n, bs)
    assert spe == n // bs
    epochs = []
    for epoch in range(3):
        idx = np.concatenate([batch_indices(n, bs, 0, epoch * spe + k) for k in range(spe)])
        assert len(idx) == spe * bs and len(np.unique(idx)) == len(idx)  # no repeats
        assert idx.min() >= 0 and idx.max() < n
        if n % bs == 0:
            np.testing.assert_array_equal(np.sort(idx), np.arange(n))
        epochs.append(idx)
    if n > 1:
        assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


def test_resume_at_any_step_gives_same_batches():
    n, bs, seed = 50, 6, 11
    straight = [batch_indices(n, bs, seed, s) for s in range(40)]  # 8 steps/epoch: 5 epochs
    for s in np.random.default_rng(1).permutation(40):  # "resumed" in any order, cold cache
        D._epoch_permutation.cache_clear()
        np.testing.assert_array_equal(batch_indices(n, bs, seed, int(s)), straight[s])


def test_returned_batch_does_not_alias_cache():
    a = batch_indices(20, 4, 0, 0)
    a[:] = -1
    assert batch_indices(20, 4, 0, 0).min() >= 0


@pytest.mark.parametrize("args, err", [
    ((10, 11, 0, 0), ValueError), ((10, 0, 0, 0), ValueError), ((10, 2, 0, -1), ValueError),
    ((10, 2, -1, 0), ValueError), ((10.0, 2, 0, 0), TypeError),
])
def test_batch_indices_bad_arguments(args, err):
    with pytest.raises(err):
        batch_indices(*args)


# --------------------------------------------------------------------------- real MNIST (optional)

# a real copy, if the machine has one: $MINIDIFF_DATA_DIR/mnist (.ci/run sets it where the CI machine keeps one)
MNIST_DIR = Path(os.environ.get(D.ENV_VAR, "/nonexistent")) / "mnist"


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason=f"real MNIST not present at {MNIST_DIR}")
@pytest.mark.parametrize("split, n", [("train", 60000), ("test", 10000)])
def test_real_mnist(split, n):
    images, labels = load_dataset("mnist", split, data_dir=MNIST_DIR, download=False)
    assert images.shape == (n, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.uint8
    assert set(np.unique(labels)) == set(range(10)) and images.max() == 255 and images.min() == 0
    # the arrays are exactly the published content (checked against its MD5 via a re-built IDX file)
    for name, arr in zip(D.SPLITS[split], (images, labels)):
        assert md5(idx_bytes(arr)) == D.DATASETS["mnist"]["md5"][name][1]
