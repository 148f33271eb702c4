"""minidiff.utils: CIFAR-10's binary archive (datafiles.read_cifar10, data.load_dataset("cifar10")), the Dataset
that loading returns, and folders of images (folder.load_image_folder, data.load_dataset(path)).

Everything runs on small synthetic files written into tmp_path: a cifar-10-binary.tar.gz of a few records per
member, with the spec's MD5 and size pointed at it, and folders of tiny images whose content is known. Downloads
use file:// mirrors, and any other URL fails the test (no test touches the network); the per-user cache is a
folder of tmp_path.
"""
import gzip
import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import minidiff.utils.data as D
import minidiff.utils.folder as F
from minidiff.utils.data import CIFAR10_CLASSES, DataError, Dataset, load_dataset, read_cifar10, to_model_range
from minidiff.utils.folder import load_image_folder


def md5(b):
    return hashlib.md5(b).hexdigest()


@pytest.fixture(autouse=True)
def isolated(offline):
    """No real cache, env var, /usr/share or network (conftest.py)."""
    return offline


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
    # gzip's header time fixed: the same members give the same bytes (and MD5) on every call, whatever the clock
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
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


# --------------------------------------------------------------------------- image folders

def save(path, arr, **kw):
    """Write a uint8 array (H, W) or (H, W, C), or a Pillow image, to path (format from the suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = arr if isinstance(arr, Image.Image) else Image.fromarray(np.asarray(arr, np.uint8))
    img.save(path, **kw)
    return path


def noise(h, w, c=None, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w) if c is None else (h, w, c), dtype=np.uint8)


def load(path, resolution=8, **kw):
    return load_image_folder(path, resolution, progress=False, **kw)


def cache_entries(tmp_path):
    root = tmp_path / "xdg" / "minidiff" / "folders"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_grey_folder_is_one_class_named_after_it(tmp_path):
    d = tmp_path / "digits"
    arrays = [noise(8, 8, seed=i) for i in range(3)]
    for i, a in enumerate(arrays):
        save(d / f"{i}.png", a)
    images, labels = ds = load(d)
    assert isinstance(images, np.memmap) and images.dtype == np.uint8 and images.shape == (3, 1, 8, 8)
    np.testing.assert_array_equal(images[:, 0], np.stack(arrays))  # 8x8 at resolution 8: untouched
    assert labels.dtype == np.int64 and labels.tolist() == [0, 0, 0] and ds.class_names == ("digits",)


def test_rgb_folder(tmp_path):
    arrays = [noise(8, 8, 3, seed=i) for i in range(2)]
    for i, a in enumerate(arrays):
        save(tmp_path / "rgb" / f"{i}.png", a)
    images, _ = load(tmp_path / "rgb")
    assert images.shape == (2, 3, 8, 8)
    np.testing.assert_array_equal(images, np.stack(arrays).transpose(0, 3, 1, 2))  # HWC -> CHW


def test_mixed_folder_is_rgb_and_channels_can_be_forced(tmp_path):
    grey, colour = noise(8, 8, seed=1), noise(8, 8, 3, seed=2)
    save(tmp_path / "mix" / "a.png", grey)
    save(tmp_path / "mix" / "b.png", colour)
    images, _ = load(tmp_path / "mix")                    # channels=None: one colour file makes it RGB
    assert images.shape == (2, 3, 8, 8)
    np.testing.assert_array_equal(images[0], np.stack([grey] * 3))  # grey: three equal planes
    np.testing.assert_array_equal(images[1], colour.transpose(2, 0, 1))
    images, _ = load(tmp_path / "mix", channels=1)        # colour files converted to grey (ITU-R 601-2 luma)
    assert images.shape == (2, 1, 8, 8)
    np.testing.assert_array_equal(images[0, 0], grey)
    np.testing.assert_array_equal(images[1, 0], np.asarray(Image.fromarray(colour).convert("L")))
    images, _ = load(tmp_path / "mix", channels=3)
    assert images.shape == (2, 3, 8, 8)


@pytest.mark.parametrize("w, h", [(37, 23), (23, 37), (5, 90), (90, 5), (3, 4), (200, 150)])
def test_odd_sizes_come_out_square(tmp_path, w, h):
    save(tmp_path / "odd" / "x.png", noise(h, w, 3))
    images, _ = load(tmp_path / "odd", resolution=8)
    assert images.shape == (1, 3, 8, 8)


def test_resize_then_centre_crop_geometry(tmp_path):
    """37x23 at 8: the shorter side 23 -> 8, so 37 -> round(37 * 8 / 23) = 13; the crop starts at (13 - 8) // 2 = 2."""
    src = noise(23, 37, 3, seed=5)
    save(tmp_path / "g" / "x.png", src)
    images, _ = load(tmp_path / "g", resolution=8)
    want = Image.fromarray(src).resize((13, 8), Image.BICUBIC, reducing_gap=3.0).crop((2, 0, 10, 8))
    np.testing.assert_array_equal(images[0], np.asarray(want).transpose(2, 0, 1))


