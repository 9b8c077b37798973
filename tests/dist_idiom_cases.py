"""Distributed cases of tests/test_idioms.py: the seed broadcast's ``process_group=`` option
when the ranks build different numbers of optimizers (pipeline stages). Run on 2 gloo
processes by the harness of tests/dist_cases.py (its ``worker``: init, save the results,
barrier, teardown)."""
from __future__ import annotations

import torch

from fused_flat import FSGLD, RWP, SGLD
from tests import dist_cases as dc


def _pipeline(rank: int, results: dict, *_) -> None:
    import torch.distributed as dist

    params = lambda: dc.mlp().parameters()   # noqa: E731
    seeds: dict = {}
    # process_group=False: no collective; rank 0 builds two optimizers, rank 1 one
    opts = [FSGLD(params(), lr=0.1, seed=10 + rank, process_group=False)]
    if rank == 0:
        opts.append(SGLD(params(), lr=0.1, seed=20, process_group=False))
    seeds["none"] = [o.seed for o in opts]
    # one group per stage: rank 1's group has global rank 1 as its first rank
    stage = [dist.new_group([0]), dist.new_group([1])]   # every rank creates every group
    opts = [RWP(params(), lr=0.1, seed=30 + rank, process_group=stage[rank])]
    if rank == 0:
        opts.append(FSGLD(params(), lr=0.1, seed=40, process_group=stage[0]))
    seeds["stage"] = [o.seed for o in opts]
    # a group of both ranks, then the default group: both still pair up (no collective was
    # left pending above), and they give the first rank's seed
    both = dist.new_group([0, 1])
    seeds["group"] = FSGLD(params(), lr=0.1, seed=50 + rank, process_group=both).seed
    seeds["default"] = SGLD(params(), lr=0.1, seed=60 + rank).seed
    results["seeds"] = seeds


JOBS = {"pipeline": _pipeline}


def worker(rank: int, job: str, store_path: str, outdir: str) -> None:
    """tests/dist_cases.py's worker running JOBS[job] of this file."""
    torch.set_num_threads(1)
    dc.JOBS[job] = JOBS[job]
    dc.worker(rank, job, store_path, outdir)
