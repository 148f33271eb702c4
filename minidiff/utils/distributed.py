"""Data-parallel training over MPI (mpi4py), with NCCL on GPUs: one model trained by N processes.

    mpiexec -n 4 python examples/train.py ...        # pip install ".[mpi]": mpi4py and an MPI from PyPI

Every process (rank) holds the whole model and optimizer. At each step the global batch of B examples (the same
indices, timesteps and noise on every rank: they are keyed by the seed, the step and the example's place in the
global batch) is split into N shares; each rank runs the network on its share, then ONE allreduce of the flat
gradient buffer (model.py) sums the shares' gradients, each weighted by its share of the batch, so every rank holds
the gradient of the global batch's mean loss. Adam and the EMA then make the same update everywhere. So N
processes train the run one process would train with the same B, up to the order of floating-point sums, and a
checkpoint (written by rank 0 alone) resumes at any N.

``group()`` is a ``Single`` process unless the program was started by mpiexec (the launcher's environment says
how many processes there are). On GPUs each rank uses GPU local_rank mod device count, and the gradients are summed
by NCCL (CuPy's cupy.cuda.nccl, the unique id broadcast over MPI) on the training step's stream.
"""
import contextlib
import os
import sys
import time
import traceback

import numpy as np

from .backend import array_module

# What MPI launchers put in each process's environment: the number of processes (MPICH/Hydra, Open MPI, Slurm).
SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_NTASKS")


def launched_size():
    """How many processes the launcher started (1 when not started by mpiexec)."""
    for name in SIZE_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


class Single:
    """One process: every collective is the identity."""
    rank, size, local_rank, main = 0, 1, 0, True

    def share(self, n):
        """This rank's rows [start, stop) of a global batch of n."""
        return 0, n

    def average(self, flat, weight):
        """Sum ``weight * flat`` over the ranks, in place (weight: this rank's share of the batch)."""

    def share_rng(self, rng, n):
        """The generator this rank's part of a step draws from (dropout masks, one row per example): rng itself
        here; under MPI each draw is made for the whole global batch of n and this rank keeps its rows, so the masks
        do not depend on the number of processes."""
        return rng

    def sum_host(self, values):
        return values

    def any(self, flag):
        """The largest of the ranks' flags (0: none raised)."""
        return flag

    def barrier(self):
        pass

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (a download, a folder's first decode), then the others (from its cache)."""
        yield

    def gather(self, value):
        """[every rank's value] on rank 0 (None elsewhere)."""
        return [value]

    def use_gpu(self):
        """On GPUs: use device local_rank mod device count; set up NCCL."""

    def fail(self, message, code=1, together=False):
        """Stop with an error: every rank (a process that just left would leave the others waiting forever).
        together: every rank found this same error in the same reduced values (a NaN loss), so rank 0 alone
        reports it and all leave after it is printed; otherwise the first rank to fail stops the others."""
        sys.exit(message)


class MPIGroup(Single):
    def __init__(self):
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise RuntimeError(f"started by mpiexec with {launched_size()} processes, but mpi4py is not importable "
                               f"({e}); install it with pip install \".[mpi]\"") from None
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.local_rank = self.comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        self.main, self.nccl = self.rank == 0, None
        previous = sys.excepthook

        def excepthook(*exc):                   # an exception on any rank ends every rank: no hang
            if getattr(exc[1], "every_rank", False):            # raised on all ranks together: report it once
                if self.main:
                    previous(*exc)
                self.comm.Barrier()
                return
            traceback.print_exception(*exc)
            self.abort(1)
            previous(*exc)
        sys.excepthook = excepthook

    def share(self, n):
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def average(self, flat, weight):
        flat *= flat.dtype.type(weight)
        if array_module(flat) is np:
            self.comm.Allreduce(self.MPI.IN_PLACE, flat, op=self.MPI.SUM)
            return
        import cupy
        from cupy.cuda import nccl
        self.nccl.allReduce(flat.data.ptr, flat.data.ptr, flat.size, nccl.NCCL_FLOAT32, nccl.NCCL_SUM,
                            cupy.cuda.get_current_stream().ptr)

    def share_rng(self, rng, n):
        return None if rng is None else _Rows(rng, *self.share(n), n)

    def sum_host(self, values):
        return self.comm.allreduce(values, op=self.MPI.SUM)

    def any(self, flag):
        return self.comm.allreduce(flag, op=self.MPI.MAX)

    def barrier(self):
        self.comm.Barrier()

    @contextlib.contextmanager
    def main_first(self):
        if not self.main:
            self.comm.Barrier()
        yield
        if self.main:
            self.comm.Barrier()

    def gather(self, value):
        return self.comm.gather(value, root=0)

    def use_gpu(self):
        if self.nccl is not None:
            return
        import cupy
        from cupy.cuda import nccl
        cupy.cuda.Device(self.local_rank % cupy.cuda.runtime.getDeviceCount()).use()
        uid = self.comm.bcast(nccl.get_unique_id() if self.main else None, root=0)
        self.nccl = nccl.NcclCommunicator(self.size, uid, self.rank)

    def fail(self, message, code=1, together=False):
        if together:                            # printed before anyone leaves: the launcher cannot cut it off
            if self.main:
                print(message, file=sys.stderr, flush=True)
            self.comm.Barrier()
            sys.exit(code)
        print(message, file=sys.stderr, flush=True)
        self.abort(code)

    def abort(self, code):
        """End every rank now, after a pause: the launcher forwards each rank's output through a pipe, and output
        still in it when the Abort arrives is lost (a traceback cut after its first line)."""
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(0.5)
        self.comm.Abort(code)


class _Rows:
    """rows [lo, hi) of every draw ``random(shape)`` made for n examples (shape[0] is this rank's hi - lo)."""

    def __init__(self, rng, lo, hi, n):
        self.rng, self.lo, self.hi, self.n = rng, lo, hi, n

    def random(self, shape, dtype=np.float64):
        if shape[0] != self.hi - self.lo:
            raise ValueError(f"a draw of {shape[0]} rows from this process's share of {self.hi - self.lo}")
        return self.rng.random((self.n,) + tuple(shape[1:]), dtype=dtype)[self.lo:self.hi]


def group():
    """The processes of this program: an MPIGroup when mpiexec started more than one, else a Single."""
    return MPIGroup() if launched_size() > 1 else Single()
