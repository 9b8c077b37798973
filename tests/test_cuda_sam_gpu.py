"""GPU tests of the SAM-family CUDA list ops (fused_flat/backends/cuda_sam.py: the compiled
list ops' CUDA kernels, csrc/cuda/sam_cuda.cu) and the compiled
Triton ones (fused_flat/backends/triton/sam.py); skipped without a CUDA GPU (the host emulation
tests/test_sam_cuda_emulation.py and the static SASS checks run instead).

Oracles: fused_flat/backends/sam_reference.py tensor by tensor on the GPU (1 ulp: fp32 1e-6
relative, bf16 2^-7; the compiled Triton kernels may contract to FMA), the layout-3
probe oracle, and torch.cuda.set_sync_debug_mode("error") around warm calls: no host sync.
"""
from __future__ import annotations

import random

import pytest
import torch

from fused_flat.backends import sam_reference
from tests.noise_v3_oracle import rademacher_v3_oracle

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

RTOL = {torch.float32: 2e-6, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10,
        torch.float64: 1e-12}


def _impls():
    from fused_flat.backends import cuda_sam
    out = [cuda_sam]
    try:
        from fused_flat.backends.triton import sam as tsam
        out.append(tsam)
    except ImportError:
        pass
    return out


def _sizes(seed):
    rng = random.Random(seed)
    return [1, 0, 3, 16384, 16385, 100_000] + [rng.randint(1, 50_000) for _ in range(5)]


def _list(sizes, dtype, gen, shift=0):
    out = []
    for n in sizes:
        full = torch.randn(n + shift, generator=gen, dtype=torch.float64).to(dtype).cuda()
        out.append(full[shift:])
    return out


def _close(got, want, dtype, what):
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a.double(), b.double(), rtol=RTOL[dtype], atol=1e-7,
                                   msg=lambda m: f"{what}[{i}]: {m}")


