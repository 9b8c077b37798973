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

Who builds them, when, and who owns them (no host round trip, ever):

* :func:`launch_tables` builds all three for ONE launch, inside the real implementation of
  the registered Triton list ops (fused_flat/backends/triton/multi.py, triton/sam.py;
  registered by :func:`register_list_op`). The CUDA C++ list ops need no tables: their
  kernels get pointers, sizes and offsets by value in the argument block
  (csrc/cuda/list_launch.h). Under FakeTensorMode or
  torch.compile's tracing those ops run their fake implementations, which touch nothing on
  the host, so this code never runs on fake tensors and fake tensors cannot check it: on a
  GPU it is checked by tests/test_gpu_sync.py (``make gpu-check``, sync debug mode "error").
* The three tables are written into ONE host staging buffer -- **pinned** when the device
  is CUDA -- and copied to ONE device buffer with ``non_blocking=True``: an asynchronous
  copy on the current stream, never a synchronizing one. torch's caching host allocator
  records the copy's stream event on the pinned block and hands the block out again only
  once that event has completed. The device buffer comes from torch's caching allocator on
  the current stream (the kernel's stream); when the op returns it is freed, and the
  allocator reuses a freed block only for work queued later on that stream: in stream
  order, after the kernel that reads it.
* Nothing is cached by address: a new gradient tensor (``zero_grad(set_to_none=True)``)
  simply lands in the next call's pointer table. The only cache is of the host-side
  chunk + tensor rows, keyed by (numels, offsets, chunk) and holding plain host memory that
  is copied into each call's staging buffer, so dropping an entry can never free memory a
  kernel or a graph reads.
* While the current stream is capturing a CUDA graph
  (``torch.cuda.is_current_stream_capturing()``), the captured copy re-reads the pinned
  staging buffer and the captured kernel the device buffer at every replay. Those tables are therefore handed to the
  process-lifetime registry ``CAPTURED`` (staging buffer and device buffer together): never
  evicted, never reused, never written again. ``release_captured_tables()`` empties it for
  a process that has destroyed every graph it captured (a few hundred bytes per pass and
  capture otherwise stay held until exit).
* :func:`launching` is the context a real implementation launches in: the tensors' CUDA
  device made current, and, while the stream is capturing, this thread switched to the
  relaxed capture mode (the driver's ``cuThreadExchangeStreamCaptureMode``), so that a
  first capture needs no warm-up: a Triton kernel loaded for the first time
  (``cuModuleLoadData``) and a pinned staging block allocated for the first time are legal
  inside the capture. The launches themselves are captured as usual.

The builders are plain Python + torch on the CPU (tested on CPU: tests/test_multi_tensor.py,
the CUDA branch through the ``_empty`` / ``_capturing`` seams, which are the only CUDA calls
in it); on CPU tensors (Triton's interpreter) the staging buffer is the table itself.
"""
from __future__ import annotations

import array
import contextlib
import ctypes
import operator
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

HOST_CACHE_SIZE = 64


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


def frame_numels(numels: Sequence[int], offsets: Sequence[int]) -> list[int]:
    """Frame sizes of the Langevin multi-tensor kernels: ``numel + (offset & 3)`` (0 for an
    empty tensor). Frame position f of tensor t is element f - (offset_t & 3), bucket index
    4 * (offset_t >> 2) + f: blocks of frame positions starting at multiples of 4 are whole
    Philox calls (noise layout v2 and v3) whatever the offset."""
    if len(offsets) != len(numels):
        raise ValueError(f"{len(offsets)} offsets for {len(numels)} tensors")
    return [int(n) + (int(o) & 3) if int(n) else 0 for n, o in zip(numels, offsets)]


# ------------------------------------------------------------------ one launch's tables
@dataclass(frozen=True)
class Tables:
    """The tables of ONE launch (module docstring), views of one device buffer."""
    chunks: torch.Tensor    # int64 [n_chunks, 2]
    meta: torch.Tensor      # int64 [T, 2]
    ptrs: torch.Tensor      # int64 [K, T]
    chunk: int
    n_chunks: int
    n_tensors: int
    staging: torch.Tensor   # the host buffer they were written to (pinned for CUDA)
    buffer: torch.Tensor    # the device buffer (the staging buffer itself on CPU)
    aligned16: bool = False  # every data pointer (empty tensors' too) a multiple of 16 bytes


_host_rows: OrderedDict = OrderedDict()   # (numels, offsets, chunk, frame) -> (rows, n_chunks)
_host_lock = threading.Lock()
CAPTURED: list = []                       # Tables read by captured CUDA graphs (never freed)


def _rows(numels: tuple, offsets: tuple | None, chunk: int,
          frame: bool = False) -> tuple[torch.Tensor, int]:
    """[chunk table | tensor table] as one flat CPU int64 tensor, and n_chunks (host memory
    only; the cache holds nothing a device reads). ``frame``: the tables of the call frame
    (``frame_numels``), computed on a miss only."""
    key = (numels, offsets, chunk, frame)
    with _host_lock:
        hit = _host_rows.get(key)
        if hit is not None:
            _host_rows.move_to_end(key)
            return hit
    if frame:
        numels = tuple(frame_numels(numels, offsets))
    ch = chunk_table_cpu(numels, chunk)
    meta = tensor_table_cpu(numels, offsets)
    val = (torch.cat((ch.reshape(-1), meta.reshape(-1))), int(ch.shape[0]))
    with _host_lock:
        _host_rows[key] = val
        while len(_host_rows) > HOST_CACHE_SIZE:
            _host_rows.popitem(last=False)
    return val


def _empty(n: int, *, pin_memory: bool = False, device=None) -> torch.Tensor:
    """An int64 buffer of n elements: the allocation seam (pinned host staging / device)."""
    if device is not None:
        return torch.empty(n, dtype=torch.int64, device=device)
    return torch.empty(n, dtype=torch.int64, pin_memory=pin_memory)


def _capturing(device: torch.device) -> bool:
    """Whether the current stream of ``device`` is capturing a CUDA graph (the seam)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


_numel = torch.Tensor.numel


def _pointer_row(ptrs: list) -> torch.Tensor:
    """int64 tensor of the data pointers (through array: half the cost of torch.tensor on a
    list of ints; a pointer is below 2^63)."""
    if not ptrs:
        return torch.empty(0, dtype=torch.int64)
    return torch.frombuffer(array.array("q", ptrs), dtype=torch.int64)


def launch_tables(lists: Sequence[Sequence[torch.Tensor]], chunk: int,
                  offsets: Sequence[int] | None = None, *, frame: bool = False,
                  device=None) -> Tables:
    """The chunk, tensor and pointer tables of one launch over ``lists`` (K lists of T
    tensors; the chunk table follows ``lists[0]``'s numels), on ``device`` (default: the
    tensors' device). ``frame=True``: the Langevin kernels' call frame (``frame_numels``;
    meta rows (numel + (offset & 3), offset)). Runs only inside a real op implementation
    (module docstring: pinned staging, non-blocking copy, capture-owned tables)."""
    if not lists:
        raise ValueError("launch_tables: no tensor lists")
    ref = lists[0]
    n = len(ref)
    if any(len(lst) != n for lst in lists):
        raise ValueError(f"tensor lists of different lengths: {[len(lst) for lst in lists]}")
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    device = torch.device(device) if device is not None else (
        ref[0].device if n else torch.device("cpu"))
    numels = tuple(map(_numel, ref))
    offs = None if offsets is None else tuple(map(int, offsets))
    if frame and offs is None:
        raise ValueError("launch_tables: frame=True needs the offsets")
    rows, n_chunks = _rows(numels, offs, int(chunk), bool(frame))
    ptrs = _pointer_row([t.data_ptr() for lst in lists for t in lst])
    aligned16 = not bool((ptrs & 15).any())   # host tensor ops: one check, not one per tensor
    total = rows.numel() + ptrs.numel()
    on_cuda = device.type == "cuda"
    staging = _empty(total, pin_memory=on_cuda)
    torch.cat((rows, ptrs), out=staging)
    if device.type == "cpu":
        buf = staging
    else:
        buf = _empty(total, device=device)
        buf.copy_(staging, non_blocking=True)     # pinned -> device: asynchronous, no sync
    a, b = 2 * n_chunks, 2 * n_chunks + 2 * n   # 16-byte aligned views (even int64 offsets)
    tb = Tables(buf[:a].view(n_chunks, 2), buf[a:b].view(n, 2), buf[b:].view(len(lists), n),
                int(chunk), n_chunks, n, staging, buf, aligned16)
    if _capturing(device):
        CAPTURED.append(tb)   # read at every replay: alive (and unwritten) for the process
    return tb


def release_captured_tables() -> int:
    """Drop the tables held for captured CUDA graphs (returns how many). Only for a process
    that has destroyed every graph captured so far: a graph replayed afterwards would read
    freed (and possibly reused) memory."""
    n = len(CAPTURED)
    CAPTURED.clear()
    return n


# ------------------------------------------------------------------ launch context
_CU_STREAM_CAPTURE_MODE_RELAXED = 2
_driver = None


def _exchange_capture_mode(mode: int) -> int:
    """cuThreadExchangeStreamCaptureMode (CUDA driver API): set this thread's capture mode,
    return the previous one. -1 when the driver library cannot be loaded (nothing changed)."""
    global _driver
    if _driver is None:
        try:
            lib = ctypes.CDLL("nvcuda.dll" if os.name == "nt" else "libcuda.so.1")
            fn = lib.cuThreadExchangeStreamCaptureMode
            fn.argtypes = [ctypes.POINTER(ctypes.c_int)]
            fn.restype = ctypes.c_int
            _driver = fn
        except (OSError, AttributeError):
            _driver = False
    if _driver is False:
        return -1
    m = ctypes.c_int(mode)
    rc = _driver(ctypes.byref(m))
    if rc != 0:
        raise RuntimeError(f"fused_flat: cuThreadExchangeStreamCaptureMode failed ({rc})")
    return m.value


@contextlib.contextmanager
def _relaxed_capture():
    prev = _exchange_capture_mode(_CU_STREAM_CAPTURE_MODE_RELAXED)
    try:
        yield
    finally:
        if prev >= 0:
            _exchange_capture_mode(prev)


@contextlib.contextmanager
def launching(device: torch.device):
    """Where a real op implementation builds its tables and launches: on a CUDA device, that
    device made current (Triton launches on the current device's current stream) and, while
    the stream is capturing, the relaxed capture mode for this thread (module docstring)."""
    if device.type != "cuda":
        yield
        return
    with torch.cuda.device(device):
        with _relaxed_capture() if _capturing(device) else contextlib.nullcontext():
            yield


_shape = operator.attrgetter("shape")
_dtype = operator.attrgetter("dtype")
_device = operator.attrgetter("device")
_contiguous = torch.Tensor.is_contiguous


def lists_ok(ref: Sequence[torch.Tensor], lists) -> bool:
    """True when check_lists(ref, *lists) would pass (``ref`` non-empty; None lists skipped),
    checked list at a time: one attribute per tensor per condition, the comparisons in C,
    about half the per-tensor host cost of the loop that names the culprit. False may also
    mean "use that loop": always under torch.compile (Dynamo traces the loop; the check is
    not in the graph)."""
    if torch.compiler.is_compiling():
        return False
    n = len(ref)
    dtype, device = ref[0].dtype, ref[0].device
    if not dtype.is_floating_point:
        return False
    shapes = list(map(_shape, ref))
    if list(map(len, shapes)).count(1) != n:                    # every tensor 1-D
        return False
    for lst in lists:
        if lst is None:
            continue
        if len(lst) != n or (lst is not ref and list(map(_shape, lst)) != shapes):
            return False
        if not all(map(_contiguous, lst)):
            return False
        if list(map(_dtype, lst)).count(dtype) != n or list(map(_device, lst)).count(device) != n:
            return False
    return True


def check_lists(what: str, ref_name: str, ref: Sequence[torch.Tensor], **others) -> None:
    """Every tensor 1-D, contiguous, floating; every list as long as ``ref`` with tensors of
    the same numel, and one dtype and device throughout."""
    if ref and lists_ok(ref, (ref,) + tuple(others.values())):
        return   # the fast path; the loop below names the culprit (and is what Dynamo traces)
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


# ------------------------------------------------------------------ op registration
def register_list_op(lib: torch.library.Library, schema: str, impl, fake):
    """Define the op ``lib.ns::schema`` (one pass over tensor lists) and return its overload.

    Registered with ``Library.define`` + ``Library.impl`` + ``torch.library.register_fake``
    rather than ``torch.library.custom_op``: custom_op adds Python kernels at the Autograd and
    ADInplaceOrView keys, and every Python kernel converts every tensor of every list argument
    between the dispatcher and Python again (about 0.35 us per tensor per list instead of
    about 0.14 at 200 tensors; the host time a small model's step waits on). Here the only
    Python kernel a real call meets is ``impl``; the Autograd key takes torch's C++ fallback
    (under ``torch.no_grad()``, where the optimizers call these ops, a plain redispatch).

    * ``schema``: ``name(args) -> returns`` with the mutation annotations (``Tensor(a0!)[]``
      for a list the op writes): functionalization (torch.compile's auto_functionalized) and
      opcheck's schema check read them.
    * ``impl``: the real implementation (CompositeExplicitAutograd: every device; fake tensors
      and tracing never reach it, they stop at the Python key). ``fake``: the fake
      implementation (FakeTensorMode, torch.compile's tracing, Meta tensors), which must touch
      nothing on the host.
    * The version counters of the mutated lists are bumped in both (what custom_op's
      ADInplaceOrView kernel does; torch's C++ ADInplaceOrView fallback skips tensor lists):
      autograd still sees the in-place writes.
    """
    name = schema.split("(", 1)[0].strip()
    lib.define(schema, tags=(torch.Tag.pt2_compliant_tag,))
    op = getattr(getattr(torch.ops, lib.ns), name).default
    mutated = tuple(i for i, a in enumerate(op._schema.arguments)
                    if a.alias_info is not None and a.alias_info.is_write)
    if not all(isinstance(op._schema.arguments[i].type, torch._C.ListType) for i in mutated):
        raise TypeError(f"register_list_op: {name}: only tensor lists may be mutated")
    if any(a.has_default_value() or a.kwarg_only for a in op._schema.arguments):
        raise TypeError(f"register_list_op: {name}: positional arguments without defaults only "
                        "(the kernels receive every argument in order)")
    bump = torch._C._increment_version

    def real(*args):
        for i in mutated:
            if args[i]:
                bump(args[i])
        return impl(*args)

    def fake_impl(*args):
        for i in mutated:
            if args[i]:
                bump(args[i])
        return fake(*args)

    real.__name__, real.__qualname__ = impl.__name__, impl.__qualname__
    real.__module__, real.__doc__ = impl.__module__, impl.__doc__
    lib.impl(name, real, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{lib.ns}::{name}", fake_impl, lib=lib)
    return op
