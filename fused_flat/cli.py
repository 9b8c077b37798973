"""Command-line entry point of fused_flat: environment report and benchmarks.

    python -m fused_flat info [--json]        # like DeepSpeed's ds_report
    python -m fused_flat bench micro [...]    # per-pass kernels vs torch.optim.SGD and STREAM
    python -m fused_flat bench e2e [...]      # training steps of ResNet-18 / a GPT block stack
    python -m fused_flat bench stream [...]   # STREAM copy/triad bandwidth only
    python -m fused_flat bench lowprec [...]  # bf16 parameters: walk variance, double well, GPT
    python -m fused_flat science [--quick]    # fSGLD paper's claims on digits (benchmarks/science.py)

(``fused-flat`` is the same command as a console script.) The benchmarks live in the
``benchmarks/`` directory of a source checkout, next to the ``fused_flat`` package; an
installed wheel does not ship them. ``bench <name> --help`` lists each one's options.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from pathlib import Path

BENCHMARKS = ("micro", "e2e", "stream", "lowprec")

_HOW_TO_GET = {
    "reference": "always available (pure torch)",
    "cpp": "build the extension: `pip install --no-build-isolation -e .` or `make build`",
    "cuda": "build on a machine with nvcc: `CUDA_HOME=/usr/local/cuda FORCE_CUDA=1 "
            "TORCH_CUDA_ARCH_LIST=\"8.0;9.0\" pip install --no-build-isolation -e .`; runs on CUDA tensors",
    "triton": "`pip install triton` (ships with CUDA builds of torch); runs on CUDA tensors",
}


def benchmarks_dir() -> Path:
    import fused_flat

    return Path(fused_flat.__file__).resolve().parent.parent / "benchmarks"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect_info() -> dict:
    """Everything `info` prints, as a dict."""
    import torch

    import fused_flat
    from fused_flat import backends
    from fused_flat.backends import _native

    avail = backends.available_backends()
    cuda_ok = torch.cuda.is_available()
    auto = {"cpu": "cpp" if avail.get("cpp") == "ok" else "reference"}
    if cuda_ok:
        auto["cuda"] = next((b for b in ("triton", "cuda") if avail.get(b) == "ok"), "reference")
    bdir = benchmarks_dir()
    return {
        "fused_flat": fused_flat.__version__,
        "fused_flat_path": str(Path(fused_flat.__file__).resolve().parent),
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "cpu": f"{_cpu_model()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        "torch": torch.__version__,
        "torch_path": str(Path(torch.__file__).resolve().parent),
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": cuda_ok,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda_ok else [],
        "extension_loaded": _native.available(),
        "extension_build_info": _native.build_info(),
        "extension_load_error": _native.load_error,
        "extension_build_hint": None if _native.available() else _native.BUILD_HINT,
        "backends": {name: {"ok": status == "ok", "reason": None if status == "ok" else status,
                            "how_to_get": _HOW_TO_GET.get(name)} for name, status in avail.items()},
        "auto_backend": auto,
        "benchmarks_dir": str(bdir) if bdir.is_dir() else None,
    }


def print_info(info: dict) -> None:
    line = "-" * 78
    print(line)
    print("fused_flat environment report")
    print(line)
    for key in ("fused_flat", "fused_flat_path", "python", "platform", "cpu", "torch", "torch_path",
                "torch_cuda_build", "cuda_available"):
        print(f"{key:.<28} {info[key]}")
    print(f"{'gpus':.<28} {', '.join(info['gpus']) or 'none'}")
    print(line)
    if info["extension_loaded"]:
        print(f"{'compiled extension':.<28} [OKAY] fused_flat._C")
        for k, v in info["extension_build_info"].items():
            print(f"    {k:.<24} {v}")
    else:
        print(f"{'compiled extension':.<28} [FAIL] {info['extension_load_error']}")
        print(f"    fix: {info['extension_build_hint']}")
    print(line)
    print("backend      status  reason / how to get it")
    for name, b in info["backends"].items():
        if b["ok"]:
            print(f"{name:<12} [OKAY]  {b['how_to_get'] if name == 'reference' else 'available'}")
        else:
            print(f"{name:<12} [----]  {b['reason']}")
            print(f"{'':<20}to get it: {b['how_to_get']}")
    print(f"backend='auto' picks: " + ", ".join(f"{d} tensors -> {n}" for d, n in info["auto_backend"].items()))
    print(line)
    bdir = info["benchmarks_dir"]
    print(f"{'benchmarks':.<28} {bdir or 'not found (they ship with the source checkout, not the wheel)'}")
    print(line)


def load_benchmark(name: str):
    """Import benchmarks.<name> from the checkout next to the package; SystemExit if missing."""
    bdir = benchmarks_dir()
    if not (bdir / f"{name}.py").is_file():
        raise SystemExit(
            f"fused_flat: the benchmarks were not found at {bdir}.\n"
            f"They live in the `benchmarks/` directory of a fused_flat source checkout and are not "
            f"part of an installed wheel. Clone the repository, `pip install --no-build-isolation -e .` "
            f"there, and run `python -m fused_flat bench {name}` from it.")
    root = str(bdir.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    mod = sys.modules.get("benchmarks")
    if mod is not None and Path(getattr(mod, "__file__", "") or "").resolve().parent != bdir.resolve():
        for key in [k for k in sys.modules if k == "benchmarks" or k.startswith("benchmarks.")]:
            del sys.modules[key]   # another package called `benchmarks` shadowed ours
    return importlib.import_module(f"benchmarks.{name}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fused-flat", description="fused_flat: environment report and benchmarks")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_info = sub.add_parser("info", help="torch, CUDA, the compiled extension and each backend")
    p_info.add_argument("--json", action="store_true", help="print the report as JSON")
    p_bench = sub.add_parser("bench", help="run a benchmark (options after the name; --help lists them)",
                             add_help=True)
    p_bench.add_argument("name", choices=BENCHMARKS)
    p_bench.add_argument("args", nargs=argparse.REMAINDER, help="options of the benchmark")
    p_sci = sub.add_parser("science", help="does fSGLD find flatter minima? (digits, label noise; --help)",
                           add_help=False)
    p_sci.add_argument("args", nargs=argparse.REMAINDER, help="options of benchmarks/science.py")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["science"]:          # its options go to benchmarks/science.py unparsed
        load_benchmark("science").main(argv[1:])
        return 0
    args = ap.parse_args(argv)
    if args.cmd == "info":
        info = collect_info()
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            print_info(info)
        return 0
    mod = load_benchmark(args.name)
    mod.main(args.args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
