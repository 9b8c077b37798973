"""STREAM copy and triad bandwidth measured with torch: the roofline of the micro benchmark.

Measured on the same machine, in the same process and run as the passes it is compared
with. Bandwidth = bytes read + written / time, best of N (STREAM's convention):

  copy   b <- a             2 n elements moved
  triad  a <- b + s * c     3 n elements moved   (torch.add(b, c, alpha=s, out=a))
  add_   a <- a + b         3 n elements moved   (in place, the shape of a fused update pass)

Usage: python -m fused_flat bench stream [--size 64M] [--reps 10] [--dtype float32]
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    import sys as _sys
    from pathlib import Path as _Path

    _sys.path.insert(0, str(_Path(__file__).resolve().parent.parent))

import argparse
import time

import torch

from benchmarks import common

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def measure(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
            reps: int = 10) -> dict:
    """{'copy_GBps', 'triad_GBps', 'add_GBps', 'n', 'dtype', 'reps'} for arrays of n elements."""
    device = torch.device(device)
    es = torch.empty((), dtype=dtype).element_size()
    a = torch.ones(n, dtype=dtype, device=device)
    b = torch.full((n,), 2.0, dtype=dtype, device=device)
    c = torch.full((n,), 0.5, dtype=dtype, device=device)
    kernels = {
        "copy": (lambda: b.copy_(a), 2),
        "triad": (lambda: torch.add(b, c, alpha=3.0, out=a), 3),
        "add_": (lambda: a.add_(c), 3),
    }
    out = {"n": n, "dtype": str(dtype).replace("torch.", ""), "reps": reps, "device": str(device)}
    for name, (fn, words) in kernels.items():
        fn()
        common.sync(device)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            common.sync(device)
            best = min(best, time.perf_counter() - t0)
        out[f"{name}_GBps"] = words * n * es / best / 1e9
        out[f"{name}_best_s"] = best
    del a, b, c
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="fused-flat bench stream", description=__doc__.splitlines()[0])
    ap.add_argument("--size", default=None, help="elements per array (default 64M on CPU, 256M on GPU)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(common.DEFAULT_OUT))
    args = ap.parse_args(argv)
    dev = common.resolve_device(args.device)
    n = common.parse_size(args.size) if args.size else (256 << 20 if dev.type == "cuda" else 64 << 20)
    meta = common.machine_info(dev)
    res = measure(n, DTYPES[args.dtype], dev, args.reps)
    print(common.meta_line(meta))
    print(f"STREAM ({common.human_count(n)} {res['dtype']} elements per array, best of {args.reps}): "
          f"copy {res['copy_GBps']:.1f} GB/s, triad {res['triad_GBps']:.1f} GB/s, "
          f"in-place add {res['add__GBps']:.1f} GB/s")
    common.write_json(common.Path(args.out) / "stream.json", {"meta": meta, "stream": res})
    return res


if __name__ == "__main__":
    main()
