"""The multi-tensor Langevin Triton kernels (fused_flat/backends/triton/multi.py) under the interpreter:
one launch per list, against fused_flat.backends.reference applied tensor by tensor at each tensor's
bucket offset, and bit for bit against the same ops on one-tensor lists (a tensor's result
does not depend on the other tensors of its list: fused_flat.backends.per_tensor; equal
eps/xi bits mean equal Philox words, which tests/test_triton.py checks against the
reference and the C++ ops). Stochastic rounding (bf16 / fp16) runs in the same single
launch: bit for bit on one-tensor lists. fp64 lists are refused (the resolver gives fp64
buckets to another backend).

Random lists of sizes (1-element and empty tensors, sizes not a multiple of the block,
several chunks per tensor) with random bucket offsets, odd ones included (FSDP shards): a
tensor may start and end in the middle of a Philox call. Small BLOCK / CHUNK so that short
lists exercise masked heads, whole (unmasked) blocks and masked tails; the interpreter
costs ~10 ms per program that calls Philox, so the lists stay short.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (set by conftest) or a GPU", allow_module_level=True)
pytest.importorskip("triton")

from fused_flat import FSGLD, SAM, backends  # noqa: E402
from fused_flat.backends import reference
from fused_flat.backends.triton import multi as tm  # noqa: E402
from fused_flat.backends.triton import noise as tnoise  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ft = backends.per_tensor(backends.get("triton"))   # the list ops on one-tensor lists
SEED = 0x2545F4914F6CDD1D
BUCKET, STEP = 3, 11


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    monkeypatch.setattr(tm, "BLOCK", 32)
    monkeypatch.setattr(tm, "CHUNK", 96)


def _case(seed):
    """(sizes, offsets): a shuffled mix of edge sizes, random odd/even offsets."""
    rng = random.Random(seed)
    base = [1, 0, 32, 95, 96, 97, 130]
    rng.shuffle(base)
    sizes = base[:rng.randint(3, 6)] + [rng.randint(1, 70) for _ in range(rng.randint(0, 2))]
    offsets = [rng.choice([0, 4 * rng.randint(0, 50), rng.randint(0, 999),
                           (1 << 33) + rng.randint(0, 9)]) for _ in sizes]
    return sizes, offsets


def _tensors(sizes, dtype, gen, scale=1.0):
    return [(torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)
            for n in sizes]


def _clone(ts):
    return None if ts is None else [t.clone() for t in ts]


def _ulps(a, b):
    eps = torch.finfo(a.dtype).eps
    mag = torch.maximum(a.double().abs(), b.double().abs()).clamp_min(torch.finfo(a.dtype).tiny)
    ulp = eps * torch.exp2(torch.floor(torch.log2(mag)))
    return ((a.double() - b.double()).abs() / ulp).max().item() if a.numel() else 0.0


def _close_ref(got, want, dtype, what):
    """fp32: within 1e-6 of the reference (its log/sin/cos are torch's); bf16: 1 ulp (the
    interpreter truncates fp32 -> bf16)."""
    for i, (a, b) in enumerate(zip(got, want)):
        if dtype == torch.float32:
            err = (a - b).abs().max().item() if a.numel() else 0.0
            assert err <= 1e-6, f"{what}[{i}] ({a.numel()} el.): max abs diff {err:.3g}"
        else:
            assert _ulps(a, b) <= 1.0, f"{what}[{i}]: {_ulps(a, b)} ulps"


def _equal(got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"{what}[{i}] ({a.numel()} el.): {(a - b).abs().max()}"


class _Count:
    """Counts launches of a @triton.jit kernel (kernel[grid](...))."""

    def __init__(self, kernel):
        self.kernel, self.n = kernel, 0

    def __getitem__(self, grid):
        self.n += 1
        return self.kernel[grid]


# ------------------------------------------------------------------ perturb
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_perturb_matches_reference_and_per_tensor(dtype, seed, monkeypatch):
    sizes, offsets = _case(seed)
    gen = torch.Generator().manual_seed(seed)
    params = _tensors(sizes, dtype, gen)
    got, ref, per = _clone(params), _clone(params), _clone(params)
    count = _Count(tm.perturb_kernel)
    monkeypatch.setattr(tm, "perturb_kernel", count)
    tm.perturb_(got, offsets, SEED, BUCKET, STEP, 5, 0.3)
    assert count.n == 1, "one launch per list"
    for p, q, off in zip(ref, per, offsets):
        reference.perturb_(p, SEED, BUCKET, STEP, 5, 0.3, off)
        ft.perturb_(q, SEED, BUCKET, STEP, 5, 0.3, off)
    _close_ref(got, ref, dtype, "perturb vs reference")
    _equal(got, per, "perturb vs one-tensor lists")


def test_perturb_noise_is_the_stream():
    """theta = 0, sigma = 1: the kernel writes eps itself, bit for bit the per-tensor
    inspection kernel's z(tag, i) (same Philox words), within 1e-6 of fused_flat.noise."""
    from fused_flat import noise

    sizes, offsets = [1, 3, 70, 33, 5], [0, 1, 6, 2 ** 33 + 3, 2 ** 40 + 2]
    got = [torch.zeros(n, device=DEVICE) for n in sizes]
    tm.perturb_(got, offsets, SEED, BUCKET, STEP, 0, 1.0)
    for z, n, off in zip(got, sizes, offsets):
        want = tnoise.normal_noise(SEED, BUCKET, STEP, 0, off, n, device=DEVICE)
        assert torch.equal(z, want), (n, off)
        ref = noise.normal_noise(SEED, BUCKET, STEP, 0, off, n, DEVICE)
        assert (z - ref).abs().max().item() <= 1e-6


