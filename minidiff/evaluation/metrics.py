"""Sample-quality measures computed with NumPy only, in a classifier's feature space (classifier.py).
Stage 7 of the pipeline, in evaluate.py: the numbers the judge reports.

Frechet distance between Gaussians fitted to two feature sets (the FID formula, with our own classifier instead
of Inception): d^2 = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1^{1/2} S_2 S_1^{1/2})^{1/2}); the trace term is
computed from the eigenvalues of the symmetric matrix S_1^{1/2} S_2 S_1^{1/2}, which equal those of S_1 S_2.
"""
import numpy as np


def _sqrtm_psd(a):
    """Square root of a symmetric positive semi-definite matrix by its eigen-decomposition."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(feats1, feats2):
    """Frechet distance between N(mu_1, S_1) and N(mu_2, S_2) fitted to (N1, D) and (N2, D) feature arrays."""
    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"features must be (N, D) arrays with the same D, got {f1.shape} and {f2.shape}")
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    r1 = _sqrtm_psd(s1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()   # tr (S1^1/2 S2 S1^1/2)^1/2
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)


def class_histogram(predicted, num_classes=10):
    """Fraction of samples predicted as each class (num_classes,): a collapse onto one digit shows as one large
    entry (the project's target for a good sampler: none above 0.15, real digits give about 0.1 each)."""
    predicted = np.asarray(predicted)
    if predicted.ndim != 1 or len(predicted) == 0 or not np.issubdtype(predicted.dtype, np.integer):
        raise ValueError(f"predicted must be a non-empty 1-d array of class indices, got {predicted.dtype} "
                         f"{predicted.shape}")
    if predicted.min() < 0 or predicted.max() >= num_classes:
        raise ValueError(f"predicted classes must be in 0..{num_classes - 1}, got {predicted.min()}..{predicted.max()}")
    return np.bincount(predicted, minlength=num_classes) / len(predicted)


def class_histogram_entropy(predicted, num_classes=10):
    """Entropy (bits) of the predicted-class histogram: log2(10) = 3.32 when every class is equally present."""
    p = class_histogram(predicted, num_classes)
    p = p[p > 0]
    return float((p * np.log2(1 / p)).sum())


def confident_fraction(probs, threshold=0.9):
    """Fraction of samples whose largest class probability is >= threshold (probs (N, K), rows summing to 1):
    how many samples the classifier reads as a clear digit (the project's target: >= 0.9)."""
    probs = np.asarray(probs)
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError(f"probs must be a non-empty (N, K) array, got shape {probs.shape}")
    return float((probs.max(axis=1) >= threshold).mean())
