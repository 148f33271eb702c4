"""Train the evaluation classifier (minidiff.evaluation.classifier) on MNIST and write its weights.

    python examples/mnist_classifier.py --out-dir runs/classifier

Writes OUT_DIR/classifier.npz (weights, feature scale and test accuracy in its meta). examples/mnist_eval.py uses it
to judge samples: which digit each shows, how confident, and the Frechet distance in its judge features
(docs/evaluation.md). 4 epochs take about a minute on 2 CPU cores.
"""
import argparse
import os
import sys
import time

import numpy as np

from minidiff.evaluation.classifier import predict, save_classifier, train_classifier
from minidiff.utils.data import DataError, load_dataset, to_model_range


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out-dir", default="runs/classifier")
    p.add_argument("--epochs", type=float, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        xtr, ytr = load_dataset(a.dataset, "train", a.data_dir)
        xte, yte = load_dataset(a.dataset, "test", a.data_dir)
    except DataError as e:
        sys.exit(f"error: {e}")
    t0 = time.perf_counter()
    model = train_classifier(to_model_range(xtr), ytr.astype(np.int64), epochs=a.epochs, batch_size=a.batch_size,
                             lr=a.lr, seed=a.seed)
    train_s = time.perf_counter() - t0
    pred, _, _ = predict(model, to_model_range(xte))
    acc = float((pred == yte).mean())
    path = os.path.join(a.out_dir, "classifier.npz")
    save_classifier(model, path, meta=dict(dataset=a.dataset, test_accuracy=acc, epochs=a.epochs,
                                           batch_size=a.batch_size, lr=a.lr, seed=a.seed, train_seconds=train_s))
    print(f"test accuracy {acc:.2%} ({(pred != yte).sum()} errors of {len(yte)}); trained in {train_s:.0f} s; "
          f"wrote {path}")


if __name__ == "__main__":
    main()
