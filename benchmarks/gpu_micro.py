"""GPU micro benchmark: each fused pass as a fraction of the device's measured copy bandwidth.

For each size (elements; 1M .. 1B as device memory allows) and dtype, on one CUDA device:

* copy bandwidth: ``dst.copy_(src)`` of n elements, bytes = 2 n s (read + write), median of
  timed repetitions with CUDA events (the yardstick: what a pass that only moves its bytes
  could reach on this device);
* every fused pass that runs here, timed the same way, with bytes = what the pass must move:
    flat Langevin passes (backend 'cuda' and 'triton', one bucket):
      perturb_            theta read + write                       2 n s
      restore_and_step_   theta, g read; theta write (no momentum) 3 n s
    multi-tensor Langevin passes (fused_flat.backends.cuda and fused_flat.backends.triton.multi, one
    launch for a list of ``--tensors`` tensors of mixed sizes summing to n, packed offsets):
      perturb_ (list), restore_and_step_ (list): bytes as the flat passes
    multi-tensor SAM passes (fused_flat.backends.cuda_sam and fused_flat.backends.triton.sam, the same list):
      sam_grad_sq_norm    g read                                   1 n s
      sam_perturb_        theta, g read; theta, backup write       4 n s
      sam_restore_and_step_ backup, g read; theta write            3 n s
      sam_probe_          theta read; theta, backup write          3 n s
  reported as GB/s and fraction of the copy bandwidth at the same size.

Target (issue 12): every fused pass >= 85% of copy bandwidth at >= 64M elements.

Launch overhead (issue 12, "one launch per bucket"): the Langevin passes over the 62
parameter tensors of a ResNet-18 (10 classes, 11.2M elements, fp32), one multi-tensor launch
vs one launch per tensor (the cuda list op over a one-tensor list, fused_flat.backends.per_tensor),
reported separately (``launch`` in the JSON, its own table; no bandwidth verdict).
A pass that cannot run (backend missing, API changed) is listed with the reason, never
silently dropped. Usage: python benchmarks/gpu_micro.py [--sizes 1M,64M] [--out results]
"""
from __future__ import annotations

if __package__ in (None, ""):
    import sys as _sys
    from pathlib import Path as _Path

    _sys.path.insert(0, str(_Path(__file__).resolve().parent.parent))

import argparse
import json
from pathlib import Path

import torch

TARGET_FRACTION = 0.85
TARGET_MIN_SIZE = 64 << 20
SIZES = "1M,4M,16M,64M,256M,1G"


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "B": 1 << 30}.get(s[-1:], 1)
    return int(float(s[:-1] if mult > 1 else s) * mult)


