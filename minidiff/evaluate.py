"""Evaluation: the article's objective in bits per dimension, and sample quality judged by a classifier.

- ``bound``: the variational bound L = L_T + sum_t L_{t-1} + L_0 (likelihood.py) of a trained model on real
  images, exactly (all T terms, a few images) and as a Monte Carlo estimate with its standard error.
- ``sample_quality``: for generated images, in the feature space of minidiff's own MNIST classifier
  (classifier.py): the Frechet distance to the test set, the classifier's mean confidence, the entropy of the
  predicted-class histogram (mode coverage; log2(10) = 3.32 bits when every digit is equally present) and,
  for prompted or class-conditional samples, the fraction recognised as the prompted class.
- ``frechet_floor``: the same distance for real training images at the same count: what a perfect sampler
  would score, since the distance between two finite samples of one distribution is not zero.
"""
import numpy as np

from .backend import to_numpy
from .classifier import predict
from .diffusion import model_eps
from .likelihood import bpd_exact, bpd_monte_carlo
from .metrics import class_histogram_entropy, frechet_distance


def eps_function(model, schedule, batch_size=256):
    """eps_fn(x_t, t) for likelihood.py: the model in evaluation mode (unconditional: conditional models get the
    "no condition" input), in chunks of batch_size images."""
    model.train(False)

    def eps_fn(x_t, t):
        t = np.asarray(t, dtype=np.int64)
        return np.concatenate([to_numpy(model_eps(model, schedule, x_t[i:i + batch_size], t[i:i + batch_size]))
                               for i in range(0, len(t), batch_size)]).astype(x_t.dtype)
    return eps_fn


def bound(model, schedule, x0, exact_images=4, mc_images=1000, seed=0, batch_size=256):
    """Bits per dimension of the bound on real images x0 (N, 1, H, W) in [-1, 1]: the exact sum over all T terms
    for the first ``exact_images`` images and a Monte Carlo estimate over the first ``mc_images``."""
    eps_fn = eps_function(model, schedule, batch_size=batch_size)
    out = {}
    if exact_images:
        xe = x0[:exact_images]
        ex = bpd_exact(schedule, eps_fn, xe, seed=seed, batch_t=max(1, batch_size // len(xe)))
        out.update(exact_bpd=float(ex["total"].mean()), exact_images=len(xe),
                   exact_terms=ex["terms"].mean(axis=0), prior_bpd=float(ex["prior"].mean()))
    if mc_images:
        mean, se = bpd_monte_carlo(schedule, eps_fn, x0[:mc_images], seed=seed)
        out.update(mc_bpd=mean, mc_se=se, mc_images=min(mc_images, len(x0)))
    return out


def sample_quality(classifier, images, reference_feats, labels=None):
    """Quality of generated images (N, 1, 28, 28) in [-1, 1] against real-image features (M, D)."""
    if labels is not None and np.shape(labels) != (len(images),):
        raise ValueError(f"labels must have one class per image, shape ({len(images)},), got {np.shape(labels)}")
    pred, probs, feats = predict(classifier, np.asarray(images, dtype=np.float32))
    out = dict(n=len(images), frechet=frechet_distance(feats, reference_feats),
               confidence=float(probs.max(axis=1).mean()), class_entropy=class_histogram_entropy(pred))
    if labels is not None:
        out["prompted_accuracy"] = float((pred == np.asarray(labels)).mean())
    return out


def frechet_floor(classifier, train_images, reference_feats, n, seed=0):
    """Frechet distance of n random real training images to the reference features (the floor at count n)."""
    idx = np.random.default_rng(seed).choice(len(train_images), size=n, replace=False)
    _, _, feats = predict(classifier, train_images[idx])
    return frechet_distance(feats, reference_feats)
