"""torch.distributed helpers: checkpoints with torch.distributed.checkpoint (DCP).

The optimizers need nothing from this module to run under DDP or FSDP2 (see the README,
"Multi-GPU and multi-node"): the noise is a pure function of (seed, bucket, step, tag,
element index), the seed is rank 0's (broadcast once at construction), and a sharded
parameter's elements keep their index in the unsharded bucket. This module saves and
loads model + optimizer with DCP so that a resumed run is bit-identical:

    from fused_flat.distributed import save_checkpoint, load_checkpoint
    save_checkpoint("ckpt/step_5", model, opt)           # every rank calls it
    ...
    model, opt = build()                                 # fresh, same structure and world
    load_checkpoint("ckpt/step_5", model, opt)           # every rank calls it

What is saved: ``{"model": model.state_dict(), "optim": optim_state_dict(model, opt)}``,
the optimizer's state keyed by parameter name (FQN) instead of torch.optim's integer ids:
``{"state": {fqn: {"momentum_buffer": DTensor or tensor}}, "param_groups": [...],
"fused_flat": {"seed", "step", ...}}`` -- the 'fused_flat' entry (the noise seed and step
counter) is what makes the resume bit-exact.

Why not ``torch.distributed.checkpoint.state_dict.get_state_dict`` / ``set_state_dict``:
on an optimizer without state (a fresh one, or SGLD/FSGLD/RWP/SAM without momentum, which
keep no per-parameter state) they call ``optimizer.step()`` with zero gradients to create
the state. FSGLD/RWP raise there (a step without a closure needs ``perturb()`` first), SAM
raises (it needs a closure), and SGLD would take a real step (the step counter advances, so
the noise stream shifts). Use these helpers instead. They load only the momentum buffers
that the checkpoint has (a parameter without one keeps torch.optim.SGD's "first step
sets the buffer" rule), so no state has to be created up front.
"""
from __future__ import annotations

import torch

__all__ = ["optim_state_dict", "load_optim_state_dict", "save_checkpoint", "load_checkpoint"]


def _names(model: torch.nn.Module) -> dict:
    """{parameter object: its FQN in model.named_parameters()}."""
    return {p: n for n, p in model.named_parameters(remove_duplicate=True)}


def optim_state_dict(model: torch.nn.Module, optimizer) -> dict:
    """``optimizer.state_dict()`` (fused_flat format, 'fused_flat' entry included) with the
    parameters named by their FQN in ``model``; tensors stay as they are (DTensor momentum
    of an FSDP2 model stays sharded), so DCP saves each rank's shard."""
    names = _names(model)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    missing = [i for i, p in enumerate(params) if p not in names]
    if missing:
        raise ValueError(f"optim_state_dict: {len(missing)} parameter(s) of the optimizer are not "
                         f"parameters of the model (first: position {missing[0]}); pass the model "
                         f"whose parameters the optimizer updates (the FSDP2/DDP-wrapped one)")
    sd = optimizer.state_dict()
    fqn_of_id = {}
    i = 0
    for g in sd["param_groups"]:
        for pid in g["params"]:
            fqn_of_id[pid] = names[params[i]]
            i += 1
    out = {k: v for k, v in sd.items() if k not in ("state", "param_groups")}
    out["state"] = {fqn_of_id[pid]: dict(st) for pid, st in sd["state"].items()}
    out["param_groups"] = [dict(g, params=[fqn_of_id[pid] for pid in g["params"]])
                           for g in sd["param_groups"]]
    return out


def load_optim_state_dict(model: torch.nn.Module, optimizer, osd: dict) -> None:
    """Inverse of :func:`optim_state_dict`: map the FQNs back to this optimizer's parameter
    ids and call ``optimizer.load_state_dict``."""
    names = _names(model)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    id_of_fqn = {names[p]: i for i, p in enumerate(params) if p in names}
    unknown = [n for g in osd["param_groups"] for n in g["params"] if n not in id_of_fqn]
    if unknown:
        raise ValueError(f"load_optim_state_dict: the checkpoint names parameters this optimizer "
                         f"does not have (first: {unknown[0]!r}); it comes from a different model")
    sd = {k: v for k, v in osd.items() if k not in ("state", "param_groups")}
    sd["state"] = {id_of_fqn[n]: st for n, st in osd["state"].items()}
    sd["param_groups"] = [dict(g, params=[id_of_fqn[n] for n in g["params"]])
                          for g in osd["param_groups"]]
    optimizer.load_state_dict(sd)


def save_checkpoint(checkpoint_id, model: torch.nn.Module, optimizer, extra: dict | None = None,
                    **dcp_kwargs) -> None:
    """Save model and optimizer with ``torch.distributed.checkpoint.save`` (every rank
    calls it; each writes its own shards). ``extra``: more entries saved alongside (e.g.
    {"epoch": 3}); ``dcp_kwargs`` go to ``dcp.save`` (storage_writer, process_group, ...)."""
    import torch.distributed.checkpoint as dcp

    if getattr(optimizer, "_is_perturbed", lambda: False)():
        raise RuntimeError("save_checkpoint: the weights are perturbed; save between steps")
    state = {"model": model.state_dict(), "optim": optim_state_dict(model, optimizer)}
    if extra:
        state["extra"] = dict(extra)
    dcp.save(state, checkpoint_id=checkpoint_id, **dcp_kwargs)


def load_checkpoint(checkpoint_id, model: torch.nn.Module, optimizer, extra: dict | None = None,
                    **dcp_kwargs) -> dict | None:
    """Load what :func:`save_checkpoint` wrote into ``model`` (in place, DTensor shards
    included) and ``optimizer`` (momentum, hyperparameters, seed and step counter): the run
    continues bit-identically. The model and optimizer must be built as for the saved run
    (same structure, world size and sharding), before any step. ``extra``: a template of the
    extra entries (same keys) to load; returned filled in."""
    import torch.distributed.checkpoint as dcp

    reader = dcp_kwargs.pop("storage_reader", None)
    if reader is None:
        reader = dcp.FileSystemReader(checkpoint_id)
    saved_keys = set(reader.read_metadata().state_dict_metadata)
    template = optim_state_dict(model, optimizer)
    names = _names(model)
    # Momentum buffers: allocated (like the parameter, DTensor included) exactly for the
    # parameters whose buffer is in the checkpoint.
    state = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            n = names[p]
            if f"optim.state.{n}.momentum_buffer" in saved_keys:
                state[n] = {"momentum_buffer": torch.zeros_like(p)}
    template["state"] = state
    sd = {"model": model.state_dict(), "optim": template}
    if extra:
        sd["extra"] = dict(extra)
    dcp.load(sd, storage_reader=reader, **dcp_kwargs)
    model.load_state_dict(sd["model"])
    load_optim_state_dict(model, optimizer, sd["optim"])
    return sd.get("extra")
