"""The noise stream (ALGORITHMS.md §1, layout version 3): known answers, the mapping of
elements to calls and tags, the key / counter layout (no two (seed, bucket) streams meet),
bitwise equality of the words across the reference, C++ (every ISA path), Triton
(interpreter) and the CUDA kernels' header compiled for the host, thread independence, and
its distribution."""
import math
import os
import shutil
import subprocess

import pytest
import torch

from fused_flat import noise
from tests import cpp_per_tensor as cpt
from tests.conftest import ROOT, cpu_backends
from tests.noise_v3_oracle import words_v3

HAS_CPP = "cpp" in cpu_backends()
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")

# Random123 known answers for Philox4x32-10: (counter, key) -> words. Under layout 3 the key
# is the seed and counter word 3 is tag | bucket_id << 8: the first is (seed 0, bucket 0,
# tag 0), the second (seed 0x299F31D0A4093822, bucket 0x037073, tag 0x44).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _as_args(counter, key):
    """(seed, bucket_id, step, tag, j) whose Philox call has this counter and key."""
    seed = (key[1] << 32) | key[0]          # key = (seed_lo, seed_hi)
    j = (counter[1] << 32) | counter[0]
    return seed, counter[3] >> 8, counter[2], counter[3] & 0xFF, j


def _isas():
    """The ISA paths of the CPU loops this CPU supports (each forced in turn)."""
    if not HAS_CPP:
        return []
    import os
    from fused_flat.backends import cpp as ops
    out = []
    old = os.environ.get("FUSED_FLAT_CPU_ISA")
    try:
        for isa in ("baseline", "avx2", "avx512"):
            os.environ["FUSED_FLAT_CPU_ISA"] = isa
            try:
                if ops.cpu_isa() == isa:
                    out.append(isa)
            except RuntimeError:
                pass
    finally:
        if old is None:
            os.environ.pop("FUSED_FLAT_CPU_ISA", None)
        else:
            os.environ["FUSED_FLAT_CPU_ISA"] = old
    return out


ISAS = _isas()


def _u(x):
    return ((x >> 8) + 0.5) * 2.0 ** -24


def _z_from_words(words, i):
    """z(tag, i) in float64 from the words of call i >> 2, straight from ALGORITHMS.md §1."""
    second = (i >> 1) & 1
    a, b = words[2 * second], words[2 * second + 1]
    r = math.sqrt(-2.0 * math.log(_u(a)))
    t = 2.0 * math.pi * _u(b)
    return r * math.cos(t) if i % 2 == 0 else r * math.sin(t)


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_reference_philox_known_answers(counter, key, expected):
    seed, bucket, step, tag, j = _as_args(counter, key)
    w = noise.philox_words(seed, bucket, step, tag, j, 1)
    assert [int(x) for x in w[0]] == list(expected)


@needs_cpp
@pytest.mark.parametrize("counter,key,expected", KAT)
def test_cpp_philox_known_answers(counter, key, expected):
    from fused_flat.backends import cpp as ops
    seed, bucket, step, tag, j = _as_args(counter, key)
    w = ops.philox_words(seed, bucket, step, tag, j - 2 ** 64 if j >= 2 ** 63 else j, 1)
    assert [int(x) for x in w[0]] == list(expected)


