"""FlatBucket: the parameters of one (param group, device, dtype) in one contiguous buffer.

At construction every parameter's values are copied into ``bucket.data`` and the
parameter is re-pointed (``p.data``) at its slice; its ``.grad`` becomes a view of
``bucket.grad``, into which autograd then accumulates in place. A kernel can therefore
run over the whole bucket in one pass. Element i of the bucket is the noise index of
ALGORITHMS.md §1, so the noise of a parameter does not depend on the launch.

If user code replaces ``p.data`` or ``p.grad`` (``model.zero_grad(set_to_none=True)``,
``p.grad = ...``), ``sync()`` notices at the next step, copies the values back into the
bucket, re-attaches the views and warns once. Which parameters received a gradient
since the last ``zero_grad()`` is tracked with post-accumulate-grad hooks, so a
parameter without a gradient this step is left alone as torch.optim does.
"""
from __future__ import annotations

import warnings
import weakref

import torch

def _warn_reattach(bucket: "FlatBucket", what: str) -> None:
    if not bucket.warned_reattach:
        bucket.warned_reattach = True
        warnings.warn(
            f"fused_flat: {what} was replaced outside the optimizer; it was copied back into the "
            f"optimizer's flat buffer (one extra copy per step while this continues). Use "
            f"optimizer.zero_grad() instead of model.zero_grad(set_to_none=True), and modify "
            f"parameters in place (p.data.copy_(...)) rather than assigning p.data.",
            RuntimeWarning,
            stacklevel=4,
        )


class FlatBucket:
    """One contiguous parameter buffer (``data``) and gradient buffer (``grad``)."""

    def __init__(self, params: list[torch.nn.Parameter], bucket_id: int, group_index: int):
        if not params:
            raise ValueError("FlatBucket needs at least one parameter")
        self.params = list(params)
        self.bucket_id = bucket_id
        self.group_index = group_index
        self.dtype = params[0].dtype
        self.device = params[0].device
        self.numels = [p.numel() for p in params]
        self.offsets = []
        total = 0
        for n in self.numels:
            self.offsets.append(total)
            total += n
        self.numel = total
        self.data = torch.empty(total, dtype=self.dtype, device=self.device)
        self.grad = torch.zeros(total, dtype=self.dtype, device=self.device)
        self._grad_views: list[torch.Tensor] = []
        self._data_ptrs: list[int] = []
        had_grad = [p.grad is not None for p in self.params]
        with torch.no_grad():
            for p in self.params:
                self._attach(len(self._grad_views), p, copy_grad=True)
        self.warned_reattach = False
        # received[i]: parameter i has a gradient in torch.optim's sense (``grad is not None``):
        # as before the optimizer was built, then True once autograd accumulates into it,
        # False after zero_grad(set_to_none=True) until autograd accumulates again.
        self.received = had_grad
        ref = weakref.ref(self)
        self._hooks = [h for i, p in enumerate(self.params)
                       for h in (p.register_post_accumulate_grad_hook(_make_hook(ref, i)),
                                 p.register_hook(_reject_sparse))]

    def slice(self, buf: torch.Tensor, i: int) -> torch.Tensor:
        return buf[self.offsets[i]:self.offsets[i] + self.numels[i]]

    def _attach(self, i: int, p: torch.nn.Parameter, copy_grad: bool) -> None:
        d = self.slice(self.data, i)
        d.copy_(p.detach().reshape(-1))
        gview = self.slice(self.grad, i).view_as(p)
        if copy_grad and p.grad is not None:
            if p.grad.is_sparse:
                raise ValueError("fused_flat: sparse gradients are not supported; use a dense "
                                 "embedding (sparse=False)")
            gview.copy_(p.grad)
        p.data = d.view_as(p)
        p.grad = gview
        if i < len(self._grad_views):
            self._grad_views[i] = gview
            self._data_ptrs[i] = p.data_ptr()
        else:
            self._grad_views.append(gview)
            self._data_ptrs.append(p.data_ptr())

    @torch.no_grad()
    def sync(self) -> list[bool]:
        """Re-attach replaced data/grad; return, per parameter, whether it has a gradient."""
        has = []
        for i, p in enumerate(self.params):
            if p.data_ptr() != self._data_ptrs[i] or p.dtype != self.dtype:
                if p.dtype != self.dtype or p.device != self.device or p.numel() != self.numels[i]:
                    raise RuntimeError(
                        f"fused_flat: parameter {i} of bucket {self.bucket_id} changed to "
                        f"{p.dtype}/{p.device}/{tuple(p.shape)} after the optimizer was built "
                        f"({self.dtype}/{self.device}); build the optimizer after model.to(...)")
                _warn_reattach(self, "a parameter's .data")
                g = p.grad
                self._attach(i, p, copy_grad=False)
                if g is not None and g is not self._grad_views[i]:
                    p.grad.copy_(g)
            g = p.grad
            if g is None:
                has.append(False)
                # Re-attach a zeroed view so autograd accumulates into the bucket again.
                view = self._grad_views[i]
                view.zero_()
                p.grad = view
                self.received[i] = False
            elif g is not self._grad_views[i]:
                if g.is_sparse:
                    raise ValueError("fused_flat: sparse gradients are not supported; use a dense "
                                     "embedding (sparse=False)")
                _warn_reattach(self, "a parameter's .grad")
                self._grad_views[i].copy_(g)
                p.grad = self._grad_views[i]
                has.append(True)
            else:
                has.append(self.received[i])
        return has

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.grad.zero_()
        if set_to_none:
            self.received = [False] * len(self.params)

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __del__(self):
        try:
            self.remove_hooks()
        except Exception:
            pass


def _reject_sparse(grad: torch.Tensor):
    if grad.is_sparse:
        raise ValueError("fused_flat: sparse gradients are not supported (the optimizer keeps "
                         "gradients in a dense flat buffer); use nn.Embedding(..., sparse=False)")
    return None


def _make_hook(ref, i):
    def hook(p):
        b = ref()
        if b is not None:
            b.received[i] = True
    return hook


def build_buckets(param_groups: list[dict], first_id: int = 0, group_offset: int = 0) -> list[FlatBucket]:
    """Buckets keyed by (param group, device, dtype), in parameter order; frozen
    parameters (requires_grad=False) are left out and never touched."""
    buckets = []
    for gi, group in enumerate(param_groups):
        keyed: dict[tuple, list] = {}
        for p in group["params"]:
            if not p.requires_grad:
                continue
            keyed.setdefault((str(p.device), p.dtype), []).append(p)
        for params in keyed.values():
            buckets.append(FlatBucket(params, first_id + len(buckets), group_offset + gi))
    return buckets
