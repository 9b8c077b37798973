"""Stochastic rounding of 16-bit parameters (ALGORITHMS.md §1) and perturb_from_.

rbits = (w(0, i) & 0xFF) | ((w(32, i) & 0xFF) << 8); SR(x) = sign(x) (floor(|x|/ulp) + up) ulp
with up = 1 iff rbits + floor(2^16 frac(|x|/ulp)) >= 2^16 (fused_flat.noise.stochastic_round).

Cross-backend checks are bitwise. To make the fp32 result identical on every backend (the
noise floats agree only to ~1 ulp: each backend's log/sin/cos), the update is set up so
that theta is exact in fp32: lr = 1, no weight decay, theta = p - g (+ sigma eps / noise
when they are on, whose fp32 values the C++ ISAs and Triton share bit for bit: those are
compared with each other, the reference separately with lr-only updates).
"""
from __future__ import annotations

import os

import pytest
import torch

from fused_flat import noise
from fused_flat.backends import reference
from fused_flat.backends import sam_reference
from tests import cpp_per_tensor as cpt
from tests.conftest import cpu_backends

HAS_CPP = "cpp" in cpu_backends()
ISAS = ("baseline", "avx2", "avx512")
DT16 = (torch.bfloat16, torch.float16)


def _bits(t):
    return t.view(torch.int16)


def _ulp(x: torch.Tensor, dtype) -> torch.Tensor:
    """Spacing of the 16-bit grid at |x| (x float64 / float32), as SR defines it."""
    fi = torch.finfo(dtype)
    mant = 7 if dtype == torch.bfloat16 else 10
    e = torch.floor(torch.log2(x.abs().double().clamp_min(fi.smallest_normal)))
    return torch.exp2(e - mant)


def _isa_supported(isa):
    from fused_flat.backends import cpp as ops
    old = os.environ.get("FUSED_FLAT_CPU_ISA")
    os.environ["FUSED_FLAT_CPU_ISA"] = isa
    try:
        ops.cpu_isa()
        return True
    except RuntimeError:
        return False
    finally:
        if old is None:
            os.environ.pop("FUSED_FLAT_CPU_ISA", None)
        else:
            os.environ["FUSED_FLAT_CPU_ISA"] = old


@pytest.fixture
def isa_env(monkeypatch):
    def set_isa(isa):
        if not _isa_supported(isa):
            pytest.skip(f"CPU/build lacks {isa}")
        monkeypatch.setenv("FUSED_FLAT_CPU_ISA", isa)
    return set_isa


def _triton():
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or a GPU")
    pytest.importorskip("triton")
    return _triton_ops()


def _triton_ops():
    """The Triton list passes with reference.py's per-tensor signatures."""
    from fused_flat import backends

    return backends.per_tensor(backends.get("triton"))


# ------------------------------------------------------------------ the rounding function
SPECIAL = [float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 65504.0, 65519.0, 65520.0,
           65535.9, 70000.0, -70000.0, 3.4e38, -3.4e38, 1e-45, -1e-40, 2.0 ** -14, 2.0 ** -24,
           2.0 ** -25, 1.5 * 2.0 ** -24, 6e-8, 2.0 ** -126, 1.0 + 2.0 ** -9]


def _values(n=20000):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 8)
    return torch.cat([x, torch.tensor(SPECIAL)])


@pytest.mark.parametrize("dtype", DT16)
def test_sr_brackets_the_value_and_keeps_representable_values(dtype):
    x = _values()
    lo = noise.stochastic_round(x, torch.zeros(x.numel(), dtype=torch.int64), dtype).double()
    hi = noise.stochastic_round(x, torch.full((x.numel(),), 0xFFFF), dtype).double()
    xd = x.double()
    fin = torch.isfinite(hi) & torch.isfinite(lo)
    # floor and ceil on the grid (toward zero / away from zero)
    assert (lo[fin].abs() <= xd[fin].abs()).all()
    # rbits = 0xFFFF rounds up unless frac < 2^-16 (then up would need rbits = 2^16)
    frac_ok = (hi[fin].abs() >= xd[fin].abs()) | ((xd[fin].abs() - lo[fin].abs()) < _ulp(xd[fin], dtype) * 2 ** -16)
    assert frac_ok.all()
    assert ((hi[fin] - lo[fin]).abs() <= _ulp(xd[fin], dtype) * 1.0000001).all()
    # representable values are exact, whatever the bits
    rep = x.to(dtype)
    rep = rep[torch.isfinite(rep)].float()
    for r in (0, 1, 0x7FFF, 0x8000, 0xFFFF):
        out = noise.stochastic_round(rep, torch.full((rep.numel(),), r), dtype)
        assert torch.equal(_bits(out), _bits(rep.to(dtype)))
    # non-finite values pass through
    sp = torch.tensor([float("inf"), -float("inf"), float("nan")])
    out = noise.stochastic_round(sp, torch.tensor([0xFFFF, 0xFFFF, 0x1234]), dtype).float()
    assert out[0] == float("inf") and out[1] == -float("inf") and torch.isnan(out[2])


