"""minidiff: diffusion models (DDPM, DDIM, classifier-free guidance) from scratch in NumPy/CuPy.

Start with schedule.py (the betas and everything derived from them), diffusion.py (the forward
process and the reverse Gaussian), step.py (one reverse step, equation by equation), layers.py and
unet.py (the network with hand-written backward passes), train.py and sample.py.
"""
from .schedule import NoiseSchedule, make_beta_schedule

__version__ = "0.1.0"


def backends():
    """Which backends this install can use: {'numpy', 'cpu_kernel', 'cuda_kernel', 'cupy'} -> bool, plus
    'notes' explaining anything missing. 'cuda_kernel' is True when the kernel is compiled in AND CuPy sees a GPU.  Run: python -c "import minidiff; print(minidiff.backends())"."""
    from .backend import cupy_status
    notes = []
    try:
        from ._native import native_status
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
