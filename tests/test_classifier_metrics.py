"""The evaluation classifier (own layers, gradient-checked), the NumPy-only sample-quality measures, and the known
degradations of real images that calibrate them (degrade.py, examples/mnist_eval.py --calibrate)."""
import math

import numpy as np
import pytest

from minidiff.utils import data
from minidiff.evaluation import degrade
from minidiff.evaluation.classifier import Classifier, predict, softmax_cross_entropy, train_classifier
from minidiff.evaluation.metrics import class_histogram, class_histogram_entropy, confident_fraction, frechet_distance
from test_layers import assert_small, numerical_grad, randomize, rel_error
from test_text_to_image import _script
from test_train import _write_idx


def test_softmax_cross_entropy_value_and_gradient():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((5, 4))
    y = np.array([0, 3, 1, 1, 2])
    loss, dz = softmax_cross_entropy(z, y)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    assert loss == pytest.approx(-np.log(p[np.arange(5), y]).mean(), rel=1e-12)
    assert rel_error(dz, numerical_grad(lambda: softmax_cross_entropy(z, y)[0], z).reshape(z.shape)) < 1e-7


def test_classifier_gradcheck_float64():
    """Centred differences at the input and 4 sampled entries of every parameter tensor."""
    rng = np.random.default_rng(1)
    model = Classifier(num_classes=3, image_size=8, seed=0, dtype=np.float64)
    randomize(model, rng, scale=0.3)
    x = rng.standard_normal((2, 1, 8, 8))
    R = rng.standard_normal((2, 3))
    loss = lambda: float(np.sum(model.forward(x) * R))  # noqa: E731
    model.zero_grad()
    model.forward(x)
    dx = model.backward(R)
    errors = {"x": rel_error(dx.ravel()[:30], numerical_grad(loss, x, range(30), h=1e-5))}
    for name, p in model.params.items():
        entries = rng.choice(p.size, size=min(4, p.size), replace=False)
        errors[name] = rel_error(model.grads[name].ravel()[entries], numerical_grad(loss, p, entries, h=1e-5))
    assert len(errors) == 1 + 2 + 3 * 4 + 2 + 2   # input, conv0, 3 x (conv, norm) x (weight, bias), fc1, fc
    assert_small(errors)


