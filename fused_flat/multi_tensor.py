"""Multi-tensor launch tables: one kernel launch per bucket per pass.

A bucket is an ordered list of the user's 1-D contiguous tensors (ALGORITHMS.md: an index
space, not a buffer). A multi-tensor kernel gets, instead of one flat pointer,

* the **chunk table** ``chunks``: int64 ``[n_chunks, 2]``, row ``b = (t, start)``: program
  (CUDA block / Triton program) ``b`` handles elements ``[start, min(start + chunk,
  numel_t))`` of tensor ``t``. ``chunk`` is a multiple of the kernel's block, so a program
  never needs more than its own row; every element of every tensor is covered exactly
  once; empty tensors get no row (and an empty list no row at all: no launch).
* the **tensor table** ``meta``: int64 ``[T, 2]``, row ``t = (numel_t, offset_t)``,
  offset_t the bucket index of tensor t's first element (arbitrary int64 >= 0, odd
  values included: an FSDP shard starts where its slice of the unsharded parameter does).
* the **pointer table** ``ptrs``: int64 ``[K, T]``, row k = ``data_ptr()`` of the tensors
  of the k-th tensor-list argument (params, grads, backups, ...).

All three are built on the host once and cached as device tensors: the chunk and tensor
tables by (device, numels, offsets, chunk), the pointer table by (device, data_ptrs).
A step therefore does no host-to-device copy once the cache is warm (which CUDA-graph
capture and the no-host-sync goal need), and a pointer table can never be stale: a new
storage has a new key. The builders are plain Python + torch on the CPU (device-agnostic,
tested on CPU: tests/test_multi_tensor.py); only the final ``.to(device)`` touches the
device. Caches are small LRUs (``CACHE_SIZE`` entries each).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

CACHE_SIZE = 256


def chunk_rows(numels: Sequence[int], chunk: int) -> list[tuple[int, int]]:
    """The chunk table as a Python list of (tensor index, start element) rows (the spec;
    ``chunk_table`` computes the same rows with tensor ops)."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    return [(t, s) for t, n in enumerate(numels) for s in range(0, int(n), chunk)]


