"""A whole network: its layers' parameters in ONE flat buffer and its gradients in another.
Step 5 of the reading order (the U-Net, unet.py, and the judge's classifier are Models).

Each layer's ``params[key]`` and ``grads[key]`` are views of the model's two buffers, so what is done to every
parameter at once (zeroing the gradients, the gradient norm and clipping, Adam, the EMA: optim.py) is one operation
over one buffer instead of one per tensor (a C = 32 U-Net has 268 of them). ``model.params`` is the dict
name -> view that checkpoints and readers use: ``model.params["down.0.res.0.conv1.weight"]`` is a view.
"""
import math

import numpy as np

from .layers import Layer
from .utils.backend import array_module

ALIGN = 64              # every parameter starts at a multiple of 64 elements (256 bytes in float32) of its buffer


class FlatDict(dict):
    """name -> array, every array a view into one 1-D buffer ``flat`` at the place ``layout`` gives it
    (name -> (offset, shape)). The gaps between the arrays (alignment) are zero."""

    def __init__(self, flat, layout):
        views = {slot: flat[slot[0]:slot[0] + math.prod(slot[1])].reshape(slot[1]) for slot in set(layout.values())}
        super().__init__({name: views[slot] for name, slot in layout.items()})   # a shared slot: one view
        self.flat, self.layout = flat, layout

    def like(self, flat):
        """The same layout over another buffer (Adam's moments, the EMA copy)."""
        return FlatDict(flat, self.layout)


class Model(Layer):
    """Subclasses build their layers with ``add`` and call ``self._collect()`` at the end of __init__;
    ``self.dtype`` is the parameters' dtype."""

    def _collect(self):
        """Lay every parameter out in one flat buffer (and every gradient in another) and make the layers' arrays
        views of them; ``params`` and ``grads`` are the FlatDicts name -> view that the optimizer and checkpoints
        walk. A parameter shared by two layers is one slot, so both layers add their gradients into it."""
        named, slots, size = list(self.named_params()), {}, 0
        for _, layer, key in named:
            a = layer.params[key]
            if id(a) not in slots:
                slots[id(a)] = (size, tuple(a.shape), a)
                size += -(-a.size // ALIGN) * ALIGN
        layout = {name: slots[id(layer.params[key])][:2] for name, layer, key in named}
        first = named[0][1].params[named[0][2]]
        flat = array_module(first).zeros(size, dtype=first.dtype)
        for offset, shape, a in slots.values():
            flat[offset:offset + a.size] = a.reshape(-1)
        self._set_flat(flat, array_module(flat).zeros_like(flat), layout)

    def _set_flat(self, flat_params, flat_grads, layout=None):
        """Make every layer's parameter and gradient a view of these buffers (same layout as now, or ``layout``)."""
        layout = layout or self.params.layout
        self.params, self.grads = FlatDict(flat_params, layout), FlatDict(flat_grads, layout)
        for name, layer, key in self.named_params():
            layer.params[key], layer.grads[key] = self.params[name], self.grads[name]

    def to(self, xp, dtype=None):
        """Move the parameters to numpy or cupy, optionally casting (the gradients start at zero); returns self."""
        dtype = np.dtype(dtype or self.dtype)
        flat = xp.asarray(self.params.flat, dtype=dtype)
        self._set_flat(flat, xp.zeros_like(flat))
        self.dtype = dtype
        return self

    def zero_grad(self):
        """The one place gradients are zeroed: one fill of the gradient buffer (the layers keep their views)."""
        self.grads.flat[...] = 0

    def num_parameters(self):
        return int(sum(math.prod(shape) for _, shape in set(self.params.layout.values())))

    def train(self, mode=True):
        """Training mode: dropout on, every layer caches for backward. Evaluation: dropout off, no caches
        (less memory: large sampling batches fit), backward unavailable."""
        for _, layer in self.named_layers():
            layer.training = bool(mode)
        return self