def test_perturb_noops_and_fp64_refused():
    ps = [torch.randn(5, device=DEVICE), torch.randn(0, device=DEVICE)]
    before = _clone(ps)
    tm.perturb_(ps, [0, 5], SEED, BUCKET, STEP, 0, 0.0)      # sigma = 0
    tm.perturb_([], [], SEED, BUCKET, STEP, 0, 1.0)          # empty list
    tm.perturb_([ps[1]], [3], SEED, BUCKET, STEP, 0, 1.0)    # only an empty tensor
    _equal(ps, before, "no-op")
    d = [torch.randn(n, dtype=torch.float64, device=DEVICE) for n in (3, 9)]
    want = _clone(d)
    with pytest.raises(ValueError, match="float64 tensors are not supported"):
        tm.perturb_(d, [1, 7], SEED, BUCKET, STEP, 2, 0.1)
    _equal(d, want, "fp64 untouched")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("sigma", [0.3, 0.0])
def test_perturb_from_matches_reference(dtype, sigma, monkeypatch):
    """param <- round(master + sigma * eps) from fp32 masters (master_weights=True): one
    launch, the reference's numbers (1 ulp for the 16-bit roundings of the interpreter),
    the params' own values never read; sigma = 0 copies the masters, rounded."""
    seed = 40 + (dtype == torch.float16) + 2 * (sigma == 0.0)
    sizes, offsets = _case(seed)
    gen = torch.Generator().manual_seed(seed)
    masters = _tensors(sizes, torch.float32, gen)
    got = [torch.full((n,), 7.0, dtype=dtype, device=DEVICE) for n in sizes]
    count = _Count(tm.perturb_from_kernel)
    monkeypatch.setattr(tm, "perturb_from_kernel", count)
    tm.perturb_from_(got, masters, offsets, SEED, BUCKET, STEP, 5, sigma)
    assert count.n == (1 if sum(sizes) else 0), "one launch per list"
    want = [torch.empty(n, dtype=dtype, device=DEVICE) for n in sizes]
    for p, m, off in zip(want, masters, offsets):
        reference.perturb_from_(p, m, SEED, BUCKET, STEP, 5, sigma, off)
    _close_ref(got, want, dtype if dtype != torch.float16 else torch.bfloat16, "perturb_from")
    if sigma == 0.0 and dtype == torch.float32:
        _equal(got, masters, "sigma = 0: the masters")
    per = [torch.zeros(n, dtype=dtype, device=DEVICE) for n in sizes]
    for p, m, off in zip(per, masters, offsets):
        ft.perturb_from_(p, m, SEED, BUCKET, STEP, 5, sigma, off)
    _equal(got, per, "perturb_from vs one-tensor lists")