def chunk_table_cpu(numels: Sequence[int], chunk: int) -> torch.Tensor:
    """int64 [n_chunks, 2] rows (t, start), in tensor order then start order."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    n = torch.tensor([int(x) for x in numels], dtype=torch.int64)
    if (n < 0).any():
        raise ValueError("numels must be >= 0")
    if n.numel() == 0:
        return torch.empty((0, 2), dtype=torch.int64)
    counts = (n + (chunk - 1)) // chunk
    total = int(counts.sum())
    t = torch.repeat_interleave(torch.arange(n.numel(), dtype=torch.int64), counts)
    first_row = torch.cumsum(counts, 0) - counts          # row index of each tensor's chunk 0
    start = (torch.arange(total, dtype=torch.int64) - first_row[t]) * chunk
    return torch.stack([t, start], dim=1).contiguous()


def tensor_table_cpu(numels: Sequence[int], offsets: Sequence[int] | None) -> torch.Tensor:
    """int64 [T, 2] rows (numel, offset); offsets default to the packed prefix sums."""
    numels = [int(x) for x in numels]
    if offsets is None:
        offsets, acc = [], 0
        for x in numels:
            offsets.append(acc)
            acc += x
    offsets = [int(o) for o in offsets]
    if len(offsets) != len(numels):
        raise ValueError(f"{len(offsets)} offsets for {len(numels)} tensors")
    if any(o < 0 or o >= 2 ** 63 for o in offsets):
        raise ValueError("offsets must be in [0, 2^63)")
    return torch.tensor([[n, o] for n, o in zip(numels, offsets)],
                        dtype=torch.int64).reshape(len(numels), 2)


class _LRU(OrderedDict):
    def get_or_make(self, key, make):
        hit = self.get(key)
        if hit is not None:
            self.move_to_end(key)
            return hit
        val = make()
        self[key] = val
        if len(self) > CACHE_SIZE:
            self.popitem(last=False)
        return val


_chunk_cache = _LRU()
_ptr_cache = _LRU()
stats = {"chunk_builds": 0, "ptr_builds": 0}


@dataclass(frozen=True)
class Plan:
    """Device tables of one launch: see the module docstring."""
    chunks: torch.Tensor   # int64 [n_chunks, 2]
    meta: torch.Tensor     # int64 [T, 2]
    chunk: int
    n_chunks: int
    n_tensors: int


def plan(numels: Sequence[int], chunk: int, device, offsets: Sequence[int] | None = None) -> Plan:
    """Cached chunk + tensor tables for tensors of these sizes on ``device``."""
    device = torch.device(device)
    key = (str(device), tuple(int(x) for x in numels),
           None if offsets is None else tuple(int(o) for o in offsets), int(chunk))

    def make():
        stats["chunk_builds"] += 1
        ch = chunk_table_cpu(key[1], chunk)
        meta = tensor_table_cpu(key[1], offsets)
        return Plan(ch.to(device), meta.to(device), int(chunk), int(ch.shape[0]), len(key[1]))

    return _chunk_cache.get_or_make(key, make)


def frame_numels(numels: Sequence[int], offsets: Sequence[int]) -> list[int]:
    """Frame sizes of the Langevin multi-tensor kernels: ``numel + (offset & 3)`` (0 for an
    empty tensor). Frame position f of tensor t is element f - (offset_t & 3), bucket index
    4 * (offset_t >> 2) + f: blocks of frame positions starting at multiples of 4 are whole
    Philox calls (noise layout v2 and v3) whatever the offset."""
    if len(offsets) != len(numels):
        raise ValueError(f"{len(offsets)} offsets for {len(numels)} tensors")
    return [int(n) + (int(o) & 3) if int(n) else 0 for n, o in zip(numels, offsets)]


def frame_plan(numels: Sequence[int], offsets: Sequence[int], chunk: int, device) -> Plan:
    """``plan`` over the frame sizes (meta rows (numel + (offset & 3), offset))."""
    return plan(frame_numels(numels, offsets), chunk, device, offsets)


def pointer_table(lists: Sequence[Sequence[torch.Tensor]], device) -> torch.Tensor:
    """Cached int64 [K, T] table of data_ptr()s, one row per tensor list (all of length T)."""
    device = torch.device(device)
    if not lists:
        return torch.empty((0, 0), dtype=torch.int64, device=device)
    n = len(lists[0])
    if any(len(lst) != n for lst in lists):
        raise ValueError(f"tensor lists of different lengths: {[len(lst) for lst in lists]}")
    key = (str(device),) + tuple(tuple(t.data_ptr() for t in lst) for lst in lists)

    def make():
        stats["ptr_builds"] += 1
        return torch.tensor([list(row) for row in key[1:]], dtype=torch.int64).reshape(
            len(lists), n).to(device)

    return _ptr_cache.get_or_make(key, make)


def check_lists(what: str, ref_name: str, ref: Sequence[torch.Tensor], **others) -> None:
    """Every tensor 1-D, contiguous, floating; every list as long as ``ref`` with tensors of
    the same numel, and one dtype and device throughout."""
    if not ref:
        for name, lst in others.items():
            if lst is not None and len(lst) != 0:
                raise ValueError(f"{what}: {name} has {len(lst)} tensors, expected 0")
        return
    dtype, device = ref[0].dtype, ref[0].device
    for name, lst in ((ref_name, ref),) + tuple(others.items()):
        if lst is None:
            continue
        if len(lst) != len(ref):
            raise ValueError(f"{what}: {name} has {len(lst)} tensors, expected {len(ref)}")
        for i, (t, r) in enumerate(zip(lst, ref)):
            if t.dim() != 1 or not t.is_contiguous():
                raise ValueError(f"{what}: {name}[{i}] must be a contiguous 1-D tensor, got "
                                 f"shape {tuple(t.shape)} strides {t.stride()}")
            if t.dtype != dtype or t.device != device or not t.is_floating_point():
                raise ValueError(f"{what}: {name}[{i}] is {t.dtype} on {t.device}; every tensor "
                                 f"must be floating point, {dtype} on {device}")
            if t.numel() != r.numel():
                raise ValueError(f"{what}: {name}[{i}] has {t.numel()} elements, expected "
                                 f"{r.numel()}")


def clear_caches() -> None:
    _chunk_cache.clear()
    _ptr_cache.clear()


def tracing(t: torch.Tensor) -> bool:
    """Whether ``t`` is a fake tensor (FakeTensorMode, torch.compile tracing): no memory, so
    no pointer or chunk tables; the ops' fake implementations do not read them."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def placeholder_tables(n_lists: int, n_tensors: int, chunk: int, device) -> tuple[Plan, torch.Tensor]:
    """Empty (plan, pointer table) for tracing (never cached: fake tensors must not leak)."""
    empty = torch.zeros((0, 2), dtype=torch.int64, device=device)
    return (Plan(empty, empty, chunk, 0, n_tensors),
            torch.zeros((n_lists, n_tensors), dtype=torch.int64, device=device))
