"""Buckets: the parameters of one (param group, device, dtype) as one flat *index space*.

A bucket owns no storage. It is the ordered list of the group's parameters of one device
and dtype, in parameter order, each with its offset in the bucket's index space
(ALGORITHMS.md, top): the numels of the parameters before it, each rounded up to a
multiple of 4, so every tensor starts on a Philox call. Element e of parameter t -- e
counted in *memory order*, so a channels_last weight stays channels_last -- has noise
index ``offsets[t] + e``. Every parameter of the group is in the index space, frozen or
not, so freezing or unfreezing one never shifts another's noise.

The optimizer never assigns ``p.data`` or ``p.grad``: the kernels run over
:func:`flat` views of the user's own tensors.

Sharded parameters (FSDP2's DTensors, ``Shard(0)``, even or uneven): the index space is
the unsharded one (``Bucket.numel`` counts global numels) and the kernels run over each
rank's local shard with ``Bucket.index(j)`` = the offset of parameter j plus the global
position of the local shard's first element, so every element receives the noise it
receives in an unsharded run. :func:`shard_groups` tells which process groups hold the
other shards (global reductions: SAM's norm, the non-finite check).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def round_up4(n: int) -> int:
    return (n + 3) & ~3


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill ``numel`` consecutive storage slots."""
    if t.is_contiguous():
        return True
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def flat(t: torch.Tensor) -> torch.Tensor:
    """The 1-D view of a dense tensor in memory order (no copy); of a DTensor, of its
    rank-local shard."""
    t = _local(t)
    if t.is_contiguous():
        return t.view(-1)
    return t.as_strided((t.numel(),), (1,))


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether element e in memory order is the same logical element in a and b."""
    if a.is_contiguous() and b.is_contiguous():
        return True
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n != 1)


def flat_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` (same shape as ``like``) as a 1-D view in ``like``'s memory order; a tensor laid
    out differently (a gradient written by hand) is copied into ``like``'s layout."""
    if is_dense(t) and same_layout(t, like):
        return flat(t)
    out = torch.empty_like(like)
    out.copy_(t)
    return flat(out)


@dataclass
class Bucket:
    """One (param group, device, dtype) index space over the user's parameter tensors."""

    bucket_id: int
    group_index: int
    device: torch.device
    dtype: torch.dtype
    params: list = field(default_factory=list)
    offsets: list = field(default_factory=list)
    numel: int = 0   # size of the index space (rounded ends included; global numels)
    starts: list = field(default_factory=list)   # per parameter: global index of its first local element
    shard_keys: list = field(default_factory=list)   # per parameter: shard_groups(p), () if not split

    def index(self, j: int) -> int:
        """The index (in the bucket's index space) of the first element of parameter j that
        this process holds: its offset, plus, for a sharded (DTensor) parameter, the
        position of the local shard in the unsharded parameter."""
        return self.offsets[j] + self.starts[j]

    def add(self, p: torch.Tensor) -> None:
        self.params.append(p)
        self.offsets.append(self.numel)
        self.starts.append(shard_start(p))
        self.shard_keys.append(shard_groups(p))
        self.numel += round_up4(p.numel())


def check_param(p: torch.Tensor, where: str) -> None:
    """The one check of a parameter the optimizer is given (construction, add_param_group)
    or finds changed (a bucket rebuild): ValueError saying what is wrong and what to do."""
    if p.device.type == "meta":
        raise ValueError(
            f"{where}: a parameter of shape {tuple(p.shape)} is on device {p.device}, which holds "
            f"no data, so it cannot be perturbed or updated. Materialize the model first "
            f"(model.to_empty(device='cpu' or 'cuda'), then initialize it, e.g. "
            f"reset_parameters() or load_state_dict), then build the optimizer on its parameters")
    if p.layout != torch.strided:   # COO, CSR, CSC, BSR, BSC
        raise ValueError(f"{where}: a parameter with layout {p.layout}: sparse parameters are not "
                         f"supported, the fused kernels need dense (torch.strided) ones; make it "
                         f"dense (nn.Parameter(p.to_dense()))")
    if not p.is_floating_point():
        raise ValueError(f"{where}: parameters must be floating point, got {p.dtype}")
    if is_dtensor(p):
        shard_start(p)   # raises on an unsupported sharding
    local = _local(p)
    if not is_dense(local):
        raise ValueError(
            f"{where}: a parameter of shape {tuple(p.shape)} with strides {tuple(local.stride())} "
            f"is not dense (it is a strided view of a larger tensor); the fused kernels need "
            f"non-overlapping dense parameters (any memory format). Make it a Parameter of its "
            f"own (e.g. nn.Parameter(t.clone()))")