def test_perturb_from_argument_checks():
    p, m = [torch.zeros(4, dtype=torch.bfloat16, device=DEVICE)], [torch.zeros(4, device=DEVICE)]
    with pytest.raises(ValueError, match="masters must be float32"):
        tm.perturb_from_(p, [x.double() for x in m], [0], SEED, BUCKET, STEP, 0, 0.1)
    with pytest.raises(ValueError, match="masters must match params"):
        tm.perturb_from_(p, [torch.zeros(3, device=DEVICE)], [0], SEED, BUCKET, STEP, 0, 0.1)
    with pytest.raises(ValueError, match="float64 tensors are not supported"):
        tm.perturb_from_([x.double() for x in m], m, [0], SEED, BUCKET, STEP, 0, 0.1)
    with pytest.raises(ValueError, match="tag must be in"):
        tm.perturb_from_(p, m, [0], SEED, BUCKET, STEP, -1, 0.1)


def test_misaligned_views_take_the_scalar_path():
    """Views one element into their storage: not 16-byte aligned after the frame shift,
    so ALIGNED is False; same numbers."""
    store = torch.randn(300, device=DEVICE)
    views = [store[1:50], store[60:131], store[141:142]]
    offsets = [0, 9, 3]
    per = _clone(views)
    _tb, kw = tm._frame_tables([views], offsets)
    assert kw["ALIGNED"] is False
    tm.perturb_(views, offsets, SEED, BUCKET, STEP, 1, 0.2)
    for q, off in zip(per, offsets):
        ft.perturb_(q, SEED, BUCKET, STEP, 1, 0.2, off)
    _equal(views, per, "misaligned")


def test_frame_tables():
    """The chunk table covers numel + (offset & 3) frame positions per tensor."""
    ps = [torch.zeros(n, device=DEVICE) for n in (96, 1, 0, 95)]
    tb, kw = tm._frame_tables([ps], [1, 2, 3, 4])
    assert tb.meta.cpu().tolist() == [[97, 1], [3, 2], [0, 3], [95, 4]]
    assert tb.chunks.cpu().tolist() == [[0, 0], [0, 96], [1, 0], [3, 0]]
    assert tb.ptrs.cpu().tolist() == [[t.data_ptr() for t in ps]]
    assert kw["CHUNK"] == 96 and kw["BLOCK"] == 32


# ------------------------------------------------------------------ restore + update
CONFIGS = {
    # name: (sigma, noise_std, momentum, nesterov, momentum_init, grad_scale, found_inf)
    "fsgld": (0.05, 1e-3, 0.0, False, False, None, None),
    "mom_init": (0.05, 1e-3, 0.9, False, True, None, None),
    "mom_nesterov_scaled": (0.05, 1e-3, 0.9, True, False, 4.0, 0.0),
    "sgld_mom": (0.0, 1e-3, 0.9, False, False, None, None),
    "rwp": (0.05, 0.0, 0.0, False, False, 0.5, None),
    "skipped": (0.05, 1e-3, 0.9, False, False, 2.0, 1.0),
}


