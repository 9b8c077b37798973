"""Micro benchmark of fused_flat's raw passes on flat buckets, against torch and STREAM.

What it measures, side by side in one process:

* per pass (``perturb_``: theta += sigma*eps; ``restore_and_step_``: restore + decay +
  Langevin + update) and per backend (reference, cpp, triton/cuda where they run on the
  device), on buckets of each size and dtype: median time, effective bandwidth = bytes the
  pass must move (read + written) / time, its fraction of this run's STREAM triad, the time
  a bandwidth-bound pass would take (bytes / triad) and the noise rate (bucket elements/s);
* the noise roofline (CPU): ``fused_flat::noise_roofline``, the project's fastest generator of
  the same stream (layout v3) into L1 buffers with no parameter traffic, for the tags each
  pass needs (perturb: eps; restore_step: eps and xi); each pass reports "of noise limit" =
  roofline time / pass time next to its fraction of STREAM;
* torch.optim.SGD (for-loop, foreach, fused) over the same number of elements (split into
  ``--sgd-tensors`` tensors, as a model's parameters are), and torch's own Gaussian
  generators (``normal_`` in place, ``randn_like``) as the noise-rate yardstick;
* SAM passes / steps when ``fused_flat.optim.sam`` is importable (skipped with a note otherwise);
* host overhead (always, CPU, one thread): 500 parameters of 64 fp32 elements with their
  gradients set, where a step's time is its host work (Python, dispatch: what a GPU waits
  for): SGLD step, FSGLD perturb + step and SAM first + second step, each timed call by call
  alternately with torch.optim.SGD(fused=True, momentum=0.9)'s step on an equal parameter
  set; medians and their ratio, read against the targets (1.2x / 2.0x / 2.5x);
* a full optimizer step at ``--step-size`` (default 64M): fused FSGLD (perturb + update,
  backend auto; with the default check_finite gradient scan, and without it) vs the
  paper-style baseline (randn_like x2 + adds + SGD step) vs the
  reference backend vs torch.optim.SGD, with the closure's forward/backward left out
  (the gradient is written once, beforehand); the cases take turns in rotating order.

A pass is called "RNG-bound" when its time exceeds 2x the bandwidth-bound time: it then
spends its time generating Gaussians, not moving bytes. Results: results/micro.{json,csv,md}
and results/micro_bandwidth.png. Usage: python -m fused_flat bench micro [--quick] [--sizes 1M,4M]
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    import sys as _sys
    from pathlib import Path as _Path

    _sys.path.insert(0, str(_Path(__file__).resolve().parent.parent))

import argparse
import gc
import math
import time
from pathlib import Path

import torch

from benchmarks import baselines, common, stream
from fused_flat import backends

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SEED = 1234
SIGMA = 1e8 ** (-(1.01) / 4)
LR, WD = 0.1, 5e-4
NOISE_STD = math.sqrt(2 * LR / 1e8)


# ----------------------------------------------------------------------------- helpers
def _backend_names(device: torch.device, wanted: list[str] | None) -> tuple[list[str], list[dict]]:
    """Backends that run tensors on ``device`` here, and notes for those that do not."""
    avail = backends.available_backends()
    names, notes = [], []
    for name in (wanted or ["reference", "cpp", "cuda", "triton"]):
        status = avail.get(name, f"unknown backend {name!r}")
        if status != "ok":
            notes.append({"backend": name, "skipped": status})
            continue
        b = backends.get(name)
        if device.type not in b.devices:
            notes.append({"backend": name, "skipped": f"runs on {b.devices} tensors, not {device.type}"})
            continue
        names.append(name)
    return names, notes


_STREAM_BEST = [float("nan")]   # best of this run's STREAM kernels (GB/s), set by main()


def _classify(t: float, t_bw: float, noisy: bool, gbps: float, triad: float) -> str:
    """memory-bound / mixed / RNG-bound, judged against this run's STREAM. In-place passes
    avoid the write-allocate traffic triad pays, so up to the best STREAM kernel (usually the
    in-place add) still counts as memory-bound; above it, the data sat in cache."""
    if not (t_bw > 0) or math.isnan(t):
        return "—"
    best = max(triad, _STREAM_BEST[0]) if not math.isnan(_STREAM_BEST[0]) else triad
    r = t / t_bw
    if gbps > 1.1 * best:
        return "cache-resident (faster than STREAM)"
    if gbps >= 0.75 * triad:
        return "memory-bound"
    if r <= 2.0:
        return "mixed"
    return f"RNG-bound ({r:.1f}x bw time)" if noisy else f"compute/overhead-bound ({r:.1f}x)"


def _row(kind, name, impl, n, dtype, times, nbytes, triad, noisy, **extra) -> dict:
    med = common.median(times)
    t_bw = nbytes / (triad * 1e9) if triad else float("nan")
    gbps = nbytes / med / 1e9 if med > 0 else float("nan")
    r = {
        "kind": kind, "op": name, "impl": impl, "n": n, "dtype": str(dtype).replace("torch.", ""),
        "median_s": med, "min_s": min(times) if times else float("nan"), "reps": len(times),
        "bytes": nbytes, "GBps": gbps, "frac_triad": gbps / triad if triad else float("nan"),
        "t_bw_s": t_bw, "t_over_t_bw": med / t_bw if t_bw > 0 else float("nan"),
        "noise_Melem_s": (n / med / 1e6) if noisy and med > 0 else None,
        "bound": _classify(med, t_bw, noisy, gbps, triad) if triad else "—",
    }
    r.update(extra)
    return r


def _split(n: int, k: int) -> list[int]:
    k = max(1, min(k, n))
    base, rem = divmod(n, k)
    return [base + (1 if i < rem else 0) for i in range(k)]


# ----------------------------------------------------------------------------- passes
CHECK_READ = "all_finite (gradient read)"
CHECK_PASS1 = "checked step, pass 1: restore + check"
CHECK_PASS2 = "checked step, pass 2: update, no restore"


def _checked_passes(b, name, theta, grad, mom, momentum, n, es, words_u, triad, tkw,
                    fr) -> list[dict]:
    """What ``check_finite=True`` costs, pass by pass (fp32, cpp): the gradient read alone
    (``all_finite``), and the two passes a checked step runs instead of the fused one:
    restore + finiteness check (one tag of noise, theta and the gradient read) and the
    update without a restore (the other tag). Their sum against the fused pass is the
    check's cost in the full-step table."""
    dtype = theta.dtype
    t_f = common.time_fn(lambda: b.all_finite([grad]), theta.device, **tkw)
    t_1 = common.time_fn(lambda: b.restore_check_([theta], [grad], [0], SEED, 0, 0, 0, SIGMA),
                         theta.device, **tkw)
    found = torch.zeros(1)

    def upd():
        b.restore_and_step_([theta], [grad], [mom] if mom is not None else None, [0], None, found,
                            SEED, 0, 0, 0, 0.0, LR, WD, momentum, 0.0, False, False,
                            NOISE_STD, 1.0)

    t_2 = common.time_fn(upd, theta.device, **tkw)
    return [
        _row("check", CHECK_READ, name, n, dtype, t_f, n * es, triad, False),
        _row("check", CHECK_PASS1, name, n, dtype, t_1, 3 * n * es, triad, True,
             frac_noise=fr("perturb", t_1)),
        _row("check", CHECK_PASS2, name, n, dtype, t_2, words_u * n * es, triad, True,
             frac_noise=fr("perturb", t_2)),
    ]


