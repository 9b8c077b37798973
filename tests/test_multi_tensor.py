"""Host emulation of the multi-tensor launch tables (fused_flat/multi_tensor.py), on CPU.

Every element of every tensor must be covered by exactly one (chunk row, lane) pair, for
thousands of random size lists (1-element tensors, empty tensors, sizes not a multiple of
the block, empty lists), with every row's work inside one tensor and one chunk, exactly as
a kernel program reads its row: t, s = chunks[b]; elements [s, min(s + chunk, numel_t)).
"""
from __future__ import annotations

import random

import pytest
import torch

from fused_flat import multi_tensor as mt


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


def test_plan_and_pointer_caches():
    mt.clear_caches()
    before = dict(mt.stats)
    p1 = mt.plan([3, 4], 16, "cpu")
    p2 = mt.plan([3, 4], 16, "cpu")
    assert p1 is p2 and mt.stats["chunk_builds"] == before["chunk_builds"] + 1
    assert mt.plan([3, 4], 16, "cpu", offsets=[1, 9]) is not p1
    a, b = torch.zeros(3), torch.zeros(4)
    ptr1 = mt.pointer_table([[a, b], [b, a]], "cpu")
    assert ptr1.tolist() == [[a.data_ptr(), b.data_ptr()], [b.data_ptr(), a.data_ptr()]]
    assert mt.pointer_table([[a, b], [b, a]], "cpu") is ptr1
    c = torch.zeros(3)
    assert mt.pointer_table([[c, b], [b, a]], "cpu") is not ptr1   # new storage, new table
    with pytest.raises(ValueError):
        mt.pointer_table([[a], [a, b]], "cpu")


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
