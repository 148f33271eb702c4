"""minidiff: diffusion models (DDPM, DDIM, DPM-Solver++, guidance) from scratch in NumPy/CuPy.

The core path, in reading order: each module imports only the ones before it (and the plumbing below).
  1. schedule.py     the betas and every coefficient derived from them (article 3.1, 4.1, 5.2)
  2. diffusion.py    the forward process q(x_t | x_0), its posterior, the reverse Gaussian p(x_{t-1} | x_t)
  3. step.py         one reverse step x_t -> x_{t-1}: DDPM, DDIM and DPM-Solver++ as one formula
  4. layers.py       the network's layers, every backward pass written by hand
  5. model.py        a whole network: its parameters in one flat buffer, its gradients in another
  6. unet.py         the DDPM U-Net eps_theta(x_t, t)
  7. optim.py        Adam, the EMA of the weights, gradient clipping, the learning rate
  8. train_step.py   one training step: the loss L_simple (DDPM eq. 14), backward, Adam, EMA
  9. sample.py       the sampling loop: eps = network, x = step(x, eps), from noise to images
 10. train.py        the training loop: batches, steps, logs, checkpoints, exact resume

Beside it, in subpackages a first reading skips:
  conditioning/      class labels and text-to-image: tokenizer, text encoder, prompts, conditional U-Nets
  evaluation/        the bound in bits per dimension and the judge (classifier, metrics, degradations)
  utils/             plumbing: NumPy/CuPy, Philox noise, data sets, checkpoints, images, the compiled extension
  fast/              the fast paths: one registry, the C++/CUDA kernels and fused CuPy kernels registered in it
README.md's equation map leads from each formula to its function and the test that proves it.
"""
__version__ = "0.1.0"

CORE_PATH = ("schedule", "diffusion", "step", "layers", "model", "unet", "optim", "train_step", "sample", "train")


def backends():
    """Which backends this install can use: {'numpy', 'cpu_kernel', 'cuda_kernel', 'cupy'} -> bool, plus
    'notes' explaining anything missing. 'cuda_kernel' is True when the kernel is compiled in AND CuPy sees a GPU.
    Run: python -c "import minidiff; print(minidiff.backends())"."""
    from .utils.backend import cupy_status
    from .utils.native import native_status
    native = native_status()
    notes = [native["reason"]] if native["reason"] else []
    cupy_ok, cupy_why = cupy_status()
    if not cupy_ok:
        notes.append(cupy_why)
    if native["cuda_kernel"] and not cupy_ok:
        notes.append("the CUDA kernel is compiled in, but unusable without CuPy and a GPU")
    return dict(numpy=True, cpu_kernel=bool(native["cpu_kernel"]), cuda_kernel=bool(native["cuda_kernel"]) and cupy_ok,
                cupy=cupy_ok, notes="; ".join(notes))
