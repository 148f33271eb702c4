"""The two figures the article leaves as placeholders ("[插入扩散过程中间结果图像]", sections 4.1 and 4.2).

    python examples/forward_diffusion.py                                                       # forward process
    python examples/forward_diffusion.py --checkpoint runs/mnist/checkpoint.npz                # + reverse process

Figure 1 (forward_process.png): MNIST digits diffused by the article's section 4.1 example (T = 10, beta_t = t/T,
so x_10 is pure noise), each column x_t for t = 0..10, and under each row the same digit noised by the T = 1000
linear schedule at the timestep whose alpha-bar is closest (the same signal-to-noise level).
Figure 2 (reverse_process.png, needs a trained checkpoint): DDPM ancestral sampling from noise to digits, showing
x_t at several t.
"""
import argparse
import os
import sys

import numpy as np

from minidiff.diffusion import q_sample
from minidiff.schedule import NoiseSchedule
from minidiff.utils.data import DataError, load_dataset, to_model_range
from minidiff.utils.image import save_figure


def forward_figure(images, out, seed=0):
    """Rows: for each image, the T = 10 article schedule, then the T = 1000 linear schedule at matched alpha-bar."""
    article = NoiseSchedule(num_train_timesteps=10, beta_schedule="t_over_T")
    linear = NoiseSchedule()
    rng = np.random.default_rng(seed)
    x0 = to_model_range(images)                               # (n, 1, 28, 28)
    eps = rng.standard_normal(x0.shape).astype(np.float32)    # one eps per image, shared by both rows
    # column 0 is x_0; column k = 1..10 is x_k (index k - 1 in code)
    matched = [int(np.argmin(np.abs(linear.alphas_cumprod - ab))) for ab in article.alphas_cumprod]
    rows, labels = [], []
    for i in range(len(x0)):
        for sched, steps, name in ((article, list(range(10)), "T=10"), (linear, matched, "T=1000")):
            cols = [x0[i]] + [q_sample(sched, x0[i:i + 1], t, eps[i:i + 1])[0] for t in steps]
            rows.append(cols)
            labels.append(name)
    col_labels = ["x0"] + [f"t={k}" for k in range(1, 11)]
    path = save_figure(np.array(rows), out, col_labels=col_labels, row_labels=labels)
    print("article t -> alpha-bar, matched linear t (1-based):",
          ", ".join(f"{k + 1}: {article.alphas_cumprod[k]:.3g} -> {matched[k] + 1}" for k in range(10)))
    return path


def reverse_figure(checkpoint, out, n=6, seed=0):
    from minidiff.sample import sample
    from minidiff.utils.backend import to_numpy
    from minidiff.utils.checkpoint import load_model
    model, sched, _ = load_model(checkpoint)
    T = sched.num_train_timesteps
    shown = [T - 1, int(T * 0.8), int(T * 0.6), int(T * 0.4), int(T * 0.3), int(T * 0.2), int(T * 0.1), int(T * 0.05), 0]
    seen = {}

    def keep(t, x):                                          # the network's input x_t before the step at t
        if t in shown:
            seen[t] = to_numpy(x).copy()
    x0 = sample(model, sched, n, sampler="ddpm", seed=seed, callback=keep)
    rows = np.stack([seen[t] for t in shown] + [x0], axis=1)  # (n, columns, 1, 28, 28)
    return save_figure(rows, out, col_labels=[f"t={t + 1}" for t in shown] + ["x0"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--checkpoint", default=None, help="trained checkpoint for the reverse-process figure")
    p.add_argument("--out-dir", default="runs/figures")
    p.add_argument("-n", type=int, default=3, help="digits to show")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        images, _ = load_dataset("mnist", "test", data_dir=a.data_dir)
        print("wrote", forward_figure(images[:a.n], os.path.join(a.out_dir, "forward_process.png"), a.seed))
        if a.checkpoint:
            print("wrote", reverse_figure(a.checkpoint, os.path.join(a.out_dir, "reverse_process.png"), seed=a.seed))
    except (DataError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