@pytest.mark.parametrize("dtype", DT16)
def test_sr_is_unbiased_over_all_bits(dtype):
    """The mean over all 2^16 rbits is x exactly (bf16; fp16 with <= 16 discarded bits),
    else within 2^-16 ulp."""
    r = torch.arange(65536)
    vals = [1.0 + 1.0 / 3.0, -3.14159, 1e-3, 7e-8, 1e-6, 123.456, -0.0071]
    for v in vals:
        x = torch.full((65536,), v, dtype=torch.float32)
        mean = noise.stochastic_round(x, r, dtype).double().mean().item()
        xv = float(torch.tensor(v, dtype=torch.float32))
        tol = _ulp(torch.tensor([xv]), dtype).item() * 2.0 ** -16
        assert abs(mean - xv) <= tol * 1.01 + 1e-300, (dtype, v, mean, xv)


@pytest.mark.parametrize("dtype", DT16)
def test_sr_mean_of_random_draws(dtype):
    """Many elements of one value with the stream's rbits: the sample mean is x within
    5 standard errors ulp * sqrt(f (1 - f) / N)."""
    n = 1 << 16
    for v in (1.0 + 1.0 / 3.0, 0.01 + 1e-5, -5.3):
        x = torch.full((n,), v)
        rb = noise.sr_bits(123, 4, 7, 0, n)
        out = noise.stochastic_round(x, rb, dtype).double()
        xv = float(x[0])
        ulp = _ulp(torch.tensor([xv]), dtype).item()
        f = (abs(xv) / ulp) % 1.0
        se = ulp * (f * (1 - f) / n) ** 0.5
        assert abs(out.mean().item() - xv) <= 5 * se + 1e-12, (dtype, v)
        assert out.unique().numel() == 2      # the two neighbours on the grid


def test_sr_bits_definition():
    w0 = noise.element_words(5, 3, 9, 0, 13, 1000)
    w32 = noise.element_words(5, 3, 9, 32, 13, 1000)
    assert torch.equal(noise.sr_bits(5, 3, 9, 13, 1000), (w0 & 0xFF) | ((w32 & 0xFF) << 8))
    rb = noise.sr_bits(5, 3, 9, 0, 1 << 16)
    assert rb.min() >= 0 and rb.max() < 65536
    assert abs(rb.double().mean().item() / 65535 - 0.5) < 0.01


def test_sr_bits_across_backends():
    ref = noise.sr_bits(77, 2, 11, 5, 3001)
    if HAS_CPP:
        from fused_flat.backends import cpp as ops
        w0 = ops.element_words(77, 2, 11, 0, 5, 3001)
        w32 = ops.element_words(77, 2, 11, 32, 5, 3001)
        assert torch.equal(ref, (w0 & 0xFF) | ((w32 & 0xFF) << 8))
    _triton()
    from fused_flat.backends.triton import noise as tn
    assert torch.equal(tn.sr_bits(77, 2, 11, 5, 3001), ref)