def is_dtensor(p) -> bool:
    return hasattr(p, "to_local") and hasattr(p, "placements") and hasattr(p, "device_mesh")


def _local(p: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor of a DTensor parameter, the tensor itself otherwise."""
    return p.to_local() if is_dtensor(p) else p


def local_copy_(dsts: list, srcs: list) -> None:
    """``torch._foreach_copy_`` that also takes DTensors (copies the local shards: DTensor
    has no sharding rule for ``_foreach_copy_``); a copy between tensors of one layout."""
    if dsts:
        torch._foreach_copy_([_local(t) for t in dsts], [_local(t) for t in srcs])


def _sharded_dims(p) -> tuple:
    """The mesh dims along which DTensor ``p`` is split (its local data differs across
    them); () for a replicated DTensor or an ordinary tensor."""
    if not is_dtensor(p):
        return ()
    out = []
    for d, pl in enumerate(p.placements):
        if pl.is_replicate():
            continue
        if pl.is_shard():
            out.append(d)
            continue
        raise ValueError(f"fused_flat: a DTensor parameter with placement {pl} (mesh dim {d}) is not "
                         f"supported; parameters must be Shard(0) (FSDP2's fully_shard) or "
                         f"Replicate. Redistribute it (p.redistribute(placements=[Shard(0)]))")
    return tuple(out)


def shard_start(p: torch.Tensor) -> int:
    """The index, in the unsharded parameter (memory order), of the first element of this
    rank's local shard: 0 for an ordinary or replicated tensor; rows before the shard times
    the row's numel for ``Shard(0)`` (FSDP2; uneven shards included). Other shardings raise,
    as the local shard would not be one run of the unsharded memory order."""
    dims = _sharded_dims(p)
    if not dims:
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    shape = tuple(p.shape)
    if any(ls != gs for ls, gs in zip(local_shape[1:], shape[1:])) \
            or any(pl.is_shard() and pl.dim != 0 for pl in p.placements):
        raise ValueError(f"fused_flat: a DTensor parameter of shape {shape} sharded as "
                         f"{tuple(p.placements)}: only dim-0 sharding (Shard(0), FSDP2's default) "
                         f"is supported, where the local shard is one run of the unsharded "
                         f"parameter; use fully_shard's default shard placement")
    row = 1
    for n in shape[1:]:
        row *= n
    local = p.to_local()
    if local.numel() > 0 and local.dim() > 1 and local.shape[0] > 1 and local.stride(0) != row:
        raise ValueError(f"fused_flat: a Shard(0) DTensor parameter of shape {shape} whose local "
                         f"shard has strides {tuple(local.stride())}: dim 0 must be outermost in "
                         f"memory (contiguous or channels_last)")
    return int(offset[0]) * row


def shard_groups(p) -> tuple:
    """The process groups across which a DTensor parameter is split (all-reduce over each,
    in order, to reduce over its shards); () when it is not split."""
    return tuple(p.device_mesh.get_group(d) for d in _sharded_dims(p))


def layout_key(param_groups: list[dict]) -> tuple:
    """What the bucket layout depends on; a change (``model.half()``, ``.to(device)``,
    ``.to(memory_format=...)``) makes the optimizer rebuild its buckets at the next step."""
    return tuple((p.dtype, p.device, p.shape, p.stride() if p.layout == torch.strided else p.layout)
                 for g in param_groups for p in g["params"])


def build_buckets(param_groups: list[dict]) -> list[Bucket]:
    """Buckets keyed by (param group, device, dtype), in parameter order, frozen
    parameters included; ids numbered in that order."""
    buckets: list[Bucket] = []
    for gi, group in enumerate(param_groups):
        keyed: dict[tuple, Bucket] = {}
        for p in group["params"]:
            key = (str(p.device), p.dtype)
            if key not in keyed:
                keyed[key] = Bucket(len(buckets) + len(keyed), gi, p.device, p.dtype)
            keyed[key].add(p)
        buckets.extend(keyed.values())
    return buckets
