"""Host emulation of the by-value launch planning of the CUDA tensor-list ops (no GPU needed).

csrc/cuda/list_launch.h holds all of the logic that decides which block of which launch
visits which units of which tensor (plan_launches, row_of). tests/list_launch_emulation.cpp
compiles it with the host compiler and runs it over 600 random tensor lists (up to 200
tensors: more than one launch's slots; empty and tiny tensors; bucket offsets up to 2^34,
not multiples of 4), the exact launch-capacity edges, and sizes past 2^31 and 2^32 elements
(index arithmetic only: the tensors are sizes and fake pointers), for K = 1..4 lists, plain
and call-frame units: every unit of every tensor is visited exactly once, in order, with the
right bucket index (see the .cpp's comment).
"""
from __future__ import annotations

import re

from tests.helpers import run_host_program


def test_list_launch_plan_on_host(tmp_path):
    run = run_host_program("list_launch_emulation.cpp", tmp_path, torch_headers=False)
    m = re.search(r"cases=(\d+) launches=(\d+) max_units=(\d+) failures=(\d+)", run.stdout)
    assert m, f"unexpected output:\n{run.stdout[-4000:]}\n{run.stderr[-2000:]}"
    cases, launches, max_units, fails = map(int, m.groups())
    assert fails == 0, f"{fails} failures:\n{run.stdout[-4000:]}"
    assert run.returncode == 0
    # the big cases ran (units past 2^32) and lists needed more than one launch
    assert cases > 600 and launches > cases and max_units > 1 << 32, run.stdout
    sizes = re.search(r"sizeof ListArgs<1..4> = (\d+) (\d+) (\d+) (\d+)", run.stdout)
    assert sizes and all(int(s) <= 3584 for s in sizes.groups()), run.stdout
