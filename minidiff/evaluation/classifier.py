"""A small MNIST classifier built from minidiff's own layers: the judge of sample quality.
Stage 7 of the pipeline, in evaluate.py: the judge.

Its predictions say which digit a sample shows; its judge features are the space in which the Frechet distance
between generated and real digits is measured (metrics.py). Architecture (NCHW in, NHWC inside like the U-Net):
    conv 3x3 1->32, SiLU                 (28x28)   no normalisation: keeps each image's contrast and texture
    conv 3x3 32->64 stride 2, GN, SiLU   (14x14)
    conv 3x3 64->64 stride 2, GN, SiLU   (7x7)
    conv 3x3 64->128 stride 2, GN, SiLU  (4x4)
    flatten (2048) -> Linear -> SiLU -> hidden (128) -> Linear -> 10 logits
The head sees the last map position by position (no global pooling) and training uses no shifts, so the hidden
layer knows where a digit is as well as which it is. Trained with softmax cross-entropy,
L = mean_i (logsumexp(z_i) - z_i[y_i]), dL/dz = (softmax(z) - onehot(y)) / B.

Judge features (B, 32 + 128 + 128), three views, each scaled to unit total variance over training digits
(``feature_scale``, fitted after training) so that none drowns the others:
    texture: the first block's 32 channels averaged over the image (speckle, blur, hard edges);
    layout:  the same averaged over each image quadrant (where the ink is: off-centre or misplaced strokes);
    shape:   the hidden layer (which digit, how well formed).
The penultimate layer alone (the usual FID choice) barely sees speckle, blur or binarisation, and a globally pooled
one misses shifts: docs/evaluation.md has the calibration that chose these views.
"""
import numpy as np
from tqdm.auto import tqdm

from ..utils.backend import array_module, to_numpy
from ..utils.checkpoint import CheckpointError, load_checkpoint, load_params_into, save_checkpoint
from ..utils.data import batch_indices, steps_per_epoch
from ..layers import Conv2d, GroupNorm, Linear, SiLU
from ..model import Model
from ..optim import Adam


