"""Evaluation: the article's objective in bits per dimension, and sample quality judged by a classifier.
Stage 7 of the pipeline: judging a trained model (examples/mnist_eval.py runs it).

- ``bound``: the variational bound L = L_T + sum_t L_{t-1} + L_0 (likelihood.py) of a trained model on real
  images, exactly (all T terms, a few images) and as a Monte Carlo estimate with its standard error.
- ``sample_quality``: for generated images, judged by minidiff's own MNIST classifier (classifier.py): the
  Frechet distance to the test set in its judge features, the classifier's mean confidence and the fraction of
  samples it classifies with confidence >= 0.9, the predicted-class histogram (the ten fractions, the largest,
  and its entropy: log2(10) = 3.32 bits when every digit is equally present) and, for prompted or
  class-conditional samples, the fraction recognised as the prompted class.
- ``frechet_floor``: the same distance for real training images at the same count: what a perfect sampler
  would score, since the distance between two finite samples of one distribution is not zero.
- ``TARGET`` / ``target_misses``: the project's target for a good sampler, and which measures miss it.
- ``calibration_sets``: real training digits and known degradations of them (degrade.py), to check that the judge
  ranks them as a person would (examples/mnist_eval.py --calibrate, docs/evaluation.md).
"""
import numpy as np

from . import degrade
from ..utils.backend import to_numpy
from .classifier import predict
from ..diffusion import model_eps
from .likelihood import bpd_exact, bpd_monte_carlo
from .metrics import class_histogram, class_histogram_entropy, confident_fraction, frechet_distance


def eps_function(model, schedule, batch_size=256):
    """eps_fn(x_t, t) for likelihood.py: the model in evaluation mode (unconditional: conditional models get the
    "no condition" input), in chunks of batch_size images."""
    model.train(False)

    def eps_fn(x_t, t):
        t = np.asarray(t, dtype=np.int64)
        return np.concatenate([to_numpy(model_eps(model, schedule, x_t[i:i + batch_size], t[i:i + batch_size]))
                               for i in range(0, len(t), batch_size)]).astype(x_t.dtype)
    return eps_fn


def bound(model, schedule, x0, exact_images=4, mc_images=1000, seed=0, batch_size=256, group=None):
    """Bits per dimension of the bound on real images x0 (N, C, H, W) in [-1, 1]: the exact sum over all T terms
    for the first ``exact_images`` images and a Monte Carlo estimate over the first ``mc_images``; ``group``: shared
    by the processes of a parallel run (utils/distributed.py), the same numbers."""
    for name, n in (("exact_images", exact_images), ("mc_images", mc_images)):
        if not (isinstance(n, (int, np.integer)) and n >= 0):      # x0[:-1] would be nearly all of them
            raise ValueError(f"{name} must be an integer >= 0 (0: skip), got {n!r}")
    eps_fn = eps_function(model, schedule, batch_size=batch_size)
    out = {}
    if exact_images:
        xe = x0[:exact_images]
        ex = bpd_exact(schedule, eps_fn, xe, seed=seed, batch_t=max(1, batch_size // len(xe)), group=group)
        out.update(exact_bpd=float(ex["total"].mean()), exact_images=len(xe),
                   exact_terms=ex["terms"].mean(axis=0), prior_bpd=float(ex["prior"].mean()))
    if mc_images:
        mean, se = bpd_monte_carlo(schedule, eps_fn, x0[:mc_images], seed=seed, group=group)
        out.update(mc_bpd=mean, mc_se=se, mc_images=min(mc_images, len(x0)))
    return out


def sample_quality(classifier, images, reference_feats, labels=None):
    """Quality of generated images (N, 1, 28, 28) in [-1, 1] against real-image features (M, D)."""
    if labels is not None and np.shape(labels) != (len(images),):
        raise ValueError(f"labels must have one class per image, shape ({len(images)},), got {np.shape(labels)}")
    pred, probs, feats = predict(classifier, np.asarray(images, dtype=np.float32))
    hist = class_histogram(pred, probs.shape[1])
    out = dict(n=len(images), frechet=frechet_distance(feats, reference_feats),
               confidence=float(probs.max(axis=1).mean()), confident_fraction=confident_fraction(probs),
               class_entropy=class_histogram_entropy(pred, probs.shape[1]), class_fractions=hist.tolist(),
               max_class_fraction=float(hist.max()))
    if labels is not None:
        out["prompted_accuracy"] = float((pred == np.asarray(labels)).mean())
    return out


TARGET = dict(frechet_over_floor=2.0, max_class_fraction=0.15, confident_fraction=0.9)


def target_misses(row):
    """The project's target for a good sampler, checked on a sample_quality row with its floor ratio: the names of
    the measures that miss it (FD above 2x the floor at the same n, one class above 15% of the samples, fewer than
    90% classified with confidence >= 0.9); [] when all are met."""
    missed = dict(frechet_over_floor=row["frechet_over_floor"] > TARGET["frechet_over_floor"],
                  max_class_fraction=row["max_class_fraction"] > TARGET["max_class_fraction"],
                  confident_fraction=row["confident_fraction"] < TARGET["confident_fraction"])
    return [k for k, m in missed.items() if m]


def real_sample(train_images, n, seed=0):
    """n distinct random training images: the floor's images, and what calibration_sets degrades."""
    if not 2 <= n <= len(train_images):
        raise ValueError(f"n must be in 2..{len(train_images)} (the training images available), got {n}")
    return np.random.default_rng(seed).choice(len(train_images), size=n, replace=False)


def frechet_floor(classifier, train_images, reference_feats, n, seed=0):
    """Frechet distance of n random real training images to the reference features (the floor at count n)."""
    _, _, feats = predict(classifier, train_images[real_sample(train_images, n, seed)])
    return frechet_distance(feats, reference_feats)


def calibration_sets(train_images, train_labels, n, seed=0, digit=8):
    """[(name, images)]: the floor's n real training images and known degradations of them (degrade.py): blurred,
    shifted, binarised and noisy digits, a collapse onto one class (8: the collapse seen in DDIM samples, and the
    digit whose collapse the judge separates least), pure noise. A judge worth reading puts every degradation well
    above the real row (the floor), the collapse above the damaged digits and pure noise above everything."""
    x = train_images[real_sample(train_images, n, seed)]
    return [("real", x), ("blur 3x3", degrade.blur(x)), ("shift 2px", degrade.shift(x, 2, seed)),
            ("binarised", degrade.binarize(x)), ("noise 0.1", degrade.add_noise(x, 0.1, seed)),
            ("noise 0.3", degrade.add_noise(x, 0.3, seed)),
            (f"only {digit}s", degrade.one_class(train_images, train_labels, digit, n, seed)),
            ("pure noise", degrade.pure_noise(n, x.shape[1:], seed))]
