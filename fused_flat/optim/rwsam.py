"""RW-SAM (papers/rw-sam-paper.txt, sec. 4; ALGORITHMS.md §3) and :func:`choose_delta`."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from fused_flat.nn.bn import running_stats_frozen
from fused_flat.optim.buckets import flat, local_copy_, round_up4
from fused_flat.optim.core import number, refuse_dcp_state_init
from fused_flat.optim.sam import SAM


class RWSAM(SAM):
    r"""Reweighted SAM (papers/rw-sam-paper.txt, sec. 4; ALGORITHMS.md §3).

    Per step k, with ``closure()`` returning the vector of per-sample losses :math:`\ell_i`
    (with the autograd graph):

    1. :math:`\ell_i(\theta)` (first forward; updates BatchNorm running statistics);
    2. one extra forward at :math:`\theta + \delta v`, v Rademacher from the noise stream
       (``seed``, bucket, k, tag 16), without autograd and with BatchNorm statistics frozen;
       :math:`\hat g_i^2 = ((\ell_i(\theta + \delta v) - \ell_i(\theta)) / \delta)^2`
       estimates :math:`\lVert\nabla \ell_i\rVert^2`;
    3. normalization (the paper normalizes before the exponential; our choice): divide by
       the batch mean, :math:`n_i = \hat g_i^2 / \mathrm{mean}_j \hat g_j^2` (scale-free, so
       ``lam`` means the same for every model and loss scale);
    4. :math:`p = \mathrm{softmax}(\lambda n)` (detached), :math:`g_1 = \nabla \sum_i p_i \ell_i`;
    5. SAM (ASAM/USAM per ``adaptive``/``normalize``) with :math:`g_2` from the ordinary mean
       loss :math:`\mathrm{mean}_i \ell_i` at :math:`\theta + e` (BatchNorm frozen).

    ``lam = 0`` gives uniform weights: exactly SAM. ``delta`` (required) is the probe size;
    pick it with :func:`choose_delta` before training. ``seed`` (in [0, 2^63)) defaults to a
    draw from torch's default generator and is saved in ``state_dict``. ``last_weights``
    holds the last step's p. The closure is called three times per step; it must not call
    backward() itself. AMP: not supported by RWSAM.step (the first backward is internal).
    """

    def __init__(self, params, base_optimizer: type = torch.optim.SGD, rho: float | None = None,
                 adaptive: bool = False, normalize: bool = True, *, delta: float, lam: float = 0.5,
                 seed: int | None = None, **kwargs):
        delta = number("delta", delta, "RWSAM")
        if not 0.0 < delta < math.inf:
            raise ValueError(f"RWSAM: invalid delta={delta} (the probe size must be finite and > 0; "
                             f"fused_flat.optim.sam.choose_delta picks one)")
        lam = number("lam", lam, "RWSAM")
        if not math.isfinite(lam):
            raise ValueError(f"RWSAM: invalid lam={lam} (must be finite; 0 gives SAM)")
        super().__init__(params, base_optimizer, rho, adaptive, normalize, seed=seed, **kwargs)
        self.delta, self.lam = delta, lam
        self.last_weights: torch.Tensor | None = None

    def _per_sample(self, closure) -> torch.Tensor:
        losses = closure()
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
            raise ValueError("RWSAM.step(closure): closure() must return the 1-D tensor of "
                             "per-sample losses (e.g. cross_entropy(..., reduction='none')), got "
                             f"{type(losses).__name__}"
                             f"{tuple(losses.shape) if isinstance(losses, torch.Tensor) else ''}")
        return losses

    def sample_weights(self, losses: torch.Tensor, probed: torch.Tensor) -> torch.Tensor:
        """p = softmax(lam * ghat^2 / mean(ghat^2)) from the losses at theta and theta + delta v."""
        dt = torch.promote_types(losses.dtype, torch.float32)
        ghat2 = ((probed.detach().to(dt) - losses.detach().to(dt)) / self.delta) ** 2
        normalized = ghat2 / ghat2.mean().clamp_min(torch.finfo(dt).tiny)
        return torch.softmax(self.lam * normalized, dim=0)

    def step(self, closure=None):
        """One RW-SAM step; ``closure()`` returns the per-sample losses. Returns their mean
        at theta (detached). The probe forward runs under the random-number state of the
        first forward (the same dropout masks), and the state afterwards is as if the probe
        had not run."""
        if closure is None:
            refuse_dcp_state_init(type(self).__name__)
            if self._perturbed is not None:
                self.second_step()
                return None
            raise RuntimeError("RWSAM.step(closure): closure() must return the per-sample losses "
                               "(1-D, with the autograd graph); RW-SAM computes both gradients")
        if self._perturbed is not None:
            raise RuntimeError("RWSAM.step(closure) called after first_step(); call second_step()")
        buckets = self.buckets()
        self.zero_grad()
        before = _rng_state()
        with torch.enable_grad():
            losses = self._per_sample(closure)
        after = _rng_state()
        with torch.no_grad():
            probed, backups = [], []   # .data: the probe is undone exactly before the first
            for bi, b in enumerate(buckets):  # forward's graph is used; autograd must not see it
                idx = [j for j, p in enumerate(b.params) if p.requires_grad and p.numel() > 0]
                ps = [b.params[j].data for j in idx]
                bk = [self._backup_of(b.params[j]) for j in idx]
                if ps:
                    self._backends[bi].sam_probe_([flat(p) for p in ps], [flat(t) for t in bk],
                                                  [b.index(j) for j in idx], self.seed,
                                                  b.bucket_id, self._step_arg(self._backends[bi]),
                                                  self.delta)
                probed += ps
                backups += bk
            try:
                _set_rng_state(before)
                with self._bn_context():
                    probe_losses = self._per_sample(closure)
            finally:
                _set_rng_state(after)
                if probed:
                    local_copy_(probed, backups)
            if probe_losses.shape != losses.shape:
                raise ValueError(f"RWSAM.step: closure() returned {tuple(probe_losses.shape)} losses at "
                                 f"the probe point but {tuple(losses.shape)} at theta")
            p = self.sample_weights(losses, probe_losses).to(losses.dtype)
        with torch.enable_grad():
            (p * losses).sum().backward()
        self.last_weights = p
        self.first_step(zero_grad=True)
        try:
            with torch.enable_grad(), self._bn_context():
                self._per_sample(closure).mean().backward()
        except BaseException:
            self.restore()
            raise
        self.second_step()
        return losses.detach().mean()


def _rng_state():
    """torch's CPU generator state and, where CUDA is initialized, every device's."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def choose_delta(model: torch.nn.Module, per_sample_loss_fn: Callable[[], torch.Tensor],
                 candidates: Sequence[float] = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5),
                 seed: int = 0) -> tuple[float, dict[float, float]]:
    r"""Pick RW-SAM's probe size delta before training, as the paper does.

    For a Rademacher direction v (noise stream, ``seed``, tag 16) the exact per-sample
    directional derivatives :math:`\nabla\ell_i \cdot v` come from autograd (double
    backward, works with BatchNorm in train mode); for each candidate the finite difference
    :math:`(\ell_i(\theta + \delta v) - \ell_i(\theta))/\delta` is compared with them. Returns
    the delta of smallest relative error :math:`\lVert fd - dd\rVert / \lVert dd\rVert` and
    all errors. BatchNorm running statistics are frozen throughout; the parameters are
    restored exactly.
    """
    from fused_flat import noise

    if not candidates or any(not (isinstance(c, (int, float)) and 0 < c < math.inf) for c in candidates):
        raise ValueError(f"choose_delta: candidates must be positive finite numbers, got {candidates!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("choose_delta: the model has no parameter with requires_grad=True")
    vs, off = [], 0
    for p in params:
        vs.append(noise.rademacher(seed, 0, 0, off, p.numel(), p.device).to(p.dtype).view_as(p))
        off += round_up4(p.numel())
    with running_stats_frozen(model):
        with torch.enable_grad():
            losses = per_sample_loss_fn()
            if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
                raise ValueError("choose_delta: per_sample_loss_fn() must return the 1-D tensor of "
                                 "per-sample losses")
            w = torch.ones_like(losses, requires_grad=True)
            grads = torch.autograd.grad((w * losses).sum(), params, create_graph=True, allow_unused=True)
            dot = sum((g * v).sum() for g, v in zip(grads, vs) if g is not None)
            exact = torch.autograd.grad(dot, w)[0].detach().double()
        base = losses.detach().double()
        saved = [p.detach().clone() for p in params]
        errors = {}
        with torch.no_grad():
            for d in candidates:
                for p, v in zip(params, vs):
                    p.add_(v, alpha=d)
                try:
                    fd = (per_sample_loss_fn().detach().double() - base) / d
                finally:
                    for p, s in zip(params, saved):
                        p.copy_(s)
                errors[float(d)] = float(torch.linalg.vector_norm(fd - exact)
                                         / torch.linalg.vector_norm(exact).clamp_min(1e-300))
    best = min(errors, key=errors.get)
    return best, errors
