"""CUDA graphs: a function of a few device arrays captured once and replayed, for the training step and the
sampling step alike.

A small network's step on a GPU is thousands of kernel launches from Python; replaying a captured graph is one.
``CudaGraph(fn)`` runs ``fn(*buffers)`` on its own non-blocking stream and memory pool. The first call copies its
arguments into buffers of its own, runs fn once for real (CuPy's memory pool and kernel caches then hold everything
the step needs), then records the same work as a graph; every later call copies the new arguments into the same
buffers (device to device, on the graph's stream) and replays the graph. fn must not synchronise with the host and
must leave its results in arrays that outlive the call (the model's parameters, x updated in place...).
"""
import contextlib


class CudaGraph:
    def __init__(self, fn):
        import cupy
        self.fn, self.graph, self.buffers = fn, None, None
        self.stream, self.pool = cupy.cuda.Stream(non_blocking=True), cupy.cuda.MemoryPool()

    def __call__(self, *args):
        import cupy
        with self.stream:
            if self.buffers is None:
                # The stream does not wait for the default stream: whatever was queued there (uploads of the data,
                # the parameters, zeroed buffers) must be finished before the step reads it.
                cupy.cuda.Device().synchronize()
                self.buffers = [None if a is None else cupy.array(a) for a in args]
            else:
                for buf, a in zip(self.buffers, args):
                    if buf is not None:
                        buf[...] = a
            if self.graph is not None:
                return self.graph.launch(self.stream)
            with cupy.cuda.using_allocator(self.pool.malloc):
                self.fn(*self.buffers)           # the real first step; fills the pool and the kernel caches
                self.stream.synchronize()
                self.stream.begin_capture()
                try:
                    self.fn(*self.buffers)       # recorded, not run
                finally:
                    self.graph = self.stream.end_capture()

    def stream_context(self):
        """The graph's stream as a context: work around the step (reading its results, say) in order with it."""
        return self.stream

    def synchronize(self):
        self.stream.synchronize()


def stream_context(run):
    """run's stream if it is a CudaGraph, else a no-op context."""
    return run.stream if isinstance(run, CudaGraph) else contextlib.nullcontext()