def time_cuda(fn, reps: int, warmup: int = 3) -> float:
    """Median seconds of fn() over reps, each bracketed by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return times[len(times) // 2]


def split_sizes(n: int, k: int) -> list[int]:
    """k tensor sizes summing to n, mixed like a model's parameters (some tiny, odd sizes)."""
    g = torch.Generator().manual_seed(0)
    w = torch.rand(k, generator=g, dtype=torch.float64) ** 3 + 1e-6
    sizes = [max(1, int(x)) for x in (w / w.sum() * n).tolist()]
    sizes[-1] = n - sum(sizes[:-1])
    if sizes[-1] < 1:                                   # tiny n: equal split
        sizes = [n // k + (i < n % k) for i in range(k)]
    return [x for x in sizes if x > 0]


def _passes(n: int, dtype: torch.dtype, n_tensors: int, dev):
    """[(name, bytes_per_element_multiple, fn or exception)]."""
    s = torch.empty((), dtype=dtype).element_size()
    out = []
    p = torch.randn(n, device=dev).to(dtype)
    g = torch.randn(n, device=dev).to(dtype) * 1e-3
    b = torch.empty_like(p)
    sizes = split_sizes(n, n_tensors)
    ps, gs, bs = p.split(sizes), g.split(sizes), b.split(sizes)
    step = [0]

    def flat(backend_name):
        from fused_flat import backends
        be = backends.per_tensor(backends.get(backend_name))

        def perturb():
            be.perturb_(p, 1234, 0, 1, 0, 1e-3, 0)

        def restore():
            be.restore_and_step_(p, g, None, None, None, 1234, 0, 1, 0, 0, 1e-3, 1e-6, 0.0, 0.0,
                                 0.0, False, False, 1e-4, 1.0)
        return [("perturb_", 2, perturb), ("restore_and_step_", 3, restore)]

    offs = [sum(sizes[:i]) for i in range(len(sizes))]

    def multi(mod, lang):
        coef = torch.full((), 1e-3, dtype=torch.float64, device=dev)
        return [
            ("perturb_ (list)", 2, lambda: lang.perturb_(ps, offs, 1234, 0, 1, 0, 1e-3)),
            ("restore_and_step_ (list)", 3, lambda: lang.restore_and_step_(
                ps, gs, None, offs, None, None, 1234, 0, 1, 0, 1e-3, 1e-6, 0.0, 0.0, 0.0, False,
                False, 1e-4, 1.0)),
        ] + [
            ("sam_grad_sq_norm", 1, lambda: mod.sam_grad_sq_norm(gs, None, 0.0)),
            ("sam_perturb_", 4, lambda: mod.sam_perturb_(ps, gs, bs, False, coef, 0.0)),
            ("sam_restore_and_step_", 3, lambda: mod.sam_restore_and_step_(
                ps, bs, gs, None, None, None, 1e-6, 0.0, 0.0, 0.0, False, False, 1.0)),
            ("sam_probe_", 3, lambda: mod.sam_probe_(ps, bs, [0] * len(ps), 1234, 0,
                                                      step[0], 1e-3)),
        ]

    for label, make in (("cuda", lambda: flat("cuda")), ("triton", lambda: flat("triton")),
                        ("cuda-multi", lambda: multi(_mod("fused_flat.backends.cuda_sam"),
                                                     _mod("fused_flat.backends.cuda"))),
                        ("triton-multi", lambda: multi(_mod("fused_flat.backends.triton.sam"),
                                                       _mod("fused_flat.backends.triton.multi")))):
        try:
            for name, mult, fn in make():
                out.append((f"{name} [{label}]", mult * s, fn))
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            out.append((f"* [{label}]", 0, exc))
    return out


def _mod(name: str):
    import importlib

    return importlib.import_module(name)


class _PerTensor:
    """Backend ``name``'s passes one tensor at a time (fused_flat.backends.per_tensor: the list
    op over a one-tensor list), loaded on first use so that a missing backend is reported as
    the row's error."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attr):
        from fused_flat import backends

        return getattr(backends.per_tensor(backends.get(self.name)), attr)


# parameter numels of torchvision's resnet18(num_classes=10), in model order (62 tensors)
RESNET18_SIZES = [9408, 64, 64, 36864, 64, 64, 36864, 64, 64, 36864, 64, 64, 36864, 64, 64,
                  73728, 128, 128, 147456, 128, 128, 8192, 128, 128, 147456, 128, 128, 147456,
                  128, 128, 294912, 256, 256, 589824, 256, 256, 32768, 256, 256, 589824, 256, 256,
                  589824, 256, 256, 1179648, 512, 512, 2359296, 512, 512, 131072, 512, 512,
                  2359296, 512, 512, 2359296, 512, 512, 5120, 10]


def launch_overhead(reps: int) -> tuple[list[dict], list[str]]:
    """The Langevin passes over a ResNet-18-shaped list: one launch vs per-tensor launches."""
    dev = torch.device("cuda")
    sizes = RESNET18_SIZES
    offs, acc = [], 0
    for n in sizes:             # bucket offsets rounded up to whole Philox calls (ALGORITHMS §1)
        offs.append(acc)
        acc += (n + 3) // 4 * 4
    ps = [torch.randn(n, device=dev) for n in sizes]
    gs = [torch.randn(n, device=dev) * 1e-3 for n in sizes]
    ms = [torch.zeros(n, device=dev) for n in sizes]
    rows, notes = [], []
    hyper = (1234, 0, 1, 0, 1e-3, 1e-6, 5e-4, 0.9, 0.0, False, False, 1e-4, 1.0)

    def cases():
        yield "cuda", "one launch", _mod("fused_flat.backends.cuda"), True
        yield "cuda", "per tensor", _PerTensor("cuda"), False   # a one-tensor list op a tensor
        yield "triton", "one launch", _mod("fused_flat.backends.triton.multi"), True

    for label, how, mod, is_list in cases():
        try:
            if is_list:
                pert = lambda: mod.perturb_(ps, offs, 1234, 0, 1, 0, 1e-3)  # noqa: E731
                step = lambda: mod.restore_and_step_(ps, gs, ms, offs, None, None, *hyper)  # noqa: E731
            else:
                def pert():
                    for p, o in zip(ps, offs):
                        mod.perturb_(p, 1234, 0, 1, 0, 1e-3, o)

                def step():
                    for p, g, m, o in zip(ps, gs, ms, offs):
                        mod.restore_and_step_(p, g, m, None, None, 1234, 0, 1, o, *hyper[3:])
            for name, fn, launches in (("perturb_", pert, 1 if is_list else len(sizes)),
                                       ("restore_and_step_ (momentum)", step,
                                        1 if is_list else len(sizes))):
                t = time_cuda(fn, reps)
                rows.append(dict(backend=label, how=how, pass_=name, launches=launches,
                                 tensors=len(sizes), n=sum(sizes), seconds=t))
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            notes.append(f"launch overhead [{label}, {how}]: not run: {type(exc).__name__}: {exc}")
    return rows, notes


def run(sizes: list[int], dtypes: list[torch.dtype], n_tensors: int, reps: int) -> dict:
    dev = torch.device("cuda")
    rows, notes = [], []
    for dtype in dtypes:
        s = torch.empty((), dtype=dtype).element_size()
        for n in sizes:
            free, _total = torch.cuda.mem_get_info()
            if 6 * n * s > 0.8 * free:
                notes.append(f"{dtype} n={n}: skipped, needs ~{6 * n * s / 2**30:.1f} GiB, "
                             f"{free / 2**30:.1f} GiB free")
                continue
            src = torch.randn(n, device=dev).to(dtype)
            dst = torch.empty_like(src)
            t_copy = time_cuda(lambda: dst.copy_(src), reps)
            copy_bw = 2 * n * s / t_copy
            del src, dst
            rows.append(dict(dtype=str(dtype).replace("torch.", ""), n=n, pass_="copy",
                             seconds=t_copy, gbps=copy_bw / 1e9, fraction=1.0))
            for name, bytes_per_el, fn in _passes(n, dtype, n_tensors, dev):
                if isinstance(fn, Exception):
                    notes.append(f"{name} {dtype}: not run: {type(fn).__name__}: {fn}")
                    continue
                try:
                    t = time_cuda(fn, reps)
                except Exception as exc:  # noqa: BLE001
                    notes.append(f"{name} {dtype} n={n}: failed: {type(exc).__name__}: {exc}")
                    continue
                bw = bytes_per_el * n / t
                rows.append(dict(dtype=str(dtype).replace("torch.", ""), n=n, pass_=name,
                                 seconds=t, gbps=bw / 1e9, fraction=bw / copy_bw))
            torch.cuda.empty_cache()
    launch, launch_notes = launch_overhead(reps)
    return {"device": torch.cuda.get_device_name(), "rows": rows, "notes": notes + launch_notes,
            "launch": launch,
            "target": {"fraction": TARGET_FRACTION, "min_size": TARGET_MIN_SIZE}}


def verdicts(result: dict) -> list[tuple[str, bool, str]]:
    """(pass, meets target, detail) per fused pass and dtype, over sizes >= 64M."""
    out = []
    keys = sorted({(r["pass_"], r["dtype"]) for r in result["rows"] if r["pass_"] != "copy"})
    for name, dt in keys:
        big = [r for r in result["rows"] if r["pass_"] == name and r["dtype"] == dt
               and r["n"] >= TARGET_MIN_SIZE]
        if not big:
            out.append((f"{name} {dt}", False, "no run at >= 64M elements"))
            continue
        worst = min(big, key=lambda r: r["fraction"])
        out.append((f"{name} {dt}", worst["fraction"] >= TARGET_FRACTION,
                    f"min {worst['fraction']:.0%} of copy bandwidth (n={worst['n']:,}, "
                    f"{worst['gbps']:.0f} GB/s)"))
    return out


def markdown(result: dict) -> list[str]:
    md = [f"Device: {result['device']}. Bandwidth = bytes the pass must move / median time "
          f"(CUDA events); fraction = of `copy_` at the same size and dtype.", "",
          "| dtype | elements | pass | ms | GB/s | of copy |", "|---|---:|---|---:|---:|---:|"]
    for r in result["rows"]:
        md.append(f"| {r['dtype']} | {r['n']:,} | {r['pass_']} | {r['seconds'] * 1e3:.3f} | "
                  f"{r['gbps']:.0f} | {r['fraction']:.0%} |")
    if result.get("launch"):
        md += ["", "Launch overhead: ResNet-18-shaped list (62 fp32 tensors, 11.2M elements).", "",
               "| backend | pass | how | launches | ms |", "|---|---|---|---:|---:|"]
        for r in result["launch"]:
            md.append(f"| {r['backend']} | {r['pass_']} | {r['how']} | {r['launches']} | "
                      f"{r['seconds'] * 1e3:.3f} |")
    if result["notes"]:
        md += ["", "Notes:"] + [f"- {n}" for n in result["notes"]]
    return md


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=SIZES)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--tensors", type=int, default=100, help="tensors per list of the SAM passes")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_micro: no CUDA GPU (torch.cuda.is_available() is False); nothing measured.")
        return {}
    result = run([parse_size(x) for x in args.sizes.split(",")],
                 [getattr(torch, d) for d in args.dtypes.split(",")], args.tensors, args.reps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_micro.json").write_text(json.dumps(result, indent=1))
    (out / "gpu_micro.md").write_text("\n".join(markdown(result)) + "\n")
    return result


if __name__ == "__main__":
    main()