def bench_passes(n: int, dtype: torch.dtype, device: torch.device, names: list[str], triad: float,
                 args) -> list[dict]:
    rows = []
    es = torch.empty((), dtype=dtype).element_size()
    theta = torch.randn(n, device=device).to(dtype)
    grad = (torch.randn(n, device=device) * 1e-3).to(dtype)
    mom = torch.zeros_like(theta) if args.momentum > 0 else None
    k = [0]
    tkw = dict(reps=args.reps, warmup=1, max_seconds=args.max_seconds, min_reps=args.min_reps)
    # The noise roofline (CPU): the fastest generator of the same stream (the ISA the cpp
    # passes use) into L1 buffers, no parameter traffic; perturb needs one tag (eps), the
    # update two (eps and xi). Each pass reports its fraction of it ("of noise limit").
    roof = {}
    if device.type == "cpu" and "cpp" in names:
        from fused_flat.backends import cpp as ops
        isa = ops.cpu_isa()
        for op, tags in (("perturb", [0]), ("restore_step", [0, 32])):
            times = common.time_fn(lambda: ops.noise_roofline(SEED, 0, 0, tags, n), device, **tkw)
            roof[op] = common.median(times)
            rows.append(_row("noise", f"noise roofline ({op}: {len(tags)} tag{'s' if len(tags) > 1 else ''})",
                             f"cpp {isa}, no parameter traffic", n, dtype, times, 0, triad, True))
    for name in names:
        if name == "reference" and n > args.reference_max_size:
            rows.append({"kind": "pass", "op": "perturb/restore_step", "impl": name, "n": n,
                         "dtype": str(dtype).replace("torch.", ""),
                         "note": f"skipped: n > --reference-max-size {args.reference_max_size}"})
            continue
        b = backends.get(name)
        try:
            t_p = common.time_fn(lambda: b.perturb_([theta], [0], SEED, 0, k[0], 0, SIGMA), device, **tkw)

            def upd():
                b.restore_and_step_([theta], [grad], [mom] if mom is not None else None, [0], None,
                                    None, SEED, 0, k[0], 0, SIGMA, LR, WD, args.momentum, 0.0,
                                    False, False, NOISE_STD, 1.0)
                k[0] += 1

            t_u = common.time_fn(upd, device, **tkw)
        except Exception as exc:  # e.g. a dtype a backend does not support
            rows.append({"kind": "pass", "op": "perturb/restore_step", "impl": name, "n": n,
                         "dtype": str(dtype).replace("torch.", ""),
                         "note": f"failed: {type(exc).__name__}: {exc}"})
            continue
        words_u = 5 if mom is not None else 3
        fr = lambda op, t: roof[op] / common.median(t) if op in roof else None  # noqa: E731
        rows.append(_row("pass", "perturb", name, n, dtype, t_p, 2 * n * es, triad, True,
                         frac_noise=fr("perturb", t_p)))
        rows.append(_row("pass", "restore_step", name, n, dtype, t_u, words_u * n * es, triad, True,
                         frac_noise=fr("restore_step", t_u)))
        if b.restore_check_ is not None and dtype == torch.float32:
            rows += _checked_passes(b, name, theta, grad, mom, args.momentum, n, es, words_u, triad,
                                    tkw, fr)
    # torch's Gaussian generators: the yardstick for the noise rate
    buf = torch.empty(n, dtype=dtype, device=device)
    rows.append(_row("noise", "randn", "torch normal_ (in place)", n, dtype,
                     common.time_fn(lambda: buf.normal_(), device, **tkw), n * es, triad, True))
    rows.append(_row("noise", "randn", "torch randn_like (allocating)", n, dtype,
                     common.time_fn(lambda: torch.randn_like(buf), device, **tkw), n * es, triad, True))
    del buf
    # torch.optim.SGD over the same number of elements, as --sgd-tensors parameters
    sizes = _split(n, args.sgd_tensors)
    ps = [torch.nn.Parameter(torch.randn(s, device=device).to(dtype)) for s in sizes]
    for p in ps:
        p.grad = (torch.randn_like(p, dtype=torch.float32) * 1e-3).to(dtype)
    words = 5 if args.momentum > 0 else 3
    for variant in ("for-loop", "foreach", "fused"):
        kw = {"foreach": variant == "foreach", "fused": True if variant == "fused" else None}
        try:
            opt = torch.optim.SGD(ps, lr=LR, momentum=args.momentum, weight_decay=WD, **kw)
            t = common.time_fn(opt.step, device, **tkw)
            rows.append(_row("sgd", "sgd_step", f"torch.optim.SGD {variant}", n, dtype, t,
                             words * n * es, triad, False, tensors=len(ps)))
        except Exception as exc:
            rows.append({"kind": "sgd", "op": "sgd_step", "impl": f"torch.optim.SGD {variant}", "n": n,
                         "dtype": str(dtype).replace("torch.", ""),
                         "note": f"failed: {type(exc).__name__}: {exc}"})
    del ps, theta, grad, mom
    gc.collect()
    return rows


