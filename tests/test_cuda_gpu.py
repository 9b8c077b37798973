"""GPU tests of the compiled CUDA Langevin kernels: the CUDA implementations of the list ops
(csrc/cuda/multi_langevin.cu, launch arguments by value: csrc/cuda/list_launch.h), first
through one-tensor lists (fused_flat.backends.per_tensor of the 'cuda' backend), then over
lists of many tensors at the end.

They need an NVIDIA GPU and an extension built with CUDA; without a GPU the whole module
is skipped (the static checks of tests/test_cuda_static.py run instead).

Oracles, strongest first:
  * 'cpp' on CPU copies of the same buckets: the CUDA kernels call the same
    __host__ __device__ arithmetic (fused_flat/elementwise.h) and are compiled with
    -fmad=false, the C++ ones with -ffp-contract=off, so the results must be identical
    bit for bit, whatever path (16-byte vectors or Philox pairs) the kernel takes.
  * 'reference' (pure torch, on the GPU): libm-style log/cos/sin of torch, so agreement to
    rounding of the noise (|d eps| <= 1e-5), i.e. 1e-6 relative on fp32 values and one
    ulp on bf16/fp16 values.
  * 'triton' (compiled, not the interpreter) with the same tolerances, when importable.
"""
from __future__ import annotations

import os

import pytest
import torch

from fused_flat import backends
from tests import cpp_per_tensor as cpt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SEED = 0x1234_5678_9ABC
SIZES = [1, 3, 4097, (1 << 20) + 7]
# (offset in the bucket, storage shift of the view): shift 0/2/3 with an even first aligned
# element take the 16-byte vector path (with head elements for shift 2/3); odd offsets and
# shift 1 take the Philox-pair path.
PLACEMENTS = [(0, 0), (7, 0), (0, 1), (0, 2), (5, 3), (1 << 33, 0)]
ULP_RTOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 2.0 ** -7,
            torch.float16: 2.0 ** -10}


@pytest.fixture(scope="module")
def cuda_be():
    # the 'cuda' backend's list ops on one-tensor lists (longer lists: the end of this file);
    # raises (test error) if the extension lacks CUDA kernels
    return backends.per_tensor(backends.get("cuda"))


@pytest.fixture(scope="module")
def cpp_be():
    return backends.per_tensor(backends.get("cpp"))


def _others():
    """Backends compared with tolerance on the GPU: 'reference', and compiled 'triton'."""
    out = [backends.per_tensor(backends.get("reference"))]
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        try:
            out.append(backends.per_tensor(backends.get("triton")))
        except RuntimeError:
            pass
    return out


def _bucket(n, dtype, shift, gen, scale=1.0, base=0.0):
    """A CUDA view of n elements starting `shift` elements into its storage."""
    full = (torch.randn(n + shift, generator=gen, dtype=torch.float64) * scale + base).to(dtype)
    return full.cuda()[shift:]


def _cpu_copy(t):
    return t.detach().cpu().clone()


def _assert_identical(got_cuda, want_cpu, what):
    got = got_cuda.cpu()
    if not torch.equal(got, want_cpu):
        diff = (got.double() - want_cpu.double()).abs()
        i = int(diff.argmax())
        raise AssertionError(f"{what}: CUDA differs from the C++ CPU kernel at {int((diff > 0).sum())} "
                             f"of {got.numel()} elements; worst index {i}: {got[i].item()!r} vs "
                             f"{want_cpu[i].item()!r}")