@pytest.mark.parametrize("dtype", DT16)
def test_triton_sr_helper_is_bitwise_the_reference(dtype):
    _triton()
    from fused_flat.backends.triton import noise as tn
    x = _values()
    r = torch.randint(0, 65536, x.shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(_bits(tn.stochastic_round(x, r, dtype)), _bits(noise.stochastic_round(x, r, dtype)))


# ------------------------------------------------------------------ restore_and_step_
CASES = [  # (sigma, noise_std, restore_tag, momentum)
    (0.0, 0.0, 0, False), (0.02, 0.0, 0, False), (0.0, 1e-3, 0, True), (0.02, 1e-3, 0, False),
    (0.02, 1e-3, 3, True), (0.02, 0.0, 5, False)]


def _rs_args(off, sigma, nstd, tag, mom, sr=True):
    # lr = 1, wd = 0, momentum_init: d = g, theta = p - sigma eps - g + nstd xi
    return (7, 3, 11, off, tag, sigma, 1.0, 0.0, 0.9 if mom else 0.0, 0.0, False, True, nstd, 1.0, sr)


def _inputs(dtype, n, mom, seed=0):
    g_ = torch.Generator().manual_seed(seed)
    p = (torch.randn(n, generator=g_) * 4).to(dtype)
    g = torch.randn(n, generator=g_).to(dtype)
    m = torch.randn(n, generator=g_).to(dtype) if mom else None
    return p, g, m


def _run(fn, p0, g, m0, args):
    p = p0.clone()
    m = None if m0 is None else m0.clone()
    fn(p, g, m, None, None, *args)
    return p, m


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
@pytest.mark.parametrize("dtype", DT16)
@pytest.mark.parametrize("n,off", [(3000, 0), (1001, 5), (40003, 13)])
def test_restore_and_step_sr_cpp_isas_and_triton_agree_bitwise(dtype, n, off, isa_env):
    for sigma, nstd, tag, mom in CASES:
        p0, g, m0 = _inputs(dtype, n, mom)
        args = _rs_args(off, sigma, nstd, tag, mom)
        outs = []
        for isa in ISAS:
            if not _isa_supported(isa):
                continue
            isa_env(isa)
            outs.append((isa, _run(cpt.restore_and_step_, p0, g, m0, args)))
        base = outs[0][1]
        for isa, (p, m) in outs[1:]:
            assert torch.equal(_bits(p), _bits(base[0])), (isa, sigma, nstd, tag, mom)
        if sigma == 0.0 and nstd == 0.0:   # theta = p - g exactly: the reference agrees bitwise
            pr, _ = _run(reference.restore_and_step_, p0, g, m0, args)
            assert torch.equal(_bits(pr), _bits(base[0]))
        if n <= 3000 and (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()):
            ft = _triton_ops()
            pt, _ = _run(ft.restore_and_step_, p0, g, m0, args)
            assert torch.equal(_bits(pt), _bits(base[0])), ("triton", sigma, nstd, tag, mom)


@pytest.mark.parametrize("dtype", DT16)
def test_restore_and_step_sr_reference_vs_triton(dtype):
    ft = _triton()
    for sigma, nstd, tag, mom in CASES:
        p0, g, m0 = _inputs(dtype, 1001, mom, seed=2)
        args = _rs_args(5, sigma, nstd, tag, mom)
        pr, _ = _run(reference.restore_and_step_, p0, g, m0, args)
        pt, _ = _run(ft.restore_and_step_, p0, g, m0, args)
        diff = (_bits(pr) != _bits(pt))
        if sigma == 0.0 and nstd == 0.0:
            assert not diff.any()
        else:   # the noise floats differ by ~1 ulp (torch's log/sin/cos): rare 1-ulp flips
            assert diff.float().mean() < 0.01
            assert ((pr.double() - pt.double()).abs() <= _ulp(pr.double(), dtype) * 1.0000001).all()


@pytest.mark.parametrize("dtype", DT16)
def test_sr_with_zero_update_leaves_params_unchanged(dtype):
    backends_ = [reference.restore_and_step_]
    if HAS_CPP:
        backends_.append(cpt.restore_and_step_)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ft = _triton_ops()
        backends_.append(ft.restore_and_step_)
    p0, g, m0 = _inputs(dtype, 2001, True)
    for fn in backends_:
        for mom in (None, m0):
            p, _ = _run(fn, p0, g, mom, (7, 3, 11, 5, 0, 0.0, 0.0, 0.0, 0.9, 0.0, False, False, 0.0, 1.0, True))
            assert torch.equal(_bits(p), _bits(p0)), fn


def test_sr_flag_ignored_for_fp32():
    p0, g, _ = _inputs(torch.float32, 1001, False)
    fns = [reference.restore_and_step_]
    if HAS_CPP:
        fns.append(cpt.restore_and_step_)
    for fn in fns:
        a, _ = _run(fn, p0, g, None, _rs_args(5, 0.01, 1e-3, 0, False, sr=True))
        b, _ = _run(fn, p0, g, None, _rs_args(5, 0.01, 1e-3, 0, False, sr=False))
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DT16)
def test_sr_keeps_the_mean_of_small_updates(dtype):
    """A constant update of a tenth of an ulp: round-to-nearest stalls, SR follows the fp32
    trajectory on average (mean over many elements and steps)."""
    fns = [reference.restore_and_step_]
    if HAS_CPP:
        fns = [cpt.restore_and_step_]
    n, steps, lr = 4096, 50, 1e-4   # ulp(1-) = 2^-8 (bf16), 2^-11 (fp16)
    g = torch.ones(n, dtype=dtype)
    for fn in fns:
        p_sr = torch.ones(n, dtype=dtype)
        p_rn = torch.ones(n, dtype=dtype)
        for k in range(steps):
            a = (7, 0, k, 0, 0, 0.0, lr, 0.0, 0.0, 0.0, False, False, 0.0, 1.0)
            fn(p_sr, g, None, None, None, *a, True)
            fn(p_rn, g, None, None, None, *a, False)
        target = 1.0 - steps * lr
        assert torch.equal(p_rn, torch.ones(n, dtype=dtype))     # stalled
        ulp = 2.0 ** (-8 if dtype == torch.bfloat16 else -11)
        # per element the SR error is a sum of `steps` independent zero-mean terms, each
        # at most one ulp: sd <= ulp sqrt(steps) / 2 per element, / sqrt(n) for the mean
        se = ulp * (steps ** 0.5) / 2 / n ** 0.5
        assert abs(p_sr.double().mean().item() - target) < 5 * se, (p_sr.double().mean().item(), target)


