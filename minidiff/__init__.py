"""minidiff: diffusion models (DDPM, DDIM, DPM-Solver++, classifier-free guidance) from scratch in NumPy/CuPy.

Read it in the order of the pipeline, which is the order of README's tour:
  1. data.py          the images
  2. schedule.py      the betas and everything derived from them
  3. diffusion.py     the forward process, its closed form and posterior, the reverse Gaussian
  4. layers.py,       the network, every backward pass by hand (kernels.py: the fast paths registered
     unet.py          for its readable functions; text.py, prompts.py: text-to-image)
  5. train.py,        the loss, Adam, EMA, one training step without host synchronisation, checkpoints
     optim.py
  6. sample.py,       DDPM, DDIM and DPM-Solver++ over the fused step, its Philox noise
     step.py
  7. evaluate.py      the bound in bits per dimension (likelihood.py) and the calibrated judge (classifier.py,
                      metrics.py, degrade.py)
"""
from .schedule import NoiseSchedule, make_beta_schedule

__version__ = "0.1.0"


def backends():
    """Which backends this install can use: {'numpy', 'cpu_kernel', 'cuda_kernel', 'cupy'} -> bool, plus
    'notes' explaining anything missing. 'cuda_kernel' is True when the kernel is compiled in AND CuPy sees a GPU.  Run: python -c "import minidiff; print(minidiff.backends())"."""
    from .utils.backend import cupy_status
    notes = []
    try:
        from .utils.native import native_status
        native = native_status()
    except ImportError as e:
        native = dict(cpu_kernel=False, cuda_kernel=False, reason=str(e))
    if native.get("reason"):
        notes.append(native["reason"])
    cupy_ok, cupy_why = cupy_status()
    if not cupy_ok:
        notes.append(cupy_why)
    if native["cuda_kernel"] and not cupy_ok:
        notes.append("the CUDA kernel is compiled in, but unusable without CuPy and a GPU")
    return dict(numpy=True, cpu_kernel=bool(native["cpu_kernel"]), cuda_kernel=bool(native["cuda_kernel"]) and cupy_ok,
                cupy=cupy_ok, notes="; ".join(notes))