def _run_rs(fn_list, params, grads, moms, offsets, cfg, per_tensor=None):
    sigma, nstd, mu, nest, init, gs, fi = cfg
    gs_t = None if gs is None else torch.tensor([gs], device=DEVICE)
    fi_t = None if fi is None else torch.tensor([fi], device=DEVICE)
    args = (gs_t, fi_t, SEED, BUCKET, STEP)
    hyper = (sigma, 0.05, 1e-3, mu, 0.1, nest, init, nstd, 0.5)
    if per_tensor is None:
        fn_list(params, grads, moms, offsets, *args, 7, *hyper)
    else:
        for t, (p, g, off) in enumerate(zip(params, grads, offsets)):
            per_tensor(p, g, None if moms is None else moms[t], *args, off, 7, *hyper)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_restore_and_step_matches_reference_and_per_tensor(dtype, name, monkeypatch):
    cfg = CONFIGS[name]
    seed = list(CONFIGS).index(name) + (10 if dtype == torch.bfloat16 else 0)
    sizes, offsets = _case(seed)
    gen = torch.Generator().manual_seed(seed)
    params, grads = _tensors(sizes, dtype, gen), _tensors(sizes, dtype, gen)
    moms = _tensors(sizes, dtype, gen, 0.1) if cfg[2] != 0.0 else None
    count = _Count(tm.restore_and_step_kernel)
    monkeypatch.setattr(tm, "restore_and_step_kernel", count)
    got = (_clone(params), _clone(moms))
    _run_rs(tm.restore_and_step_, got[0], grads, got[1], offsets, cfg)
    assert count.n == 1, "one launch per list"
    ref = (_clone(params), _clone(moms))
    _run_rs(None, ref[0], grads, ref[1], offsets, cfg, reference.restore_and_step_)
    per = (_clone(params), _clone(moms))
    _run_rs(None, per[0], grads, per[1], offsets, cfg, ft.restore_and_step_)
    _close_ref(got[0], ref[0], dtype, f"{name} theta vs reference")
    _equal(got[0], per[0], f"{name} theta vs one-tensor lists")
    if moms is not None:
        _close_ref(got[1], ref[1], dtype, f"{name} momentum vs reference")
        _equal(got[1], per[1], f"{name} momentum vs one-tensor lists")
        if cfg[6]:
            _equal(got[1], moms, f"{name}: a skipped step leaves the momentum")


def test_restore_and_step_fp64_refused_and_empty():
    sizes, offsets = [3, 0, 8], [1, 3, 5]
    p = [torch.randn(n, dtype=torch.float64, device=DEVICE) for n in sizes]
    g = [torch.randn(n, dtype=torch.float64, device=DEVICE) for n in sizes]
    want = _clone(p)
    cfg = CONFIGS["fsgld"]
    with pytest.raises(ValueError, match="float64 tensors are not supported"):
        _run_rs(tm.restore_and_step_, p, g, None, offsets, cfg)
    _equal(p, want, "fp64 untouched")
    _run_rs(tm.restore_and_step_, [], [], None, [], cfg)


SR_CONFIGS = {
    # name: (sigma, noise_std, momentum, nesterov, momentum_init, grad_scale, found_inf, tag)
    "fsgld_tag0": (0.05, 1e-3, 0.0, False, False, None, None, 0),      # eps words reused
    "fsgld_tag7": (0.05, 1e-3, 0.0, False, False, None, None, 7),      # extra tag-0 call
    "sgld_mom": (0.0, 1e-3, 0.9, False, False, None, None, 0),         # extra tag-0 call
    "rwp_nesterov": (0.05, 0.0, 0.9, True, False, 4.0, 0.0, 0),        # extra tag-32 call
    "mom_init_tag3": (0.05, 1e-3, 0.9, False, True, 0.5, None, 3),
    "plain": (0.0, 0.0, 0.0, False, False, None, None, 0),              # no noise: exact
    "plain_mom": (0.0, 0.0, 0.9, True, False, 2.0, 0.0, 0),
    "skipped": (0.05, 1e-3, 0.9, False, False, 2.0, 1.0, 0),           # found_inf: restore only
    "skipped_no_eps": (0.0, 1e-3, 0.0, False, False, None, 1.0, 0),
}


def _run_sr(fn, params, grads, moms, offsets, cfg, per_tensor):
    sigma, nstd, mu, nest, init, gs, fi, tag = cfg
    gs_t = None if gs is None else torch.tensor([gs], device=DEVICE)
    fi_t = None if fi is None else torch.tensor([fi], device=DEVICE)
    hyper = (sigma, 0.05, 1e-3, mu, 0.1, nest, init, nstd, 0.5)
    if not per_tensor:
        fn(params, grads, moms, offsets, gs_t, fi_t, SEED, BUCKET, STEP, tag, *hyper,
           stochastic_rounding=True)
    else:
        for t, (p, g, off) in enumerate(zip(params, grads, offsets)):
            fn(p, g, None if moms is None else moms[t], gs_t, fi_t, SEED, BUCKET, STEP, off, tag,
               *hyper, stochastic_rounding=True)


