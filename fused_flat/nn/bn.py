"""BatchNorm running statistics during perturbed forward passes.

A perturbed forward (SAM's second pass, RW-SAM's probe, fSGLD's perturbed point) must not
update BatchNorm's running_mean / running_var / num_batches_tracked: the statistics would
be those of weights that are never kept, and they would be updated twice per step
(davda54/sam #17, #80). The mechanism here changes no buffer: it switches
``track_running_stats`` off for the pass. In training mode a BatchNorm module with
``track_running_stats=False`` normalizes with the batch statistics exactly as before and
neither reads nor writes its buffers; in eval mode it still normalizes with its running
statistics, so eval behaviour is unchanged. (davda54's ``momentum = 0`` trick still
increments ``num_batches_tracked`` and breaks ``momentum=None`` cumulative averaging.)

    disable_running_stats(model); ...; enable_running_stats(model)

    with running_stats_frozen(model):      # a model, or None: every BatchNorm that runs
        loss_fn(model(x), y).backward()    # inside the block in this thread (a global hook)

Applies to every ``torch.nn.modules.batchnorm._BatchNorm`` (BatchNorm1d/2d/3d, SyncBatchNorm,
the lazy variants). Modules built with ``track_running_stats=False`` are left alone.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
from torch.nn.modules.batchnorm import _BatchNorm

_FLAG = "_fused_flat_frozen_stats"


def _freeze(m: torch.nn.Module) -> bool:
    if isinstance(m, _BatchNorm) and m.track_running_stats and not getattr(m, _FLAG, False):
        setattr(m, _FLAG, True)
        m.track_running_stats = False
        return True
    return False


def _unfreeze(m: torch.nn.Module) -> None:
    if getattr(m, _FLAG, False):
        m.track_running_stats = True
        delattr(m, _FLAG)


def _check_model(model, fn: str) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fused_flat.{fn}: expected a torch.nn.Module, got {type(model).__name__}")


def disable_running_stats(model: torch.nn.Module) -> None:
    """Stop every BatchNorm of ``model`` from updating its running statistics (until
    ``enable_running_stats``). Idempotent."""
    _check_model(model, "disable_running_stats")
    for m in model.modules():
        _freeze(m)


def enable_running_stats(model: torch.nn.Module) -> None:
    """Undo ``disable_running_stats`` (only modules it froze are switched back on)."""
    _check_model(model, "enable_running_stats")
    for m in model.modules():
        _unfreeze(m)


@contextlib.contextmanager
def running_stats_frozen(model: torch.nn.Module | None = None) -> Iterator[None]:
    """Inside the block, BatchNorm running statistics are not updated.

    ``model``: freeze that model's BatchNorm modules. ``None``: freeze every BatchNorm
    module whose forward runs inside the block *in the thread that entered it* (a global
    forward pre-hook that acts only in that thread; this is how SAM.step(closure) works
    without knowing the model). Models running forward in other threads at the same time
    keep updating their statistics. A module frozen this way stays frozen (it is module
    state) until the block exits, also if another thread runs it meanwhile; and forwards
    that run in worker threads, such as multi-GPU ``nn.DataParallel`` replicas, are not
    seen: pass the model for those. Modules already frozen by an outer block or by
    ``disable_running_stats`` stay frozen after the block.
    """
    frozen: list[torch.nn.Module] = []
    handle = None
    if model is not None:
        _check_model(model, "running_stats_frozen")
        frozen = [m for m in model.modules() if _freeze(m)]
    else:
        here = threading.local()       # attributes set here are seen by this thread only
        here.active = True

        def hook(m, args):
            if getattr(here, "active", False) and _freeze(m):
                frozen.append(m)

        handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
        for m in frozen:
            _unfreeze(m)