def test_layout_known_answers():
    """Elements 0..3 of (seed 0, bucket 0, step 0, tag 0) come from the one call with counter
    (0, 0, 0, 0), whose words are Random123's first known answer: element i takes the pair
    (x0, x1) for i < 2, (x2, x3) otherwise, and r cos t (even i) / r sin t (odd i)."""
    words = KAT[0][2]
    want = [_z_from_words(words, i) for i in range(4)]
    got = noise.normal_noise(0, 0, 0, 0, 0, 4)
    assert max(abs(g - w) for g, w in zip(got.tolist(), want)) < 1e-5
    # w(tag, i) = x_(i & 3)
    assert noise.element_words(0, 0, 0, 0, 0, 4).tolist() == list(words)
    # an element deep in the bucket, other tag, step, seed and bucket: call j = i >> 2,
    # counter (j_lo, j_hi, step_lo, tag | bucket << 8) (the oracle builds it independently)
    seed, bucket, step, tag, i = 0xDEADBEEF12345, 7, 2 ** 32 + 9, 32, (5 << 32) + 4 * 1234 + 3
    w = [int(x) for x in noise.philox_words(seed, bucket, step, tag, i >> 2, 1)[0]]
    assert noise.element_words(seed, bucket, step, tag, i, 1).item() == w[3]
    assert words_v3(seed, bucket, step, tag, i - 3, 4).tolist() == w
    z = noise.normal_noise(seed, bucket, step, tag, i - 3, 4).tolist()
    assert max(abs(z[q] - _z_from_words(w, i - 3 + q)) for q in range(4)) < 1e-5


@needs_cpp
def test_cpp_layout_known_answers():
    from fused_flat.backends import cpp as ops
    words = KAT[0][2]
    for isa in ISAS:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FUSED_FLAT_CPU_ISA", isa)
            got = ops.normal_noise(0, 0, 0, 0, 0, 64)
            assert max(abs(got[q].item() - _z_from_words(words, q)) for q in range(4)) < 1e-5
            assert ops.element_words(0, 0, 0, 0, 0, 4).tolist() == list(words)


def test_tags_of_the_passes():
    """eps of perturbation n is tag n, xi is tag 32, the Rademacher probe tag 16."""
    assert (noise.TAG_EPS, noise.TAG_RADEMACHER, noise.TAG_XI) == (0, 16, 32)
    e, x = noise.gaussian_noise(4, 1, 3, 2, 5, 99)
    assert torch.equal(e, noise.normal_noise(4, 1, 3, 2, 5, 99))
    assert torch.equal(x, noise.normal_noise(4, 1, 3, 32, 5, 99))
    w = noise.element_words(4, 1, 3, 16, 5, 99)
    assert torch.equal(noise.rademacher(4, 1, 3, 5, 99), 1.0 - 2.0 * (w >> 31).float())


@needs_cpp
@pytest.mark.parametrize("seed,bucket,step,tag", [(0, 0, 0, 0), (2 ** 63 - 1, 7, 123456, 3),
                                                  (0xDEADBEEF12345, 2 ** 24 - 1, 2 ** 32 + 9, 16),
                                                  (5, 1, 2, 32), (4, 5, 2, 255)])
def test_cpp_words_bitwise_equal_reference(seed, bucket, step, tag):
    from fused_flat.backends import cpp as ops
    for f in (0, 2 ** 31 - 100, 2 ** 32 - 3):   # the last crosses the j_lo -> j_hi carry
        a = ops.philox_words(seed, bucket, step, tag, f, 257)
        b = noise.philox_words(seed, bucket, step, tag, f, 257)
        assert torch.equal(a, b)
    for off in (0, 3, 4 * (2 ** 32 - 5) + 1):
        assert torch.equal(ops.element_words(seed, bucket, step, tag, off, 103),
                           noise.element_words(seed, bucket, step, tag, off, 103))


@needs_cpp
@pytest.mark.parametrize("offset,n", [(0, 1), (1, 2), (3, 4097), (0, 100_003), (6, 3),
                                      (4 * (2 ** 32 - 20) + 2, 300)])
def test_cpp_normals_match_reference_every_isa(offset, n):
    from fused_flat.backends import cpp as ops
    zr = noise.normal_noise(42, 3, 5, 0, offset, n)
    base = None
    for isa in ISAS:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FUSED_FLAT_CPU_ISA", isa)
            z = ops.normal_noise(42, 3, 5, 0, offset, n)
            e, x = ops.gaussian_noise(42, 3, 5, 0, offset, n)
        assert (z - zr).abs().max().item() <= 1e-5
        assert torch.equal(e, z)
        assert (x - noise.normal_noise(42, 3, 5, 32, offset, n)).abs().max().item() <= 1e-5
        if base is None:
            base = z
        assert torch.equal(z, base), f"{isa} differs from {ISAS[0]}"