@pytest.mark.parametrize("impl", _impls(), ids=lambda m: m.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shift", [0, 1])          # 1: misaligned views, scalar path
def test_passes_vs_reference(impl, dtype, shift):
    gen = torch.Generator().manual_seed(3)
    sizes = _sizes(shift)
    ps, gs, bs = _list(sizes, dtype, gen, shift), _list(sizes, dtype, gen, shift), _list(sizes, dtype, gen, shift)
    ms = _list(sizes, dtype, gen, shift)
    for adaptive in (False, True):
        got = impl.sam_grad_sq_norm(gs, ps if adaptive else None, 0.01)
        want = sum(float(sam_reference.sam_grad_sq_norm(g, p if adaptive else None, 0.01))
                   for g, p in zip(gs, ps))
        assert abs(float(got) - want) <= 1e-9 * want
        coef = torch.tensor(0.05, dtype=torch.float64, device="cuda") / (got.sqrt() + 1e-12)
        wp, wb = [p.clone() for p in ps], [torch.empty_like(p) for p in ps]
        for p, g, b in zip(wp, gs, wb):
            sam_reference.sam_perturb_(p, g, b, adaptive, float(coef), 0.01)
        gp, gb = [p.clone() for p in ps], [torch.empty_like(p) for p in ps]
        impl.sam_perturb_(gp, gs, gb, adaptive, coef, 0.01)
        _close(gp, wp, dtype, "perturb")
        assert all(torch.equal(a, b) for a, b in zip(gb, ps))
    gsc, fi = torch.tensor([512.0], device="cuda"), torch.tensor([0.0], device="cuda")
    for mom in (None, ms):
        wp = [p.clone() for p in ps]
        wm = None if mom is None else [m.clone() for m in mom]
        for i in range(len(sizes)):
            sam_reference.sam_restore_and_step_(wp[i], bs[i], gs[i], None if wm is None else wm[i],
                                                gsc, fi, 0.1, 5e-4, 0.9, 0.0, True, False, 1.0)
        gp = [p.clone() for p in ps]
        gm = None if mom is None else [m.clone() for m in mom]
        impl.sam_restore_and_step_(gp, bs, gs, gm, gsc, fi, 0.1, 5e-4, 0.9, 0.0, True, False, 1.0)
        _close(gp, wp, dtype, "step")
        if gm is not None:
            _close(gm, wm, dtype, "momentum")
    fi.fill_(1.0)
    gp, gm = [p.clone() for p in ps], [m.clone() for m in ms]
    impl.sam_restore_and_step_(gp, bs, gs, gm, gsc, fi, 0.1, 5e-4, 0.9, 0.0, True, False, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(gp, bs))
    assert all(torch.equal(a, b) for a, b in zip(gm, ms))
    offsets = [0, 1, 7, 2 ** 33 + 3] + [1000 * i + 1 for i in range(len(sizes) - 4)]
    gp, gb = [p.clone() for p in ps], [torch.empty_like(p) for p in ps]
    impl.sam_probe_(gp, gb, offsets, 0x1234_5678_9ABC, 3, 17, 1e-2)
    for p, b, g, n, off in zip(ps, gb, gp, sizes, offsets):
        v = rademacher_v3_oracle(0x1234_5678_9ABC, 3, 17, off, n).cuda()
        _close([g], [(p.float() + 1e-2 * v).to(dtype)], dtype, "probe")
        assert torch.equal(b, p)


@pytest.mark.parametrize("impl", _impls(), ids=lambda m: m.__name__)
def test_no_host_sync(impl):
    gen = torch.Generator().manual_seed(0)
    sizes = _sizes(0)
    ps, gs, bs, ms = (_list(sizes, torch.float32, gen) for _ in range(4))
    gsc, fi = torch.tensor([1.0], device="cuda"), torch.tensor([0.0], device="cuda")

    def step():
        n2 = impl.sam_grad_sq_norm(gs, None, 0.0)
        coef = 0.05 / (n2.sqrt() + 1e-12)
        impl.sam_perturb_(ps, gs, bs, False, coef, 0.0)
        impl.sam_restore_and_step_(ps, bs, gs, ms, gsc, fi, 0.1, 0.0, 0.9, 0.0, False, False, 1.0)
        impl.sam_probe_(ps, bs, [0] * len(ps), 1, 0, 1, 1e-3)

    step()                                   # warm the table caches and compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def test_cuda_sam_lists_past_one_launch():
    """200 tensors (more than one launch's slots) and one of more blocks than a launch holds:
    the per-tensor squared norms (one thread per tensor over its blocks' partials) and the
    passes match the reference tensor by tensor."""
    from fused_flat.backends import cuda_sam

    gen = torch.Generator().manual_seed(3)
    sizes = [int(x) for x in torch.randint(0, 50, (200,), generator=gen)] + [320 * (1 << 14) + 5]
    ps, gs, bs = (_list(sizes, torch.float32, gen) for _ in range(3))
    parts = torch.ops.fused_flat.sam_grad_sq_norm_list(gs, ps, True, 0.01)
    want = torch.stack([sam_reference.sam_grad_sq_norm(g, p, 0.01) for g, p in zip(gs, ps)])
    torch.testing.assert_close(parts, want.to(parts.dtype), rtol=1e-10, atol=0.0)
    qs = [p.clone() for p in ps]
    orig = [p.clone() for p in ps]
    cuda_sam.sam_perturb_(ps, gs, bs, True, 0.05, 0.01)
    for p, q, g, b, o in zip(ps, qs, gs, bs, orig):
        sam_reference.sam_perturb_(q, g, torch.empty_like(q), True, 0.05, 0.01)
        _close([p], [q], torch.float32, "perturb, long list")
        assert torch.equal(b, o)    # the backup is theta before the perturbation


def test_capability_check_passes_here():
    from fused_flat.backends import cuda_arch
    assert cuda_arch.check_device("cuda") in ("sass", "ptx")


# ------------------------------------------------------- device-resident per-step scalars
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("sr", [False, True])
@pytest.mark.parametrize("lr_dtype", [torch.float64, torch.float32])
def test_cuda_sam_device_scalars_equal_scalar_path(dtype, sr, lr_dtype):
    """cuda_sam: lr (float64 / float32) and the SR step (int64) of sam_restore_and_step_, and
    the step of sam_probe_, as one-element device tensors: the scalar path's results bit for
    bit (step's high bits included)."""
    from fused_flat.backends import cuda_sam

    gen = torch.Generator().manual_seed(11)
    sizes = _sizes(2)
    offsets = [1000 * i + (i % 4) for i in range(len(sizes))]
    ps, gs, bs, ms = (_list(sizes, dtype, gen, s) for s in (0, 1, 0, 1))
    gsc, fi = torch.tensor([2.0], device="cuda"), torch.tensor([0.0], device="cuda")
    step = (1 << 33) + 17
    lr_t = torch.tensor(0.1, dtype=lr_dtype, device="cuda")
    step_t = torch.tensor(step, dtype=torch.int64, device="cuda")
    a_p, a_m = [p.clone() for p in ps], [m.clone() for m in ms]
    b_p, b_m = [p.clone() for p in ps], [m.clone() for m in ms]
    cuda_sam.sam_restore_and_step_(a_p, bs, gs, a_m, gsc, fi, lr_t, 5e-4, 0.9, 0.0, True, False,
                                   1.0, sr, 0x1234_5678_9ABC, 3, step_t, offsets)
    cuda_sam.sam_restore_and_step_(b_p, bs, gs, b_m, gsc, fi, float(lr_t), 5e-4, 0.9, 0.0, True,
                                   False, 1.0, sr, 0x1234_5678_9ABC, 3, step, offsets)
    assert all(torch.equal(x.view(torch.int8), y.view(torch.int8)) for x, y in zip(a_p, b_p))
    assert all(torch.equal(x, y) for x, y in zip(a_m, b_m))
    a_b, b_b = [torch.empty_like(p) for p in ps], [torch.empty_like(p) for p in ps]
    cuda_sam.sam_probe_(a_p, a_b, offsets, 0x1234_5678_9ABC, 3, step_t, 1e-2)
    cuda_sam.sam_probe_(b_p, b_b, offsets, 0x1234_5678_9ABC, 3, step, 1e-2)
    assert all(torch.equal(x.view(torch.int8), y.view(torch.int8)) for x, y in zip(a_p, b_p))


def test_cuda_sam_graph_replay_reads_device_scalars():
    """A captured SAM restore + step (bf16, stochastic rounding) and probe, replayed with new
    lr / step values written into the device tensors, equals eager calls with those values."""
    from fused_flat.backends import cuda_sam

    gen = torch.Generator().manual_seed(12)
    sizes = _sizes(3)
    offsets = [17 * i for i in range(len(sizes))]
    ps, gs, bs, ms = (_list(sizes, torch.bfloat16, gen) for _ in range(4))
    lr_t = torch.zeros((), dtype=torch.float64, device="cuda")
    step_t = torch.zeros((), dtype=torch.int64, device="cuda")
    pb = [torch.empty_like(p) for p in ps]

    def step(lst, mom, probe_backup, lr, k):
        cuda_sam.sam_restore_and_step_(lst, bs, gs, mom, None, None, lr, 5e-4, 0.9, 0.0, False,
                                       False, 1.0, True, 5, 1, k, offsets)
        cuda_sam.sam_probe_(lst, probe_backup, offsets, 5, 1, k, 1e-2)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step(ps, ms, pb, lr_t, step_t)      # warm the table caches before capture
    torch.cuda.current_stream().wait_stream(s)
    qs, ks, qb = [p.clone() for p in ps], [m.clone() for m in ms], [torch.empty_like(p) for p in ps]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(ps, ms, pb, lr_t, step_t)
    for k, lr in ((3, 0.1), ((1 << 32) + 4, 0.05)):
        lr_t.fill_(lr)
        step_t.fill_(k)
        graph.replay()
        step(qs, ks, qb, lr, k)
        torch.cuda.synchronize()
        assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(ps, qs)), k
        assert all(torch.equal(a, b) for a, b in zip(ms, ks)), k
