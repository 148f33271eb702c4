"""minidiff.utils: CIFAR-10's binary archive (datafiles.read_cifar10, data.load_dataset("cifar10")) and the Dataset
that loading returns.

Everything runs on small synthetic files written into tmp_path: a cifar-10-binary.tar.gz of a few records per
member, with the spec's MD5 and size pointed at it. Downloads use file:// mirrors, and any other URL fails the test
(no test touches the network).
"""
import hashlib
import io
import pickle
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import minidiff.utils.data as D
from minidiff.utils.data import CIFAR10_CLASSES, DataError, Dataset, load_dataset, read_cifar10, to_model_range


def md5(b):
    return hashlib.md5(b).hexdigest()


def real_urlopen_file_only(url, *args, **kwargs):
    if not url.startswith("file://"):
        raise AssertionError(f"a test tried to reach the network: {url}")
    return urllib.request.urlopen(url, *args, **kwargs)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No real cache, env var, /usr/share or network."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("MINIDIFF_DATA_DIR", raising=False)
    monkeypatch.setattr(D, "SYSTEM_DATA_DIR", tmp_path / "usr-share-datasets")
    monkeypatch.setattr(D, "_urlopen", real_urlopen_file_only)
    return tmp_path


# --------------------------------------------------------------------------- a synthetic CIFAR-10

ARCHIVE = "cifar-10-binary.tar.gz"
PREFIX = "cifar-10-batches-bin/"
COUNTS = {"data_batch_1.bin": 3, "data_batch_2.bin": 2, "data_batch_3.bin": 1, "data_batch_4.bin": 2,
          "data_batch_5.bin": 2, "test_batch.bin": 4}


def records(member, n):
    """n records (label byte + 3,072 pixel bytes) for a member; the very first train record has label 3, a red
    plane of 255 and green and blue planes of 0, so the plane layout can be checked."""
    rng = np.random.default_rng(sorted(COUNTS).index(member))
    recs = rng.integers(0, 256, (n, 3073), dtype=np.uint8)
    recs[:, 0] = rng.integers(0, 10, n)
    if member == "data_batch_1.bin":
        recs[0, 0], recs[0, 1:1025], recs[0, 1025:] = 3, 255, 0
    return recs


RECORDS = {m: records(m, n) for m, n in COUNTS.items()}


