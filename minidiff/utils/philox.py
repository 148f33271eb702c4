"""Philox4x32-10 counter-based random numbers and standard normals: the readable NumPy/CuPy reference.
Stage 6 of the pipeline, inside step.py: the noise of every step (and of training, train.training_noise).

Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2, 3" (SC 2011); constants
and round structure as in Random123's philox.h, checked against its known-answer vectors
(tests/test_philox.py). The native kernels compute the same numbers (csrc/step_math.h), so the NumPy
sampler and the C++/CUDA sampler draw the same noise, and give the same images, for the same seed.

The noise of a sampling step is a pure function of (seed, step, element index):
    key     = (seed lo32, seed hi32)                           seed: 0 <= seed < 2**64
    counter = (block lo32, block hi32, step lo32, step hi32)   step: 0 <= step < 2**64
    element i uses block i // 4, output word i % 4
    u       = ((word >> 8) + 1) / 2**24                        uniform in (0, 1], exact in float32, never 0
    words (0, 1) and (2, 3) -> Box-Muller:
        r = sqrt(-2 log u_even), theta = 2 pi u_odd, z_even = r cos(theta), z_odd = r sin(theta)
    Here in float64, rounded to float32 once; the kernels compute the same formula in float32 with their
    own ~1 ulp log/sin/cos, within 1e-6 of this (|z| < 6, ~2 ulps of r).
No state, no sequential dependence: any split of the elements over threads gives the same bits.
"""
import numpy as np

from .. import fast

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57   # round multipliers
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85   # Weyl key increments (golden ratio, sqrt(3) - 1)
MASK32 = 0xFFFFFFFF


def check_u64(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= int(value) < 2 ** 64:
        raise ValueError(f"{name} must be an integer in [0, 2**64), got {value!r}")
    return int(value)


def philox4x32_10(counter, key, xp=np):
    """Philox4x32-10 of counters (4 uint32 arrays, or ints) under key (2 ints): the 4 output uint32 arrays."""
    c0, c1, c2, c3 = (xp.asarray(c, dtype=xp.uint32) for c in counter)
    k0, k1 = int(key[0]) & MASK32, int(key[1]) & MASK32
    for r in range(10):
        if r > 0:  # bump the key between rounds
            k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
        p0 = c0.astype(xp.uint64) * xp.uint64(PHILOX_M0)  # 32 x 32 -> 64-bit products
        p1 = c2.astype(xp.uint64) * xp.uint64(PHILOX_M1)
        hi0, lo0 = (p0 >> xp.uint64(32)).astype(xp.uint32), p0.astype(xp.uint32)
        hi1, lo1 = (p1 >> xp.uint64(32)).astype(xp.uint32), p1.astype(xp.uint32)
        c0, c1, c2, c3 = hi1 ^ c1 ^ xp.uint32(k0), lo1, hi0 ^ c3 ^ xp.uint32(k1), lo0
    return c0, c1, c2, c3


def uint32_to_uniform(x, xp=np):
    """uint32 -> float32 uniform in (0, 1]: (top 24 bits + 1) / 2**24 (exact; never 0, so log is finite)."""
    return ((x >> xp.uint32(8)) + xp.uint32(1)).astype(xp.float32) * xp.float32(2.0 ** -24)


def box_muller(u_r, u_theta, xp=np):
    """Two float32 uniforms in (0, 1] -> two independent float32 standard normals (r cos, r sin).

    Computed in float64 and rounded once, so this is the exact mapping to float32 precision; the native
    kernels compute it in float32 (csrc/step_math.h) and stay within ~2 ulps of r (tests/test_philox.py).
    """
    r = xp.sqrt(-2.0 * xp.log(u_r.astype(xp.float64)))
    theta = 2.0 * np.pi * u_theta.astype(xp.float64)
    return (r * xp.cos(theta)).astype(xp.float32), (r * xp.sin(theta)).astype(xp.float32)


@fast.reference(by_xp=True)
def philox_normal(seed, step, n, xp=np):
    """n float32 standard normals for (seed, step): element i from block i // 4, word i % 4 (module docstring)."""
    seed, step = check_u64(seed, "seed"), check_u64(step, "step")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    nblocks = (int(n) + 3) // 4
    block = xp.arange(nblocks, dtype=xp.uint64)
    counter = ((block & xp.uint64(MASK32)).astype(xp.uint32), (block >> xp.uint64(32)).astype(xp.uint32),
               xp.full(nblocks, step & MASK32, dtype=xp.uint32), xp.full(nblocks, step >> 32, dtype=xp.uint32))
    w0, w1, w2, w3 = philox4x32_10(counter, (seed & MASK32, seed >> 32), xp=xp)
    z0, z1 = box_muller(uint32_to_uniform(w0, xp), uint32_to_uniform(w1, xp), xp)
    z2, z3 = box_muller(uint32_to_uniform(w2, xp), uint32_to_uniform(w3, xp), xp)
    return xp.stack([z0, z1, z2, z3], axis=1).reshape(-1)[:n]  # (nblocks, 4) -> element order 4*block + word
