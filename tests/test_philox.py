"""Philox4x32-10 and its normals: known answers, statistics, reproducibility, NumPy reference == native."""
import numpy as np
import pytest

from minidiff.utils import native as _native
from minidiff.utils.philox import philox4x32_10, philox_normal, uint32_to_uniform

# Random123 tests/kat_vectors, the three "philox4x32 10" lines: counter[4], key[2] -> output[4].
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
N = 1 << 20  # draws for the statistical tests: standard error of a mean or correlation is 1/sqrt(N) ~ 0.001
SE = 1.0 / np.sqrt(N)

needs_native = pytest.mark.skipif(not _native.native_status()["cpu_kernel"],
                                  reason=f"native extension unavailable: {_native.native_status()['reason']}")


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_numpy_philox_known_answers(counter, key, expected):
    out = philox4x32_10([np.array([c], dtype=np.uint32) for c in counter], key)
    assert [int(w[0]) for w in out] == list(expected)


@needs_native
@pytest.mark.parametrize("counter, key, expected", KAT)
def test_native_philox_known_answers(counter, key, expected):
    assert list(_native.core.philox4x32_10(list(counter), list(key))) == list(expected)


def test_uniform_is_in_half_open_unit_interval():
    x = np.array([0, 255, 256, 0xFFFFFF00, 0xFFFFFFFF], dtype=np.uint32)
    u = uint32_to_uniform(x)
    assert u.dtype == np.float32
    np.testing.assert_array_equal(u, np.array([2.0 ** -24, 2.0 ** -24, 2.0 ** -23, 1.0, 1.0], dtype=np.float32))
    assert np.all(np.isfinite(np.log(u)))  # never log(0)


def test_normal_moments():
    z = philox_normal(seed=1234, step=7, n=N).astype(np.float64)
    assert z.dtype == np.float64 and np.all(np.isfinite(z))
    # 5 standard errors: mean SE = 1/sqrt(N), variance SE = sqrt(2/N), P(|z|<1) SE = sqrt(p(1-p)/N).
    assert abs(z.mean()) < 5 * SE
    assert abs(z.var() - 1.0) < 5 * np.sqrt(2.0 / N)
    p = 0.6826894921370859
    assert abs(np.mean(np.abs(z) < 1.0) - p) < 5 * np.sqrt(p * (1 - p) / N)
    assert abs(np.mean(z ** 4) - 3.0) < 5 * np.sqrt(96.0 / N)  # kurtosis of N(0, 1): E z^4 = 3, Var z^4 = 96


@pytest.mark.parametrize("lag", [1, 2, 3, 4, 5])
def test_no_correlation_between_neighbours(lag):
    # lag 1 pairs the cos and sin of one Box-Muller draw (uncorrelated) and neighbouring blocks.
    z = philox_normal(seed=99, step=3, n=N).astype(np.float64)
    assert abs(np.corrcoef(z[:-lag], z[lag:])[0, 1]) < 5 * SE


def test_no_correlation_between_steps_and_seeds():
    a = philox_normal(5, 10, N).astype(np.float64)
    for other in (philox_normal(5, 11, N), philox_normal(6, 10, N), philox_normal(5 + 2 ** 32, 10, N),
                  philox_normal(5, 10 + 2 ** 32, N)):
        assert abs(np.corrcoef(a, other)[0, 1]) < 5 * SE


def test_same_seed_same_bits_different_seed_or_step_different_noise():
    a = philox_normal(42, 100, 1000)
    np.testing.assert_array_equal(a, philox_normal(42, 100, 1000))
    for seed, step in [(43, 100), (42, 101), (42 + 2 ** 32, 100), (42, 100 + 2 ** 32)]:
        assert np.mean(a == philox_normal(seed, step, 1000)) < 0.01


def test_prefix_property_and_odd_sizes():
    # element i depends on (seed, step, i) only, so shorter draws are prefixes of longer ones.
    full = philox_normal(1, 2, 1003)
    for n in (0, 1, 3, 4, 5, 1002):
        np.testing.assert_array_equal(philox_normal(1, 2, n), full[:n])


@pytest.mark.parametrize("bad", [-1, 2 ** 64, 1.5, None, True])
def test_bad_seed_step_n(bad):
    with pytest.raises(ValueError):
        philox_normal(bad, 0, 4)
    with pytest.raises(ValueError):
        philox_normal(0, bad, 4)
    if bad is not None and bad != 2 ** 64:
        with pytest.raises(ValueError):
            philox_normal(0, 0, bad)


@needs_native
@pytest.mark.parametrize("seed, step, n", [(0, 0, 1), (1, 2, 7), (2 ** 64 - 1, 2 ** 64 - 1, 4096), (123, 999, 300_001),
                                           (2 ** 32 + 1, 77, 1 << 21)])
def test_native_normal_equals_numpy_reference(seed, step, n):
    """core.normal_cpu is the generator of the fused step's noise (csrc/step_math.h), and of philox_normal on CuPy."""
    ref = philox_normal(seed, step, n)
    got = _native.core.normal_cpu(seed, step, n)
    assert got.dtype == np.float32 and got.shape == (n,)
    # Same bits in, same formula; the reference rounds the float64 result once, the kernel computes in
    # float32 with ~1 ulp log/sin/cos: measured within 2.2 ulps of r, and r < 6 so one ulp is <= 4.8e-7.
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


@needs_native
def test_native_normal_same_for_any_thread_count():
    normal, n = _native.core.normal_cpu, 200_003
    np.testing.assert_array_equal(normal(7, 8, n, threads=1), normal(7, 8, n, threads=0))
    np.testing.assert_array_equal(normal(7, 8, n, threads=1), normal(7, 8, n, threads=3))
