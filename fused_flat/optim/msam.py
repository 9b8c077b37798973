"""m-SAM (ALGORITHMS.md §3): SAM with one perturbation per micro-batch."""
from __future__ import annotations

import torch

from fused_flat.optim.core import refuse_dcp_state_init
from fused_flat.optim.sam import SAM

def _split_batch(batch, m: int) -> list[tuple[object, int]]:
    if isinstance(batch, torch.Tensor):
        return [(t, t.shape[0]) for t in torch.split(batch, m)]
    if isinstance(batch, (tuple, list)) and batch and all(isinstance(t, torch.Tensor) for t in batch):
        n = batch[0].shape[0]
        if any(t.shape[0] != n for t in batch):
            raise ValueError(f"MSAM: the batch tensors have different sizes along dim 0 "
                             f"({[t.shape[0] for t in batch]}); they must split together")
        parts = [torch.split(t, m) for t in batch]
        return [(type(batch)(p), p[0].shape[0]) for p in zip(*parts)]
    raise TypeError(f"MSAM.step: batch must be a tensor or a tuple/list of tensors (split along "
                    f"dim 0), got {type(batch).__name__}")


class MSAM(SAM):
    r"""m-SAM: the batch is split into micro-batches of ``micro_batch_size`` samples; each
    micro-batch i gets its own :math:`e_i` from its own :math:`g_{1,i}` and its own
    :math:`g_{2,i}` at :math:`\theta + e_i`; the update uses the mean of the :math:`g_{2,i}`
    (weighted by micro-batch size when the last one is smaller, so it is the plain mean
    whenever m divides the batch).

    Under DDP, SAM's per-rank perturbation (each rank perturbs with its local gradient, the
    g2 are all-reduced) is exactly m-SAM with m = the per-device batch size.

    ``step(closure, batch)``: ``closure(micro_batch)`` computes the mean loss of the
    micro-batch (same structure as ``batch``: a tensor or a tuple/list of tensors, split
    along dim 0) and calls ``backward()``; it is called twice per micro-batch. Gradients are
    zeroed by the step; afterwards ``p.grad`` holds the mean g2. BatchNorm: the first pass of each micro-batch updates the running
    statistics (as training on that micro-batch would), the perturbed pass does not
    (``freeze_bn``). Memory: one gradient-sized accumulator beyond SAM. AMP: MSAM.step
    takes no GradScaler (the backward passes are the closure's); use bf16 autocast.
    """

    def __init__(self, params, base_optimizer: type = torch.optim.SGD, rho: float | None = None,
                 adaptive: bool = False, normalize: bool = True, *, micro_batch_size: int,
                 **kwargs):
        if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
            raise ValueError(f"MSAM: micro_batch_size must be an integer >= 1, got {micro_batch_size!r}")
        self.micro_batch_size = micro_batch_size
        super().__init__(params, base_optimizer, rho, adaptive, normalize, **kwargs)
        self._acc: dict = {}

    def step(self, closure=None, batch=None):
        """One m-SAM step over ``batch``; returns the size-weighted mean of the first-pass
        micro-batch losses (detached)."""
        if closure is None or batch is None:
            refuse_dcp_state_init("MSAM")
            if closure is None and batch is None and self._perturbed is not None:
                self.second_step()
                return None
            raise RuntimeError("MSAM.step(closure, batch): closure(micro_batch) computes the "
                               "micro-batch's loss and calls backward(); batch is a tensor or a "
                               "tuple of tensors split along dim 0")
        if self._perturbed is not None:
            raise RuntimeError("MSAM.step(closure, batch) called after first_step()")
        parts = _split_batch(batch, self.micro_batch_size)
        total = sum(n for _, n in parts)
        params = [p for g in self.param_groups for p in g["params"]]
        acc = {}
        nonfinite, found = False, None   # g1's verdicts (host; device) over the micro-batches
        loss_sum = 0.0
        try:
            for mb, n in parts:
                w = n / total
                self.zero_grad()
                with torch.enable_grad():
                    loss = closure(mb)
                loss_sum = loss_sum + w * loss.detach() if isinstance(loss, torch.Tensor) else loss_sum
                self.first_step(zero_grad=True)
                nonfinite = nonfinite or self._first_nonfinite
                first = self._first_found   # restore() below clears it
                if first is not None:
                    found = first if found is None else torch.maximum(found, first)
                with torch.enable_grad(), self._bn_context():
                    closure(mb)
                self.restore()
                with torch.no_grad():
                    for p in params:
                        if p.grad is None:
                            continue
                        if p not in acc:
                            buf = self._acc.get(p)
                            if buf is None or buf.dtype != p.grad.dtype or buf.shape != p.shape \
                                    or buf.device != p.device:
                                buf = self._acc[p] = torch.empty_like(p.grad)
                            acc[p] = buf.zero_()
                        acc[p].add_(p.grad, alpha=w)
        except BaseException:
            self.restore()
            raise
        with torch.no_grad():
            self.zero_grad()
            for p, a in acc.items():
                p.grad = a.clone() if p.grad is None else p.grad.copy_(a)
        self.buckets()
        self._perturbed = [[] for _ in self._buckets]   # nothing perturbed: second_step updates
        self._first_nonfinite = nonfinite
        self._first_found = found
        self.second_step()
        return loss_sum
