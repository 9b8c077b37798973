"""Host emulation of the multi-tensor launch tables (fused_flat/backends/multi_tensor.py), on CPU.

The tables of one launch (launch_tables): rows and pointers; nothing cached by address (a
changed address is in the next call's tables); on CUDA (the same code, with the allocation
and capture queries as seams) a pinned staging buffer and one non-blocking copy; tables
built during a CUDA-graph capture held for the process, never evicted nor reused; the
relaxed capture mode around a captured launch.

Coverage of the chunk table: every element of every tensor must be covered by exactly one (chunk row, lane) pair, for
thousands of random size lists (1-element tensors, empty tensors, sizes not a multiple of
the block, empty lists), with every row's work inside one tensor and one chunk, exactly as
a kernel program reads its row: t, s = chunks[b]; elements [s, min(s + chunk, numel_t)).
"""
from __future__ import annotations

import random
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fused_flat.backends import multi_tensor as mt


def _emulate_coverage(numels, chunk):
    """Count, per element of each tensor, how many programs touch it (vectorised)."""
    table = mt.chunk_table_cpu(numels, chunk)
    assert table.dtype == torch.int64 and table.dim() == 2 and table.shape[1] == 2
    counts = [torch.zeros(n, dtype=torch.int32) for n in numels]
    for t, s in table.tolist():
        n = numels[t]
        assert 0 <= s < n and s % chunk == 0, (t, s, n)
        counts[t][s:min(s + chunk, n)] += 1
    return table, counts


def _random_sizes(rng):
    k = rng.choice([0, 1, 1, 2, 3, 5, 8, 17, 40])
    out = []
    for _ in range(k):
        r = rng.random()
        if r < 0.15:
            out.append(1)
        elif r < 0.22:
            out.append(0)
        elif r < 0.6:
            out.append(rng.randint(2, 300))
        else:
            out.append(rng.randint(300, 5000))
    return out


