"""The multi-tensor SAM Triton kernels (fused_flat/backends/triton/sam.py) under the interpreter,
against fused_flat/backends/sam_reference.py applied tensor by tensor.

Random lists of tensor sizes (1-element tensors, empty tensors, sizes that are not a
multiple of the block, several chunks per tensor), fp32 and bf16. The interpreter runs
numpy fp32 arithmetic without FMA, so fp32 results equal the reference bit for bit where
the operation order is the same; it rounds fp32 -> bf16 by truncation (a GPU rounds to
nearest even), hence 1 bf16 ulp of tolerance on bf16 outputs.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (set by conftest) or a GPU", allow_module_level=True)
pytest.importorskip("triton")

from fused_flat.backends import sam_reference  # noqa: E402
from fused_flat.backends.triton import sam as tsam  # noqa: E402
from tests.noise_v3_oracle import rademacher_v3_oracle  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    # small blocks and chunks so that short lists exercise several chunks per tensor,
    # whole (unmasked) blocks and masked tails, within the interpreter's speed
    monkeypatch.setattr(tsam, "BLOCK", 64)
    monkeypatch.setattr(tsam, "CHUNK", 192)


def _sizes(seed):
    rng = random.Random(seed)
    base = [1, 0, 64, 191, 192, 193, 450]
    rng.shuffle(base)
    return base[:rng.randint(3, 7)] + [rng.randint(1, 300) for _ in range(rng.randint(0, 3))]


def _tensors(sizes, dtype, gen, scale=1.0):
    return [(torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)
            for n in sizes]


def _clone(ts):
    return [t.clone() for t in ts]


def _ulp(dtype):
    return {torch.float32: 0.0, torch.bfloat16: 2.0 ** -7}[dtype]


def _assert_close(got, want, dtype, what):
    for i, (a, b) in enumerate(zip(got, want)):
        if dtype == torch.float32:
            assert torch.equal(a, b), f"{what}[{i}]: max diff {(a - b).abs().max()}"
        else:
            torch.testing.assert_close(a.double(), b.double(), rtol=_ulp(dtype), atol=1e-30,
                                       msg=lambda m: f"{what}[{i}]: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("adaptive", [False, True])
def test_grad_sq_norm(dtype, seed, adaptive):
    gen = torch.Generator().manual_seed(seed)
    sizes = _sizes(seed)
    grads, params = _tensors(sizes, dtype, gen), _tensors(sizes, dtype, gen)
    eta = 0.01 if adaptive else 0.0
    got = tsam.sam_grad_sq_norm(grads, params if adaptive else None, eta)
    want = sum(sam_reference.sam_grad_sq_norm(g, p if adaptive else None, eta)
               for g, p in zip(grads, params))
    assert got.dtype == torch.float64 and got.dim() == 0 and got.device.type == DEVICE
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=torch.float64, device=DEVICE),
                               rtol=1e-12, atol=0)


def test_grad_sq_norm_empty():
    assert float(tsam.sam_grad_sq_norm([], None, 0.0)) == 0.0
    z = [torch.zeros(0, device=DEVICE)]
    assert float(tsam.sam_grad_sq_norm(z, None, 0.0)) == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("coef_kind", ["float", "tensor64", "tensor32"])
def test_perturb(dtype, adaptive, coef_kind):
    gen = torch.Generator().manual_seed(7)
    sizes = _sizes(3 + adaptive)
    params, grads = _tensors(sizes, dtype, gen), _tensors(sizes, dtype, gen)
    coef_f = 0.037
    coef = {"float": coef_f,
            "tensor64": torch.tensor([coef_f], dtype=torch.float64, device=DEVICE),
            "tensor32": torch.tensor(coef_f, dtype=torch.float32, device=DEVICE)}[coef_kind]
    eta = 0.01 if adaptive else 0.0
    want_p, want_b = _clone(params), [torch.empty_like(p) for p in params]
    for p, g, b in zip(want_p, grads, want_b):
        sam_reference.sam_perturb_(p, g, b, adaptive, coef_f, eta)
    got_b = [torch.full_like(p, float("nan")) for p in params]
    got_p = _clone(params)
    tsam.sam_perturb_(got_p, grads, got_b, adaptive, coef, eta)
    for a, b in zip(got_b, params):
        assert torch.equal(a, b), "backup must be the exact theta"
    _assert_close(got_p, want_p, dtype, "theta")


CASES = [
    dict(momentum=0.0, nesterov=False, momentum_init=False, weight_decay=0.0, dampening=0.0),
    dict(momentum=0.9, nesterov=False, momentum_init=True, weight_decay=5e-4, dampening=0.0),
    dict(momentum=0.9, nesterov=False, momentum_init=False, weight_decay=5e-4, dampening=0.1),
    dict(momentum=0.9, nesterov=True, momentum_init=False, weight_decay=1e-2, dampening=0.0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("scaler", ["none", "scale", "scale_inf"])
def test_restore_and_step(dtype, case, scaler):
    c = CASES[case]
    gen = torch.Generator().manual_seed(11 + case)
    sizes = _sizes(5 + case)
    params, backups, grads = (_tensors(sizes, dtype, gen) for _ in range(3))
    moms = _tensors(sizes, dtype, gen) if c["momentum"] else None
    gs = torch.tensor([1024.0], device=DEVICE) if scaler != "none" else None
    fi = torch.tensor([1.0 if scaler == "scale_inf" else 0.0], device=DEVICE) if scaler != "none" else None
    args = (None, c["weight_decay"], c["momentum"], c["dampening"], c["nesterov"],
            c["momentum_init"], 1.0)
    lr = 0.1
    want_p, want_m = _clone(params), (_clone(moms) if moms is not None else None)
    for i in range(len(sizes)):
        sam_reference.sam_restore_and_step_(want_p[i], backups[i], grads[i],
                                            None if moms is None else want_m[i], gs, fi, lr,
                                            *args[1:])
    got_p, got_m = _clone(params), (_clone(moms) if moms is not None else None)
    tsam.sam_restore_and_step_(got_p, backups, grads, got_m, gs, fi, lr, *args[1:])
    _assert_close(got_p, want_p, dtype, "theta")
    if moms is not None:
        _assert_close(got_m, want_m, dtype, "momentum")
    if scaler == "scale_inf":
        for a, b in zip(got_p, backups):
            assert torch.equal(a, b)
        if moms is not None:
            for a, b in zip(got_m, moms):
                assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_probe_v3(dtype):
    gen = torch.Generator().manual_seed(5)
    sizes = [1, 130, 0, 7, 257, 64]
    offsets = [0, 1, 200, 203, 2 ** 33 + 5, 1000]          # odd offsets: FSDP shards
    seed, bucket_id, step, delta = 0x1234_5678_9ABC, 3, 17, 1e-2
    params = _tensors(sizes, dtype, gen)
    backups = [torch.empty_like(p) for p in params]
    got = _clone(params)
    tsam.sam_probe_(got, backups, offsets, seed, bucket_id, step, delta)
    for p, b, g, n, off in zip(params, backups, got, sizes, offsets):
        assert torch.equal(b, p)
        v = rademacher_v3_oracle(seed, bucket_id, step, off, n).to(DEVICE)
        want = (p.float() + delta * v).to(dtype)
        _assert_close([g], [want], dtype, f"probe@{off}")
        if n > 16:
            assert 0 < int((v < 0).sum()) < n


def test_argument_errors():
    a = [torch.zeros(3, device=DEVICE)]
    with pytest.raises(ValueError):
        tsam.sam_perturb_(a, [torch.zeros(4, device=DEVICE)], _clone(a), False, 0.1, 0.0)
    with pytest.raises(ValueError):
        tsam.sam_probe_(a, _clone(a), [0, 1], 1, 0, 0, 0.1)
    with pytest.raises(ValueError):
        tsam.sam_restore_and_step_(a, _clone(a), _clone(a), None,
                                   torch.tensor([1.0], dtype=torch.float64, device=DEVICE),
                                   None, 0.1, 0, 0, 0, False, False, 1.0)