# ------------------------------------------------------------------ perturb_from_
@pytest.mark.parametrize("dtype", DT16 + (torch.float32,))
@pytest.mark.parametrize("n,off", [(3000, 0), (1001, 5), (40003, 13)])
def test_perturb_from(dtype, n, off, isa_env):
    master = torch.randn(n, generator=torch.Generator().manual_seed(4))
    for sigma in (0.0, 0.05):
        pr = torch.empty(n, dtype=dtype)
        reference.perturb_from_(pr, master, 5, 1, 9, 2, sigma, off)
        if sigma == 0.0:
            assert torch.equal(pr, master.to(dtype))
        else:
            exp = (master.double() + sigma * noise.normal_noise(5, 1, 9, 2, off, n).double())
            assert ((pr.double() - exp).abs() <= _ulp(exp, dtype) * 0.5000001 + 1e-6 * sigma).all()
        outs = []
        if HAS_CPP:
            from fused_flat.backends import cpp as ops
            for isa in ISAS:
                if not _isa_supported(isa):
                    continue
                isa_env(isa)
                pc = torch.empty(n, dtype=dtype)
                ops.perturb_from_(pc, master, 5, 1, 9, 2, sigma, off)
                outs.append(pc)
        if n <= 3000 and os.environ.get("TRITON_INTERPRET") == "1":
            ft = _triton_ops()
            pt = torch.empty(n, dtype=dtype)
            ft.perturb_from_(pt, master, 5, 1, 9, 2, sigma, off)
            outs.append(pt)
        for o in outs:   # C++ (every ISA) and Triton share the noise bits: equal exactly
            assert torch.equal(o, outs[0])
            # vs the reference: within the noise's float accuracy (1 ulp of dtype)
            assert ((o.double() - pr.double()).abs() <= _ulp(pr.double(), dtype) * 1.0000001 + 1e-6).all()


# ------------------------------------------------------------------ SAM
def _sam_case(dtype, sizes, mom, seed=0):
    g_ = torch.Generator().manual_seed(seed)
    bk = [(torch.randn(n, generator=g_) * 3).to(dtype) for n in sizes]
    g = [torch.randn(n, generator=g_).to(dtype) for n in sizes]
    m = [torch.randn(n, generator=g_).to(dtype) for n in sizes] if mom else None
    return bk, g, m