def test_centre_crop_position_exact(tmp_path):
    """A 5-wide, 90-tall image whose row y holds the value y, at resolution 5: no scaling, rows 42..46 kept
    ((90 - 5) // 2 = 42); the same turned sideways keeps columns 42..46."""
    tall = np.repeat(np.arange(90, dtype=np.uint8)[:, None], 5, axis=1)
    save(tmp_path / "tall" / "x.png", tall)
    save(tmp_path / "wide" / "x.png", tall.T)
    np.testing.assert_array_equal(load(tmp_path / "tall", 5)[0][0, 0], tall[42:47])
    np.testing.assert_array_equal(load(tmp_path / "wide", 5)[0][0, 0], tall.T[:, 42:47])


def test_scaling_keeps_halves_and_crop_removes_the_sides(tmp_path):
    halves = np.zeros((20, 40), np.uint8)
    halves[:, 20:] = 255                                  # left half black, right half white
    save(tmp_path / "halves" / "x.png", halves)
    out = load(tmp_path / "halves", 10)[0][0, 0].astype(int)  # 40x20 -> 20x10, centre columns 5..14
    assert (out[:, :4] < 20).all() and (out[:, 6:] > 235).all()
    bands = np.zeros((20, 60, 3), np.uint8)
    bands[:, :20, 0] = bands[:, 20:40, 1] = bands[:, 40:, 2] = 255  # red | green | blue, 20 columns each
    save(tmp_path / "bands" / "x.png", bands)
    out = load(tmp_path / "bands", 10)[0][0].astype(int)  # 60x20 -> 30x10: the crop is the green third
    assert (out[1, :, 2:8] > 230).all() and (out[0, :, 2:8] < 25).all() and (out[2, :, 2:8] < 25).all()


def test_png_jpeg_webp_bmp_read_and_others_ignored(tmp_path):
    d = tmp_path / "formats"
    colour = np.zeros((8, 8, 3), np.uint8) + np.array([200, 40, 90], np.uint8)
    for name, kw in (("a.png", {}), ("b.JPG", {"quality": 95}), ("c.jpeg", {"quality": 95}),
                     ("d.webp", {"lossless": True}), ("e.bmp", {})):
        save(d / name, colour, **kw)
    save(d / "f.gif", colour)                             # not one of the extensions
    save(d / ".hidden.png", colour)
    (d / "notes.txt").write_text("not an image")
    images, labels = load(d)
    assert images.shape == (5, 3, 8, 8) and len(labels) == 5
    assert np.abs(images.astype(int) - np.array([200, 40, 90])[:, None, None]).max() <= 6  # JPEG is lossy


