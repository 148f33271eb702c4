"""Optimizer and training helpers: Adam/AdamW, EMA of weights, gradient clipping, learning-rate warm-up.

All of them work in place on dicts name -> array (the model's ``params`` and ``grads``), NumPy or CuPy.
Their state is a flat dict of arrays and ints (``state_dict`` / ``load_state_dict``), so a checkpoint can
store it with ``np.savez`` (no pickle).
"""
import math

import numpy as np

from .backend import array_module


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
        self.m = {k: array_module(p).zeros_like(p) for k, p in params.items()}   # first moments
        self.v = {k: array_module(p).zeros_like(p) for k, p in params.items()}   # second moments

    def step(self, lr=None):
        lr = self.lr if lr is None else float(lr)
        self.step_count += 1
        n, b1, b2 = self.step_count, self.beta1, self.beta2
        # bias corrections folded into the step size and eps (Python floats: no float64 leaks)
        bc1, bc2 = 1.0 - b1 ** n, 1.0 - b2 ** n
        step_size = lr / bc1
        eps_hat = self.eps * math.sqrt(bc2)                    # so that sqrt(v)/sqrt(bc2) + eps matches
        for k, p in self.params.items():
            xp = array_module(p)
            g, m, v = self.grads[k], self.m[k], self.v[k]
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * (g * g)
            if self.weight_decay:
                p *= 1.0 - lr * self.weight_decay
            denom = xp.sqrt(v)
            denom += eps_hat
            # m_hat / (sqrt(v_hat) + eps) = (m / bc1) / ((sqrt(v) + eps sqrt(bc2)) / sqrt(bc2))
            p -= (step_size * math.sqrt(bc2)) * (m / denom)

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


class EMA:
    """Exponential moving average of the weights, with the usual warm-up of the decay:
        decay_n = min(max_decay, (1 + n) / (10 + n)),   ema <- decay_n ema + (1 - decay_n) p,
    n = number of updates made before this one (decay 0.1 at the first update, 0.5 at the ninth...), so
    early in training the EMA weights follow the model instead of its random initialisation."""

    def __init__(self, params, max_decay=0.9999):
        self.max_decay = float(max_decay)
        self.num_updates = 0
        self.params = {k: p.copy() for k, p in params.items()}

    def decay(self):
        n = self.num_updates
        return min(self.max_decay, (1.0 + n) / (10.0 + n))

    def update(self, params):
        d = self.decay()
        for k, e in self.params.items():
            e *= d
            e += (1.0 - d) * params[k]
        self.num_updates += 1

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
    clipping (a Python float)."""
    gs = list(grads.values())
    xp = array_module(gs[0])
    total = float(xp.sqrt(sum(xp.vdot(g.ravel(), g.ravel()) for g in gs)))
    if total > max_norm:
        scale = max_norm / (total + 1e-6)
        for g in gs:
            g *= scale
    return total


def warmup_lr(step, base_lr, warmup_steps):
    """Linear learning-rate warm-up: base_lr * min(1, (step + 1) / warmup_steps), step counted from 0
    (so the first step already moves); base_lr when warmup_steps <= 0."""
    if warmup_steps <= 0:
        return float(base_lr)
    return float(base_lr) * min(1.0, (step + 1) / warmup_steps)