@pytest.mark.parametrize("dtype", DT16)
@pytest.mark.parametrize("offsets", [None, [0, 1000, 4000], [3, 1001, 5000]])
@pytest.mark.parametrize("mom", [False, True])
def test_sam_restore_and_step_sr_backends_agree(dtype, offsets, mom, monkeypatch):
    sizes = [997, 2500, 3000]
    offs = offsets or [0, 997, 997 + 2500]
    bk, g, m0 = _sam_case(dtype, sizes, mom)
    args = (1.0, 0.0, 0.9 if mom else 0.0, 0.0, False, True, 1.0)  # theta = backup - g exactly
    ref = []
    for t in range(3):
        p = torch.empty_like(bk[t])
        sam_reference.sam_restore_and_step_(p, bk[t], g[t], m0[t].clone() if mom else None, None, None,
                                            *args, True, 9, 2, 5, offs[t])
        ref.append(p)
        # SR of the exact fp32 result, bits of its own bucket indices
        exp = noise.stochastic_round(bk[t].float() - g[t].float(), noise.sr_bits(9, 2, 5, offs[t], sizes[t]), dtype)
        assert torch.equal(_bits(p), _bits(exp))
    if HAS_CPP:
        for t in range(3):
            p = torch.empty_like(bk[t])
            cpt.sam_restore_and_step_(p, bk[t], g[t], m0[t].clone() if mom else None, None, None,
                                          *args, True, 9, 2, 5, offs[t])
            assert torch.equal(_bits(p), _bits(ref[t]))
    if os.environ.get("TRITON_INTERPRET") == "1":
        from fused_flat.backends.triton import sam as tsam
        monkeypatch.setattr(tsam, "BLOCK", 256)
        monkeypatch.setattr(tsam, "CHUNK", 1024)
        ps = [torch.empty_like(b) for b in bk]
        tsam.sam_restore_and_step_(ps, bk, g, [x.clone() for x in m0] if mom else None, None, None,
                                   *args, True, 9, 2, 5, offsets)
        for p, r in zip(ps, ref):
            assert torch.equal(_bits(p), _bits(r))


@pytest.mark.parametrize("dtype", DT16)
def test_sam_sr_zero_update_and_found_inf(dtype):
    bk, g, _ = _sam_case(dtype, [1001], False)
    fns = [sam_reference.sam_restore_and_step_]
    if HAS_CPP:
        fns.append(cpt.sam_restore_and_step_)
    for fn in fns:
        p = torch.empty_like(bk[0])
        fn(p, bk[0], g[0], None, None, None, 0.0, 0.0, 0.0, 0.0, False, False, 1.0, True, 9, 2, 5, 0)
        assert torch.equal(_bits(p), _bits(bk[0]))
        p = torch.empty_like(bk[0])
        fn(p, bk[0], g[0], None, None, torch.ones(1), 0.1, 0.0, 0.0, 0.0, False, False, 1.0, True, 9, 2, 5, 0)
        assert torch.equal(_bits(p), _bits(bk[0]))


# ------------------------------------------------------------------ schemas
@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
def test_opcheck_new_signatures():
    p, g = torch.randn(777).to(torch.bfloat16), torch.randn(777).to(torch.bfloat16)
    torch.library.opcheck(torch.ops.fused_flat.restore_and_step_list_.default,
                          ([p], [g], [], [2], None, None, 1, 0, 3, 0, 0.1, 0.01, 1e-4, 0.0, 0.0,
                           False, False, 1e-3, 1.0, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.fused_flat.perturb_from_.default,
                          (p, torch.randn(777), 1, 0, 3, 0, 0.1, 5),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.fused_flat.sam_restore_and_step_list_.default,
                          ([p], [p.clone()], [g], [], None, None, 0.1, 0.0, 0.0, 0.0, False, False,
                           1.0, True, 3, 1, 2, [8]), test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match="master"):
        torch.ops.fused_flat.perturb_from_(p, torch.randn(776), 1, 0, 3, 0, 0.1, 0)