# ------------------------------------------------------------------ layout 3: key and counter
# (seed, bucket_id) pairs: seeds with non-zero high words, bucket ids up to 2^24 - 1
STREAMS = [(0x2545F4914F6CDD1D, 1), (2 ** 63 - 1, 5), (0xDEADBEEF12345, 2 ** 24 - 1)]
# (step, tag, first call, calls): the last crosses the j_lo -> j_hi carry
WORD_CASES = [(11, 0, 0, 300), (2 ** 32 + 9, 32, 2 ** 32 - 3, 40), (3, 16, 12345, 17)]

# The CUDA kernels' noise (csrc/include/fused_flat/elementwise.h: make_key, noise_words, as
# every kernel in csrc/cuda calls them) compiled for the host: one line "seed bucket step tag
# first n" in, the n calls' words out.
_HOST_WORDS_CPP = r"""
#include <cinttypes>
#include <cstdio>
#include "fused_flat/elementwise.h"
int main() {
  long long seed, bucket, step, tag, first, n;
  while (std::scanf("%lld %lld %lld %lld %lld %lld", &seed, &bucket, &step, &tag, &first, &n) == 6) {
    const fused_flat::PhiloxKey key = fused_flat::make_key(seed, bucket);
    for (long long r = 0; r < n; ++r) {
      const fused_flat::Words4 w =
          fused_flat::noise_words(key, first + r, step, static_cast<uint32_t>(tag));
      std::printf("%" PRIu32 " %" PRIu32 " %" PRIu32 " %" PRIu32 "\n", w.x0, w.x1, w.x2, w.x3);
    }
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def host_words(tmp_path_factory):
    """words(cases) -> one int64 [n, 4] tensor per (seed, bucket, step, tag, first, n) case,
    from elementwise.h compiled by the host C++ compiler (asserts on: no -DNDEBUG)."""
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.fail("no host C++ compiler (c++/g++) on PATH")
    d = tmp_path_factory.mktemp("host_words")
    (d / "words.cpp").write_text(_HOST_WORDS_CPP)
    exe = str(d / "words")
    build = subprocess.run([cxx, "-std=c++17", "-O1", "-I" + os.path.join(ROOT, "csrc", "include"),
                            "-o", exe, str(d / "words.cpp")], capture_output=True, text=True,
                           timeout=120)
    assert build.returncode == 0, build.stderr[-3000:]

    def words(cases):
        text = "".join(" ".join(str(v) for v in c) + "\n" for c in cases)
        run = subprocess.run([exe], input=text, capture_output=True, text=True, timeout=60,
                             check=True)
        rows = torch.tensor([[int(x) for x in line.split()] for line in run.stdout.splitlines()],
                            dtype=torch.int64)
        return list(rows.split([c[-1] for c in cases]))
    return words


def test_consecutive_seeds_and_buckets_draw_different_words():
    """The layout-2 bug: key (seed_lo ^ bucket_id, seed_hi) made (seed s + 1, bucket 0) and
    (seed s, bucket 1) one stream (s even). Layout 3 keys with the whole seed and counts the
    bucket in counter word 3: no word in common."""
    j = torch.arange(1024, dtype=torch.int64)
    zero = torch.zeros_like(j)

    def words_v2(seed, bucket):   # step 3, tag 0 under the layout-2 key
        return torch.stack(noise.philox4x32_10(j, zero, zero + 3, zero,
                                               (seed & 0xFFFFFFFF) ^ bucket, seed >> 32), 1)

    for s in (0, 4, 0x2545F4914F6CDD1C):
        a = noise.philox_words(s + 1, 0, 3, 0, 0, 1024)
        b = noise.philox_words(s, 1, 3, 0, 0, 1024)
        assert not (a == b).any()
        # the premise: under the layout-2 key the same two streams are equal word for word
        assert torch.equal(words_v2(s + 1, 0), words_v2(s, 1))


def test_streams_of_seeds_and_buckets_uncorrelated():
    """24 streams, seeds 0..7 x bucket ids 0..2, at one (step, tag): every pair's Pearson r
    of z over n = 2^14 elements is below 5 / sqrt(n) = 0.039. For independent streams r is
    ~ N(0, 1/n), so one pair exceeds 5 standard errors with probability 5.7e-7 and any of the
    276 pairs with at most 276 x 5.7e-7 = 1.6e-4 (union bound). Under layout 2 the 24
    streams were 8 (key seed ^ bucket_id): 24 pairs had r = 1.0."""
    n = 1 << 14
    bound = 5.0 / math.sqrt(n)
    streams = [(s, b) for s in range(8) for b in range(3)]
    off_diag = ~torch.eye(len(streams), dtype=torch.bool)
    for step, tag in ((0, 0), (7, 32)):
        z = torch.stack([noise.normal_noise(s, b, step, tag, 0, n).double() for s, b in streams])
        r_max = torch.corrcoef(z)[off_diag].abs().max().item()
        print(f"layout {noise.LAYOUT_VERSION}, step {step}, tag {tag}: max |r| over "
              f"{len(streams) * (len(streams) - 1) // 2} pairs of {n} elements = {r_max:.4f} "
              f"(bound {bound:.4f})")
        assert r_max < bound


def test_bucket_id_and_tag_ranges():
    """bucket_id < 2^24 and tag < 256 (they share counter word 3): beyond, a clear error on
    every backend, never a silently aliased stream."""
    noise.philox_words(1, 2 ** 24 - 1, 0, 255, 0, 1)
    for bucket, tag in ((2 ** 24, 0), (-1, 0), (0, 256), (0, -1)):
        with pytest.raises(ValueError, match="bucket_id|tag"):
            noise.philox_words(1, bucket, 0, tag, 0, 1)
    if HAS_CPP:
        from fused_flat.backends import cpp as ops
        for bucket, tag in ((2 ** 24, 0), (-1, 0), (0, 256)):
            with pytest.raises(RuntimeError, match="bucket_id|tag"):
                ops.philox_words(1, bucket, 0, tag, 0, 1)
        with pytest.raises(RuntimeError, match="bucket_id"):
            cpt.perturb_(torch.zeros(8), 1, 2 ** 24, 0, 0, 0.1, 0)


@pytest.mark.parametrize("step", [0, 7, 2 ** 32 + 5, 2 ** 62 + 3])
def test_tensor_step_draws_the_words_of_the_int_step(step):
    """A step counter held in a tensor (0-dim or one element, what torch.compile takes as a
    graph input) draws the words of the same int, bit for bit, its low 32 bits only; a
    floating or many-element step is refused."""
    for t in (torch.tensor(step), torch.tensor([step])):
        assert torch.equal(noise.philox_words(3, 5, t, 32, 9, 40),
                           noise.philox_words(3, 5, step, 32, 9, 40))
        assert torch.equal(noise.normal_noise(3, 5, t, 0, 13, 101).view(torch.int32),
                           noise.normal_noise(3, 5, step, 0, 13, 101).view(torch.int32))
        assert torch.equal(noise.sr_bits(3, 5, t, 2, 50), noise.sr_bits(3, 5, step, 2, 50))
        assert torch.equal(noise.rademacher(3, 5, t, 2, 50), noise.rademacher(3, 5, step, 2, 50))
    for bad in (torch.tensor(1.0), torch.tensor([1, 2])):
        with pytest.raises(ValueError, match="step must be"):
            noise.philox_words(3, 5, bad, 0, 0, 4)


def _triton_noise():
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None   # with a GPU, tests/test_triton*.py cover the compiled kernels
    try:
        from fused_flat.backends.triton import noise as tnoise
    except ImportError:
        return None
    return tnoise


@pytest.mark.parametrize("seed,bucket", STREAMS)
def test_words_bitwise_equal_across_backends(seed, bucket, host_words):
    """Layout 3's words for non-zero bucket ids, bit for bit: the independent oracle, the
    reference, the C++ ops, the Triton helpers (interpreter) and elementwise.h compiled for
    the host (the CUDA kernels' code)."""
    tnoise = _triton_noise()
    host = host_words([(seed, bucket, step, tag, first - 2 ** 64 if first >= 2 ** 63 else first, n)
                       for step, tag, first, n in WORD_CASES])
    for (step, tag, first, n), hw in zip(WORD_CASES, host):
        want = noise.philox_words(seed, bucket, step, tag, first, n)
        assert torch.equal(words_v3(seed, bucket, step, tag, 4 * first, 4 * n), want.reshape(-1))
        assert torch.equal(hw, want), "host-compiled elementwise.h"
        if HAS_CPP:
            from fused_flat.backends import cpp as ops
            assert torch.equal(ops.philox_words(seed, bucket, step, tag, first, n), want)
            assert torch.equal(ops.element_words(seed, bucket, step, tag, 4 * first + 1, 4 * n - 1),
                               want.reshape(-1)[1:])
        if tnoise is not None:
            assert torch.equal(tnoise.philox_words(seed, bucket, step, tag, first, n), want)
            z, w = tnoise.normal_noise_and_words(seed, bucket, step, tag, 4 * first + 3, 4 * n - 3)
            assert torch.equal(w, want.reshape(-1)[3:])


@needs_cpp
@pytest.mark.parametrize("seed,bucket", STREAMS)
def test_cpp_simd_streams_every_isa(seed, bucket):
    """The SIMD generators build counter word 3 themselves: for non-zero bucket ids, every
    forced ISA path gives the normals of the portable path bit for bit (within 1e-5 of the
    reference), and stochastic-rounding bits (the words' low bytes; no noise, so the result
    is exact) equal to the reference's."""
    from fused_flat.backends import cpp as ops
    from fused_flat.backends import reference
    n, off = 4099, 6
    zr = noise.normal_noise(seed, bucket, 9, 32, off, n)
    gen = torch.Generator().manual_seed(2)
    p0 = (torch.randn(n, generator=gen) * 3).to(torch.bfloat16)
    g = torch.randn(n, generator=gen).to(torch.bfloat16)
    want = p0.clone()
    reference.restore_and_step_(want, g, None, None, None, seed, bucket, 9, off, 0, 0.0, 1e-3, 0.0,
                                0.0, 0.0, False, False, 0.0, 1.0, stochastic_rounding=True)
    base = None
    for isa in ISAS:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FUSED_FLAT_CPU_ISA", isa)
            z = ops.normal_noise(seed, bucket, 9, 32, off, n)
            p = p0.clone()
            cpt.restore_and_step_(p, g, None, None, None, seed, bucket, 9, off, 0, 0.0, 1e-3, 0.0,
                                  0.0, 0.0, False, False, 0.0, 1.0, stochastic_rounding=True)
        assert (z - zr).abs().max().item() <= 1e-5, isa
        base = z if base is None else base
        assert torch.equal(z, base), f"{isa} differs from {ISAS[0]}"
        assert torch.equal(p.view(torch.int16), want.view(torch.int16)), isa


@needs_cpp
def test_cpu_isa_forcing():
    from fused_flat.backends import cpp as ops
    assert "baseline" in ISAS
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUSED_FLAT_CPU_ISA", "no-such-isa")
        with pytest.raises(RuntimeError, match="FUSED_FLAT_CPU_ISA"):
            ops.cpu_isa()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("FUSED_FLAT_CPU_ISA", raising=False)
        assert ops.cpu_isa() == ISAS[-1]   # the best one by default


@needs_cpp
@pytest.mark.parametrize("isa", ISAS)
def test_cpp_noise_independent_of_thread_count(isa, monkeypatch):
    from fused_flat.backends import cpp as ops
    monkeypatch.setenv("FUSED_FLAT_CPU_ISA", isa)
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
            cpt.perturb_(p, 9, 1, 4, 0, 0.01, 2)
            cpt.restore_and_step_(p, g, m, None, None, 9, 1, 4, 2, 0, 0.01, 0.1, 1e-4, 0.9, 0.0,
                                  False, False, 1e-3, 1.0)
            z = ops.normal_noise(9, 1, 4, 0, 1, n)
            outs.append((p, m, z))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


N_DIST = 400_000


def test_noise_distribution_moments():
    n = N_DIST
    tol = 5.0 / math.sqrt(n)   # 5 standard errors of a mean of N(0,1) samples
    for tag in (0, 32):
        z = noise.normal_noise(1234, 0, 0, tag, 0, n).double()
        assert abs(z.mean().item()) < tol
        # var of the sample variance of N(0,1) is 2/n
        assert abs(z.var().item() - 1.0) < 5.0 * math.sqrt(2.0 / n)
        # fourth moment 3: a check on the Gaussian shape, not just the variance
        assert abs((z ** 4).mean().item() - 3.0) < 5.0 * math.sqrt(96.0 / n)
        # each of the 4 positions in a call is N(0, 1) by itself
        for q in range(4):
            zq = z[q::4]
            assert abs(zq.mean().item()) < 5.0 / math.sqrt(zq.numel())
            assert abs(zq.var().item() - 1.0) < 5.0 * math.sqrt(2.0 / zq.numel())


def test_eps_and_xi_uncorrelated():
    """eps (tag 0) and xi (tag 32) of the same element: different Philox calls."""
    n = N_DIST
    e, x = noise.gaussian_noise(1234, 0, 0, 0, 0, n)
    e, x = e.double(), x.double()
    tol = 5.0 / math.sqrt(n)
    assert abs((e * x).mean().item()) < tol
    assert abs((e * e * x * x).mean().item() - 1.0) < 5.0 * math.sqrt(8.0 / n)  # E[e²x²]=1 if independent


def test_elements_of_one_call_uncorrelated():
    """The 4 elements of one call (two Box-Muller transforms, cos and sin of each): no
    correlation of the values, nor of their squares (r is shared by the cos/sin pair)."""
    n = N_DIST
    z = noise.normal_noise(99, 0, 0, 0, 0, n).double().view(-1, 4)
    m = z.shape[0]
    tol = 5.0 / math.sqrt(m)
    for a in range(4):
        for b in range(a + 1, 4):
            assert abs((z[:, a] * z[:, b]).mean().item()) < tol
            # E[(z_a² - 1)(z_b² - 1)] = 0 for independent normals, variance 4
            assert abs(((z[:, a] ** 2 - 1) * (z[:, b] ** 2 - 1)).mean().item()) < 5.0 * 2.0 / math.sqrt(m)


def test_noise_uncorrelated_across_steps_tags_buckets():
    n = 100_000
    tol = 5.0 / math.sqrt(n)
    base = noise.normal_noise(5, 0, 0, 0, 0, n).double()
    for other in (noise.normal_noise(5, 0, 1, 0, 0, n),     # next step
                  noise.normal_noise(5, 0, 0, 1, 0, n),     # other perturbation
                  noise.normal_noise(5, 0, 0, 32, 0, n),    # xi
                  noise.normal_noise(5, 0, 1, 32, 0, n),    # xi of the next step
                  noise.normal_noise(5, 1, 0, 0, 0, n),     # other bucket
                  noise.normal_noise(6, 0, 0, 0, 0, n)):    # other seed
        assert abs((base * other.double()).mean().item()) < tol


def test_noise_is_a_pure_function_of_the_index():
    z_all = noise.normal_noise(77, 2, 3, 0, 0, 1001)
    for off, n in ((333, 100), (1, 3), (4, 4), (6, 1)):
        assert torch.equal(z_all[off:off + n], noise.normal_noise(77, 2, 3, 0, off, n))


@needs_cpp
def test_cpp_noise_sliced_equals_whole():
    from fused_flat.backends import cpp as ops
    z_all = ops.normal_noise(77, 2, 3, 0, 0, 10001)
    for off, n in ((333, 1000), (1, 3), (4, 4), (6, 1), (5, 9000)):
        assert torch.equal(z_all[off:off + n], ops.normal_noise(77, 2, 3, 0, off, n))


def test_rademacher_balanced():
    n = 100_000
    v = noise.rademacher(3, 0, 0, 0, n)
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    assert abs(v.mean().item()) < 5.0 / math.sqrt(n)


def _pass_cases():
    # (dtype, n, offset, momentum, nesterov, restore_tag, sigma, noise_std)
    return [
        (torch.float32, 100_003, 1, 0.0, False, 0, 0.05, 1e-3),
        (torch.float32, 70_001, 4, 0.9, True, 0, 0.05, 1e-3),
        (torch.float32, 65_541, 2, 0.9, False, 2, 0.05, 0.0),
        (torch.float32, 4099, 3, 0.0, False, 0, 0.0, 1e-3),
        (torch.bfloat16, 100_003, 1, 0.9, False, 0, 0.05, 1e-3),
        (torch.bfloat16, 4099, 0, 0.0, False, 1, 0.05, 1e-3),
        (torch.float16, 4099, 2, 0.9, False, 0, 0.05, 1e-3),
        (torch.float64, 4099, 1, 0.9, True, 0, 0.05, 1e-3),
    ]


@needs_cpp
@pytest.mark.parametrize("dtype,n,offset,momentum,nesterov,tag,sigma,noise_std", _pass_cases())
def test_cpp_isa_paths_bitwise_equal(dtype, n, offset, momentum, nesterov, tag, sigma, noise_std):
    """Every ISA path of the CPU loops (forced with FUSED_FLAT_CPU_ISA) gives the bits of the
    portable baseline loop (-ffp-contract=off: no FMA contraction anywhere), and the pass is
    the reference's up to rounding."""
    from fused_flat.backends import reference
    gen = torch.Generator().manual_seed(1)
    p0, g, m0 = (torch.randn(n, generator=gen).to(dtype) for _ in range(3))
    outs = []
    for isa in ISAS:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FUSED_FLAT_CPU_ISA", isa)
            p, m = p0.clone(), m0.clone()
            cpt.perturb_(p, 3, 1, 2, tag, sigma, offset)
            pert = p.clone()
            cpt.restore_and_step_(p, g, m if momentum else None, None, None, 3, 1, 2, offset, tag, sigma,
                                  0.1, 1e-4, momentum, 0.0, nesterov, False, noise_std, 1.0)
            outs.append((isa, pert, p, m))
    for isa, pert, p, m in outs[1:]:
        assert torch.equal(pert, outs[0][1]), isa
        assert torch.equal(p, outs[0][2]), isa
        assert torch.equal(m, outs[0][3]), isa
    # against the pure-torch reference (float math of torch's log/cos differs by ~1 ulp)
    p, m = p0.clone(), m0.clone()
    reference.perturb_(p, 3, 1, 2, tag, sigma, offset)
    reference.restore_and_step_(p, g, m if momentum else None, None, None, 3, 1, 2, offset, tag, sigma,
                                0.1, 1e-4, momentum, 0.0, nesterov, False, noise_std, 1.0)
    atol = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
    torch.testing.assert_close(p, outs[0][2], rtol=1e-2 if atol > 1e-5 else 1e-5, atol=atol)


@needs_cpp
@pytest.mark.parametrize("isa", ISAS)
def test_cpp_roofline_runs(isa, monkeypatch):
    from fused_flat.backends import cpp as ops
    monkeypatch.setenv("FUSED_FLAT_CPU_ISA", isa)
    c = ops.noise_roofline(1, 0, 0, [0, 32], 1 << 16)
    assert c.dtype == torch.float32 and c.numel() == 1