def test_random_size_lists_every_element_exactly_once():
    rng = random.Random(12)
    cases = 0
    for _ in range(3000):
        sizes = _random_sizes(rng)
        block = rng.choice([4, 16, 64, 128])
        chunk = block * rng.choice([1, 2, 3, 8])
        table, counts = _emulate_coverage(sizes, chunk)
        assert all(bool((c == 1).all()) for c in counts), (sizes, chunk)
        # same rows as the pure-Python spec, in tensor then start order
        assert [tuple(r) for r in table.tolist()] == mt.chunk_rows(sizes, chunk)
        assert table.shape[0] == sum((n + chunk - 1) // chunk for n in sizes)
        cases += 1
    assert cases == 3000


@pytest.mark.parametrize("sizes", [[], [0], [0, 0], [1], [1, 1, 1], [1023, 1, 1025], [4096]])
def test_edge_lists(sizes):
    table, counts = _emulate_coverage(sizes, 1024)
    assert all(bool((c == 1).all()) for c in counts)
    if sum(sizes) == 0:
        assert table.shape == (0, 2)


def test_large_sizes_rows():
    # int64 starts: a tensor of 2^33 + 5 elements (table only, nothing allocated)
    n = (1 << 33) + 5
    table = mt.chunk_table_cpu([3, n], 1 << 20)
    assert table.shape[0] == 1 + (n + (1 << 20) - 1) // (1 << 20)
    assert table[-1].tolist() == [1, ((n - 1) >> 20) << 20]


def test_tensor_table_offsets():
    meta = mt.tensor_table_cpu([5, 0, 7], None)
    assert meta.tolist() == [[5, 0], [0, 5], [7, 5]]
    meta = mt.tensor_table_cpu([5, 7], [3, 2 ** 40 + 1])       # odd FSDP-shard offsets
    assert meta.tolist() == [[5, 3], [7, 2 ** 40 + 1]]
    with pytest.raises(ValueError):
        mt.tensor_table_cpu([5], [1, 2])
    with pytest.raises(ValueError):
        mt.tensor_table_cpu([5], [-1])
    assert mt.tensor_table_cpu([], None).shape == (0, 2)


def _lists(sizes, k=2, dtype=torch.float32):
    return [[torch.randn(n).to(dtype) for n in sizes] for _ in range(k)]


def _ptrs(lists):
    return [[t.data_ptr() for t in lst] for lst in lists]


def test_launch_tables_rows_and_pointers():
    sizes, offsets = [5, 0, 33, 1, 70], [3, 8, 2 ** 33 + 1, 40, 41]
    lists = _lists(sizes, 3)
    tb = mt.launch_tables(lists, 16, offsets)
    assert tb.chunks.tolist() == [list(r) for r in mt.chunk_rows(sizes, 16)]
    assert tb.meta.tolist() == [[n, o] for n, o in zip(sizes, offsets)]
    assert tb.ptrs.tolist() == _ptrs(lists)
    assert (tb.n_chunks, tb.n_tensors, tb.chunk) == (tb.chunks.shape[0], 5, 16)
    # the call frame of the Langevin kernels: numel + (offset & 3) frame positions
    fr = mt.launch_tables(lists[:1], 16, offsets, frame=True)
    frames = mt.frame_numels(sizes, offsets)
    assert fr.meta.tolist() == [[f, o] for f, o in zip(frames, offsets)]
    assert fr.chunks.tolist() == [list(r) for r in mt.chunk_rows(frames, 16)]
    # packed offsets by default; the three tables are views of one buffer, each 16-byte aligned
    tb = mt.launch_tables(lists, 16)
    assert tb.meta[:, 1].tolist() == [0, 5, 5, 38, 39]
    for t in (tb.chunks, tb.meta, tb.ptrs):
        assert t.untyped_storage().data_ptr() == tb.buffer.untyped_storage().data_ptr()
        assert t.is_contiguous() and t.data_ptr() % 16 == 0 and t.dtype == torch.int64
    with pytest.raises(ValueError, match="different lengths"):
        mt.launch_tables([lists[0], lists[1][:2]], 16)


def test_a_changed_address_is_in_the_next_tables():
    """Nothing is cached by address: a new gradient tensor (zero_grad(set_to_none=True))
    lands in the next call's pointer table, and an earlier call's tables are left alone."""
    params, grads = _lists([7, 300, 2])
    first = mt.launch_tables([params, grads], 64)
    before = first.ptrs.clone()
    grads = [torch.randn_like(g) for g in grads]          # new storages, same sizes
    second = mt.launch_tables([params, grads], 64)
    assert second.ptrs.tolist() == _ptrs([params, grads])
    assert second.ptrs[1].tolist() != before[1].tolist()
    assert torch.equal(first.ptrs, before)                # owned by the first call: unchanged
    assert torch.equal(first.chunks, second.chunks) and torch.equal(first.meta, second.meta)


class _Alloc:
    """Stands in for the allocation seam mt._empty on a machine without a GPU: records what
    was asked for (pinned host staging, a device buffer) and hands out CPU memory."""

    def __init__(self):
        self.requests = []

    def __call__(self, n, *, pin_memory=False, device=None):
        self.requests.append(dict(n=n, pin_memory=pin_memory,
                                  device=None if device is None else torch.device(device).type))
        return torch.empty(n, dtype=torch.int64)


class _Copies(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.copy_.default:
            self.copies.append((args[0], args[1], kwargs.get("non_blocking",
                                                             args[2] if len(args) > 2 else False)))
        return func(*args, **kwargs)


def test_cuda_tables_are_staged_in_pinned_memory_and_copied_without_sync(monkeypatch):
    """The CUDA branch of launch_tables (the code a GPU runs; only the allocations are
    stood in for): one pinned staging buffer, one device buffer, one non-blocking copy."""
    alloc = _Alloc()
    monkeypatch.setattr(mt, "_empty", alloc)
    monkeypatch.setattr(mt, "_capturing", lambda device: False)
    lists = _lists([5, 40, 1])
    held = len(mt.CAPTURED)
    with _Copies() as rec:
        tb = mt.launch_tables(lists, 16, [0, 5, 45], device=torch.device("cuda", 0))
    total = 2 * tb.n_chunks + 2 * 3 + 2 * 3
    assert alloc.requests == [dict(n=total, pin_memory=True, device=None),
                              dict(n=total, pin_memory=False, device="cuda")]
    (dst, src, non_blocking), = [c for c in rec.copies if c[0] is tb.buffer]
    assert src is tb.staging and non_blocking is True
    assert tb.buffer is not tb.staging and torch.equal(tb.buffer, tb.staging)
    assert tb.ptrs.tolist() == _ptrs(lists) and tb.meta.tolist() == [[5, 0], [40, 5], [1, 45]]
    assert len(mt.CAPTURED) == held          # not capturing: owned by the call alone


def test_tables_used_in_a_capture_are_held_never_evicted_nor_reused(monkeypatch):
    """Tables built while the stream captures a CUDA graph are read at every replay (the
    captured copy re-reads the pinned staging buffer, the kernel the device buffer): held for
    the process, unchanged, their memory never handed out again, however many tables follow."""
    alloc = _Alloc()
    monkeypatch.setattr(mt, "_empty", alloc)
    capturing = [True]
    monkeypatch.setattr(mt, "_capturing", lambda device: capturing[0])
    mt.release_captured_tables()
    lists = _lists([9, 17])
    cuda = torch.device("cuda", 0)
    tb = mt.launch_tables(lists, 16, device=cuda)
    assert mt.CAPTURED == [tb]
    snapshot = (tb.staging.clone(), tb.buffer.clone())
    capturing[0] = False
    later = []
    for k in range(300):          # more than any cache size (the host rows keep 64)
        other = _lists([k + 1, 3])
        later.append(mt.launch_tables(other, 16, device=cuda))
    assert mt.CAPTURED == [tb]
    assert torch.equal(tb.staging, snapshot[0]) and torch.equal(tb.buffer, snapshot[1])
    held = {tb.staging.data_ptr(), tb.buffer.data_ptr()}
    assert not held & {t.data_ptr() for x in later for t in (x.staging, x.buffer)}
    assert mt.release_captured_tables() == 1 and mt.CAPTURED == []


def test_relaxed_capture_mode_is_set_and_restored(monkeypatch):
    """While a stream captures, the launch runs in the relaxed capture mode (a first Triton
    launch loads its module, a first pinned block is allocated); the thread's previous mode
    comes back afterwards, also when the launch raises; without a driver nothing changes."""
    modes = [0]                       # the thread's mode: global

    def exchange(mode):
        prev, modes[0] = modes[0], mode
        return prev

    monkeypatch.setattr(mt, "_exchange_capture_mode", exchange)
    with mt._relaxed_capture():
        assert modes[0] == mt._CU_STREAM_CAPTURE_MODE_RELAXED
    assert modes[0] == 0
    with pytest.raises(KeyError):
        with mt._relaxed_capture():
            raise KeyError("launch failed")
    assert modes[0] == 0
    monkeypatch.setattr(mt, "_exchange_capture_mode", lambda mode: -1)   # no driver library
    with mt._relaxed_capture():
        pass


def test_check_lists():
    a, b = torch.zeros(3), torch.zeros(4)
    mt.check_lists("op", "params", [a, b], grads=[a.clone(), b.clone()], moms=None)
    with pytest.raises(ValueError, match="grads"):
        mt.check_lists("op", "params", [a, b], grads=[a])
    with pytest.raises(ValueError, match="elements"):
        mt.check_lists("op", "params", [a, b], grads=[b, a])
    with pytest.raises(ValueError, match="float64"):
        mt.check_lists("op", "params", [a, b], grads=[a.double(), b])
    with pytest.raises(ValueError, match="1-D"):
        mt.check_lists("op", "params", [torch.zeros(2, 2)])


def test_lists_ok_agrees_with_the_loop():
    """The list-at-a-time fast path of check_lists accepts exactly what the per-tensor loop
    accepts (each kind of bad tensor, in any position and any list)."""
    def loop_ok(ref, others):
        try:
            with mock.patch.object(mt, "lists_ok", lambda *a: False):
                mt.check_lists("op", "params", ref, **others)
            return True
        except ValueError:
            return False

    good = [torch.zeros(3), torch.zeros(1), torch.zeros(0), torch.zeros(8)]
    bad = [torch.zeros(2, 2).reshape(-1)[:3], torch.zeros(6)[::2], torch.zeros(3, 1),
           torch.zeros(()), torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.int32),
           torch.zeros(4), torch.zeros(3, device="meta"), torch.zeros(3, dtype=torch.bfloat16)]
    for i in range(len(good)):
        for x in bad:
            for where in ("params", "grads", "moms"):
                ref = [t.clone() for t in good]
                grads, moms = [t.clone() for t in good], [t.clone() for t in good]
                {"params": ref, "grads": grads, "moms": moms}[where][i] = x
                others = {"grads": grads, "moms": moms}
                want = loop_ok(ref, others)
                assert mt.lists_ok(ref, (ref, grads, moms)) == want, (i, x.shape, x.dtype, where)
    ref = [t.clone() for t in good]
    assert mt.lists_ok(ref, (ref, None, [t.clone() for t in good]))
    assert not mt.lists_ok(ref, (ref, good[:2]))
    assert not mt.lists_ok([torch.zeros(3, dtype=torch.int64)], ([torch.zeros(3)],))


def test_aligned16_flag():
    store = torch.zeros(64)
    lists = [[store[0:4], store[8:12]], [store[16:20], store[24:28]]]
    assert mt.launch_tables(lists, 16).aligned16 == (store.data_ptr() % 16 == 0)
    lists[1][1] = store[25:29]                       # 4 bytes past a 16-byte boundary
    assert not mt.launch_tables(lists, 16).aligned16


def test_register_list_op_schema_fake_versions_and_opcheck():
    """fused_flat.backends.multi_tensor.register_list_op (what the Triton list ops are
    registered with): the schema as written, the real implementation on every device, the
    fake one under FakeTensorMode, version counters bumped on the written lists only, and
    torch.library.opcheck (schema annotations, fake, autograd fallback, AOT dispatch)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    lib = torch.library.Library("fused_flat_test_mt", "FRAGMENT")
    calls = []

    def impl(xs, ys, alpha, scale_t):
        calls.append("real")
        for x, y in zip(xs, ys):
            x.data.add_(y, alpha=alpha)               # .data: no version bump of its own
        return torch.stack([y.sum() for y in ys]).sum() * (scale_t if scale_t is not None else 1)

    def fake(xs, ys, alpha, scale_t):
        calls.append("fake")
        return ys[0].new_empty(())

    op = mt.register_list_op(lib, "axpy_list_(Tensor(a0!)[] xs, Tensor[] ys, float alpha, "
                                  "Tensor? scale_t) -> Tensor", impl, fake)
    assert str(op._schema) == ("fused_flat_test_mt::axpy_list_(Tensor(a0!)[] xs, Tensor[] ys, "
                               "float alpha, Tensor? scale_t) -> Tensor")
    assert torch.Tag.pt2_compliant_tag in op.tags
    xs, ys = [torch.zeros(3), torch.zeros(5)], [torch.ones(3), torch.ones(5)]
    with torch.no_grad():
        out = op(xs, ys, 2.0, None)
    assert calls == ["real"] and out.item() == 8.0 and xs[1].tolist() == [2.0] * 5
    assert [x._version for x in xs] == [1, 1] and [y._version for y in ys] == [0, 0]
    with FakeTensorMode() as mode:
        fx = [mode.from_tensor(x) for x in xs]
        fy = [mode.from_tensor(y) for y in ys]
        r = op(fx, fy, 1.0, None)
    assert calls[-1] == "fake" and r.shape == () and calls.count("real") == 1
    torch.library.opcheck(op, ([torch.randn(3), torch.randn(5)], [torch.randn(3), torch.randn(5)],
                               0.5, torch.tensor(2.0)))
    with pytest.raises(TypeError, match="lists"):
        mt.register_list_op(lib, "bad_(Tensor(a0!) x) -> ()", impl, fake)
    with pytest.raises(TypeError, match="defaults"):
        mt.register_list_op(lib, "bad2_(Tensor(a0!)[] x, float alpha=1.0) -> ()", impl, fake)


def test_list_op_schemas_mark_the_written_lists():
    """Every list op, both GPU backends (Triton's registered ops; the compiled ops the 'cuda'
    and 'cpp' backends share): the lists it writes, and only those, are Tensor(a!)[] in its
    schema (functionalization and compile rely on it)."""
    from fused_flat.backends import _native

    written = {"perturb_list_": ["params"], "restore_and_step_list_": ["params", "moms"],
               "all_finite_list": [], "sam_grad_sq_norm_list": [],
               "sam_perturb_list_": ["params", "backups"],
               "sam_restore_and_step_list_": ["params", "moms"],
               "sam_probe_list_": ["params", "backups"]}
    namespaces = []
    if _native.available():
        namespaces.append("fused_flat")
    try:
        from fused_flat.backends.triton import multi, sam  # noqa: F401  (registers fused_flat_triton)
        namespaces.append("fused_flat_triton")
    except ImportError:
        pass
    if not namespaces:
        pytest.skip("neither the compiled extension nor Triton")
    for ns in namespaces:
        for name, want in written.items():
            if ns == "fused_flat" and name == "all_finite_list":
                name = "all_finite"   # the compiled op takes any tensors, lists included
            schema = getattr(getattr(torch.ops, ns), name).default._schema
            got = [a.name for a in schema.arguments
                   if a.alias_info is not None and a.alias_info.is_write]
            assert got == want, (ns, name, got)
            assert all(str(a.type) == "List[Tensor]" for a in schema.arguments if a.name in got)