# ----------------------------------------------------------------------------- full steps
def _make_params(n: int, k: int, dtype, device, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device=device, dtype=dtype)) for s in _split(n, k)]


def _step_cases(dtype, device, args, sam_mod) -> list[tuple[str, callable, dict]]:
    """(name, factory, flags); factory(n) -> (step_fn, objects to keep alive)."""
    import fused_flat

    k = args.sgd_tensors

    def fused(backend, check_finite=True):
        def make(n):
            ps = _make_params(n, k, dtype, device)
            for p in ps:
                p.grad = torch.full_like(p, 1e-3)
            opt = fused_flat.FSGLD(ps, lr=LR, beta=1e8, weight_decay=WD, momentum=args.momentum,
                                   seed=SEED, backend=backend, check_finite=check_finite)

            def closure():
                return None   # p.grad stays from the last step (nothing zeroes it): no backward

            return lambda: opt.step(closure), (ps, opt)
        return make

    def paper(n):
        ps = _make_params(n, k, dtype, device)
        grads = [torch.full_like(p, 1e-3) for p in ps]
        opt = baselines.PaperFSGLD(ps, lr=LR, beta=1e8, weight_decay=WD, momentum=args.momentum)

        def closure():
            for p, g in zip(ps, grads):
                p.grad = g   # what backward would have produced (no copy)
            return None

        return lambda: opt.step(closure), (ps, opt, grads)

    def sgd(variant):
        def make(n):
            ps = _make_params(n, k, dtype, device)
            for p in ps:
                p.grad = torch.full_like(p, 1e-3)
            opt = torch.optim.SGD(ps, lr=LR, weight_decay=WD, momentum=args.momentum,
                                  foreach=variant == "foreach", fused=True if variant == "fused" else None)
            return opt.step, (ps, opt)
        return make

    def davda(n):
        ps = _make_params(n, k, dtype, device)
        grads = [torch.full_like(p, 1e-3) for p in ps]
        opt = baselines.DavdaSAM(ps, torch.optim.SGD, rho=0.05, lr=LR, weight_decay=WD, momentum=args.momentum)

        def closure():
            for p, g in zip(ps, grads):
                p.grad = g
            return None

        return lambda: opt.step(closure), (ps, opt, grads)

    cases = [
        ("torch.optim.SGD (foreach)", sgd("foreach"), {}),
        ("FSGLD fused (backend auto)", fused("auto"), {}),
        ("FSGLD fused, check_finite=False", fused("auto", check_finite=False), {}),
        ("fSGLD paper-style (randn_like x2 + adds + SGD)", paper, {}),
        ("FSGLD reference backend", fused("reference"), {"reference": True}),
        ("SAM davda54-style (unfused)", davda, {}),
    ]
    if sam_mod is not None and hasattr(sam_mod, "SAM"):
        def fused_sam(n):
            ps = _make_params(n, k, dtype, device)
            grads = [torch.full_like(p, 1e-3) for p in ps]
            opt = sam_mod.SAM(ps, lr=LR, weight_decay=WD, momentum=args.momentum)

            def closure():
                for p, g in zip(ps, grads):
                    p.grad = g   # what backward would have produced (no copy)
                return None

            def step():
                closure()   # g1
                opt.step(closure)

            return step, (ps, opt, grads)
        cases.append(("SAM fused_flat.optim.sam", fused_sam, {}))
    return cases