def _bits(ts):
    return [t.view(torch.int16) for t in ts]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(SR_CONFIGS))
def test_stochastic_rounding_in_the_list_kernel(dtype, name, monkeypatch):
    """SR inside the one launch: bit for bit the same op on one-tensor lists (same words, same
    rbits); bit for bit the reference where no noise float enters (the
    noise floats of the reference are torch's: rare 1-ulp flips otherwise)."""
    cfg = SR_CONFIGS[name]
    seed = 100 + list(SR_CONFIGS).index(name) + (20 if dtype == torch.float16 else 0)
    sizes, offsets = _case(seed)
    gen = torch.Generator().manual_seed(seed)
    params, grads = _tensors(sizes, dtype, gen, 4.0), _tensors(sizes, dtype, gen)
    moms = _tensors(sizes, dtype, gen, 0.1) if cfg[2] != 0.0 else None
    count = _Count(tm.restore_and_step_kernel)
    monkeypatch.setattr(tm, "restore_and_step_kernel", count)
    got = (_clone(params), _clone(moms))
    _run_sr(tm.restore_and_step_, got[0], grads, got[1], offsets, cfg, False)
    assert count.n == 1, "one launch per list, SR included"
    per = (_clone(params), _clone(moms))
    _run_sr(ft.restore_and_step_, per[0], grads, per[1], offsets, cfg, True)
    _equal(_bits(got[0]), _bits(per[0]), f"{name} SR theta vs one-tensor lists")
    if moms is not None:
        _equal(_bits(got[1]), _bits(per[1]), f"{name} momentum vs one-tensor lists")
    ref = (_clone(params), _clone(moms))
    _run_sr(reference.restore_and_step_, ref[0], grads, ref[1], offsets, cfg, True)
    skipped = cfg[6] == 1.0
    if cfg[0] == 0.0 and cfg[1] == 0.0 and not skipped:
        _equal(_bits(got[0]), _bits(ref[0]), f"{name} SR theta vs reference")
    else:
        # the noise floats: <= 1 ulp, rare; a skipped step's restore is round-to-nearest,
        # which the interpreter does by truncation for bf16 (a GPU rounds): <= 1 ulp there
        flips = sum(int((a != b).sum()) for a, b in zip(_bits(got[0]), _bits(ref[0])))
        if not (skipped and dtype == torch.bfloat16 and DEVICE == "cpu"):
            assert flips <= max(2, sum(sizes) // 50), f"{name}: {flips} of {sum(sizes)} differ"
        for i, (a, b) in enumerate(zip(got[0], ref[0])):
            assert _ulps(a, b) <= 1.0, f"{name}[{i}]: {_ulps(a, b)} ulps"
    if moms is not None and skipped:
        _equal(got[1], moms, f"{name}: a skipped step leaves the momentum")


def test_stochastic_rounding_rounds_stochastically():
    """The SR path is taken: a tiny update (below half an ulp) moves some bf16 elements,
    round-to-nearest would move none; exactly those of the rbits rule."""
    from fused_flat import noise

    sizes, offsets = [70, 33, 1], [3, 101, 2 ** 33 + 1]
    params = [torch.ones(n, dtype=torch.bfloat16, device=DEVICE) for n in sizes]
    grads = [torch.ones(n, dtype=torch.bfloat16, device=DEVICE) for n in sizes]
    lr = 2.0 ** -10   # 1 - lr: an eighth of a bf16 ulp below 1 (ulp 2^-8 below 1)
    got = _clone(params)
    tm.restore_and_step_(got, grads, None, offsets, None, None, SEED, BUCKET, STEP, 0, 0.0, lr,
                         0.0, 0.0, 0.0, False, False, 0.0, 1.0, stochastic_rounding=True)
    moved = 0
    for p, n, off in zip(got, sizes, offsets):
        want = noise.stochastic_round(torch.full((n,), 1.0 - lr), noise.sr_bits(
            SEED, BUCKET, STEP, off, n, DEVICE), torch.bfloat16)
        assert torch.equal(p.view(torch.int16), want.view(torch.int16))
        moved += int((p != 1.0).sum())
    assert 0 < moved < sum(sizes)


def test_stochastic_rounding_fp32_ignores_the_flag():
    sizes, offsets = [5, 9], [1, 6]
    for dtype in (torch.float32,):
        gen = torch.Generator().manual_seed(3)
        p, g = _tensors(sizes, dtype, gen), _tensors(sizes, dtype, gen)
        a, b = _clone(p), _clone(p)
        cfg = CONFIGS["fsgld"]
        sigma, nstd, mu, nest, init, _gs, _fi = cfg
        args = (None, None, SEED, BUCKET, STEP, 7, sigma, 0.05, 1e-3, mu, 0.1, nest, init, nstd, 0.5)
        tm.restore_and_step_(a, g, None, offsets, *args, stochastic_rounding=True)
        tm.restore_and_step_(b, g, None, offsets, *args)
        _equal(a, b, f"{dtype}: SR flag ignored")


# ------------------------------------------------------------------ all_finite
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite(dtype, monkeypatch):
    count = _Count(tm.all_finite_kernel)
    monkeypatch.setattr(tm, "all_finite_kernel", count)
    sizes = [1, 0, 33, 200, 7]
    ts = [torch.randn(n, device=DEVICE).to(dtype) for n in sizes]
    for _ in range(2):   # the scratch pair is left zeroed: repeatable
        out = tm.all_finite(ts)
        assert out.dtype == torch.float32 and out.shape == (1,) and out.item() == 0.0
    big = torch.full((40,), torch.finfo(dtype).max, dtype=dtype, device=DEVICE)
    assert tm.all_finite(ts + [big]).item() == 0.0
    for t_i, e, bad in ((0, 0, float("nan")), (3, 199, float("inf")), (3, 100, float("-inf")),
                        (4, 6, float("nan"))):
        bads = _clone(ts)
        bads[t_i][e] = bad
        assert tm.all_finite(bads).item() == 1.0, (t_i, e, bad)
        assert tm.all_finite(ts).item() == 0.0          # and the next call starts clean
    assert count.n == 2 + 1 + 4 * 2, "one launch per call"
    assert all(not s.any() for s in tm._scratch.values())


def test_all_finite_edge_cases():
    assert tm.all_finite([]).item() == 0.0
    assert tm.all_finite([torch.zeros(0, device=DEVICE)]).item() == 0.0
    d = [torch.tensor([1e300, 2.0], dtype=torch.float64, device=DEVICE)]
    with pytest.raises(ValueError, match="float64 tensors are not supported"):
        tm.all_finite(d)        # an fp32 cast would call 1e300 inf: fp64 is not taken
    with pytest.raises(ValueError, match="must be floating point, torch.float32"):
        tm.all_finite([torch.zeros(3, device=DEVICE), torch.zeros(2, device=DEVICE).half()])


# ------------------------------------------------------------------ backend + optimizer
def test_triton_backend_uses_the_list_ops():
    b = backends.get("triton")
    assert b.perturb_ is tm.perturb_ and b.restore_and_step_ is tm.restore_and_step_
    assert b.all_finite is tm.all_finite and b.perturb_from_ is tm.perturb_from_


def _model():
    torch.manual_seed(5)
    # 17 parameter tensors: weights, biases, BatchNorm affine pairs; sizes mostly not
    # multiples of 4, so the packed bucket offsets of the later tensors are odd-sized steps
    return torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.Tanh(),
        torch.nn.Linear(7, 9), torch.nn.BatchNorm1d(9), torch.nn.Tanh(),
        torch.nn.Linear(9, 3, bias=False), torch.nn.Linear(3, 11), torch.nn.Tanh(),
        torch.nn.Linear(11, 1), torch.nn.Linear(1, 2), torch.nn.Linear(2, 3))


