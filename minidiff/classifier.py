"""A small MNIST classifier built from minidiff's own layers: the judge of sample quality.

Its penultimate features (the global average of the last convolution, 128 numbers per image) are the space in
which the Frechet distance between generated and real digits is measured (metrics.py), and its predictions
say which digit a sample shows. Architecture (NCHW in, NHWC inside like the U-Net):
    conv 3x3 1->32, GN, SiLU   (28x28)
    conv 3x3 32->64 stride 2, GN, SiLU   (14x14)
    conv 3x3 64->64 stride 2, GN, SiLU   (7x7)
    conv 3x3 64->128 stride 2, GN, SiLU  (4x4)
    mean over pixels -> features (128) -> Linear -> 10 logits
Trained with softmax cross-entropy, L = mean_i (logsumexp(z_i) - z_i[y_i]), dL/dz = (softmax(z) - onehot(y)) / B.
"""
import numpy as np
from tqdm.auto import tqdm

from .backend import array_module, to_numpy
from .checkpoint import CheckpointError, load_checkpoint, load_params_into, save_checkpoint
from .data import batch_indices, steps_per_epoch
from .layers import Conv2d, GroupNorm, Linear, Model, SiLU
from .optim import Adam


class Classifier(Model):
    def __init__(self, num_classes=10, in_channels=1, seed=0, dtype=np.float32):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.blocks = []
        for i, (cin, cout, stride) in enumerate([(in_channels, 32, 1), (32, 64, 2), (64, 64, 2), (64, 128, 2)]):
            self.blocks.append((self.add(f"conv{i}", Conv2d(cin, cout, 3, rng, stride=stride, padding=1, dtype=dtype)),
                                self.add(f"norm{i}", GroupNorm(8, cout, dtype=dtype)),
                                self.add(f"act{i}", SiLU())))
        self.fc = self.add("fc", Linear(128, num_classes, rng, dtype))
        self._collect()

    def features(self, x):
        """x (B, C, H, W) in [-1, 1] -> penultimate features (B, 128)."""
        xp = array_module(x)
        h = xp.ascontiguousarray(x.transpose(0, 2, 3, 1))           # NCHW -> NHWC
        for conv, norm, act in self.blocks:
            h = act.forward(norm.forward(conv.forward(h)))
        self._pool_shape = h.shape
        return h.mean(axis=(1, 2))                                    # (B, 128)

    def forward(self, x):
        """Logits (B, num_classes)."""
        return self.fc.forward(self.features(x))

    def backward(self, dlogits):
        xp = array_module(dlogits)
        B, H, W, C = self._pool_shape
        dfeat = self.fc.backward(dlogits)                             # (B, 128)
        dh = xp.broadcast_to(dfeat[:, None, None, :] / (H * W), (B, H, W, C))  # mean pool: d/dh = 1/(H W)
        for conv, norm, act in reversed(self.blocks):
            dh = conv.backward(norm.backward(act.backward(xp.ascontiguousarray(dh))))
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
    """(predicted classes (N,), softmax probabilities (N, K), features (N, 128)) in evaluation mode."""
    model.train(False)
    probs, feats = [], []
    for i in range(0, len(x), batch_size):
        f = model.features(x[i:i + batch_size])
        z = to_numpy(model.fc.forward(f)).astype(np.float64)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        probs.append(e / e.sum(axis=1, keepdims=True))
        feats.append(to_numpy(f))
    p = np.concatenate(probs)
    return p.argmax(axis=1), p, np.concatenate(feats)


def random_shift(x, max_shift, rng):
    """Translate each image of (B, C, H, W) by its own random (dy, dx) in [-max_shift, max_shift], filling with -1
    (background): the data augmentation that lifts the classifier above 99%."""
    xp = array_module(x)
    B, C, H, W = x.shape
    m = max_shift
    padded = xp.pad(x, ((0, 0), (0, 0), (m, m), (m, m)), constant_values=-1.0)
    dy, dx = (xp.asarray(rng.integers(0, 2 * m + 1, B)) for _ in range(2))
    rows = dy[:, None] + xp.arange(H)                                  # (B, H) source rows in the padded image
    cols = dx[:, None] + xp.arange(W)
    out = padded[xp.arange(B)[:, None, None, None], xp.arange(C)[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
    return out


def train_classifier(images, labels, epochs=3, batch_size=128, lr=2e-3, seed=0, max_shift=2, progress=True):
    """Train a Classifier on images (N, 1, 28, 28) in [-1, 1] and int labels with Adam, each batch shifted by up
    to max_shift pixels; returns the model."""
    model = Classifier(seed=seed)
    rng = np.random.default_rng(seed)
    opt = Adam(model.params, model.grads, lr=lr)
    model.train(True)
    steps = int(epochs * steps_per_epoch(len(images), batch_size))
    bar = tqdm(range(steps), unit="step", disable=not progress, desc="classifier")
    for step in bar:
        idx = batch_indices(len(images), batch_size, seed, step)
        x = random_shift(images[idx], max_shift, rng) if max_shift else images[idx]
        loss, dlogits = softmax_cross_entropy(model.forward(x), labels[idx])
        model.zero_grad()
        model.backward(dlogits)
        opt.step(lr=lr * 0.5 * (1 + np.cos(np.pi * step / steps)))    # cosine decay to 0
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss:.4f}")
    model.train(False)
    return model


def save_classifier(model, path, meta=None):
    save_checkpoint(path, model.params, meta=dict(meta or {}, kind="classifier"))


def load_classifier(path):
    """A Classifier with the weights written by save_classifier (examples/mnist_classifier.py)."""
    ckpt = load_checkpoint(path)
    if ckpt["meta"].get("kind") != "classifier":
        raise CheckpointError(f"{path!r} is not a classifier checkpoint (train one with examples/mnist_classifier.py)")
    model = Classifier()
    load_params_into(model.params, ckpt["params"], "classifier weights", path)
    model.train(False)
    return model, ckpt["meta"]
