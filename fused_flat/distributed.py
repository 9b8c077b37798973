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
the noise stream shifts). Use these helpers instead. :func:`load_checkpoint` loads exactly
the optimizer state that the checkpoint holds, as saved: its template is built from the
checkpoint's metadata (each entry's shape and dtype), not from the optimizer's current
state, so a fresh optimizer gets everything -- fp32 master weights and momentum of 16-bit
parameters, a base optimizer's state (AdamW's exp_avg, exp_avg_sq, 0-dim step), non-tensor
entries, hyperparameters (an LR scheduler's lr) -- and a parameter without state keeps
torch.optim's "first step creates it" rule, so no state has to be created up front.
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
    if not isinstance(osd, dict) or not isinstance(osd.get("param_groups"), list):
        raise ValueError("load_optim_state_dict: not an optimizer state dict from "
                         "optim_state_dict (no 'param_groups' list)")
    names = _names(model)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    id_of_fqn = {names[p]: i for i, p in enumerate(params) if p in names}
    unknown = [n for g in osd["param_groups"] for n in g.get("params", [])
               if n not in id_of_fqn] + [n for n in osd.get("state", {}) if n not in id_of_fqn]
    if unknown:
        raise ValueError(f"load_optim_state_dict: the checkpoint names parameters this optimizer "
                         f"does not have (first: {unknown[0]!r}); it comes from a different model")
    sd = {k: v for k, v in osd.items() if k not in ("state", "param_groups")}
    sd["state"] = {id_of_fqn[n]: st for n, st in osd.get("state", {}).items()}
    sd["param_groups"] = [dict(g, params=[id_of_fqn[n] for n in g.get("params", [])])
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


def _saved_paths(metadata) -> dict:
    """{flattened key: its path in the saved nested dict} of a DCP checkpoint's metadata
    (DCP's flattening map; a key saved unflattened is its own path)."""
    paths = metadata.planner_data or {}
    return {key: tuple(paths.get(key, (key,))) for key in metadata.state_dict_metadata}


def _optim_template(metadata, paths: dict, model: torch.nn.Module) -> dict:
    """The ``"optim"`` entry to hand ``dcp.load``, built from what the checkpoint holds
    (``metadata``: its ``Metadata``; ``paths``: :func:`_saved_paths`): every saved entry at
    its saved place, each tensor allocated with its saved shape and dtype -- like the
    parameter (a DTensor with its placements, on its device) when it has the parameter's
    shape, else a plain CPU tensor (a 0-dim 'step', the state of a parameter ``model`` lacks:
    load_optim_state_dict rejects those); non-tensor entries get a placeholder that DCP
    replaces. Raises when the checkpoint has no optimizer state."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    params = {n: p for p, n in _names(model).items()}
    root: dict = {}
    for key, md in metadata.state_dict_metadata.items():
        path = paths[key]
        if path[0] != "optim":
            continue
        p = params.get(path[2]) if len(path) > 2 and path[1] == "state" else None
        value = None
        if isinstance(md, TensorStorageMetadata):
            dtype, size = md.properties.dtype, tuple(md.size)
            value = (torch.empty_like(p, dtype=dtype) if p is not None and tuple(p.shape) == size
                     else torch.empty(size, dtype=dtype))
        _set_path(root, path, value)
    if not isinstance(root.get("optim"), dict):
        raise ValueError("load_checkpoint: the checkpoint has no optimizer state (no 'optim' "
                         "entry); write it with fused_flat.distributed.save_checkpoint")
    return root["optim"]


def _set_path(root: dict, path: tuple, value) -> None:
    """Put ``value`` at ``path`` in the nested ``root``, making the containers on the way:
    a str key makes a dict, an int a list (DCP's flattening rule)."""
    cur = root
    for key, nxt in zip(path[:-1], path[1:]):
        new = {} if isinstance(nxt, str) else []
        if isinstance(cur, dict):
            cur = cur.setdefault(key, new)
        else:
            cur.extend([None] * (key + 1 - len(cur)))
            if cur[key] is None:
                cur[key] = new
            cur = cur[key]
    if isinstance(cur, list):
        cur.extend([None] * (path[-1] + 1 - len(cur)))
    cur[path[-1]] = value


def _check_saved(paths: dict, prefix: str, sd: dict) -> None:
    """Raise when an entry of ``sd`` (model.state_dict() or the extra template) is not in the
    checkpoint, before anything is loaded."""
    saved = {path[:2] for path in paths.values()}
    missing = [k for k in sd if (prefix, k) not in saved]
    if missing:
        raise ValueError(f"load_checkpoint: the checkpoint has no {prefix!r} entry {missing[0]!r}; "
                         f"it comes from a different model or was saved without it")


def load_checkpoint(checkpoint_id, model: torch.nn.Module, optimizer, extra: dict | None = None,
                    **dcp_kwargs) -> dict | None:
    """Load what :func:`save_checkpoint` wrote into ``model`` (in place, DTensor shards
    included) and ``optimizer`` (its whole state as saved: master weights, momentum and any
    base optimizer's state in their saved dtype, hyperparameters, seed and step counter): the
    run continues bit-identically. The model and optimizer must be built as for the saved
    run (same structure, world size and sharding), before any step. ``extra``: a template of
    the extra entries (same keys) to load; returned filled in. Raises ``ValueError``, with
    nothing loaded, when the checkpoint lacks the optimizer state or an entry of the model
    or ``extra``, or names parameters the model does not have."""
    import torch.distributed.checkpoint as dcp

    reader = dcp_kwargs.pop("storage_reader", None)
    if reader is None:
        reader = dcp.FileSystemReader(checkpoint_id)
    metadata = reader.read_metadata()
    paths = _saved_paths(metadata)
    model_sd = model.state_dict()
    _check_saved(paths, "model", model_sd)
    if extra:
        _check_saved(paths, "extra", extra)
    # The optimizer first: its param_groups name the parameters only once loaded, and a
    # mismatch must raise before the model's weights are overwritten.
    osd = {"optim": _optim_template(metadata, paths, model)}
    dcp.load(osd, storage_reader=reader, **dcp_kwargs)
    load_optim_state_dict(model, optimizer, osd["optim"])
    sd = {"model": model_sd}
    if extra:
        sd["extra"] = dict(extra)
    dcp.load(sd, storage_reader=reader, **dcp_kwargs)
    model.load_state_dict(sd["model"])
    return sd.get("extra")
