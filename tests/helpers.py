"""Test helpers shared by the optimizer tests."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fused_flat import noise
from fused_flat.optim.buckets import flat, round_up4


def bucket_noise(params, seed: int, bucket_id: int, step: int, tag: int = 0):
    """(eps, xi) of a bucket made of ``params`` (in order), concatenated per parameter in
    memory order, with the bucket index rule of ALGORITHMS.md (offsets rounded up to 4)."""
    eps, xi, off = [], [], 0
    for p in params:
        e, x = noise.gaussian_noise(seed, bucket_id, step, tag, off, p.numel())
        eps.append(e)
        xi.append(x)
        off += round_up4(p.numel())
    return torch.cat(eps), torch.cat(xi)


def flat_cat(tensors) -> torch.Tensor:
    """Parameters (or gradients) concatenated in memory order."""
    return torch.cat([flat(t.detach()) for t in tensors])


class RecordOps(TorchDispatchMode):
    """Records the registered ops of one namespace (``fused_flat_triton``,
    ``fused_flat``) that reach the dispatcher: (op name, {argument: value}), schema
    defaults filled in."""

    def __init__(self, namespace: str):
        super().__init__()
        self.namespace = namespace
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == self.namespace:
            schema = func._schema.arguments
            named = {a.name: a.default_value for a in schema if a.has_default_value()}
            named.update(zip([a.name for a in schema], args))
            named.update(kwargs)
            self.calls.append((func._schema.name.split("::")[1], named))
        return func(*args, **kwargs)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_host_program(source: str, out_dir, *, torch_headers: bool = True,
                     timeout: int = 300) -> subprocess.CompletedProcess:
    """Compile ``tests/<source>`` (a host emulation of CUDA index logic: it includes the
    ``__host__ __device__`` headers of csrc/include and csrc/cuda) with the host C++ compiler,
    as the CUDA build compiles them (C++20, no FMA contraction), run it in ``out_dir`` and
    return the run. Fails the test when there is no compiler or the build fails.
    ``torch_headers``: the program includes c10/ATen headers (torch's include paths)."""
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.fail("no host C++ compiler (c++/g++) on PATH")
    exe = os.path.join(str(out_dir), os.path.splitext(os.path.basename(source))[0])
    cmd = [cxx, "-std=c++20", "-O1", "-Wall", "-ffp-contract=off",
           "-I" + os.path.join(ROOT, "csrc", "include"), "-I" + os.path.join(ROOT, "csrc", "cuda"),
           "-I" + os.path.join(ROOT, "tests")]
    if torch_headers:
        from torch.utils import cpp_extension

        cmd += ["-I" + p for p in cpp_extension.include_paths()]
    cmd += ["-o", exe, os.path.join(ROOT, "tests", source)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert build.returncode == 0, f"compile failed:\n{build.stderr[-4000:]}"
    return subprocess.run([exe], capture_output=True, text=True, timeout=timeout)
