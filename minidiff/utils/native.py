"""The compiled extension minidiff._core (csrc/), loaded if present and current.
Underneath every stage: the C++/CUDA kernels that minidiff/fast/ registers.

`import minidiff` never fails because of it: without the extension (a source tree that was not built,
or a build from older sources) the NumPy path works and ``native_status()`` says why and how to fix it.
"""
import os

from .distributed import launched_size

# Must equal MINIDIFF_ABI_VERSION in csrc/kernels.h; bump both when a binding's signature changes.
ABI_VERSION = 3

_FIX = "build it with `pip install .` from the repository root"

# The kernels' OpenMP threads wait by spinning a little, then sleep (OpenMP reads these when _core loads it): waking
# a sleeping thread for each kernel costs more than the short spin, but a spin waits for a core that another program
# holds (docs/performance.md), so the processes of mpiexec, which share the cores, sleep at once.
# OMP_WAIT_POLICY=active spins, OMP_WAIT_POLICY=passive alone sleeps at once.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "passive"
    if launched_size() == 1:
        os.environ.setdefault("GOMP_SPINCOUNT", "3000")   # GNU OpenMP: spins of the CPU's pause before sleeping


def _load():
    try:
        from .. import _core
    except ImportError as e:
        return None, (f"the compiled extension minidiff._core is not available ({e}); {_FIX} and run from "
                      f"outside the source tree (its minidiff/ has no compiled module)")
    found = getattr(_core, "ABI_VERSION", None)
    if found != ABI_VERSION:
        return None, (f"the compiled extension minidiff._core is stale (ABI_VERSION {found}, this minidiff "
                      f"expects {ABI_VERSION}); rebuild it with `pip install .`")
    return _core, ""


core, _reason = _load()
if core is not None and os.environ.get("MINIDIFF_CPU_ISA"):   # e.g. avx2: the network kernels of another instruction set
    try:
        core.set_cpu_isa(os.environ["MINIDIFF_CPU_ISA"])
    except ValueError as e:
        raise ImportError(f"MINIDIFF_CPU_ISA={os.environ['MINIDIFF_CPU_ISA']!r}: {e} (available: "
                          f"{', '.join(core.cpu_isas())}, or auto)") from None


def native_status():
    """dict(cpu_kernel, cuda_kernel, reason): what the extension provides; reason says what is missing and why."""
    if core is None:
        return dict(cpu_kernel=False, cuda_kernel=False, reason=_reason)
    if not core.has_cuda():
        return dict(cpu_kernel=True, cuda_kernel=False,
                    reason="minidiff._core was built without CUDA (no nvcc at build time, or MINIDIFF_CUDA=OFF); "
                           "to add it, install the CUDA toolkit and rebuild with `pip install .`")
    return dict(cpu_kernel=True, cuda_kernel=True, reason="")