def test_alpha_is_composited_on_white_and_16_bit_grey_scaled(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)                  # black everywhere; left half transparent
    rgba[:, 4:, 3] = 255
    save(tmp_path / "alpha" / "x.png", rgba)
    out = load(tmp_path / "alpha")[0][0]
    assert out.shape == (3, 8, 8) and (out[:, :, :4] == 255).all() and (out[:, :, 4:] == 0).all()
    la = Image.fromarray(rgba[:, :, [0, 3]], "LA")        # grey + alpha: still one channel
    save(tmp_path / "la" / "x.png", la)
    out = load(tmp_path / "la")[0]
    assert out.shape == (1, 1, 8, 8) and (out[0, 0, :, :4] == 255).all() and (out[0, 0, :, 4:] == 0).all()
    deep = np.full((8, 8), 257 * 100, np.uint16)
    deep[0] = 65535
    save(tmp_path / "deep" / "x.png", Image.fromarray(deep))
    out = load(tmp_path / "deep")[0][0, 0]
    assert out[0].tolist() == [255] * 8 and (out[1:] == 100).all()
    pal = Image.fromarray(noise(8, 8, 3)).convert("P")    # a palette is colour
    save(tmp_path / "pal" / "x.png", pal)
    np.testing.assert_array_equal(load(tmp_path / "pal")[0][0], np.asarray(pal.convert("RGB")).transpose(2, 0, 1))


def jpeg_bytes(seed=0):
    buf = io.BytesIO()
    Image.fromarray(noise(32, 32, 3, seed)).save(buf, "JPEG")
    return buf.getvalue()


def test_corrupt_files_skipped_counted_and_named_once(tmp_path):
    d = tmp_path / "some-bad"
    save(d / "cat" / "good1.png", noise(8, 8, seed=1))
    save(d / "dog" / "good2.png", noise(8, 8, seed=2))
    (d / "cat" / "bad.png").write_bytes(np.random.default_rng(0).bytes(300))  # random bytes
    (d / "dog" / "cut.jpg").write_bytes(jpeg_bytes()[:600])                    # a truncated JPEG
    (d / "dog" / "link.png").symlink_to(tmp_path / "nowhere.png")             # a broken link
    with pytest.warns(UserWarning) as record:
        images, labels = ds = load(d)
    messages = [str(w.message) for w in record if "minidiff" in str(w.message)]
    assert len(messages) == 1, messages
    assert f"skipped 3 of the 5 image files in {d} that could not be read" in messages[0]
    assert "cat/bad.png: UnidentifiedImageError" in messages[0] and "dog/cut.jpg: OSError" in messages[0]
    assert "dog/link.png: FileNotFoundError" in messages[0]
    assert images.shape == (2, 1, 8, 8) and labels.tolist() == [0, 1] and ds.class_names == ("cat", "dog")
    np.testing.assert_array_equal(images[1, 0], noise(8, 8, seed=2))


def test_many_corrupt_files_the_first_few_named(tmp_path):
    d = tmp_path / "many-bad"
    save(d / "good.png", noise(8, 8))
    for i in range(7):
        (d / f"bad{i}.png").write_bytes(b"junk")
    with pytest.warns(UserWarning) as record:
        assert len(load(d)[0]) == 1
    [msg] = [str(w.message) for w in record]
    assert "skipped 7 of the 8" in msg and "bad4.png" in msg and "bad5.png" not in msg and "(and 2 more)" in msg


def test_only_corrupt_files_is_an_error(tmp_path):
    d = tmp_path / "all-bad"
    d.mkdir()
    (d / "a.png").write_bytes(b"not a png")
    (d / "b.jpg").write_bytes(jpeg_bytes()[:300])
    with pytest.raises(DataError) as info:
        load(d)
    msg = str(info.value)
    assert msg.startswith(f"{d}: none of its 2 image files could be read")
    assert "a.png: UnidentifiedImageError" in msg and "b.jpg: OSError" in msg
    assert cache_entries(tmp_path) == []                  # nothing cached


def test_missing_empty_and_file_instead_of_folder(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'}: no such folder"):
        load(tmp_path / "nope")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"empty: no image files \(.bmp, .jpeg, .jpg, .png, .webp\)"):
        load(tmp_path / "empty")
    f = save(tmp_path / "single.png", noise(8, 8))
    with pytest.raises(DataError, match="single.png: is a file, not a folder"):
        load(f)


