"""Shared helpers of the benchmarks: machine description, timing, result files, tables, plots.

Every result file carries the same ``meta`` block (machine, torch version, fused_flat
backends, date), so a number is never separated from where and how it was measured.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "results"


# ----------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmark: --device cuda requested but torch.cuda.is_available() is False")
    return dev


def machine_info(device: torch.device | None = None) -> dict:
    """Where and with what a result was measured (goes into every result file)."""
    import fused_flat
    from fused_flat import backends
    from fused_flat.backends import _native

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "device": str(device) if device is not None else None,
        "fused_flat": fused_flat.__version__,
        "extension": _native.build_info() or {"load_error": _native.load_error},
        "backends": backends.available_backends(),
    }
    try:
        info["loadavg_1min"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def meta_line(meta: dict) -> str:
    dev = meta.get("gpu") or meta.get("cpu_model")
    line = (f"{meta['date']} | {dev} | {meta['cpu_logical_cores']} cores, {meta['torch_threads']} torch threads"
            f" | torch {meta['torch']} | device {meta.get('device')} | load {meta.get('loadavg_1min', '?')}")
    w = load_warning(meta)
    return f"{line}\n\n{w}" if w else line


def load_warning(meta: dict) -> str | None:
    """A warning when other processes competed for the CPU while this ran."""
    load, cores = meta.get("loadavg_1min"), meta.get("cpu_logical_cores") or 1
    if meta.get("device", "cpu").startswith("cpu") and load is not None and load > 0.75 * cores:
        return (f"WARNING: 1-minute load average {load} on {cores} logical cores when this started: other "
                f"processes competed for the CPU, so these timings are noisy (rerun on an idle machine; on a "
                f"shared one, --threads 1 avoids multi-thread barrier stalls).")
    return None


# ----------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, reps: int = 10, warmup: int = 1,
            max_seconds: float = 3.0, min_reps: int = 3) -> list[float]:
    """Wall times (s) of ``fn``: ``warmup`` untimed calls, then up to ``reps`` timed calls,
    stopping early (after ``min_reps``) once ``max_seconds`` of timed work has been spent."""
    for _ in range(warmup):
        fn()
    sync(device)
    out: list[float] = []
    spent = 0.0
    for i in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        dt = time.perf_counter() - t0
        out.append(dt)
        spent += dt
        if i + 1 >= min_reps and spent > max_seconds:
            break
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def progress(iterable: Iterable, **kw):
    """tqdm progress bar on stderr (plain iteration when tqdm is missing or disabled)."""
    if os.environ.get("FUSED_FLAT_BENCH_NO_PROGRESS") == "1":
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, file=sys.stderr, leave=False, dynamic_ncols=True, **kw)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_time(s: float) -> str:
    """Seconds with a unit that keeps three significant digits (s, ms, us)."""
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def human_count(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1 << 10 and n % (1 << 10) == 0:
        return f"{n >> 10}K"
    return str(n)


def parse_size(s: str) -> int:
    """'4096', '1M', '64M', '2K', '1e6' -> int (K, M, G are powers of 2)."""
    s = s.strip()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if s and s[-1].upper() in mult:
        return int(float(s[:-1]) * mult[s[-1].upper()])
    return int(float(s))


# ----------------------------------------------------------------------------- output
def fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 0.01:
            return f"{v:.3f}"
        return f"{v:.2e}"
    return str(v)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """``columns`` = [(key, header)]; missing keys print as '—'."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=_json_default)


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    if isinstance(o, float) and math.isnan(o):
        return None
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_csv(path: Path, rows: list[dict], meta: dict) -> None:
    """One row per result, with the measurement context repeated in every row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ctx = {"date": meta["date"], "cpu_model": meta["cpu_model"], "gpu": meta["gpu"],
           "torch": meta["torch"], "device": meta["device"], "torch_threads": meta["torch_threads"]}
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    keys += [k for k in ctx if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({**ctx, **{k: ("" if v is None else v) for k, v in r.items()}})


def plt():
    """matplotlib.pyplot with the Agg backend (None when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as pyplot
    except ImportError:
        return None
    return pyplot


def announce(paths: Iterable[Path]) -> None:
    for p in paths:
        print(f"wrote {p}")