def bench_steps(n: int, dtype, device, args, sam_mod) -> list[dict]:
    """All step cases are built first, then timed in rounds in which they take turns (the
    order rotates every round), so that machine drift affects every ratio alike."""
    rows: list[dict] = []
    live = []   # [name, fn, keep, size, note, times]
    dname = str(dtype).replace("torch.", "")
    for name, make, flags in _step_cases(dtype, device, args, sam_mod):
        size, note = n, None
        if flags.get("reference") and n > args.reference_max_size:
            size = args.reference_max_size
            note = f"measured at n={size} and scaled linearly to n={n} (reference is slow)"
        try:
            fn, keep = make(size)
            fn()   # warm-up (allocates lazily created state)
            common.sync(device)
            live.append([name, fn, keep, size, note, []])
        except Exception as exc:
            rows.append({"kind": "step", "op": "optimizer_step", "impl": name, "n": n, "dtype": dname,
                         "note": f"failed: {type(exc).__name__}: {exc}"})
    spent = 0.0
    for r in common.progress(range(args.reps), desc=f"full steps ({len(live)} cases, interleaved)"):
        k = r % max(1, len(live))
        for case in live[k:] + live[:k]:
            t0 = time.perf_counter()
            case[1]()
            common.sync(device)
            dt = time.perf_counter() - t0
            case[5].append(dt)
            spent += dt
        if r + 1 >= args.min_reps and spent > args.max_seconds * max(1, len(live)):
            break
    for name, fn, keep, size, note, t in live:
        scale = n / size
        rows.append({"kind": "step", "op": "optimizer_step", "impl": name, "n": n, "dtype": dname,
                     "median_s": common.median(t) * scale, "min_s": min(t) * scale, "reps": len(t),
                     "tensors": args.sgd_tensors, "note": note})
    del live
    gc.collect()
    base = next((r["median_s"] for r in rows if r["impl"].startswith("torch.optim.SGD") and "median_s" in r), None)
    fused = next((r["median_s"] for r in rows if r["impl"].startswith("FSGLD fused") and "median_s" in r), None)
    for r in rows:
        if "median_s" in r and base:
            r["x_sgd"] = r["median_s"] / base
        if "median_s" in r and fused:
            r["x_fused_fsgld"] = r["median_s"] / fused
    return rows