def test_nested_class_folders_labels_and_order(tmp_path):
    d = tmp_path / "animals"
    layout = {"dog/c.png": 30, "cat/deep/er/b.png": 20, "bird/d.png": 10, "cat/a.png": 40, "cat/z.bmp": 50}
    for rel, value in layout.items():
        save(d / rel, np.full((8, 8), value, np.uint8))
    (d / "empty").mkdir()                                 # no image: not a class
    (d / "notes").mkdir()
    (d / "notes" / "readme.txt").write_text("x")
    images, labels = ds = load(d)
    assert ds.class_names == ("bird", "cat", "dog")
    # sorted relative paths: bird/d, cat/a, cat/deep/er/b, cat/z, dog/c
    assert images[:, 0, 0, 0].tolist() == [10, 40, 20, 50, 30]
    assert labels.tolist() == [0, 1, 1, 1, 2]


def test_loose_files_beside_class_folders_is_an_error(tmp_path):
    d = tmp_path / "messy"
    save(d / "cat" / "a.png", noise(8, 8))
    save(d / "stray.png", noise(8, 8))
    save(d / "other.jpg", noise(8, 8))
    with pytest.raises(DataError) as info:
        load(d)
    msg = str(info.value)
    assert "image files directly in the folder beside class subfolders: other.jpg, stray.png" in msg


class CountDecodes:
    """Wraps folder.decode_image, counting its calls."""

    def __init__(self, monkeypatch):
        self.n, self.real = 0, F.decode_image
        monkeypatch.setattr(F, "decode_image", self)

    def __call__(self, *a, **k):
        self.n += 1
        return self.real(*a, **k)


def test_second_load_is_memory_mapped_from_the_cache_without_decoding(tmp_path, monkeypatch):
    d = tmp_path / "cached"
    for i in range(3):
        save(d / "c" / f"{i}.png", noise(12, 10, 3, seed=i))
    first = load(d)
    first_images = np.array(first[0])
    [key] = cache_entries(tmp_path)
    entry = tmp_path / "xdg" / "minidiff" / "folders" / key
    assert sorted(p.name for p in entry.iterdir()) == ["images.npy", "labels.npy", "meta.json"]
    monkeypatch.setattr(F, "decode_image", lambda *a, **k: pytest.fail("decoded again"))
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("opened an image again"))
    images, labels = second = load(d)
    assert isinstance(images, np.memmap) and Path(images.filename) == entry / "images.npy"
    assert not images.flags.writeable
    np.testing.assert_array_equal(images, first_images)
    assert labels.tolist() == [0, 0, 0] and second.class_names == ("c",)


def test_cached_load_repeats_the_skipped_warning(tmp_path):
    d = tmp_path / "warn-again"
    save(d / "a.png", noise(8, 8))
    (d / "b.png").write_bytes(b"junk")
    for _ in range(2):
        with pytest.warns(UserWarning, match="skipped 1 of the 2 image files"):
            assert len(load(d)[0]) == 1
    assert len(cache_entries(tmp_path)) == 1


def test_cache_is_read_afresh_when_the_folder_changes(tmp_path, monkeypatch):
    d = tmp_path / "changing"
    for i in range(3):
        save(d / f"{i}.png", noise(8, 8, seed=i))
        os.utime(d / f"{i}.png", ns=(1_000_000_000, 1_000_000_000))
    decodes = CountDecodes(monkeypatch)
    assert len(load(d)[0]) == 3 and decodes.n == 3
    load(d)
    assert decodes.n == 3                                 # unchanged: from the cache
    save(d / "3.png", noise(8, 8, seed=3))                # a file added
    assert len(load(d)[0]) == 4 and decodes.n == 7
    (d / "3.png").unlink()                                # removed: back to the first entry, still cached
    assert len(load(d)[0]) == 3 and decodes.n == 7
    os.utime(d / "1.png", ns=(2_000_000_000, 2_000_000_000))  # touched: same bytes, new mtime
    load(d)
    assert decodes.n == 10
    size = (d / "2.png").stat().st_size
    save(d / "2.png", np.full((8, 8), 7))                 # rewritten with another size, the old mtime put back
    os.utime(d / "2.png", ns=(1_000_000_000, 1_000_000_000))
    assert (d / "2.png").stat().st_size != size
    images, _ = load(d)
    assert decodes.n == 13
    assert (images[2, 0] == 7).all()
    load(d, resolution=4)                                 # another resolution or channels: another entry
    load(d, channels=3)
    assert decodes.n == 19 and len(cache_entries(tmp_path)) == 6
    assert not [n for n in cache_entries(tmp_path) if n.startswith(".")]  # no temporary folder left