class Classifier(Model):
    def __init__(self, num_classes=10, in_channels=1, image_size=28, seed=0, dtype=np.float32):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.in_channels, self.image_size = int(in_channels), int(image_size)
        self.blocks = []
        size = self.image_size
        for i, (cin, cout, stride) in enumerate([(in_channels, 32, 1), (32, 64, 2), (64, 64, 2), (64, 128, 2)]):
            conv = self.add(f"conv{i}", Conv2d(cin, cout, 3, rng, stride=stride, padding=1, dtype=dtype))
            norm = [self.add(f"norm{i}", GroupNorm(8, cout, dtype=dtype))] if i else []
            self.blocks.append([conv] + norm + [self.add(f"act{i}", SiLU())])
            size = (size - 1) // stride + 1                           # 28 -> 28, 14, 7, 4
        self.fc1 = self.add("fc1", Linear(128 * size * size, 128, rng, dtype))
        self.act_fc = self.add("act_fc", SiLU())
        self.fc = self.add("fc", Linear(128, num_classes, rng, dtype))
        self.feature_scale = np.ones(3)                               # texture, layout, shape (fit_feature_scale)
        self._collect()

    def forward(self, x, with_features=False):
        """x (B, C, H, W) in [-1, 1] -> logits (B, num_classes), and the judge features (B, 288) if asked."""
        xp = array_module(x)
        if x.shape[2:] != (self.image_size, self.image_size):
            raise ValueError(f"the classifier takes {self.image_size}x{self.image_size} images, got {x.shape}")
        h = xp.ascontiguousarray(x.transpose(0, 2, 3, 1))           # NCHW -> NHWC
        for i, block in enumerate(self.blocks):
            for layer in block:
                h = layer.forward(h)
            if i == 0:
                first = h                                             # (B, 28, 28, 32)
        self._map_shape = h.shape
        hidden = self.act_fc.forward(self.fc1.forward(h.reshape(len(h), -1)))   # (B, 128)
        logits = self.fc.forward(hidden)
        if not with_features:
            return logits
        B, H, W, C = first.shape
        quadrants = [first[:, r, c].mean(axis=(1, 2)) for r in (slice(0, H // 2), slice(H // 2, H))
                     for c in (slice(0, W // 2), slice(W // 2, W))]
        views = [first.mean(axis=(1, 2)), xp.concatenate(quadrants, axis=1), hidden]   # (B, 32), (B, 128), (B, 128)
        return logits, xp.concatenate([v * v.dtype.type(s) for v, s in zip(views, self.feature_scale)], axis=1)

    def backward(self, dlogits):
        dh = self.fc1.backward(self.act_fc.backward(self.fc.backward(dlogits))).reshape(self._map_shape)
        for block in reversed(self.blocks):
            for layer in reversed(block):
                dh = layer.backward(dh)
        return dh.transpose(0, 3, 1, 2)                               # NHWC -> NCHW


def softmax_cross_entropy(logits, labels):
    """(mean cross-entropy, dL/dlogits) for logits (B, K) and int labels (B,)."""
    xp = array_module(logits)
    z = logits - logits.max(axis=1, keepdims=True)
    logsumexp = xp.log(xp.exp(z).sum(axis=1))
    B = logits.shape[0]
    loss = float((logsumexp - z[xp.arange(B), labels]).mean())
    dlogits = xp.exp(z - logsumexp[:, None])                          # softmax
    dlogits[xp.arange(B), labels] -= 1.0
    return loss, dlogits / B


def predict(model, x, batch_size=500):
    """(predicted classes (N,), softmax probabilities (N, K), judge features (N, 288)) in evaluation mode."""
    model.train(False)
    probs, feats = [], []
    for i in range(0, len(x), batch_size):
        z, f = model.forward(x[i:i + batch_size], with_features=True)
        z = to_numpy(z).astype(np.float64)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        probs.append(e / e.sum(axis=1, keepdims=True))
        feats.append(to_numpy(f))
    p = np.concatenate(probs)
    return p.argmax(axis=1), p, np.concatenate(feats)


def fit_feature_scale(model, images):
    """Scale each view of the judge features (texture, layout, shape) to unit total variance, sum of the variances
    of its features, over `images` (real training digits)."""
    model.feature_scale = np.ones(3)
    f = predict(model, images)[2].astype(np.float64)
    sizes = np.cumsum([0, 32, 128, 128])
    model.feature_scale = np.array([1 / np.sqrt(f[:, a:b].var(axis=0).sum()) for a, b in zip(sizes, sizes[1:])])
    return model.feature_scale


def train_classifier(images, labels, epochs=4, batch_size=128, lr=2e-3, seed=0, progress=True):
    """Train a Classifier on images (N, 1, H, W) in [-1, 1] and int labels with Adam and cosine learning-rate decay
    (no augmentation: shifted digits must look different to the judge), then fit its feature scale on up to
    10,000 of the training images; returns the model."""
    model = Classifier(in_channels=images.shape[1], image_size=images.shape[2], seed=seed)
    opt = Adam(model.params, model.grads, lr=lr)
    model.train(True)
    steps = int(epochs * steps_per_epoch(len(images), batch_size))
    bar = tqdm(range(steps), unit="step", disable=not progress, desc="classifier")
    for step in bar:
        idx = batch_indices(len(images), batch_size, seed, step)
        loss, dlogits = softmax_cross_entropy(model.forward(images[idx]), labels[idx])
        model.zero_grad()
        model.backward(dlogits)
        opt.step(lr=lr * 0.5 * (1 + np.cos(np.pi * step / steps)))    # cosine decay to 0
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss:.4f}")
    model.train(False)
    fit = np.random.default_rng(seed).choice(len(images), size=min(len(images), 10_000), replace=False)
    fit_feature_scale(model, images[np.sort(fit)])
    return model


def save_classifier(model, path, meta=None):
    save_checkpoint(path, model.params, meta=dict(meta or {}, kind="classifier", in_channels=model.in_channels,
                                                  image_size=model.image_size,
                                                  feature_scale=[float(s) for s in model.feature_scale]))


def load_classifier(path):
    """A Classifier with the weights written by save_classifier (examples/mnist_classifier.py)."""
    ckpt = load_checkpoint(path)
    meta = ckpt["meta"]
    if meta.get("kind") != "classifier":
        raise CheckpointError(f"{path!r} is not a classifier checkpoint (train one with examples/mnist_classifier.py)")
    if "feature_scale" not in meta:
        raise CheckpointError(f"{path!r} is a classifier of an older design (globally pooled features, no feature "
                              f"scale): retrain it with examples/mnist_classifier.py")
    model = Classifier(in_channels=meta["in_channels"], image_size=meta["image_size"])
    load_params_into(model.params, ckpt["params"], "classifier weights", path)
    model.feature_scale = np.array(meta["feature_scale"])
    model.train(False)
    return model, meta