# ----------------------------------------------------------------------------- output
PASS_COLS = [("op", "pass"), ("impl", "impl"), ("dtype", "dtype"), ("n", "n"), ("median_s", "median s"),
             ("GBps", "GB/s"), ("frac_triad", "of triad"), ("t_bw_s", "bw-bound s"),
             ("noise_Melem_s", "noise Melem/s"), ("frac_noise", "of noise limit"), ("bound", "bound")]
STEP_COLS = [("impl", "optimizer step (no fwd/bwd)"), ("dtype", "dtype"), ("n", "n"), ("median_s", "median s"),
             ("x_sgd", "x SGD"), ("x_fused_fsgld", "x fused fSGLD"), ("note", "note")]


# ----------------------------------------------------------------------------- host overhead
HOST_PARAMS, HOST_ELEMS = 500, 64
HOST_TARGETS = {"SGLD step": 1.2, "FSGLD perturb + step": 2.0, "SAM first + second step": 2.5}
HOST_COLS = [("impl", "host work per step"), ("n", "params x elems"), ("median_us", "median us"),
             ("sgd_median_us", "SGD fused median us"), ("x_sgd", "x SGD"), ("target", "target"),
             ("verdict", "verdict")]


def _host_params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(HOST_ELEMS, generator=g)) for _ in range(HOST_PARAMS)]
    for p in ps:
        p.grad = torch.randn(HOST_ELEMS, generator=g)
    return ps