def test_damaged_cache_entry_is_decoded_again(tmp_path, monkeypatch):
    d = tmp_path / "damaged"
    save(d / "a.png", noise(8, 8))
    load(d)
    [key] = cache_entries(tmp_path)
    (tmp_path / "xdg" / "minidiff" / "folders" / key / "images.npy").write_bytes(b"\x93NUMPY garbage")
    decodes = CountDecodes(monkeypatch)
    with pytest.warns(UserWarning, match="unreadable"):
        images, _ = load(d)
    assert decodes.n == 1
    np.testing.assert_array_equal(images[0, 0], noise(8, 8))


def test_progress_bar_only_when_asked(tmp_path, capsys):
    d = tmp_path / "bar"
    save(d / "a.png", noise(8, 8))
    load_image_folder(d, 8, progress=False)
    assert capsys.readouterr().err == ""
    load_image_folder(d, 4, progress=True)
    assert "decoding bar" in capsys.readouterr().err


def test_bad_arguments(tmp_path):
    save(tmp_path / "args" / "a.png", noise(8, 8))
    for resolution in (0, -3, 2.5, None, True):
        with pytest.raises(ValueError, match="resolution must be a positive integer"):
            load_image_folder(tmp_path / "args", resolution)
    with pytest.raises(ValueError, match="channels must be 1"):
        load_image_folder(tmp_path / "args", 8, channels=4)


def test_load_dataset_on_a_folder(tmp_path):
    d = tmp_path / "photos"
    save(d / "x" / "a.png", noise(9, 7, 3))
    images, labels = ds = load_dataset(str(d), resolution=6, progress=False)
    assert images.shape == (1, 3, 6, 6) and ds.class_names == ("x",) and labels.dtype == np.int64
    assert load_dataset(d, resolution=6, channels=1, progress=False)[0].shape == (1, 1, 6, 6)  # a Path works too
    assert to_model_range(images).shape == (1, 3, 6, 6)
    with pytest.raises(ValueError, match="image folder: load_dataset needs resolution="):
        load_dataset(str(d))
    with pytest.raises(ValueError, match="it has only the 'train' split, not 'test'"):
        load_dataset(str(d), "test", resolution=6)
    with pytest.raises(DataError) as info:
        load_dataset(str(tmp_path / "no-such"), resolution=6)
    msg = str(info.value)
    assert "unknown data set" in msg and "not one of ['cifar10', 'fashion-mnist', 'mnist']" in msg
    assert f"no folder {tmp_path / 'no-such'} exists" in msg
    with pytest.raises(ValueError, match="resolution= and channels= are for image folders"):
        load_dataset("mnist", resolution=32)


# --------------------------------------------------------------------------- real CIFAR-10 (optional)

CIFAR_DIR = Path(os.environ.get("MINIDIFF_DATA_DIR", "/nonexistent")) / "cifar10"   # a real copy, if there is one


@pytest.mark.skipif(not (CIFAR_DIR / ARCHIVE).is_file(), reason=f"real CIFAR-10 not present at {CIFAR_DIR}")
@pytest.mark.parametrize("split, n", [("train", 50000), ("test", 10000)])
def test_real_cifar10(split, n):
    images, labels = load_dataset("cifar10", split, data_dir=CIFAR_DIR, download=False)
    assert images.shape == (n, 3, 32, 32) and images.dtype == np.uint8 and labels.shape == (n,)
    assert np.bincount(labels).tolist() == [n // 10] * 10  # CIFAR-10 is balanced in both splits