def _assert_near(got, want, dtype, atol, what):
    torch.testing.assert_close(got.double(), want.double(), rtol=ULP_RTOL[dtype], atol=atol,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("offset,shift", PLACEMENTS)
def test_perturb_matches_cpu_and_reference(cuda_be, cpp_be, n, dtype, offset, shift):
    gen = torch.Generator().manual_seed(n + offset + shift)
    p = _bucket(n, dtype, shift, gen, base=2.0)
    p_cpu = _cpu_copy(p)
    p0 = p_cpu.clone()
    p_others = [(b, p.clone()) for b in _others()]
    sigma, step, tag = 0.05, 11, 3
    cuda_be.perturb_(p, SEED, 4, step, tag, sigma, offset)
    cpp_be.perturb_(p_cpu, SEED, 4, step, tag, sigma, offset)
    _assert_identical(p, p_cpu, f"perturb_ n={n} {dtype} offset={offset} shift={shift}")
    if n > 3:
        assert (p_cpu != p0).float().mean() > 0.5, "perturb_ left most elements unchanged"
    for b, q in p_others:
        b.perturb_(q, SEED, 4, step, tag, sigma, offset)
        # each value is theta + sigma * eps with |d eps| <= 1e-5 between backends
        _assert_near(p, q, dtype, atol=sigma * 1e-5 if dtype in (torch.float32, torch.float64) else 0.0,
                     what=f"perturb_ vs {b.name}")


def test_perturb_then_restore_returns_theta(cuda_be):
    gen = torch.Generator().manual_seed(1)
    p = _bucket((1 << 20) + 7, torch.float32, 0, gen)
    p0 = p.clone()
    cuda_be.perturb_(p, SEED, 0, 5, 0, 0.1, 0)
    moved = (p - p0).abs()
    assert moved.mean().item() > 0.05      # sigma * E|eps| = 0.1 * 0.798
    cuda_be.perturb_(p, SEED, 0, 5, 0, -0.1, 0)
    # (theta + s eps) - s eps is theta up to one rounding of each addition
    torch.testing.assert_close(p, p0, rtol=0, atol=2.0 ** -21 * (p0.abs().max().item() + 1.0))


MOMENTUM = {  # name: (has buffer, momentum, dampening, nesterov, momentum_init)
    "none": (False, 0.0, 0.0, False, False),
    "init": (True, 0.9, 0.0, False, True),
    "heavy_ball": (True, 0.9, 0.1, False, False),
    "nesterov": (True, 0.9, 0.0, True, False),
}
NOISE = {  # name: (sigma, noise_std)
    "fsgld": (0.03, 0.02),
    "rwp": (0.03, 0.0),
    "sgld": (0.0, 0.02),
    "sgd": (0.0, 0.0),
}


def _step_inputs(n, dtype, shift, mom, seed):
    gen = torch.Generator().manual_seed(seed)
    p = _bucket(n, dtype, shift, gen, base=1.0)
    g = _bucket(n, dtype, shift, gen)
    m = _bucket(n, dtype, shift, gen) if MOMENTUM[mom][0] else None
    return p, g, m


def _run_step(be, p, g, m, gs, fi, offset, restore_tag, mom, noise, step=9, grad_mult=0.5):
    _, mu, damp, nest, init = MOMENTUM[mom]
    sigma, noise_std = NOISE[noise]
    be.restore_and_step_(p, g, m, gs, fi, SEED, 2, step, offset, restore_tag, sigma, 0.1, 5e-4,
                         mu, damp, nest, init, noise_std, grad_mult)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("mom", list(MOMENTUM))
@pytest.mark.parametrize("noise", list(NOISE))
@pytest.mark.parametrize("offset,shift", [(0, 0), (7, 0), (0, 1), (5, 3)])
def test_restore_and_step_matches_cpu(cuda_be, cpp_be, n, dtype, mom, noise, offset, shift):
    if n == SIZES[-1] and dtype != torch.float32 and (mom, noise) != ("heavy_ball", "fsgld"):
        pytest.skip("large size: fp32 everywhere, other dtypes on one configuration")
    p, g, m = _step_inputs(n, dtype, shift, mom, n + offset)
    pc, gc, mc = _cpu_copy(p), _cpu_copy(g), (_cpu_copy(m) if m is not None else None)
    p0 = pc.clone()
    for restore_tag in (0, 2):
        _run_step(cuda_be, p, g, m, None, None, offset, restore_tag, mom, noise)
        _run_step(cpp_be, pc, gc, mc, None, None, offset, restore_tag, mom, noise)
    what = f"restore_and_step_ n={n} {dtype} {mom} {noise} offset={offset} shift={shift}"
    _assert_identical(p, pc, what + " (param)")
    if m is not None:
        _assert_identical(m, mc, what + " (momentum)")
    assert not torch.equal(pc, p0)
    _assert_identical(g, gc, what + " (grad is read-only)")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mom", ["none", "heavy_ball", "nesterov"])
@pytest.mark.parametrize("offset,shift", [(0, 0), (7, 0), (5, 3)])
def test_restore_and_step_matches_reference(cuda_be, n, dtype, mom, offset, shift):
    p, g, m = _step_inputs(n, dtype, shift, mom, 3 * n + offset)
    runs = [(b, p.clone(), g.clone(), m.clone() if m is not None else None) for b in _others()]
    _run_step(cuda_be, p, g, m, None, None, offset, 1, mom, "fsgld")
    sigma, noise_std = NOISE["fsgld"]
    for b, q, h, k in runs:
        _run_step(b, q, h, k, None, None, offset, 1, mom, "fsgld")
        exact = dtype == torch.float32
        _assert_near(p, q, dtype, atol=(sigma + noise_std) * 1e-5 if exact else 0.0,
                     what=f"param vs {b.name}")
        if m is not None:
            _assert_near(m, k, dtype, atol=1e-6 if exact else 0.0, what=f"momentum vs {b.name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset,shift", [(0, 0), (7, 0), (5, 3)])
def test_found_inf_skips_update_and_restores(cuda_be, cpp_be, dtype, offset, shift):
    n = 4097
    p, g, m = _step_inputs(n, dtype, shift, "heavy_ball", 17)
    sigma = NOISE["fsgld"][0]
    p0, m0 = p.clone(), m.clone()
    cuda_be.perturb_(p, SEED, 2, 9, 1, sigma, offset)
    pc, gc, mc = _cpu_copy(p), _cpu_copy(g), _cpu_copy(m)
    g[n // 2] = float("inf")
    gc[n // 2] = float("inf")
    fi = torch.ones(1, device="cuda")
    _run_step(cuda_be, p, g, m, None, fi, offset, 1, "heavy_ball", "fsgld")
    _run_step(cpp_be, pc, gc, mc, None, fi.cpu(), offset, 1, "heavy_ball", "fsgld")
    assert torch.equal(m, m0), "momentum must be untouched on a skipped step"
    _assert_identical(p, pc, "skipped step (param)")
    assert torch.isfinite(p).all()
    # restored: theta to within the rounding of (theta + s eps) - s eps
    tol = 2.0 ** -21 if dtype == torch.float32 else 2.0 ** -7
    torch.testing.assert_close(p.double(), p0.double(), rtol=2 * tol, atol=sigma * tol * 8)
    # found_inf = 0 is an ordinary step
    fz = torch.zeros(1, device="cuda")
    q, h, k = p0.clone(), torch.randn_like(p0), m0.clone()
    qc, hc, kc = _cpu_copy(q), _cpu_copy(h), _cpu_copy(k)
    _run_step(cuda_be, q, h, k, None, fz, offset, 1, "heavy_ball", "fsgld")
    _run_step(cpp_be, qc, hc, kc, None, fz.cpu(), offset, 1, "heavy_ball", "fsgld")
    _assert_identical(q, qc, "found_inf=0 (param)")
    _assert_identical(k, kc, "found_inf=0 (momentum)")
    assert not torch.equal(k, m0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_scale_divides_gradient(cuda_be, cpp_be, dtype):
    n = (1 << 20) + 7
    p, g, m = _step_inputs(n, dtype, 0, "heavy_ball", 23)
    scale = 1024.0
    gs = torch.full((1,), scale, device="cuda")
    fi = torch.zeros(1, device="cuda")
    q, k = p.clone(), m.clone()
    pc, gc, mc = _cpu_copy(p), _cpu_copy(g), _cpu_copy(m)
    _run_step(cuda_be, p, g * scale, m, gs, fi, 0, 0, "heavy_ball", "fsgld")
    _run_step(cpp_be, pc, gc * scale, mc, gs.cpu(), fi.cpu(), 0, 0, "heavy_ball", "fsgld")
    _assert_identical(p, pc, "grad_scale (param)")
    _assert_identical(m, mc, "grad_scale (momentum)")
    # the same as an unscaled gradient: scale is a power of two, so g * s / s == g exactly
    _run_step(cuda_be, q, g, k, None, None, 0, 0, "heavy_ball", "fsgld")
    assert torch.equal(p, q) and torch.equal(m, k)


def test_no_host_synchronisation(cuda_be):
    """grad_scale and found_inf are read inside the kernel: the op never syncs the host."""
    p, g, m = _step_inputs(4097, torch.float32, 0, "heavy_ball", 29)
    gs = torch.full((1,), 2.0, device="cuda")
    fi = torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cuda_be.perturb_(p, SEED, 2, 9, 0, 0.03, 0)
        _run_step(cuda_be, p, g, m, gs, fi, 0, 0, "heavy_ball", "fsgld")
    finally:
        torch.cuda.set_sync_debug_mode(prev)


def test_cuda_graph_capture(cuda_be):
    """No host sync and no allocation: the ops can be captured in a CUDA graph and replayed."""
    p, g, m = _step_inputs(4097, torch.float32, 0, "heavy_ball", 31)
    fi = torch.zeros(1, device="cuda")
    q, k = p.clone(), m.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda_be.perturb_(p, SEED, 2, 9, 0, 0.03, 0)
        _run_step(cuda_be, p, g, m, None, fi, 0, 0, "heavy_ball", "fsgld")
    assert torch.equal(p, q), "capture must not execute the kernels"
    graph.replay()
    torch.cuda.synchronize()
    cuda_be.perturb_(q, SEED, 2, 9, 0, 0.03, 0)
    _run_step(cuda_be, q, g, k, None, fi, 0, 0, "heavy_ball", "fsgld")
    assert torch.equal(p, q) and torch.equal(m, k)


def test_empty_bucket_is_a_no_op(cuda_be):
    p = torch.empty(0, device="cuda")
    cuda_be.perturb_(p, SEED, 0, 0, 0, 1.0, 3)
    _run_step(cuda_be, p, p.clone(), p.clone(), None, None, 3, 0, "heavy_ball", "fsgld")
    torch.cuda.synchronize()


def test_rejects_cpu_grad(cuda_be):
    p = torch.zeros(8, device="cuda")
    with pytest.raises(ValueError, match=r"grads\[0\] is torch.float32 on cpu"):
        _run_step(cuda_be, p, torch.zeros(8), None, None, None, 0, 0, "none", "fsgld")


def _model(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)).to(device)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fsgld_optimizer_cuda_vs_reference(momentum):
    from fused_flat import FSGLD

    x = torch.randn(128, 32, generator=torch.Generator().manual_seed(5)).cuda()
    y = torch.randint(0, 4, (128,), generator=torch.Generator().manual_seed(6)).cuda()
    models, opts = [], []
    for be in ("cuda", "reference"):
        model = _model("cuda")
        models.append(model)
        opts.append(FSGLD(model.parameters(), lr=0.1, beta=1e4, momentum=momentum,
                          weight_decay=5e-4, seed=99, backend=be))
    init = [p.detach().clone() for p in models[0].parameters()]
    for _ in range(10):
        for model, opt in zip(models, opts):
            def closure(model=model, opt=opt):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss
            opt.step(closure)
    moved = max((p.detach() - p0).abs().max().item() for p, p0 in zip(models[0].parameters(), init))
    assert moved > 1e-2
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ multi-tensor (issue 12)
def _multi_case(dtype, seed):
    """A list of shifted CUDA views (1-element, odd, >1 chunk sizes) with odd / even / huge
    bucket offsets, and its CPU copies."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [1, 3, 4097, 70000, 5, 16384, 2]
    offsets = [0, 7, 13, 1 << 33, 4100, 2 ** 20 + 1, 6]
    shifts = [0, 1, 2, 3, 0, 3, 1]
    return sizes, offsets, [_bucket(n, dtype, sh, gen, base=1.0) for n, sh in zip(sizes, shifts)]


def _multi_step_inputs(ps, sizes, dtype, mom, fi, seed, shifts):
    """The rest of a restore_and_step_ case for _multi_case's tensors ps: gradients and (when
    the MOMENTUM case has them) momentum buffers, views shifts[0] / shifts[1] elements into
    their storage; a grad scale of 4 and found_inf (None or [fi]) on the GPU; and CPU copies
    of (ps, gradients, momentum buffers)."""
    gen = torch.Generator().manual_seed(seed)
    gs = [_bucket(n, dtype, shifts[0], gen) for n in sizes]
    ms = [_bucket(n, dtype, shifts[1], gen) for n in sizes] if MOMENTUM[mom][0] else None
    gs_t = torch.tensor([4.0], device="cuda")
    fi_t = None if fi is None else torch.tensor([fi], device="cuda")
    cpu = tuple(None if ts is None else [_cpu_copy(t) for t in ts] for ts in (ps, gs, ms))
    return gs, ms, gs_t, fi_t, cpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_multi_perturb_matches_cpu(cpp_be, dtype):
    from fused_flat.backends import cuda as cuda_multi

    sizes, offsets, ps = _multi_case(dtype, 1)
    cpu = [_cpu_copy(p) for p in ps]
    cuda_multi.perturb_(ps, offsets, SEED, 4, 9, 2, 0.05)
    for p, q, off in zip(ps, cpu, offsets):
        cpp_be.perturb_(q, SEED, 4, 9, 2, 0.05, off)
        _assert_identical(p, q, f"perturb_list_ {dtype} n={q.numel()} offset={off}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_lists_past_one_launch_match_cpu(cpp_be, dtype):
    """More tensors than one launch's slots (200 > 80) and one tensor of more blocks than one
    launch holds (320 x 2^14 elements): several by-value launches, the CPU op's bits, and
    all_finite sees an inf in the last launch."""
    from fused_flat.backends import cuda as cuda_multi

    gen = torch.Generator().manual_seed(12)
    sizes = [int(x) for x in torch.randint(0, 40, (200,), generator=gen)] + [320 * (1 << 14) + 9, 3]
    offsets, acc = [], 5
    for n in sizes:
        offsets.append(acc)
        acc += n + 1
    ps = [_bucket(n, dtype, 0, gen, base=1.0) for n in sizes]
    gs = [_bucket(n, dtype, 0, gen) for n in sizes]
    cpu = [_cpu_copy(p) for p in ps]
    cuda_multi.perturb_(ps, offsets, SEED, 4, 9, 2, 0.05)
    cuda_multi.restore_and_step_(ps, gs, None, offsets, None, None, SEED, 4, 9, 2, 0.05, 0.1, 0.0,
                                 0.0, 0.0, False, False, 1e-3, 1.0)
    for t, (q, off) in enumerate(zip(cpu, offsets)):
        cpp_be.perturb_(q, SEED, 4, 9, 2, 0.05, off)
        cpp_be.restore_and_step_(q, _cpu_copy(gs[t]), None, None, None, SEED, 4, 9, off, 2, 0.05,
                                 0.1, 0.0, 0.0, 0.0, False, False, 1e-3, 1.0)
        _assert_identical(ps[t], q, f"long list t={t} n={q.numel()} {dtype}")
    assert cuda_multi.all_finite(gs).item() == 0.0
    gs[-1][2] = float("inf")
    assert cuda_multi.all_finite(gs).item() == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("mom", list(MOMENTUM))
@pytest.mark.parametrize("noise", list(NOISE))
@pytest.mark.parametrize("fi", [None, 0.0, 1.0])
def test_multi_restore_and_step_matches_cpu(cpp_be, dtype, mom, noise, fi):
    from fused_flat.backends import cuda as cuda_multi

    sizes, offsets, ps = _multi_case(dtype, 2)
    gs, ms, gs_t, fi_t, cpu = _multi_step_inputs(ps, sizes, dtype, mom, fi, 3, (0, 1))
    _, mu, damp, nest, init = MOMENTUM[mom]
    sigma, noise_std = NOISE[noise]
    cuda_multi.restore_and_step_(ps, gs, ms, offsets, gs_t, fi_t, SEED, 2, 9, 1, sigma, 0.1, 5e-4,
                                 mu, damp, nest, init, noise_std, 0.5)
    for t, off in enumerate(offsets):
        cpp_be.restore_and_step_(cpu[0][t], cpu[1][t], None if ms is None else cpu[2][t],
                                 gs_t.cpu(), None if fi is None else fi_t.cpu(), SEED, 2, 9, off, 1,
                                 sigma, 0.1, 5e-4, mu, damp, nest, init, noise_std, 0.5)
        _assert_identical(ps[t], cpu[0][t], f"restore_and_step_list_ theta t={t} {dtype}")
        if ms is not None:
            _assert_identical(ms[t], cpu[2][t], f"restore_and_step_list_ m t={t} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_multi_all_finite(dtype):
    from fused_flat.backends import cuda as cuda_multi

    ts = [torch.randn(n, device="cuda").to(dtype) for n in (1, 70000, 0, 33)]
    for _ in range(3):
        assert cuda_multi.all_finite(ts).item() == 0.0
    for t_i, e, bad in ((0, 0, float("nan")), (1, 69999, float("inf")), (3, 5, float("-inf"))):
        bads = [t.clone() for t in ts]
        bads[t_i][e] = bad
        assert cuda_multi.all_finite(bads).item() == 1.0
        assert cuda_multi.all_finite(ts).item() == 0.0


def test_multi_no_host_sync_and_graph_capture():
    from fused_flat.backends import cuda as cuda_multi

    sizes, offsets, ps = _multi_case(torch.float32, 4)
    gs = [torch.randn_like(p) for p in ps]
    fi = cuda_multi.all_finite(gs)        # load the kernels
    cuda_multi.perturb_(ps, offsets, SEED, 2, 9, 0, 0.03)
    cuda_multi.restore_and_step_(ps, gs, None, offsets, None, fi, SEED, 2, 9, 0, 0.03, 0.1, 0.0,
                                 0.0, 0.0, False, False, 1e-3, 1.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fi = cuda_multi.all_finite(gs)
        cuda_multi.perturb_(ps, offsets, SEED, 2, 10, 0, 0.03)
        cuda_multi.restore_and_step_(ps, gs, None, offsets, None, fi, SEED, 2, 10, 0, 0.03, 0.1,
                                     0.0, 0.0, 0.0, False, False, 1e-3, 1.0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    qs = [p.clone() for p in ps]
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        with torch.cuda.graph(g, stream=s):   # by-value launch arguments: nothing to warm up
            fi2 = cuda_multi.all_finite(gs)
            cuda_multi.perturb_(ps, offsets, SEED, 2, 11, 0, 0.03)
    g.replay()
    torch.cuda.synchronize()
    for q, off in zip(qs, offsets):
        cuda_multi.perturb_([q], [off], SEED, 2, 11, 0, 0.03)
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
    assert fi2.item() == 0.0


# ------------------------------------------------------- multi-tensor stochastic rounding
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mom", list(MOMENTUM))
@pytest.mark.parametrize("noise", list(NOISE))
@pytest.mark.parametrize("fi", [None, 0.0, 1.0])
@pytest.mark.parametrize("restore_tag", [0, 1])
def test_multi_sr_matches_per_tensor_sr_and_cpu(dtype, mom, noise, fi, restore_tag):
    """restore_and_step_list_ with stochastic_rounding on CUDA: one launch, bit for bit the
    same list op on one-tensor lists and the C++ CPU op."""
    from fused_flat.backends import cuda as cuda_multi

    sizes, offsets, ps = _multi_case(dtype, 5)
    gs, ms, gs_t, fi_t, cpu = _multi_step_inputs(ps, sizes, dtype, mom, fi, 6, (2, 3))
    _, mu, damp, nest, init = MOMENTUM[mom]
    sigma, noise_std = NOISE[noise]
    per = ([p.clone() for p in ps], None if ms is None else [m.clone() for m in ms])
    args = (SEED, 2, 9)
    hyper = (restore_tag, sigma, 0.1, 5e-4, mu, damp, nest, init, noise_std, 0.5)
    cuda_multi.restore_and_step_(ps, gs, ms, offsets, gs_t, fi_t, *args, *hyper,
                                 stochastic_rounding=True)
    for t, off in enumerate(offsets):
        m_t = None if ms is None else per[1][t]
        cuda_multi.restore_and_step_([per[0][t]], [gs[t]], None if m_t is None else [m_t], [off],
                                     gs_t, fi_t, *args, *hyper, stochastic_rounding=True)
        cpt.restore_and_step_(cpu[0][t], cpu[1][t], None if ms is None else cpu[2][t], gs_t.cpu(),
                              None if fi is None else fi_t.cpu(), *args, off, *hyper, True)
        what = f"SR multi t={t} {dtype} {mom} {noise} fi={fi} tag={restore_tag}"
        _assert_identical(ps[t], per[0][t].cpu(), what + " vs a one-tensor list")
        _assert_identical(ps[t], cpu[0][t], what + " vs C++ CPU op")
        if ms is not None:
            _assert_identical(ms[t], per[1][t].cpu(), what + " (m) vs per-tensor")
            _assert_identical(ms[t], cpu[2][t], what + " (m) vs C++")


def test_multi_sr_is_ignored_for_fp32():
    from fused_flat.backends import cuda as cuda_multi

    sizes, offsets, ps = _multi_case(torch.float32, 8)
    gs = [torch.randn_like(p) for p in ps]
    qs = [p.clone() for p in ps]
    for lst, sr in ((ps, True), (qs, False)):
        cuda_multi.restore_and_step_(lst, gs, None, offsets, None, None, SEED, 2, 9, 0, 0.03, 0.1,
                                     0.0, 0.0, 0.0, False, False, 1e-3, 1.0, sr)
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))


# ------------------------------------------------------- device-resident per-step scalars
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("sr", [False, True])
@pytest.mark.parametrize("sdtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("noise", ["fsgld", "sgd"])
def test_multi_device_scalars_equal_scalar_path(dtype, sr, sdtype, noise):
    """step (int64), lr and noise_std (float64 / float32) as one-element device tensors give
    the scalar path's results bit for bit (and the C++ CPU op's), step's high bits included."""
    from fused_flat.backends import cuda as cuda_multi

    sizes, offsets, ps = _multi_case(dtype, 6)
    gen = torch.Generator().manual_seed(9)
    gs = [_bucket(n, dtype, 1, gen) for n in sizes]
    ms = [_bucket(n, dtype, 0, gen) for n in sizes]
    step = (1 << 33) + 9
    sigma, ns = NOISE[noise]
    step_t = torch.tensor(step, dtype=torch.int64, device="cuda")
    lr_t = torch.tensor(0.1, dtype=sdtype, device="cuda")
    ns_t = torch.tensor(ns, dtype=sdtype, device="cuda")   # 0.0 for 'sgd': xi drawn, times 0
    lr, ns = float(lr_t), float(ns_t)
    qs, ks = [p.clone() for p in ps], [m.clone() for m in ms]
    cpu = ([_cpu_copy(p) for p in ps], [_cpu_copy(g) for g in gs], [_cpu_copy(m) for m in ms])
    cuda_multi.perturb_(ps, offsets, SEED, 2, step_t, 1, 0.03)
    cuda_multi.restore_and_step_(ps, gs, ms, offsets, None, None, SEED, 2, step_t, 1, sigma, lr_t,
                                 5e-4, 0.9, 0.1, False, False, ns_t, 0.5, sr)
    cuda_multi.perturb_(qs, offsets, SEED, 2, step, 1, 0.03)
    cuda_multi.restore_and_step_(qs, gs, ks, offsets, None, None, SEED, 2, step, 1, sigma, lr,
                                 5e-4, 0.9, 0.1, False, False, ns, 0.5, sr)
    for t, off in enumerate(offsets):
        what = f"device scalars t={t} {dtype} sr={sr} {sdtype} {noise}"
        _assert_identical(ps[t], qs[t].cpu(), what + " vs scalar path")
        _assert_identical(ms[t], ks[t].cpu(), what + " (m) vs scalar path")
        cpt.perturb_(cpu[0][t], SEED, 2, step, 1, 0.03, off)
        cpt.restore_and_step_(cpu[0][t], cpu[1][t], cpu[2][t], None, None, SEED, 2, step, off, 1,
                              sigma, lr, 5e-4, 0.9, 0.1, False, False, ns, 0.5, sr)
        _assert_identical(ps[t], cpu[0][t], what + " vs C++ CPU op")


def test_multi_graph_replay_reads_device_scalars():
    """One captured perturb + restore/step replayed with new step / lr / noise_std values
    written into the device tensors equals eager calls with those values."""
    import math

    from fused_flat.backends import cuda as cuda_multi

    sizes, offsets, ps = _multi_case(torch.float32, 7)
    gs = [torch.randn_like(p) for p in ps]
    ms = [torch.zeros_like(p) for p in ps]
    step_t = torch.zeros((), dtype=torch.int64, device="cuda")
    lr_t = torch.zeros((), dtype=torch.float64, device="cuda")
    ns_t = torch.zeros((), dtype=torch.float64, device="cuda")

    def step(lst, mom, k, lr, ns):
        cuda_multi.perturb_(lst, offsets, SEED, 2, k, 0, 0.03)
        cuda_multi.restore_and_step_(lst, gs, mom, offsets, None, None, SEED, 2, k, 0, 0.03, lr,
                                     5e-4, 0.9, 0.0, False, False, ns, 1.0)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step(ps, ms, step_t, lr_t, ns_t)       # warm the table caches before capture
    torch.cuda.current_stream().wait_stream(s)
    qs, ks = [p.clone() for p in ps], [m.clone() for m in ms]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(ps, ms, step_t, lr_t, ns_t)
    for k, lr in ((5, 0.1), (6, 0.05), ((1 << 32) + 7, 0.02)):
        ns = math.sqrt(2 * lr / 1e4)
        step_t.fill_(k)
        lr_t.fill_(lr)
        ns_t.fill_(ns)
        graph.replay()
        step(qs, ks, k, lr, ns)
        torch.cuda.synchronize()
        assert all(torch.equal(p, q) for p, q in zip(ps, qs)), k
        assert all(torch.equal(m, q) for m, q in zip(ms, ks)), k


def test_list_ops_refuse_a_layout_on_cuda():
    """layout= (a CPU step plan) is CPU-only: the CUDA kernels say so."""
    p, g = torch.zeros(8, device="cuda"), torch.zeros(8, device="cuda")
    layout = torch.ops.fused_flat.plan_layout([torch.zeros(8)])
    with pytest.raises(ValueError, match="layout= .a step plan. is CPU-only"):
        torch.ops.fused_flat.perturb_list_([p], [0], 1, 0, 0, 0, 0.1, layout)
    with pytest.raises(ValueError, match="CPU-only"):
        torch.ops.fused_flat.sam_perturb_list_([p], [g], [g.clone()], False, 0.1, 0.0, layout)