def bench_host_overhead(rounds: int) -> list[dict]:
    """Each case's call (a step's host work) and torch.optim.SGD(fused=True, momentum=0.9)'s
    step, timed alternately ``rounds`` times in one thread on 500 x 64 fp32 (the arithmetic is
    negligible there); medians, their ratio and the target ratio."""
    import fused_flat

    backend = "cpp" if backends.available_backends().get("cpp") == "ok" else "auto"
    kw = dict(lr=0.01, momentum=0.9, seed=SEED, backend=backend)

    def sgld():
        return fused_flat.SGLD(_host_params(1), beta=1e8, **kw).step

    def fsgld():
        opt = fused_flat.FSGLD(_host_params(2), beta=1e8, **kw)

        def call():
            opt.perturb()
            opt.step()
        return call

    def sam():
        opt = fused_flat.SAM(_host_params(3), **kw)

        def call():
            opt.first_step()
            opt.second_step()
        return call

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for name, make in (("SGLD step", sgld), ("FSGLD perturb + step", fsgld),
                           ("SAM first + second step", sam)):
            call = make()
            sgd = torch.optim.SGD(_host_params(4), lr=0.01, momentum=0.9, fused=True).step
            for _ in range(10):   # state created, plans built, caches warm
                call()
                sgd()
            ours, theirs = [], []
            for _ in range(rounds):
                t0 = time.perf_counter()
                call()
                t1 = time.perf_counter()
                sgd()
                t2 = time.perf_counter()
                ours.append(t1 - t0)
                theirs.append(t2 - t1)
            med, sgd_med = common.median(ours), common.median(theirs)
            target = HOST_TARGETS[name]
            rows.append({"kind": "host", "impl": name, "backend": backend, "dtype": "float32",
                         "n": f"{HOST_PARAMS} x {HOST_ELEMS}", "rounds": rounds,
                         "median_us": med * 1e6, "sgd_median_us": sgd_med * 1e6,
                         "x_sgd": med / sgd_med, "target": f"<= {target}x",
                         "verdict": "met" if med / sgd_med <= target else "MISSED"})
    finally:
        torch.set_num_threads(threads)
    return rows


