"""The noise stream (ALGORITHMS.md §1): known answers, C++ vs reference, thread
independence, and its distribution."""
import math

import pytest
import torch

from fused_flat import noise
from tests.conftest import cpu_backends

HAS_CPP = "cpp" in cpu_backends()
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")

# Random123 known answers for Philox4x32-10: (counter, key) -> words.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _as_args(counter, key):
    seed = (key[1] << 32) | key[0]          # bucket_id 0: key = (seed_lo, seed_hi)
    j = (counter[1] << 32) | counter[0]
    return seed, counter[2], counter[3], j


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_reference_philox_known_answers(counter, key, expected):
    seed, step, tag, j = _as_args(counter, key)
    w = noise.philox_words(seed, 0, step, tag, j, 1)
    assert [int(x) for x in w[0]] == list(expected)


@needs_cpp
@pytest.mark.parametrize("counter,key,expected", KAT)
def test_cpp_philox_known_answers(counter, key, expected):
    from fused_flat import ops
    seed, step, tag, j = _as_args(counter, key)
    w = ops.philox_words(seed, 0, step, tag, j - 2 ** 64 if j >= 2 ** 63 else j, 1)
    assert [int(x) for x in w[0]] == list(expected)


@needs_cpp
@pytest.mark.parametrize("seed,bucket,step,tag", [(0, 0, 0, 0), (2 ** 63 - 1, 7, 123456, 3),
                                                  (0xDEADBEEF12345, 2 ** 31 + 5, 2 ** 32 + 9, 16)])
def test_cpp_words_bitwise_equal_reference(seed, bucket, step, tag):
    from fused_flat import ops
    first = 2 ** 31 - 100  # crosses the j_lo -> j_hi boundary region of the counter
    for f in (0, first, 2 ** 32 - 3):
        a = ops.philox_words(seed, bucket, step, tag, f, 257)
        b = noise.philox_words(seed, bucket, step, tag, f, 257)
        assert torch.equal(a, b)


@needs_cpp
@pytest.mark.parametrize("offset,n", [(0, 1), (1, 2), (3, 4097), (0, 100_003)])
def test_cpp_normals_match_reference(offset, n):
    from fused_flat import ops
    e, x = ops.gaussian_noise(42, 3, 5, 0, offset, n)
    er, xr = noise.gaussian_noise(42, 3, 5, 0, offset, n)
    assert (e - er).abs().max().item() <= 1e-5
    assert (x - xr).abs().max().item() <= 1e-5


@needs_cpp
def test_cpp_noise_independent_of_thread_count():
    from fused_flat import ops
    n = (1 << 20) + 7
    p0 = torch.randn(n)
    g = torch.randn(n)
    m0 = torch.randn(n)
    outs = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            p, m = p0.clone(), m0.clone()
            ops.perturb_(p, 9, 1, 4, 0, 0.01, 0)
            ops.restore_and_step_(p, g, m, None, None, 9, 1, 4, 0, 0, 0.01, 0.1, 1e-4, 0.9, 0.0,
                                  False, False, 1e-3, 1.0)
            e, x = ops.gaussian_noise(9, 1, 4, 0, 1, n)
            outs.append((p, m, e, x))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def _noise_samples(n=200_000):
    return noise.gaussian_noise(1234, 0, 0, 0, 0, n)


def test_noise_distribution_moments():
    n = 200_000
    e, x = _noise_samples(n)
    tol = 5.0 / math.sqrt(n)   # 5 standard errors of a mean of N(0,1) samples
    for z in (e.double(), x.double()):
        assert abs(z.mean().item()) < tol
        # var of the sample variance of N(0,1) is 2/n
        assert abs(z.var().item() - 1.0) < 5.0 * math.sqrt(2.0 / n)
        # fourth moment 3: a check on the Gaussian shape, not just the variance
        assert abs((z ** 4).mean().item() - 3.0) < 5.0 * math.sqrt(96.0 / n)
    corr = (e.double() * x.double()).mean().item()
    assert abs(corr) < tol


def test_noise_uncorrelated_across_steps_tags_buckets():
    n = 100_000
    tol = 5.0 / math.sqrt(n)
    base, _ = noise.gaussian_noise(5, 0, 0, 0, 0, n)
    for other in (noise.gaussian_noise(5, 0, 1, 0, 0, n)[0],     # next step
                  noise.gaussian_noise(5, 0, 0, 1, 0, n)[0],     # other tag
                  noise.gaussian_noise(5, 1, 0, 0, 0, n)[0],     # other bucket
                  noise.gaussian_noise(6, 0, 0, 0, 0, n)[0]):    # other seed
        assert abs((base.double() * other.double()).mean().item()) < tol


def test_noise_is_a_pure_function_of_the_index():
    e_all, x_all = noise.gaussian_noise(77, 2, 3, 0, 0, 1001)
    e_mid, x_mid = noise.gaussian_noise(77, 2, 3, 0, 333, 100)
    assert torch.equal(e_all[333:433], e_mid) and torch.equal(x_all[333:433], x_mid)


@needs_cpp
def test_cpp_noise_sliced_equals_whole():
    from fused_flat import ops
    e_all, _ = ops.gaussian_noise(77, 2, 3, 0, 0, 1001)
    e_mid, _ = ops.gaussian_noise(77, 2, 3, 0, 333, 100)
    assert torch.equal(e_all[333:433], e_mid)


def test_rademacher_balanced():
    n = 100_000
    v = noise.rademacher(3, 0, 0, 0, n)
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    assert abs(v.mean().item()) < 5.0 / math.sqrt(n)


@needs_cpp
@pytest.mark.parametrize("momentum,nesterov,tag", [(0.0, False, 0), (0.9, True, 0), (0.9, False, 2)])
def test_cpp_avx2_and_baseline_loops_bitwise_equal(monkeypatch, momentum, nesterov, tag):
    """The fp32 loops built for AVX2 and for the baseline ISA give the same bits
    (-ffp-contract=off: no FMA contraction in either)."""
    from fused_flat import ops
    n = 100_003
    gen = torch.Generator().manual_seed(1)
    p0, g, m0 = (torch.randn(n, generator=gen) for _ in range(3))
    outs = []
    for isa in ("baseline", "auto"):
        monkeypatch.setenv("FUSED_FLAT_CPU_ISA", isa)
        p, m = p0.clone(), m0.clone()
        ops.perturb_(p, 3, 1, 2, tag, 0.05, 1)
        ops.restore_and_step_(p, g, m if momentum else None, None, None, 3, 1, 2, 1, tag, 0.05, 0.1,
                              1e-4, momentum, 0.0, nesterov, False, 1e-3, 1.0)
        outs.append((p, m))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
