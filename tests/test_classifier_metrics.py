"""The evaluation classifier (own layers, gradient-checked) and the NumPy-only sample-quality measures."""
import math

import numpy as np
import pytest

from minidiff.classifier import Classifier, predict, softmax_cross_entropy, train_classifier
from minidiff.metrics import class_histogram_entropy, frechet_distance
from test_layers import assert_small, numerical_grad, randomize, rel_error


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
    model = Classifier(num_classes=3, seed=0, dtype=np.float64)
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
    assert len(errors) == 1 + 4 * 4 + 2      # input, 4 x (conv, norm) x (weight, bias), fc
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
    assert probs.shape == (64, 10) and np.allclose(probs.sum(1), 1) and feats.shape == (64, 128)


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