def tar_gz(members, extra=()):
    """A .tar.gz holding {name: bytes} (names under cifar-10-batches-bin/) plus (name, bytes) extras."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in list((PREFIX + m, d) for m, d in members.items()) + list(extra):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


GOOD = tar_gz({m: r.tobytes() for m, r in RECORDS.items()}, extra=[(PREFIX + "batches.meta.txt", b"airplane\n")])


def expected(split):
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
    recs = np.concatenate([RECORDS[m] for m in names])
    return recs[:, 1:].reshape(-1, 3, 32, 32), recs[:, 0]


def use_spec(monkeypatch, tmp_path, archive_bytes=GOOD, name="toycifar"):
    """Register a data set `name` whose published archive is archive_bytes, served by a file:// mirror (after one
    that does not exist)."""
    mirror = tmp_path / "mirror"
    mirror.mkdir(exist_ok=True)
    (mirror / ARCHIVE).write_bytes(archive_bytes)
    monkeypatch.setitem(D.DATASETS, name, dict(D.DATASETS["cifar10"], md5=md5(archive_bytes), size=len(archive_bytes),
                                               mirrors=[(tmp_path / "gone").as_uri() + "/", mirror.as_uri() + "/"]))
    return name


def put(d, data=GOOD):
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    (d / ARCHIVE).write_bytes(data)
    return d


# --------------------------------------------------------------------------- reading the archive

@pytest.mark.parametrize("split, n", [("train", 10), ("test", 4)])
def test_cifar10_shapes_order_layout_labels(tmp_path, monkeypatch, split, n):
    name = use_spec(monkeypatch, tmp_path)
    images, labels = load_dataset(name, split, data_dir=put(tmp_path / "mine"), download=False)
    assert images.shape == (n, 3, 32, 32) and images.dtype == np.uint8 and images.flags.writeable
    assert labels.shape == (n,) and labels.dtype == np.uint8
    want_images, want_labels = expected(split)
    np.testing.assert_array_equal(images, want_images)    # members in order 1..5, records in file order
    np.testing.assert_array_equal(labels, want_labels)
    r = RECORDS["data_batch_1.bin" if split == "train" else "test_batch.bin"][0]
    assert images[0, 1, 2, 3] == r[1 + 1024 + 2 * 32 + 3]  # channel 1 (green), row 2, column 3
    if split == "train":  # the record with a red plane of 255: channel 0 is red
        assert labels[0] == 3 and (images[0, 0] == 255).all() and (images[0, 1:] == 0).all()


def test_cifar10_class_names_and_published_checksum():
    assert CIFAR10_CLASSES == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                               "truck")
    spec = D.DATASETS["cifar10"]
    assert spec["md5"] == "c32a1d4ab5d03f1284b67883e8d87530" and spec["size"] == 170_052_171
    assert spec["mirrors"][0] + spec["archive"] == "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"


def test_dataset_unpacks_as_a_pair_and_carries_class_names(tmp_path, monkeypatch):
    name = use_spec(monkeypatch, tmp_path)
    ds = load_dataset(name, "test", data_dir=put(tmp_path / "mine"), download=False)
    images, labels = ds                                   # what every caller does
    assert isinstance(ds, tuple) and len(ds) == 2 and ds.images is images and ds.labels is labels
    assert ds.class_names == CIFAR10_CLASSES and "class_names=<10 names>" in repr(ds)
    back = pickle.loads(pickle.dumps(ds))
    assert back.class_names == ds.class_names and np.array_equal(back.images, images)
    assert Dataset(images, labels).class_names is None
    x = to_model_range(images)                            # (N, C, H, W) keeps its shape
    assert x.shape == (4, 3, 32, 32) and x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1


def test_read_cifar10_many_records(tmp_path):
    """A member of 2,000 records comes out whole and in record order."""
    big = {m: np.tile(RECORDS["test_batch.bin"], (500, 1)).tobytes() for m in ("test_batch.bin",)}
    p = tmp_path / ARCHIVE
    p.write_bytes(tar_gz(big))
    images, labels = read_cifar10(p, "test")
    assert images.shape == (2000, 3, 32, 32) and labels.shape == (2000,)
    np.testing.assert_array_equal(images[4:8], expected("test")[0])


# --------------------------------------------------------------------------- bad archives

def test_truncated_archive(tmp_path, monkeypatch):
    name = use_spec(monkeypatch, tmp_path)
    d = put(tmp_path / "mine", GOOD[:len(GOOD) // 2])
    with pytest.raises(DataError) as info:                # caught by the published size before any decoding
        load_dataset(name, "train", data_dir=d, download=False)
    msg = str(info.value)
    assert f"{d / ARCHIVE}: {len(GOOD) // 2:,} bytes, but the published {ARCHIVE} has {len(GOOD):,}" in msg
    assert "truncated" in msg
    with pytest.raises(DataError, match="corrupt or truncated archive"):  # and by the reader itself
        read_cifar10(d / ARCHIVE, "train")


@pytest.mark.parametrize("content, words", [
    (b"", "corrupt or truncated archive"),
    (b"not a gzip file at all", "corrupt or truncated archive"),
    (GOOD[:100], "corrupt or truncated archive"),
])
def test_read_cifar10_corrupt(tmp_path, content, words):
    p = tmp_path / ARCHIVE
    p.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_cifar10(p, "test")
    assert str(p) in str(info.value) and words in str(info.value)
    e = info.value
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__)


def test_member_of_the_wrong_length(tmp_path, monkeypatch):
    members = {m: r.tobytes() for m, r in RECORDS.items()}
    members["data_batch_3.bin"] += b"\x00" * 5            # 1 record + 5 bytes
    name = use_spec(monkeypatch, tmp_path, tar_gz(members))
    d = put(tmp_path / "mine", tar_gz(members))
    with pytest.raises(DataError) as info:
        load_dataset(name, "train", data_dir=d, download=False)
    msg = str(info.value)
    assert (f"{d / ARCHIVE}: member {PREFIX}data_batch_3.bin is 3,078 bytes, not a whole number of 3,073-byte "
            "records") in msg
    images, _ = load_dataset(name, "test", data_dir=d, download=False)  # the test split's member is fine
    assert len(images) == 4


def test_missing_member(tmp_path, monkeypatch):
    members = {m: r.tobytes() for m, r in RECORDS.items() if m != "test_batch.bin"}
    name = use_spec(monkeypatch, tmp_path, tar_gz(members))
    d = put(tmp_path / "mine", tar_gz(members))
    assert len(load_dataset(name, "train", data_dir=d, download=False)[0]) == 10
    with pytest.raises(DataError) as info:
        load_dataset(name, "test", data_dir=d, download=False)
    msg = str(info.value)
    assert f"{d / ARCHIVE}: no member {PREFIX}test_batch.bin (the archive holds: {PREFIX}data_batch_1.bin" in msg


def test_label_out_of_range(tmp_path):
    recs = RECORDS["test_batch.bin"].copy()
    recs[2, 0] = 10
    p = tmp_path / ARCHIVE
    p.write_bytes(tar_gz({"test_batch.bin": recs.tobytes()}))
    with pytest.raises(DataError, match="test_batch.bin: record 2 has label 10; CIFAR-10 labels are 0..9"):
        read_cifar10(p, "test")


def flip(b, i):
    return b[:i] + bytes([b[i] ^ 0xFF]) + b[i + 1:]


def test_wrong_md5_rejected_and_a_good_copy_elsewhere_used(tmp_path, monkeypatch):
    name = use_spec(monkeypatch, tmp_path)
    bad = put(tmp_path / "mine", flip(GOOD, len(GOOD) // 2))  # same size, other bytes
    with pytest.raises(DataError) as info:
        load_dataset(name, "test", data_dir=bad, download=False)
    msg = str(info.value)
    assert f"{bad / ARCHIVE}: checksum mismatch: MD5 " in msg and f"published {md5(GOOD)}" in msg
    put(tmp_path / "usr-share-datasets" / name)           # a good copy further down the search order
    with pytest.warns(UserWarning) as record:
        images, labels = load_dataset(name, "test", data_dir=bad, download=False)
    np.testing.assert_array_equal(images, expected("test")[0])
    assert f"{bad / ARCHIVE}: checksum mismatch" in str(record[0].message)


# --------------------------------------------------------------------------- finding and downloading

def test_download_via_file_mirror_into_cache(tmp_path, monkeypatch):
    name = use_spec(monkeypatch, tmp_path)
    images, labels = load_dataset(name, "train")          # first mirror does not exist, second serves
    np.testing.assert_array_equal(labels, expected("train")[1])
    cache = tmp_path / "xdg" / "minidiff" / name
    assert sorted(p.name for p in cache.iterdir()) == [ARCHIVE]
    monkeypatch.setattr(D, "_urlopen", lambda *a, **k: pytest.fail("downloaded again"))
    np.testing.assert_array_equal(load_dataset(name, "test", download=False)[0], expected("test")[0])


def test_found_through_the_env_var(tmp_path, monkeypatch):
    name = use_spec(monkeypatch, tmp_path)
    put(tmp_path / "env" / name)
    monkeypatch.setenv("MINIDIFF_DATA_DIR", str(tmp_path / "env"))
    assert len(load_dataset(name, "test", download=False)[0]) == 4


def test_offline_not_found_message(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(D, "_urlopen", offline)
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", "train", data_dir=tmp_path / "explicit")
    msg = str(info.value)
    assert msg.startswith("cifar10 train split not found: need cifar-10-binary.tar.gz")
    for d in D.search_dirs("cifar10", tmp_path / "explicit"):
        assert f"  {d}\n" in msg
    assert ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz: URLError: <urlopen error [Errno -3] "
            "Temporary failure in name resolution>") in msg
    for remedy in ("data_dir=", "--data-dir", "MINIDIFF_DATA_DIR=", "fetch https://www.cs.toronto.edu/~kriz/"):
        assert remedy in msg
    assert not (tmp_path / "xdg" / "minidiff" / "cifar10").exists() or not any(
        (tmp_path / "xdg" / "minidiff" / "cifar10").iterdir())


def test_cifar10_unknown_split(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_dataset("cifar10", "val")


# --------------------------------------------------------------------------- real CIFAR-10 (optional)

CIFAR_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


@pytest.mark.skipif(not (CIFAR_DIR / ARCHIVE).is_file(), reason=f"real CIFAR-10 not present at {CIFAR_DIR}")
@pytest.mark.parametrize("split, n", [("train", 50000), ("test", 10000)])
def test_real_cifar10(split, n):
    images, labels = load_dataset("cifar10", split, data_dir=CIFAR_DIR, download=False)
    assert images.shape == (n, 3, 32, 32) and images.dtype == np.uint8 and labels.shape == (n,)
    assert np.bincount(labels).tolist() == [n // 10] * 10  # CIFAR-10 is balanced in both splits