def test_classifier_learns_a_toy_task():
    """Four classes: a bright square in one of four quadrants of a 14x14 image, plus noise."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 256)
    x = rng.standard_normal((256, 1, 14, 14)).astype(np.float32) * 0.3 - 1
    for i, c in enumerate(y):
        r, q = divmod(int(c), 2)
        x[i, 0, 7 * r + 1:7 * r + 6, 7 * q + 1:7 * q + 6] += 2
    model = train_classifier(x[:192], y[:192], epochs=4, batch_size=32, lr=3e-3, progress=False)
    pred, probs, feats = predict(model, x[192:])
    assert (pred == y[192:]).mean() >= 0.95
    assert probs.shape == (64, 10) and np.allclose(probs.sum(1), 1) and feats.shape == (64, 32 + 128 + 128)


def test_judge_features_have_unit_variance_views_and_survive_save_and_load(tmp_path):
    """After training, each view of the judge features (texture 32, layout 128, shape 128) has total variance 1 over
    the training images; the scale is saved with the weights; a classifier without it is refused."""
    from minidiff.utils.checkpoint import CheckpointError, save_checkpoint
    from minidiff.evaluation.classifier import load_classifier, save_classifier
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (96, 1, 12, 12)).astype(np.float32)
    y = rng.integers(0, 10, 96)
    model = train_classifier(x, y, epochs=1, batch_size=32, progress=False)
    _, probs, feats = predict(model, x)
    views = np.split(feats.astype(np.float64), [32, 160], axis=1)
    assert [v.shape[1] for v in views] == [32, 128, 128]
    assert [v.var(axis=0).sum() for v in views] == pytest.approx([1, 1, 1], rel=1e-3)
    save_classifier(model, str(tmp_path / "c.npz"))
    loaded, meta = load_classifier(str(tmp_path / "c.npz"))
    assert meta["image_size"] == 12 and np.array_equal(loaded.feature_scale, model.feature_scale)
    assert np.allclose(predict(loaded, x)[2], feats) and np.allclose(predict(loaded, x)[1], probs)
    with pytest.raises(ValueError, match="takes 12x12 images"):
        predict(loaded, np.zeros((2, 1, 28, 28), np.float32))
    save_checkpoint(str(tmp_path / "old.npz"), model.params, meta=dict(kind="classifier"))
    with pytest.raises(CheckpointError, match="older design"):
        load_classifier(str(tmp_path / "old.npz"))


def test_frechet_distance_closed_form_and_properties():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200_000, 3)) * np.array([1.0, 2.0, 0.5]) + np.array([1.0, 0.0, -1.0])
    b = rng.standard_normal((200_000, 3)) * np.array([2.0, 1.0, 0.5])
    # diagonal covariances: d^2 = |mu1 - mu2|^2 + sum (s1 + s2 - 2 sqrt(s1 s2)) = 2 + (1 + 4 - 4) + (4 + 1 - 4) + 0
    assert frechet_distance(a, b) == pytest.approx(4.0, abs=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    c = rng.standard_normal((5000, 4)) @ rng.standard_normal((4, 4))
    d = rng.standard_normal((5000, 4)) @ rng.standard_normal((4, 4))
    assert frechet_distance(c, d) == pytest.approx(frechet_distance(d, c), rel=1e-6)  # symmetric, non-commuting
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(a, c)


def test_class_histogram_entropy():
    assert class_histogram_entropy(np.arange(100) % 10) == pytest.approx(math.log2(10))
    assert class_histogram_entropy(np.full(50, 8)) == 0.0


def test_class_histogram_and_its_largest_fraction():
    h = class_histogram(np.array([0, 0, 1, 9, 0, 0, 1, 9]))
    assert h.tolist() == [0.5, 0.25] + [0.0] * 7 + [0.25]
    assert class_histogram(np.full(7, 3), num_classes=4).tolist() == [0, 0, 0, 1]       # a collapse: one class 100%
    assert class_histogram_entropy(np.array([0, 0, 1, 9, 0, 0, 1, 9])) == pytest.approx(1.5)
    for bad, match in ((np.array([0, 10]), "in 0..9"), (np.array([-1, 2]), "in 0..9"), (np.array([]), "non-empty"),
                       (np.array([0.0, 1.0]), "class indices"), (np.zeros((2, 2), int), "1-d")):
        with pytest.raises(ValueError, match=match):
            class_histogram(bad)


def test_confident_fraction_counts_max_probability_at_or_above_the_threshold():
    probs = np.array([[0.95, 0.05], [0.5, 0.5], [0.1, 0.9], [0.89, 0.11]])
    assert confident_fraction(probs) == 0.5                       # 0.95 and 0.9 (>= is inclusive)
    assert confident_fraction(probs, threshold=0.5) == 1.0
    with pytest.raises(ValueError, match="non-empty"):
        confident_fraction(np.zeros(3))


def test_target_misses_names_each_measure_past_its_limit():
    from minidiff.evaluation.evaluate import target_misses
    good = dict(frechet_over_floor=1.9, max_class_fraction=0.15, confident_fraction=0.9)
    assert target_misses(good) == []                              # the limits themselves meet the target
    assert target_misses(dict(good, frechet_over_floor=2.1)) == ["frechet_over_floor"]
    assert target_misses(dict(good, max_class_fraction=0.67)) == ["max_class_fraction"]
    assert target_misses(dict(frechet_over_floor=9, max_class_fraction=1.0, confident_fraction=0.3)) == [
        "frechet_over_floor", "max_class_fraction", "confident_fraction"]


# ------------------------------------------------------------------------------------------------ degradations

def _digits(n=6, seed=0):
    """n 12x12 'digits' in [-1, 1]: background -1, a bright bar of grey values away from the border."""
    rng = np.random.default_rng(seed)
    x = np.full((n, 1, 12, 12), -1.0, np.float32)
    x[:, :, 3:9, 5:7] = rng.uniform(-0.5, 1, (n, 1, 6, 2))
    return x


def test_blur_is_the_3x3_neighbourhood_mean_with_background_outside():
    x = _digits()
    x[:, :, 0, 0] = 1.0                                           # ink in the corner: the border uses background
    out = degrade.blur(x)
    p = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-1)
    ref = np.zeros_like(x)
    for i in range(12):                                           # the definition, pixel by pixel (12x12 images)
        for j in range(12):
            ref[:, :, i, j] = p[:, :, i:i + 3, j:j + 3].mean(axis=(2, 3))
    assert out.dtype == x.dtype and np.allclose(out, ref, atol=1e-6)
    assert out[0, 0, 0, 0] == pytest.approx((1 - 8) / 9)          # one ink pixel among 8 background ones
    assert np.array_equal(degrade.blur(np.full((1, 1, 5, 5), -1.0, np.float32)), np.full((1, 1, 5, 5), -1.0))


def test_add_noise_has_the_asked_level_and_follows_the_seed():
    x = np.zeros((4, 1, 50, 50), np.float32)                      # mid-grey: no clipping at sigma 0.1
    out = degrade.add_noise(x, 0.1, seed=3)
    assert out.dtype == np.float32 and abs(out.std() - 0.1) < 0.005 and abs(out.mean()) < 0.005
    assert np.array_equal(out, degrade.add_noise(x, 0.1, seed=3))
    assert not np.array_equal(out, degrade.add_noise(x, 0.1, seed=4))
    strong = degrade.add_noise(_digits(), 0.5, seed=0)
    assert strong.min() >= -1 and strong.max() <= 1               # clipped to the pixel range
    assert (strong[:, :, :2] > -1).mean() > 0.4                   # speckle on the background (half the draws are > 0)


def test_binarize_thresholds_at_mid_grey():
    x = np.array([-1, -0.2, 0.0, 0.01, 0.7, 1], np.float32).reshape(1, 1, 1, 6)
    assert degrade.binarize(x).ravel().tolist() == [-1, -1, -1, 1, 1, 1]
    assert degrade.binarize(x).dtype == np.float32


def test_shift_moves_each_image_two_pixels_in_one_of_four_directions():
    x = _digits(200)
    out = degrade.shift(x, 2, seed=0)
    moves = set()
    for a, b in zip(x, out):                                      # which of the four moves gives b?
        found = [(dy, dx) for dy, dx in ((-2, 0), (2, 0), (0, -2), (0, 2))
                 if np.array_equal(np.roll(a, (dy, dx), axis=(1, 2)), b)]
        assert len(found) == 1                                    # the bar is >= 3 pixels from the border: no wrap
        moves.add(found[0])
    assert len(moves) == 4                                        # all four directions occur
    assert np.array_equal(out, degrade.shift(x, 2, seed=0)) and not np.array_equal(out, degrade.shift(x, 2, seed=1))
    edge = np.full((1, 1, 4, 4), -1.0, np.float32)
    edge[0, 0, :, 3] = 1.0                                        # ink at the right edge, moved right: leaves the image
    assert np.array_equal(degrade.translate(edge, [0], [1]), np.full((1, 1, 4, 4), -1.0))
    assert np.array_equal(degrade.translate(edge, [1], [-3])[0, 0, 1:, 0], np.ones(3))   # down 1, left 3


def test_one_class_and_pure_noise():
    images = np.arange(20, dtype=np.float32).reshape(20, 1, 1, 1)
    labels = np.arange(20) % 4
    x = degrade.one_class(images, labels, 2, 5, seed=0)
    assert x.shape == (5, 1, 1, 1) and set(labels[x.ravel().astype(int)]) == {2} and len(np.unique(x)) == 5
    more = degrade.one_class(images, labels, 2, 12, seed=0)       # only 5 images of class 2: with replacement
    assert len(more) == 12 and set(labels[more.ravel().astype(int)]) == {2}
    assert np.array_equal(x, degrade.one_class(images, labels, 2, 5, seed=0))
    with pytest.raises(ValueError, match="no images of class 7"):
        degrade.one_class(images, labels, 7, 5)
    noise = degrade.pure_noise(100, (1, 28, 28), seed=0)
    assert noise.shape == (100, 1, 28, 28) and noise.dtype == np.float32 and noise.min() == -1 and noise.max() == 1
    assert abs(noise.mean()) < 0.01 and 0.70 < noise.std() < 0.74   # clipped N(0, 1): std 0.72
    assert np.array_equal(noise, degrade.pure_noise(100, (1, 28, 28), seed=0))


# ------------------------------------------------------------------------------------------------ calibration

@pytest.fixture
def toy10(tmp_path, monkeypatch):
    """A 10-class 14x14 data set as IDX files (train 160, test 40): class c is a bright 3x3 square in cell c of a
    3x4 grid."""
    d = tmp_path / "toy10"
    d.mkdir()
    md5 = {}
    for split, n, seed in (("train", 160, 0), ("t10k", 40, 1)):
        labels = np.random.default_rng(seed).integers(0, 10, n).astype(np.uint8)
        images = np.zeros((n, 14, 14), np.uint8)
        for i, c in enumerate(labels):                            # a loop over a handful of test images
            r, q = divmod(int(c), 4)
            images[i, 1 + 3 * r:4 + 3 * r, 1 + 3 * q:4 + 3 * q] = 255
        for kind, arr, magic in (("images-idx3-ubyte", images, 0x803), ("labels-idx1-ubyte", labels, 0x801)):
            _write_idx(d / f"{split}-{kind}.gz", arr, magic)
            md5[f"{split}-{kind}"] = (data._md5((d / f"{split}-{kind}.gz").read_bytes()), "0" * 32)
    monkeypatch.setitem(data.DATASETS, "toy10", dict(data.DATASETS["mnist"], md5=md5, mirrors=[]))
    return str(d)


def test_calibrate_command_on_a_toy_data_set(toy10, tmp_path):
    """examples/mnist_eval.py --calibrate on 14x14 squares (10 classes): every set at -n images, the real row is the
    floor, the collapse onto 8s shows in the histogram and misses the target, pure noise is far from real images."""
    import json
    from minidiff.evaluation.classifier import save_classifier
    from minidiff.utils.data import load_dataset, to_model_range
    x, y = load_dataset("toy10", "train", toy10)
    clf = train_classifier(to_model_range(x), y.astype(np.int64), epochs=8, batch_size=16, lr=3e-3, progress=False)
    save_classifier(clf, str(tmp_path / "clf.npz"), meta=dict(test_accuracy=1.0))
    mod = _script("mnist_eval")
    common = ["--classifier", str(tmp_path / "clf.npz"), "--dataset", "toy10", "--data-dir", toy10]
    mod.main(["--calibrate", "-n", "100", "--out-dir", str(tmp_path / "cal"), "--json", str(tmp_path / "c.json")]
             + common)
    rows = {r["source"]: r for r in json.loads((tmp_path / "c.json").read_text())["rows"]}
    assert list(rows) == ["real", "blur 3x3", "shift 2px", "binarised", "noise 0.1", "noise 0.3", "only 8s",
                          "pure noise"]
    for r in rows.values():
        assert r["n"] == 100 and len(r["class_fractions"]) == 10 and sum(r["class_fractions"]) == pytest.approx(1)
        assert r["max_class_fraction"] == max(r["class_fractions"]) and 0 <= r["confident_fraction"] <= 1
        assert isinstance(r["misses_target"], list)
    assert rows["real"]["frechet"] == pytest.approx(rows["real"]["frechet_floor"])
    assert rows["real"]["frechet_over_floor"] == pytest.approx(1)
    assert rows["real"]["max_class_fraction"] < 0.25
    assert rows["only 8s"]["class_fractions"][8] == 1.0 and "max_class_fraction" in rows["only 8s"]["misses_target"]
    assert rows["pure noise"]["frechet"] > 3 * rows["real"]["frechet"]
    assert (tmp_path / "cal" / "calibration.png").stat().st_size > 500
    with pytest.raises(SystemExit):                               # neither a source nor --calibrate
        mod.main(common)
    with pytest.raises(SystemExit, match="n must be in 2..160"):
        mod.main(["--calibrate", "-n", "1000", "--out-dir", str(tmp_path / "cal")] + common)