def _train(backend, steps=4):
    model = _model()
    opt = FSGLD(model.parameters(), lr=0.05, beta=1e6, weight_decay=5e-4, momentum=0.9,
                seed=1234567, backend=backend)
    gen = torch.Generator().manual_seed(6)
    for _ in range(steps):
        x, y = torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    return model, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU tensors under the interpreter")
def test_fsgld_momentum_many_tensors_triton_matches_reference(monkeypatch):
    counts = {k: _Count(getattr(tm, k)) for k in ("perturb_kernel", "restore_and_step_kernel")}
    for k, c in counts.items():
        monkeypatch.setattr(tm, k, c)
    model, tri = _train("triton")
    n_tensors = len(list(model.parameters()))
    assert n_tensors == 17
    _m, ref = _train("reference")
    start = torch.cat([p.detach().reshape(-1) for p in _model().parameters()])
    assert (tri - start).abs().max() > 1e-3                # it trained
    err = ((tri - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-6, f"triton vs reference: {err:.3g}"
    # one launch per bucket per pass (one bucket here): 4 steps -> 4 perturb, 4 update
    assert counts["perturb_kernel"].n == 4 and counts["restore_and_step_kernel"].n == 4


def _compile_run(kind, compiled, graphs):
    """Four steps of FSGLD (perturb, backward, step) or SAM (first_step, second_step) with
    backend='triton' and capturable=True (counter and lr as tensors), eager or compiled."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    lr = torch.tensor(0.05)

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    comp = (lambda f: torch.compile(f, backend=backend, fullgraph=True)) if compiled else (lambda f: f)
    if kind == "fsgld":
        opt = FSGLD(m.parameters(), lr=lr, beta=1e4, momentum=0.9, seed=1, backend="triton",
                    capturable=True)
        steps = [comp(opt.step)]
    else:
        opt = SAM(m.parameters(), lr=lr, momentum=0.9, seed=1, backend="triton", capturable=True)
        steps = [comp(opt.first_step), comp(opt.second_step)]
    for _ in range(4):
        if kind == "fsgld":
            opt.perturb()
        for f in steps:
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            f()
    return [p.detach().clone() for p in m.parameters()]


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU tensors under the interpreter")
@pytest.mark.parametrize("kind", ["fsgld", "sam"])
def test_compiled_step_holds_one_node_per_pass(kind):
    """torch.compile(fullgraph=True) of the optimizer step with the Triton list ops: each pass
    is ONE node, the registered op (opaque: its tables are built when it runs), and the
    compiled steps are bitwise equal to eager."""
    import torch._dynamo as dynamo

    dynamo.reset()
    try:
        eager = _compile_run(kind, False, [])
        graphs = []
        got = _compile_run(kind, True, graphs)
    finally:
        dynamo.reset()
    for a, b in zip(eager, got):
        assert torch.equal(a, b)
    passes = ({"restore_and_step_list_"} if kind == "fsgld"
              else {"sam_grad_sq_norm_list", "sam_perturb_list_", "sam_restore_and_step_list_"})
    nodes = [str(n.target).removesuffix(".default") for gm in graphs for n in gm.graph.nodes
             if n.op == "call_function"]
    ours = [t for t in nodes if "fused_flat" in t]
    assert ours and all(t.startswith("fused_flat_triton.") for t in ours), ours
    per_graph = len(graphs) // (1 if kind == "fsgld" else 2)   # SAM: first and second step
    for name in passes:
        assert ours.count(f"fused_flat_triton.{name}") == per_graph, (name, ours)


# ------------------------------------------------------------------ the registered ops
def _opcheck_cases():
    """(op, args) per registered Triton list op: small CPU tensors (the interpreter), odd sizes
    and offsets, every optional tensor given (a device scalar each), momentum lists given."""
    from fused_flat.backends.triton import sam as tsam

    def lst(sizes, seed, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(n, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
                for n in sizes]

    sizes, offsets = [5, 33, 1], [0, 7, (1 << 33) + 2]
    p, g, m, b = lst(sizes, 1), lst(sizes, 2), lst(sizes, 3), lst(sizes, 4)
    step = torch.tensor(STEP, dtype=torch.int64, device=DEVICE)
    lr = torch.tensor(0.05, dtype=torch.float64, device=DEVICE)
    ns = torch.tensor([1e-3], dtype=torch.float64, device=DEVICE)
    gs = torch.tensor([2.0], device=DEVICE)
    fi = torch.tensor([0.0], device=DEVICE)
    coef = torch.tensor([0.25], device=DEVICE)
    hp = lst(sizes, 5, torch.bfloat16)
    noise = (SEED, BUCKET)
    return {
        "perturb_list_": (tm.PERTURB_LIST, (p, offsets, *noise, 0, step, 5, 0.3)),
        "perturb_from_list_": (tm.PERTURB_FROM_LIST, (hp, p, offsets, *noise, STEP, None, 2,
                                                      0.3)),
        "restore_and_step_list_": (tm.RESTORE_AND_STEP_LIST, (
            p, g, m, offsets, gs, fi, *noise, 0, step, 3, 0.05, 0.0, lr, 1e-3, 0.9, 0.1, True,
            False, 0.0, ns, 0.5, False)),
        "restore_and_step_list_ (sr)": (tm.RESTORE_AND_STEP_LIST, (
            hp, lst(sizes, 6, torch.bfloat16), [], offsets, None, None, *noise, STEP, None, 0,
            0.05, 0.05, None, 0.0, 0.0, 0.0, False, False, 1e-3, None, 1.0, True)),
        "all_finite_list": (tm.ALL_FINITE_LIST, (g,)),
        "sam_grad_sq_norm_list": (tsam.SQ_NORM_LIST, (g, p, 0.01)),
        "sam_perturb_list_": (tsam.PERTURB_LIST, (p, g, b, True, 0.0, coef, 0.01)),
        "sam_restore_and_step_list_": (tsam.RESTORE_AND_STEP_LIST, (
            hp, lst(sizes, 7, torch.bfloat16), lst(sizes, 8, torch.bfloat16),
            lst(sizes, 9, torch.bfloat16), gs, fi, 0.0, lr, 1e-3, 0.9, 0.1, False, False, 1.0,
            True, *noise, 0, step, offsets)),
        "sam_probe_list_": (tsam.PROBE_LIST, (p, b, offsets, *noise, 0, step, 1e-3)),
    }


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU tensors under the interpreter")
@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_registered_op_passes_opcheck(name, monkeypatch):
    """torch.library.opcheck of each registered list op (schema: the Tensor(a!)[] annotations
    name exactly the lists written; fake implementation; autograd registration; AOT dispatch
    with functionalization, i.e. what torch.compile does to the op)."""
    from fused_flat.backends.triton import sam as tsam

    monkeypatch.setattr(tsam, "BLOCK", 32)
    monkeypatch.setattr(tsam, "CHUNK", 64)
    op, args = _opcheck_cases()[name]
    assert op.namespace == "fused_flat_triton"
    torch.library.opcheck(op, args)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU tensors under the interpreter")
def test_registered_ops_bump_the_versions_of_the_lists_they_write():
    """Autograd sees the in-place writes: every tensor of a mutated list gets its version
    counter bumped (as torch's in-place ops), the read-only lists do not."""
    cases = _opcheck_cases()
    for name in ("perturb_list_", "restore_and_step_list_", "sam_perturb_list_",
                 "sam_probe_list_"):
        op, args = cases[name]
        schema = op._schema.arguments
        before = {i: [t._version for t in a] for i, a in enumerate(args)
                  if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)}
        with torch.no_grad():
            op(*args)
        for i, versions in before.items():
            bumped = [t._version > v for t, v in zip(args[i], versions)]
            written = schema[i].alias_info is not None and schema[i].alias_info.is_write
            assert bumped == [written] * len(bumped), (name, schema[i].name, bumped)
