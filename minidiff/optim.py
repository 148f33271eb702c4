"""Optimizer and training helpers: Adam/AdamW, EMA of weights, gradient clipping, learning-rate warm-up.
Step 7 of the reading order: how the gradients move the weights (train_step.py applies them).

All of them work in place on dicts name -> array (the model's ``params`` and ``grads``), NumPy or CuPy, and
never read a value back to the host: the per-step scalars (learning rate, bias corrections, EMA decay) are computed
on the host from counters and passed in, the gradient norm stays an array. So a whole training step can run on a
GPU without a synchronisation, and be captured as a CUDA graph (train_step.TrainStep). Over a model's flat buffers
(model.py) each update is ONE elementwise chain (adam_update, ema_update), fused into one kernel on CuPy.
Their state is a flat dict of arrays and ints (``state_dict`` / ``load_state_dict``), so a checkpoint can
store it with ``np.savez`` (no pickle).
"""
import math

import numpy as np

from . import fast
from .model import FlatDict
from .utils.backend import array_module


def _like(params, copy=False):
    """Zeros (or a copy) of every array of ``params``: one flat buffer of the same layout for a model's FlatDict."""
    if isinstance(params, FlatDict):
        flat = params.flat
        return params.like(flat.copy() if copy else array_module(flat).zeros_like(flat))
    return {k: (p.copy() if copy else array_module(p).zeros_like(p)) for k, p in params.items()}


def _tensors(*dicts):
    """What an update runs on: the flat buffers, once, when every dict is a FlatDict of one layout; else each tensor
    (the same arithmetic, one tensor at a time)."""
    if all(isinstance(d, FlatDict) and d.layout == dicts[0].layout for d in dicts):
        return [tuple(d.flat for d in dicts)]
    return [tuple(d[k] for d in dicts) for k in dicts[0]]


def _scalar(value, dtype):
    """A scalar of a fused update in the parameters' dtype (a Python float would make the kernel compute in
    float64 on a GPU); 0-d arrays, already on the device in that dtype, pass through."""
    return value if hasattr(value, "shape") else dtype.type(value)