def _plot(rows: list[dict], triad: float, path: Path) -> Path | None:
    plt = common.plt()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, op in zip(axes, ("perturb", "restore_step")):
        series = {}
        for r in rows:
            if r.get("kind") in ("pass", "sgd") and r.get("op") in (op, "sgd_step") and "GBps" in r:
                if r["op"] == "sgd_step" and "foreach" not in r["impl"]:
                    continue
                label = f"{r['impl']} step (no noise) {r['dtype']}" if r["op"] == "sgd_step" else \
                    f"{r['impl']} {r['dtype']}"
                series.setdefault(label, []).append((r["n"], r["GBps"]))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.axhline(triad, color="k", ls="--", lw=1, label=f"STREAM triad {triad:.1f} GB/s")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("bucket elements")
        ax.set_title(f"{op}: effective bandwidth")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("GB/s (bytes read+written / time)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summarize(rows: list[dict], stream_res: dict) -> list[str]:
    """Plain-language conclusions from the numbers (RNG-bound or memory-bound, noise rates)."""
    out = []
    largest = {}
    for r in rows:
        if r.get("kind") == "pass" and "median_s" in r:
            largest[r["dtype"]] = max(largest.get(r["dtype"], 0), r["n"])
    for r in rows:
        if (r.get("kind") == "pass" and "median_s" in r and r["impl"] != "reference"
                and r["n"] == largest.get(r["dtype"])):
            if r["t_over_t_bw"] > 2.0:
                out.append(f"- {r['impl']} {r['op']} ({common.human_count(r['n'])} {r['dtype']}): "
                           f"{common.human_time(r['median_s'])} vs {common.human_time(r['t_bw_s'])} bandwidth-bound "
                           f"({r['t_over_t_bw']:.1f}x): bound by RNG compute "
                           f"({r['noise_Melem_s']:.0f} M elements/s), not by memory")
            elif r["t_over_t_bw"] >= 1.0:
                out.append(f"- {r['impl']} {r['op']} ({common.human_count(r['n'])} {r['dtype']}): "
                           f"{r['frac_triad'] * 100:.0f}% of STREAM triad: memory-bound")
    noise = {}
    for r in rows:
        if r.get("noise_Melem_s") and r.get("kind") in ("pass", "noise"):
            key = (r["n"], r["dtype"])
            noise.setdefault(key, {})[f"{r['impl']} {r['op']}"] = r["noise_Melem_s"]
    if noise:
        key = max(noise)
        rates = ", ".join(f"{k} {v:.3g}" for k, v in sorted(noise[key].items(), key=lambda kv: -kv[1]))
        out.append(f"- noise rate at {common.human_count(key[0])} {key[1]} (M elements/s): {rates}")
    for r1 in rows:   # the finiteness check's cost, pass by pass
        if r1.get("kind") != "check" or r1["op"] != CHECK_PASS1:
            continue
        same = [r for r in rows if r.get("n") == r1["n"] and r.get("impl") == r1["impl"]
                and r.get("dtype") == r1["dtype"] and "median_s" in r]
        r2 = next((r for r in same if r["op"] == CHECK_PASS2), None)
        fu = next((r for r in same if r.get("kind") == "pass" and r["op"] == "restore_step"), None)
        af = next((r for r in same if r["op"] == CHECK_READ), None)
        if r2 and fu and af:
            two = r1["median_s"] + r2["median_s"]
            out.append(f"- check_finite ({r1['impl']}, {common.human_count(r1['n'])} {r1['dtype']}): "
                       f"restore + check {common.human_time(r1['median_s'])} + update "
                       f"{common.human_time(r2['median_s'])} = {common.human_time(two)} vs the fused "
                       f"pass {common.human_time(fu['median_s'])} (+{common.human_time(two - fu['median_s'])}); "
                       f"the gradient read alone {common.human_time(af['median_s'])}")
    host = [r for r in rows if r.get("kind") == "host"]
    if host:
        out.append(f"- host overhead ({HOST_PARAMS} x {HOST_ELEMS} fp32, one thread; x the step of "
                   f"torch.optim.SGD(fused=True, momentum=0.9), {host[0]['sgd_median_us']:.0f} us): "
                   + "; ".join(f"{r['impl']} {r['median_us']:.0f} us = {r['x_sgd']:.2f}x "
                               f"(target {r['target']}: {r['verdict']})" for r in host))
    steps = {r["impl"]: r for r in rows if r.get("kind") == "step" and "median_s" in r}
    fused = next((r for k, r in steps.items() if k.startswith("FSGLD fused")), None)
    paper = next((r for k, r in steps.items() if k.startswith("fSGLD paper")), None)
    sgd = next((r for k, r in steps.items() if k.startswith("torch.optim.SGD")), None)
    if fused and paper and sgd:
        verdict = "faster" if fused["median_s"] < paper["median_s"] else "SLOWER"
        out.append(f"- full step at {common.human_count(fused['n'])}: fused fSGLD {common.human_time(fused['median_s'])} "
                   f"= {fused['x_sgd']:.2f}x SGD; paper-style {common.human_time(paper['median_s'])} = "
                   f"{paper['x_sgd']:.2f}x SGD; fused is {paper['median_s'] / fused['median_s']:.2f}x the "
                   f"paper-style speed ({verdict})")
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="fused-flat bench micro", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=None, help="comma list of bucket sizes, e.g. 1M,4M,16M,64M (default; "
                                                  "GPU: 1M..256M)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--backends", default=None, help="comma list (default: every backend that runs here)")
    ap.add_argument("--reps", type=int, default=10, help="timed repetitions per case (max)")
    ap.add_argument("--min-reps", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=3.0, help="stop a case after this much timed work")
    ap.add_argument("--momentum", type=float, default=0.0, help="momentum of the update passes (paper: 0)")
    ap.add_argument("--sgd-tensors", type=int, default=100, help="tensors the SGD/step cases split n into")
    ap.add_argument("--step-size", default=None, help="elements of the full-step comparison (default 64M; "
                                                      "'0' skips it)")
    ap.add_argument("--reference-max-size", default=None,
                    help="largest bucket the (slow) reference backend runs (default 1M; --quick: 256K); larger "
                         "full-step cases are measured at this size and scaled linearly")
    ap.add_argument("--stream-size", default=None, help="STREAM array size (default 64M CPU / 256M GPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions (smoke test)")
    ap.add_argument("--out", default=str(common.DEFAULT_OUT))
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--host-rounds", type=int, default=None,
                    help="alternating calls per host-overhead case (default 300; --quick: 30)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = common.resolve_device(args.device)
    if args.quick:
        args.sizes = args.sizes or "64K,256K"
        args.step_size = args.step_size or "256K"
        args.stream_size = args.stream_size or "1M"
        args.reps, args.min_reps, args.max_seconds = min(args.reps, 3), 1, 0.5
        args.reference_max_size = args.reference_max_size or "256K"
    default_sizes = "1M,4M,16M,64M,256M" if dev.type == "cuda" else "1M,4M,16M,64M"
    sizes = [common.parse_size(s) for s in (args.sizes or default_sizes).split(",") if s]
    dtypes = [DTYPES[d.strip()] for d in args.dtypes.split(",") if d.strip()]
    args.reference_max_size = common.parse_size(args.reference_max_size or "1M")
    step_n = common.parse_size(args.step_size) if args.step_size else (64 << 20)
    stream_n = common.parse_size(args.stream_size) if args.stream_size else (
        (256 << 20) if dev.type == "cuda" else (64 << 20))
    names, notes = _backend_names(dev, args.backends.split(",") if args.backends else None)
    try:
        import fused_flat.optim.sam as sam_mod  # noqa: F401
    except ImportError as exc:
        sam_mod = None
        notes.append({"backend": "fused_flat.optim.sam", "skipped": f"not importable ({exc}); SAM passes skipped"})

    meta = common.machine_info(dev)
    print(common.meta_line(meta))
    st = stream.measure(stream_n, torch.float32, dev, reps=max(3, args.reps))
    triad = st["triad_GBps"]
    _STREAM_BEST[0] = max(st["copy_GBps"], st["triad_GBps"], st["add__GBps"])
    print(f"STREAM ({common.human_count(stream_n)} fp32/array): copy {st['copy_GBps']:.1f} GB/s, "
          f"triad {triad:.1f} GB/s, in-place add {st['add__GBps']:.1f} GB/s")
    rows: list[dict] = []
    cases = [(n, dt) for dt in dtypes for n in sizes]
    for n, dt in common.progress(cases, desc="micro passes"):
        rows += bench_passes(n, dt, dev, names, triad, args)
    if step_n > 0:
        rows += bench_steps(step_n, torch.float32, dev, args, sam_mod)
    rows += bench_host_overhead(args.host_rounds or (30 if args.quick else 300))

    out = Path(args.out)
    payload = {"meta": meta, "stream": st, "config": {k: v for k, v in vars(args).items()},
               "backends_run": names, "notes": notes, "rows": rows}
    paths = [out / "micro.json", out / "micro.csv", out / "micro.md"]
    common.write_json(paths[0], payload)
    common.write_csv(paths[1], rows, meta)
    conclusions = summarize(rows, st)
    md = [f"# fused_flat micro benchmark", "", common.meta_line(meta), "",
          f"STREAM ({common.human_count(stream_n)} fp32 per array, best of {st['reps']}): copy "
          f"{st['copy_GBps']:.1f} GB/s, triad {triad:.1f} GB/s, in-place add {st['add__GBps']:.1f} GB/s. "
          f"Bandwidth = bytes the pass must read+write / median time; 'of triad' = that / triad; 'bw-bound s' = "
          f"those bytes / triad. In-place passes skip the write-allocate traffic triad pays, so they can reach "
          f"the in-place add figure and are still called memory-bound up to it.",
          "", f"Backends run: {', '.join(names)}; momentum {args.momentum}; SGD over {args.sgd_tensors} tensors.",
          *[f"- skipped {n['backend']}: {n['skipped']}" for n in notes], "",
          "## Passes", "", common.markdown_table([r for r in rows if r.get("kind") in ("pass", "noise", "check", "sgd")],
                                                 PASS_COLS + [("note", "note")]), ""]
    if step_n > 0:
        md += [f"## Full optimizer step at {common.human_count(step_n)} fp32 (gradient given; no forward/backward)",
               "", common.markdown_table([r for r in rows if r.get("kind") == "step"], STEP_COLS), ""]
    md += [f"## Host overhead per step ({HOST_PARAMS} parameters x {HOST_ELEMS} fp32, gradients given, "
           f"one thread, each call alternating with torch.optim.SGD(fused=True, momentum=0.9)'s step)",
           "", common.markdown_table([r for r in rows if r.get("kind") == "host"], HOST_COLS), ""]
    md += ["## Reading", "", *conclusions, ""]
    text = "\n".join(md)
    paths[2].write_text(text)
    print(text)
    if not args.no_plot:
        p = _plot(rows, triad, out / "micro_bandwidth.png")
        if p:
            paths.append(p)
    common.announce(paths)
    return payload


if __name__ == "__main__":
    main()