def _check_state(kind, state, expected, prefixes):
    """Raise a clear ValueError when a state dict does not fit the parameters it is loaded into. Keys outside
    this object's namespaces (`prefixes`) are ignored, so one checkpoint dict can hold several states."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in set(state) - set(expected) if k.startswith(prefixes))
    if missing or unexpected:
        raise ValueError(f"{kind} state does not match the parameters: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    for k, shape in expected.items():
        if shape is not None and tuple(np.shape(state[k])) != shape:
            raise ValueError(f"{kind} state {k!r} has shape {tuple(np.shape(state[k]))}, expected {shape}")


@fast.reference(fuse=True)
def adam_update(p, g, m, v, lr, beta1, beta2, eps, bias_correction1, bias_correction2, weight_decay):
    """One Adam(W) update of one tensor, in place (Kingma & Ba, Algorithm 1; decoupled weight decay):
        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2;   m_hat = m / (1 - b1^n);   v_hat = v / (1 - b2^n)
        p <- p - lr (m_hat / (sqrt(v_hat) + eps) + wd p)
    with the bias corrections 1 - b1^n, 1 - b2^n computed on the host from the step count n (Adam.hyper)."""
    m *= beta1
    m += (1.0 - beta1) * g
    v *= beta2
    v += (1.0 - beta2) * (g * g)
    m_hat = m / bias_correction1
    v_hat = v / bias_correction2
    p -= lr * (m_hat / (array_module(v).sqrt(v_hat) + eps) + weight_decay * p)


class Adam:
    """Adam (Kingma & Ba 2015, Algorithm 1) with decoupled weight decay (AdamW, Loshchilov & Hutter 2019):
        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
        p <- p - lr * wd * p - lr * (m / (1 - b1^n)) / (sqrt(v / (1 - b2^n)) + eps)
    n counts steps from 1. The update is in place, so the model's arrays stay the same objects."""

    def __init__(self, params, grads, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        if set(params) != set(grads):
            raise ValueError("params and grads must have the same names")
        self.params, self.grads = params, grads
        self.lr, self.beta1, self.beta2 = float(lr), float(betas[0]), float(betas[1])
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.step_count = 0
        self.m, self.v = _like(params), _like(params)       # first and second moments, laid out like params

    def hyper(self, lr=None):
        """Count a step and return its scalars (lr, 1 - b1^n, 1 - b2^n) as python floats."""
        self.step_count += 1
        n = self.step_count
        return (self.lr if lr is None else float(lr)), 1.0 - self.beta1 ** n, 1.0 - self.beta2 ** n

    def apply(self, lr, bias_correction1, bias_correction2):
        """The update with given scalars (python floats, or 0-d arrays on the device: a captured step reads them
        from device memory): one fused operation over a model's flat buffers."""
        for p, g, m, v in _tensors(self.params, self.grads, self.m, self.v):
            s = [_scalar(a, p.dtype) for a in (lr, self.beta1, self.beta2, self.eps, bias_correction1,
                                               bias_correction2, self.weight_decay)]
            adam_update(p, g, m, v, *s)

    def step(self, lr=None):
        self.apply(*self.hyper(lr))

    def state_dict(self):
        d = {"step_count": self.step_count}
        d.update({f"m.{k}": a for k, a in self.m.items()})
        d.update({f"v.{k}": a for k, a in self.v.items()})
        return d

    def load_state_dict(self, d):
        expected = {"step_count": ()}
        for k, p in self.params.items():
            expected[f"m.{k}"] = expected[f"v.{k}"] = tuple(p.shape)
        _check_state("Adam", d, expected, ("m.", "v.", "step_count"))
        self.step_count = int(d["step_count"])
        for k, p in self.params.items():
            xp = array_module(p)
            self.m[k][...] = xp.asarray(d[f"m.{k}"], dtype=p.dtype)
            self.v[k][...] = xp.asarray(d[f"v.{k}"], dtype=p.dtype)


@fast.reference(fuse=True)
def ema_update(e, p, decay):
    """ema <- decay ema + (1 - decay) p, in place."""
    e *= decay
    e += (1.0 - decay) * p


class EMA:
    """Exponential moving average of the weights, with the usual warm-up of the decay:
        decay_n = min(max_decay, (1 + n) / (10 + n)),   ema <- decay_n ema + (1 - decay_n) p,
    n = number of updates made before this one (decay 0.1 at the first update, 0.5 at the ninth...), so
    early in training the EMA weights follow the model instead of its random initialisation."""

    def __init__(self, params, max_decay=0.9999):
        self.max_decay = float(max_decay)
        self.num_updates = 0
        self.params = _like(params, copy=True)

    def decay(self):
        n = self.num_updates
        return min(self.max_decay, (1.0 + n) / (10.0 + n))

    def next_decay(self):
        """Count an update and return its decay (what update() uses)."""
        d = self.decay()
        self.num_updates += 1
        return d

    def apply(self, params, decay):
        """The update with a given decay (a python float, or a 0-d array on the device): one fused operation over a
        model's flat buffers."""
        for e, p in _tensors(self.params, params):
            ema_update(e, p, _scalar(decay, e.dtype))

    def update(self, params):
        self.apply(params, self.next_decay())

    def state_dict(self):
        d = {"num_updates": self.num_updates}
        d.update({f"params.{k}": a for k, a in self.params.items()})
        return d

    def load_state_dict(self, d):
        expected = {"num_updates": ()}
        expected.update({f"params.{k}": tuple(p.shape) for k, p in self.params.items()})
        _check_state("EMA", d, expected, ("params.", "num_updates"))
        self.num_updates = int(d["num_updates"])
        for k, e in self.params.items():
            e[...] = array_module(e).asarray(d[f"params.{k}"], dtype=e.dtype)


def clip_grad_norm(grads, max_norm):
    """Scale all gradients in place so their global L2 norm is at most max_norm; returns the norm before
    clipping as a 0-d array on the gradients' device (not read back: no host synchronisation). The scale is
    min(1, max_norm / (norm + 1e-6)): exactly 1 below the limit. A model's gradients: one flat buffer."""
    gs = [g for g, in _tensors(grads)]
    xp = array_module(gs[0])
    total = xp.sqrt(sum((g * g).sum() for g in gs))
    scale = xp.minimum(1.0, max_norm / (total + 1e-6)).astype(gs[0].dtype)
    for g in gs:
        g *= scale
    return total


LR_SCHEDULES = ("constant", "cosine")


def learning_rate(step, base_lr, warmup_steps, total_steps, schedule="constant"):
    """The learning rate of step ``step`` (from 0): linear warm-up (warmup_lr), then base_lr ("constant") or a
    cosine decay from base_lr at the end of the warm-up to 0 at total_steps ("cosine": SGDR's annealing, Loshchilov &
    Hutter 2017, without restarts): base_lr (1 + cos(pi s)) / 2, s = (step - warmup) / (total - warmup)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {LR_SCHEDULES}")
    if step < warmup_steps or schedule == "constant":
        return warmup_lr(step, base_lr, warmup_steps)
    s = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return float(base_lr) * 0.5 * (1.0 + math.cos(math.pi * s))


def warmup_lr(step, base_lr, warmup_steps):
    """Linear learning-rate warm-up: base_lr * min(1, (step + 1) / warmup_steps), step counted from 0
    (so the first step already moves); base_lr when warmup_steps <= 0."""
    if warmup_steps <= 0:
        return float(base_lr)
    return float(base_lr) * min(1.0, (step + 1) / warmup_steps)
