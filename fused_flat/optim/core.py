"""The optimizer core shared by the Langevin family (fused_flat.optim.langevin) and the SAM
family (fused_flat.optim.sam, msam, rwsam).

One place for: the buckets (index spaces over the user's own tensors, rebuilt when a
parameter changes dtype, device or shape), the backend of each bucket, the seed (rank 0's
under torch.distributed), the step counter, the momentum state (``state[p]
["momentum_buffer"]``, live, exactly as torch.optim.SGD keeps it), the non-finite skip
(own check or ``torch.amp.GradScaler``'s ``found_inf``), and the checkpoint format
(torch.optim.SGD's ``state_dict`` plus a ``fused_flat`` entry).
"""
from __future__ import annotations

import contextlib
import math
import operator
import warnings
import weakref

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.optim import Optimizer

from fused_flat import backends, noise
from fused_flat.optim.buckets import (Bucket, build_buckets, check_param, flat, flat_like, is_dtensor,
                                layout_key, same_layout)

# 1: flat physical buffers, noise stream layout 1. 2: tensor-list buckets (offsets rounded
# up to a multiple of 4); the 'fused_flat' entry records the noise layout ("stream",
# noise.LAYOUT_VERSION, ALGORITHMS.md §1). A checkpoint of another format or of an older
# layout loads; its noise continues on the current layout (same law, other numbers; one
# warning, _check_meta).
STATE_FORMAT = 2
_NO_STATE: dict = {}   # what a parameter without state has (read-only use)
READABLE_FORMATS = (1, 2)
_SGD_ONLY_KEYS = ("foreach", "fused", "differentiable")
FP32_STATE_KEYS = ("momentum_buffer", "master_weight")
LOW_PRECISION = (torch.bfloat16, torch.float16)   # per-parameter state that may be fp32


def number(name: str, value, cls_name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{cls_name}: {name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{cls_name}: {name} must be a number, got {value!r}")
    if math.isnan(value):
        raise ValueError(f"{cls_name}: {name} must not be NaN")
    return float(value)


def default_seed() -> int:
    """A seed in [0, 2^63) drawn from torch's default generator (torch.manual_seed governs it)."""
    return int(torch.empty((), dtype=torch.int64).random_().item())


def check_seed(seed, cls_name: str) -> int:
    if seed is None:
        seed = default_seed()
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"{cls_name}: seed must be an integer in [0, 2^63), got {seed!r}")
    return seed


def broadcast_seed(seed: int, explicit: bool, cls_name: str, process_group=None) -> int:
    """The seed of the first rank of ``process_group`` on every rank of it (once, at
    construction), so replicated parameters get identical noise with no further
    communication.

    ``process_group``: None, the default group when torch.distributed is initialized (rank
    0's seed); a ProcessGroup, only its ranks take part (the seed of its first rank,
    ``dist.get_global_rank(group, 0)``), so ranks that build different optimizers (pipeline
    stages) do not wait for each other; False, no collective at all (the caller guarantees
    that replicas use the same seed, e.g. by passing ``seed=``)."""
    dist = torch.distributed
    if process_group is False:
        return seed
    if process_group is not None and (process_group is True or not dist.is_available()
                                      or not isinstance(process_group, dist.ProcessGroup)):
        raise ValueError(f"{cls_name}: process_group must be None (the default group), a "
                         f"torch.distributed ProcessGroup (e.g. dist.new_group(ranks)) or False "
                         f"(no seed broadcast), got {process_group!r}")
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise ValueError(f"{cls_name}: process_group= given but torch.distributed is not "
                             f"initialized; call dist.init_process_group first, or pass "
                             f"process_group=False")
        return seed
    group = process_group
    if group is not None and dist.get_rank(group) < 0:
        raise ValueError(f"{cls_name}: rank {dist.get_rank()} is not a member of the "
                         f"process_group given; build the optimizer with a group this rank "
                         f"belongs to, or process_group=False")
    src = 0 if group is None else dist.get_global_rank(group, 0)
    dev = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        dev = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([seed], dtype=torch.int64, device=dev)
    dist.broadcast(t, src=src, group=group)
    got = int(t.item())
    if explicit and got != seed:
        warnings.warn(f"{cls_name}: seed={seed} on rank {dist.get_rank()} differs from rank "
                      f"{src}'s seed {got}; every rank of the group uses rank {src}'s seed so "
                      f"that replicas receive the same noise", UserWarning, stacklevel=5)
    return got


def refuse_dcp_state_init(cls_name: str) -> None:
    """Raise when ``step()`` is called by torch.distributed.checkpoint.state_dict's
    ``_init_optim_state`` (get_state_dict / set_state_dict on an optimizer without state),
    which makes a step with zero gradients to create the state: that would advance the noise
    stream (or fail obscurely), and those helpers drop the 'fused_flat' entry anyway."""
    import sys

    if torch.compiler.is_compiling():
        return
    f = sys._getframe(2)
    for _ in range(6):
        if f is None:
            return
        if f.f_code.co_name == "_init_optim_state" and "checkpoint" in f.f_code.co_filename:
            raise RuntimeError(
                f"{cls_name}: torch.distributed.checkpoint.state_dict (get_state_dict, "
                f"set_state_dict, get/set_optimizer_state_dict) is not supported: it creates "
                f"optimizer state by calling step() with zero gradients, which would advance the "
                f"noise stream, and it drops the 'fused_flat' entry (seed, step counter) so a "
                f"resumed run would not continue the same noise. Use "
                f"fused_flat.distributed.save_checkpoint / load_checkpoint (DCP with the "
                f"optimizer state keyed by parameter name), or optim_state_dict / "
                f"load_optim_state_dict from the same module.")
        f = f.f_back


def _runtime_attr(name: str, default=None) -> property:
    """An attribute kept in the optimizer's ``_rt`` dict. torch.compile (dynamo, torch 2.14)
    drops plain attribute stores on a torch.optim.Optimizer made inside a compiled step, but
    replays mutations of a dict or list it holds: the attributes a step writes live there.

    Each attribute is a one-element list of its own (``_rt[name][0]``), present from the
    first store on (:func:`_runtime_dict`): a compiled frame that stores one guards on what
    it mutates and on nothing else, so another attribute that changes between steps (the
    last step's found_inf, set by the step after a perturbation) recompiles nothing, and
    no key is ever added to ``_rt`` (a new key would: dynamo guards on the dict's length)."""

    def get(self):
        cell = self.__dict__.get("_rt", {}).get(name)
        return default if cell is None else cell[0]

    get.runtime_attr = (name, default)

    def set_(self, value):
        rt = self.__dict__.get("_rt")
        if rt is None or name not in rt:
            rt = _runtime_dict(self)
        rt[name][0] = value

    return property(get, set_)


def _runtime_dict(obj) -> dict:
    """``obj._rt``, made (or completed) with a cell holding the default of every
    :func:`_runtime_attr` of its class; an object pickled when ``_rt`` held the values
    themselves gets them in cells (none of them was a list)."""
    rt = obj.__dict__.get("_rt")
    if rt is None:
        rt = obj.__dict__["_rt"] = {}
    for name, v in rt.items():
        if not isinstance(v, list):
            rt[name] = [v]
    for klass in type(obj).__mro__:
        for v in vars(klass).values():
            if isinstance(v, property) and hasattr(v.fget, "runtime_attr"):
                name, default = v.fget.runtime_attr
                rt.setdefault(name, [default])
    return rt


class _StateMaker(Optimizer):
    """What a compiled step calls to make its optimizer's state before it is traced
    (:meth:`FlatOptimizer._compile_init`). Dynamo runs a torch.optim.Optimizer's
    ``_init_group`` eagerly when it traces a call to it, then guards on every value of that
    optimizer's ``param_groups`` (torch 2.14, OptimizerVariable): called on the fused_flat
    optimizer itself, a frame would guard on each group's lr, also one that reads no lr
    (SAM's first_step), and recompile when a scheduler changes a float lr. This stand-in is
    an Optimizer without param groups or state of its own (nothing to guard on) whose
    ``_init_group`` makes the owner's state; the traced code then guards on the state it
    reads, as always."""

    def __init__(self, owner: FlatOptimizer) -> None:   # not Optimizer.__init__: no parameters
        self.defaults: dict = {}
        self.state: dict = {}
        self.param_groups: list = []
        self._owner = weakref.ref(owner)

    def _init_group(self, part: str) -> None:
        owner = self._owner()
        if owner is not None:
            owner._init_group(part)


class FlatOptimizer(Optimizer):
    """Base of every fused_flat optimizer (use the subclasses). Subclasses call
    :meth:`_init_core` after ``Optimizer.__init__``."""

    _step_supports_amp_scaling = True  # torch.amp.GradScaler passes grad_scale / found_inf
    _sam_family = False
    # written by step() (see _runtime_attr); _opt_called: what torch's LR schedulers check
    _perturbed = _runtime_attr("_perturbed")
    _first_nonfinite = _runtime_attr("_first_nonfinite", False)
    _first_found = _runtime_attr("_first_found")
    _last_found_inf = _runtime_attr("_last_found_inf")
    _opt_called = _runtime_attr("_opt_called", False)
    _step_found = _runtime_attr("_step_found")            # this step's found_inf (_known_skip)
    _step_found_read = _runtime_attr("_step_found_read")  # its host value, if it was read

    def _init_core(self, *, seed: int | None, backend: str, check_finite: bool,
                   capturable: bool = False, process_group=None) -> None:
        """``seed``: the user's (None: drawn from torch's generator); it is checked, then
        broadcast from the first rank of ``process_group`` (:func:`broadcast_seed`)."""
        name = type(self).__name__
        backends.check_name(backend)
        if not isinstance(capturable, bool):
            raise ValueError(f"{name}: capturable must be True or False, got "
                             f"{capturable!r}")
        explicit = seed is not None
        seed = broadcast_seed(check_seed(seed, name), explicit, name, process_group)
        self.backend = backend
        self.check_finite = bool(check_finite)
        self.capturable = capturable
        self.seed = seed
        self._k_dev = None   # capturable: the step counter on the parameters' device
        self._k = 0
        self.skipped_steps = 0
        self._layout = None
        self._plans = None   # the buckets' step plans (StepPlans), built at the next step
        self._buckets: list[Bucket] = []
        self._backends: list[backends.Backend] = []
        self._shard_keys: list[tuple] = []   # the process-group tuples of sharded parameters
        self._last_found_inf: torch.Tensor | None = None
        self._warned_warm_start = False
        self._state_maker = _StateMaker(self)
        self.buckets()   # validate the parameters and resolve the backends now

    def add_param_group(self, param_group: dict) -> None:
        self._materialize_group(param_group)
        super().add_param_group(param_group)
        self._validate_group(self.param_groups[-1])

    def _materialize_group(self, param_group: dict) -> None:
        """What torch.optim's ``add_param_group`` does to ``param_group["params"]`` (a
        tensor becomes [tensor], a set is refused, anything else is listed), done first and
        once, so that a generator (``model.parameters()``) is not exhausted by the checks;
        then every parameter is checked (:func:`fused_flat.optim.buckets.check_param`)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, "
                            "but the ordering of tensors in sets will change between runs. "
                            "Please use a list instead.")
        else:
            params = list(params)
        param_group["params"] = params
        for p in params:
            t = p[1] if isinstance(p, tuple) and len(p) == 2 else p   # (name, tensor)
            if isinstance(t, torch.Tensor):
                check_param(t, type(self).__name__)

    def _validate_group(self, g: dict) -> None:
        raise NotImplementedError

    # ----------------------------------------------------------------- copy / pickle
    # Rebuilt after a copy or an unpickle instead of copied: the buckets and their backends
    # (closures, process groups; derived from param_groups by buckets()) and the scratch
    # copies of a perturbed step (none exists between steps).
    _TRANSIENT = {"_layout": None, "_buckets": list, "_backends": list, "_shard_keys": list,
                  "_backups": dict, "_plans": None, "_state_maker": None}
    _HOOK_DICTS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
                   "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
                   "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")

    def __getstate__(self) -> dict:
        """The whole optimizer (seed, step counter, skip count, options, a SAM's base
        optimizer, ...) for ``copy.deepcopy`` and pickling (``torch.save(opt)``), where
        torch.optim.Optimizer keeps only defaults, state and param_groups. Left out, as
        torch leaves them out: the hooks and an instance-level ``step`` wrapper (an LR
        scheduler's, which refers to this object, not to the copy); rebuilt on the copy:
        the buckets and backends (``_TRANSIENT``)."""
        if self._is_perturbed():
            raise RuntimeError(f"{type(self).__name__}: cannot copy or pickle the optimizer "
                               f"while the weights are perturbed; call step() or restore() first")
        cls = type(self)
        return {k: v for k, v in self.__dict__.items()
                if k not in self._TRANSIENT and k not in self._HOOK_DICTS
                and not (callable(v) and callable(getattr(cls, k, None)))}

    def __setstate__(self, state: dict) -> None:
        had = "differentiable" in state.get("defaults", {})
        super().__setstate__(state)   # torch's: empty hook dicts, its step wrapper
        if not had:   # torch adds it for its own optimizers; a later group would inherit it
            self.defaults.pop("differentiable", None)
        for k, make in self._TRANSIENT.items():
            self.__dict__[k] = make() if callable(make) else make   # buckets(): on next use
        self._state_maker = _StateMaker(self)
        _runtime_dict(self)

    @property
    def _groups(self) -> list[dict]:
        """``param_groups``, read from the instance dict. Under torch.compile, reading the
        attribute ``param_groups`` of a torch.optim.Optimizer makes dynamo guard on every
        value of every group (torch 2.14 realizes them all), the lr included; read this way,
        a frame guards only on the values it reads (SAM's first_step: no lr, so no
        recompile when a scheduler changes a float lr)."""
        return self.__dict__["param_groups"]

    # ----------------------------------------------------------------- buckets
    def buckets(self) -> list[Bucket]:
        """The current buckets, rebuilt first when a parameter changed dtype, device or shape
        since the last call (``model.half()``, ``model.to(device)``): the momentum buffers
        follow their parameters."""
        groups = self._groups
        key = layout_key(groups)
        if key != self._layout:
            if self._is_perturbed():
                raise RuntimeError(f"{type(self).__name__}: a parameter changed dtype, device or "
                                   f"shape while the weights were perturbed; change the model "
                                   f"between steps")
            name = type(self).__name__
            for g in groups:
                for p in g["params"]:
                    check_param(p, name)
            self._buckets = build_buckets(groups)
            self._backends = [backends.resolve(self.backend, b.params[0], sam=self._sam_family)
                              for b in self._buckets]
            keys: dict = {}
            for b in self._buckets:
                for k in b.shard_keys:
                    if k:
                        keys.setdefault(k, None)
            self._shard_keys = list(keys)
            self._follow_params()
            self._place_counter()
            self._plans = None
            self._layout = key
        return self._buckets

    def _place_counter(self) -> None:
        """``capturable=True``: the step counter lives on the parameters' device (``_k_dev``)
        and the kernels read it there, as they read a tensor lr, so a captured CUDA graph
        replays every step with its own noise and learning rate."""
        if not self.capturable:
            return
        name = type(self).__name__
        devs = list(dict.fromkeys(b.device for b in self._buckets))
        if len(devs) > 1:
            raise ValueError(f"{name}: capturable=True needs every parameter on one device, got "
                             f"{[str(d) for d in devs]}")
        for b, be in zip(self._buckets, self._backends):
            if b.device.type != "cpu" and not be.device_scalars:
                raise ValueError(
                    f"{name}: capturable=True needs kernels that read the step counter and lr "
                    f"from device memory; backend '{be.name}' reads them on the host (a sync per "
                    f"step, and a captured graph would replay stale values). Use backend='auto', "
                    f"'triton' or 'cuda' (built with FORCE_CUDA=1).")
            if b.device.type != "cpu" and self._masters(b):
                raise ValueError(f"{name}: capturable=True with master_weights=True is not "
                                 f"supported yet on {b.device.type} (the master perturbation takes "
                                 f"the step on the host); use capturable=False, or "
                                 f"stochastic_rounding for 16-bit parameters")
        dev = devs[0] if devs else torch.device("cpu")
        if self._k_dev is None or self._k_dev.device != dev:
            k = self._k
            self._k_dev = torch.full((), k, dtype=torch.int64, device=dev)
        if dev.type != "cpu":   # the skip counter too, before any capture (_count_device_skip)
            self.__dict__.setdefault("_skips_dev", {}).setdefault(
                dev, torch.zeros((), dtype=torch.int64, device=dev))

    def _follow_params(self) -> None:
        """State tensors (momentum, masters) follow their parameter's device and memory
        layout, and its dtype unless they are kept in fp32 (``_fp32_state``)."""
        for g in self.param_groups:
            for p in g["params"]:
                st = self.state.get(p)
                if not st:
                    continue
                dtype = torch.float32 if self._fp32_state(p) else p.dtype
                for key in FP32_STATE_KEYS:
                    buf = st.get(key)
                    if isinstance(buf, torch.Tensor) and (
                            buf.dtype != dtype or buf.device != p.device or not same_layout(buf, p)):
                        new = torch.empty_like(p, dtype=dtype)
                        new.copy_(buf)
                        st[key] = new

    # ----------------------------------------------------------------- 16-bit parameters
    def _init_low_precision(self, stochastic_rounding, master_weights) -> None:
        name = type(self).__name__
        if stochastic_rounding is not None and not isinstance(stochastic_rounding, bool):
            raise ValueError(f"{name}: stochastic_rounding must be True, False or None, got "
                             f"{stochastic_rounding!r}")
        self.stochastic_rounding = stochastic_rounding
        self.master_weights = bool(master_weights)

    def _masters(self, b) -> bool:
        """Whether bucket ``b`` keeps fp32 master weights (``master_weights=True``, 16-bit)."""
        return getattr(self, "master_weights", False) and b.dtype in LOW_PRECISION

    def _fp32_state(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s momentum and master weight are kept in fp32."""
        return getattr(self, "master_weights", False) and p.dtype in LOW_PRECISION

    def _sr(self, b, backend) -> bool:
        """Whether the update of bucket ``b`` rounds stochastically into its 16-bit weights."""
        want = (b.dtype in LOW_PRECISION and not self._masters(b)
                and getattr(self, "stochastic_rounding", None) is not False)
        if want and not backend.stochastic_rounding:
            backends.warn_once(f"sr-{backend.name}", f"fused_flat: backend '{backend.name}' has no "
                               f"stochastic-rounding kernels; 16-bit updates are rounded to nearest")
            return False
        return want

    def _master(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 master of a 16-bit parameter, ``state[p]["master_weight"]`` (made from
        the parameter on first use)."""
        st = self.state[p]
        m = st.get("master_weight")
        if m is None or m.shape != p.shape or m.device != p.device:
            m = torch.empty_like(p, dtype=torch.float32)
            m.copy_(p)
            st["master_weight"] = m
        return m

    def _backup_of(self, p: torch.Tensor) -> torch.Tensor:
        """The backup copy of ``p`` a perturbation writes (``exact_restore``, SAM), one per
        parameter, in its dtype and layout (made, or remade after ``p`` changed, on use)."""
        bk = self._backups.get(p)
        if bk is None or bk.dtype != p.dtype or bk.shape != p.shape or bk.device != p.device \
                or bk.stride() != p.stride():
            bk = self._backups[p] = torch.empty_like(p)
        return bk

    def _is_perturbed(self) -> bool:
        return False

    # ----------------------------------------------------------------- step plans
    # The eager 'cpp' step over CPU buckets keeps, per bucket, the lists its ops take (a
    # StepPlan), so that a step's Python work is O(buckets) plus one ``[p.grad for p in
    # params]`` per bucket; every other path (and every step the plans cannot take) is the
    # general one, which is the definition: a planned step gives its bits exactly.
    _plans_enabled = True   # False on an instance: every step takes the general path

    def _plan_config(self) -> tuple:
        """What a plan is built from besides the buckets, the state and the gradients."""
        return (tuple(len(g["params"]) for g in self.param_groups), self.backend,
                getattr(self, "exact_restore", None), getattr(self, "stochastic_rounding", None),
                getattr(self, "master_weights", False))

    def _plans_possible(self, buckets) -> bool:
        """Whether plans can run these buckets at all (checked once per set of plans): CPU
        buckets whose backend runs plans ('cpp'), no sharded or DTensor parameter, no device
        step counter (capturable), no fp32 masters."""
        if self._shard_keys or self._k_dev is not None:
            return False
        for b, be in zip(buckets, self._backends):
            if b.device.type != "cpu" or be.check_step is None or self._masters(b):
                return False
        return not any(is_dtensor(p) for b in buckets for p in b.params)

    def _step_plans(self, build: bool = True) -> "_Plans | None":
        """The buckets' plans if this step may run them (eager, nothing changed that the
        plans were built from), else None; ``build``: build them when there are none (not
        while perturbed: they would not be the ones the perturbation used). Each plan's
        lists are still checked by the ops (first pass: Backend.check_step); a mismatch there
        makes the step take the general path too."""
        if not self._plans_enabled or torch.compiler.is_compiling():
            return None
        plans = self._plans
        config = self._plan_config()
        if plans is not None and (plans.config != config or plans.state is not self.state):
            plans = self._plans = None   # built from something else
        if plans is None:
            if not build:
                return None
            buckets = self.buckets()
            plans = self._plans = _Plans(config, self.state, self._plans_possible(buckets))
            if plans.ok:
                try:
                    plans.extend(self._plan_bucket(b, be) for b, be in zip(buckets, self._backends))
                except Exception:   # tensors the list ops do not take: the general path
                    plans.clear()
                    plans.ok = False
        return plans if plans.ok else None

    def _drop_plans(self) -> None:
        """After a step that took the general path: it may have created or replaced what the
        plans hold (momentum buffers, backups, buckets), so the next step builds them anew."""
        if self._plans is not None and self._plans.ok:
            self._plans = None

    def _plan_bucket(self, b: Bucket, backend) -> "StepPlan":
        P = StepPlan(b, backend, backend.plan_layout(b.params), self._sr(b, backend))
        self._plan_family(P)
        return P

    def _plan_family(self, P: "StepPlan") -> None:   # the families add their own lists
        return None

    def _plan_grads(self, P: "StepPlan", grads: list) -> "GradPlan":
        """The part of ``P`` that depends on which parameters have a gradient (``grads``:
        ``p.grad`` of every parameter of the bucket): the list of those parameters with
        their momentum buffers (``moms_ok`` False when one is missing: such a step creates
        them on the general path)."""
        U = GradPlan()
        has = [g is not None for g in grads]
        U.idx = [j for j, h in enumerate(has) if h]
        U.has_grad = torch.tensor(has, dtype=torch.bool)
        U.nonempty = any(grads[j].numel() for j in U.idx)
        U.upd = self._plan_part(P, U, U.idx, moms=True)
        self._plan_grads_family(P, U)
        return U

    def _plan_part(self, P: "StepPlan", U: "GradPlan | None", idx: list,
                   moms: bool) -> "PlanPart | None":
        """A list the ops take (None if empty): parameters ``idx`` of P's bucket, their
        offsets and record and, with ``moms``, their momentum buffers (``U.moms_ok`` False
        when one is missing)."""
        if not idx:
            return None
        b = P.bucket
        part = PlanPart()
        part.idx = idx
        part.whole = len(idx) == len(b.params)
        part.params = [b.params[j] for j in idx]
        part.offsets = [b.index(j) for j in idx]
        part.layout = P.backend.plan_layout(part.params)
        part.moms = None
        if moms:
            bufs = []
            for p in part.params:
                st = self.state.get(p)
                bufs.append(st.get("momentum_buffer") if st else None)
            if any(m is None for m in bufs):
                U.moms_ok = False
            else:
                part.moms = bufs
        return part

    def _plan_grads_family(self, P: "StepPlan", U: "GradPlan") -> None:
        return None

    def _planned_grads(self, plans) -> list | None:
        """Every plan's gradients for this step (``p.grad`` of each parameter of its bucket;
        the plan's GradPlan built on first use), or None when a bucket needs momentum
        buffers it does not have yet (the general path creates them) or its lr is a device
        tensor (the general path says what to do)."""
        grads = [[p.grad for p in P.params] for P in plans]
        groups = self.param_groups
        state = self.state
        for P, gl in zip(plans, grads):
            if P.grads is None:
                P.grads = self._plan_grads(P, gl)
            g = groups[P.bucket.group_index]
            if (g["momentum"] != 0 and not P.grads.moms_ok) or (
                    isinstance(g["lr"], torch.Tensor) and g["lr"].device.type != "cpu"):
                return None
            upd = P.grads.upd
            if g["momentum"] != 0 and upd is not None and upd.moms is not None and not all(
                    map(operator.is_, [state.get(p, _NO_STATE).get("momentum_buffer")
                                       for p in upd.params], upd.moms)):
                return None   # the user replaced or cleared a buffer (opt.state.clear(), ...)
        return grads

    @staticmethod
    def _checks_itself(plans, part) -> bool:
        """Whether a pass over ``part`` checks all that the first pass (Backend.check_step)
        would, before it writes anything: the only bucket's every parameter against its
        record and, taking gradients, that each parameter has one (a None in a tensor list
        is refused when the op is called). That pass then is the first one."""
        return len(plans) == 1 and part is not None and part.whole

    def _planned_check(self, plans, grads, finite) -> list | None:
        """The first pass of a planned step (writes nothing): every bucket's parameters
        against their record, its gradients against their parameters and the plan; found_inf
        per bucket when ``finite`` (a list, one per bucket; True/False per bucket too). None
        when a plan no longer fits (stale, or a gradient the general path refuses with its
        own message)."""
        if isinstance(finite, bool):
            finite = [finite] * len(plans)
        try:
            return [P.backend.check_step(P.params, P.layout, gl, P.grads.has_grad if gl else None, f)
                    for P, gl, f in zip(plans, grads, finite)]
        except Exception:   # nothing was written: the general path decides (or raises)
            return None

    def _planned_found(self, plans, checks) -> torch.Tensor | None:
        """found_inf as :meth:`_found_inf` gives it, from the first pass's per-bucket checks:
        GradScaler's when it drives the step, else (check_finite) the max over the buckets
        that have a non-empty gradient, else None."""
        if self._scaler_decides():
            return self._scaler_found()
        if not self.check_finite:
            return None
        found = None
        for P, f in zip(plans, checks):
            if P.grads.nonempty:
                found = f if found is None else torch.maximum(found, f)
        return found

    # ----------------------------------------------------------------- gradients
    def _grads(self, b: Bucket) -> list[int]:
        """Indices of the bucket's parameters that have a gradient (``p.grad is not None``,
        whoever wrote it), checked to be usable."""
        out = []
        for j, p in enumerate(b.params):
            g = p.grad
            if g is None:
                continue
            if g.layout != torch.strided:   # COO, CSR, CSC, BSR, BSC, jagged...
                raise ValueError(f"{type(self).__name__}: a gradient with layout {g.layout} (of a "
                                 f"parameter of shape {tuple(p.shape)}): sparse gradients are not "
                                 f"supported, the fused kernels need dense (torch.strided) ones. "
                                 f"Use a dense embedding (nn.Embedding(..., sparse=False)), or "
                                 f"densify the gradient before step(): p.grad = p.grad.to_dense()")
            if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                raise ValueError(f"{type(self).__name__}: a gradient of {tuple(g.shape)} {g.dtype} "
                                 f"on {g.device} does not match its parameter ({tuple(p.shape)} "
                                 f"{p.dtype} on {p.device})")
            out.append(j)
        return out

    @staticmethod
    def _flat_grad(p: torch.Tensor) -> torch.Tensor:
        return flat_like(p.grad, p)

    def _scaler_decides(self) -> bool:
        """Whether torch.amp.GradScaler drives this step (it set ``found_inf``)."""
        return getattr(self, "found_inf", None) is not None

    def _scaler_found(self) -> torch.Tensor:
        """GradScaler's ``found_inf`` as the step's verdict (MAX over sharded groups)."""
        return self._reduce_max_sharded(self.found_inf.float().reshape(1).clone())

    def _found_inf(self, flat_grads: list[list[torch.Tensor]]) -> torch.Tensor | None:
        """1-element float32: 1 when the step must be skipped. GradScaler's ``found_inf``
        when it drives the step, else (``check_finite``) whether any gradient the update
        uses holds an inf or NaN."""
        if self._scaler_decides():
            return self._scaler_found()
        if not self.check_finite:
            return None
        found = None
        for bi, grads in enumerate(flat_grads):
            grads = [t for t in grads if t.numel()]   # an empty (local shard of a) gradient
            if grads:
                f = self._backends[bi].all_finite(grads)
                found = f if found is None else torch.maximum(found, f.to(found.device))
        if found is None:
            if not self._shard_keys:
                return None
            found = torch.zeros(1, device=self._collective_device())
        return self._reduce_max_sharded(found)

    # ----------------------------------------------------------------- sharded parameters
    def _collective_device(self) -> torch.device:
        return self._buckets[0].device if self._buckets else torch.device("cpu")

    def _reduce_max_sharded(self, t: torch.Tensor) -> torch.Tensor:
        """With sharded (DTensor) parameters, each rank sees only its shard of the gradients:
        MAX over every group holding other shards, so all ranks skip a step together. A
        device-side collective (no host sync)."""
        if self._shard_keys:
            import torch.distributed as dist
            for grp in dict.fromkeys(g for key in self._shard_keys for g in key):
                dist.all_reduce(t, op=dist.ReduceOp.MAX, group=grp)
        return t

    def _split_sharded(self, b: Bucket, idx: list[int]) -> dict:
        """Positions k of ``idx`` grouped by the process groups their parameter is split
        across (key ``()``: not split), for reductions that must see every shard."""
        out: dict = {}
        for k, j in enumerate(idx):
            out.setdefault(b.shard_keys[j], []).append(k)
        return out

    def _sum_sharded(self, parts: dict) -> torch.Tensor | None:
        """``parts``: {shard key: local partial sum (tensor)}. Sums every key's partials over
        its groups (one all-reduce per group of sharded parameters, issued on every rank in
        the same order, zero where a rank holds nothing) and adds them up; None if empty."""
        import torch.distributed as dist
        total = parts.get(())
        for key in self._shard_keys:
            t = parts.get(key)
            if t is None:
                dev = total.device if total is not None else self._collective_device()
                t = torch.zeros((), dtype=torch.float64, device=dev)
            t = t.to(torch.float64).clone()
            for grp in key:
                dist.all_reduce(t, op=dist.ReduceOp.SUM, group=grp)
            total = t if total is None else total + t.to(total.device)
        return total

    def _grad_scale(self, device) -> torch.Tensor | None:
        gs = getattr(self, "grad_scale", None)
        return gs.float().to(device).reshape(1) if gs is not None else None

    @staticmethod
    def _found_inf_on_host(found_inf: torch.Tensor) -> bool:
        """Whether reading ``found_inf`` costs no device sync (a CPU tensor). The one place
        that tells the host-known skip (CPU) from the device-side one (CUDA: the kernels
        read ``found_inf``; the host learns nothing unless it syncs)."""
        return found_inf.device.type == "cpu"

    def _known_skip(self, found_inf: torch.Tensor | None) -> bool:
        """Whether the step is known (on the host, without a device sync) to be skipped.
        Under torch.compile: never (no host read in the graph); the kernels still skip the
        update on the device from ``found_inf``, as on CUDA. Called once per step, before
        :meth:`_momentum_lists`: it keeps ``found_inf`` as the step's verdict, which decides
        whether a momentum buffer may be created (:meth:`_skip_blocks_creation`)."""
        if torch.compiler.is_compiling():
            return False
        self._step_found = found_inf
        self._step_found_read = None
        return found_inf is not None and self._found_inf_on_host(found_inf) and bool(found_inf.item())

    def _skip_blocks_creation(self, group: dict) -> bool:
        """Whether this step, which would create momentum buffers, is skipped on the device.

        torch.optim.SGD creates ``momentum_buffer`` on its first *taken* step (m = d); a
        step that GradScaler skips never reaches it. Here a skip known only on the device
        cannot stop the creation, and the next step would compute m = mu * 0 + (1 - tau) d
        instead of m = d: different whenever dampening tau != 0. So, on a step that creates
        buffers with a device-side ``found_inf`` and tau != 0 (and only then: with tau = 0
        both give d bit for bit), the host reads ``found_inf`` once (a sync on the steps
        that create buffers, never in the steady state). Not under torch.compile or while
        a CUDA graph is being captured (no host read possible there): a capture of the
        first step with a skipped step and tau != 0 keeps the mu * 0 buffer."""
        found = self._step_found
        if found is None or group["dampening"] == 0 or self._found_inf_on_host(found) \
                or torch.compiler.is_compiling():
            return False
        if found.is_cuda and torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
            return False
        if self._step_found_read is None:
            self._step_found_read = bool(found.ne(0).any().item())
        return self._step_found_read

    # The step counter k lives in a 0-dim int64 CPU tensor (``_k_t``), so that a compiled
    # step reads it as a graph input instead of specializing on its value; ``_k`` is its
    # Python int (eager code, checkpoints, messages).
    # The counter is a host value even when the optimizer is built under FakeTensorMode
    # (tests/test_no_host_sync.py): it is made and read outside any fake mode.
    # With ``capturable=True`` the counter is ``_k_dev`` on the parameters' device instead
    # (reading ``_k`` then is a device read: checkpoints and messages only, never in a step).
    @property
    def _k(self) -> int:
        kd = self.__dict__.get("_k_dev")
        if kd is not None:
            return int(kd)
        with unset_fake_temporarily():
            return int(self._k_t)

    @_k.setter
    def _k(self, value: int) -> None:
        with unset_fake_temporarily():
            if "_k_t" not in self.__dict__:
                self._k_t = torch.zeros((), dtype=torch.int64)
            self._k_t.fill_(int(value))
        kd = self.__dict__.get("_k_dev")
        if kd is not None:
            kd.fill_(int(value))

    def _step_arg(self, backend: backends.Backend):
        """k as the ops take it: with ``capturable=True``, the device counter (the kernels
        read it); under torch.compile with a backend that takes it as a tensor
        (``cpu_tensor_scalars``: 'cpp', 'reference'), the CPU counter tensor (no
        guard on its value); else the Python int."""
        if self._k_dev is not None:
            return self._k_dev
        if torch.compiler.is_compiling() and backend.cpu_tensor_scalars:
            return self._k_t
        return self._k

    def _lr_arg(self, group: dict, backend: backends.Backend):
        """The group's lr as the ops take it: a tensor lr (``lr=torch.tensor(...)``, what an
        LR scheduler then updates in place) stays a tensor with ``capturable=True`` (on the
        parameters' device: the kernels read it) and under torch.compile with a backend
        that takes it as a tensor (``cpu_tensor_scalars``; no guard on its value); else a
        Python float.

        A float lr under torch.compile with such a backend becomes a float64 CPU tensor
        made in the graph (``param_groups`` keeps the user's float): the first compilation
        takes its value as a constant, as torch.optim.SGD's does; once a scheduler has
        changed it, dynamo makes it a graph input, and a tensor here keeps it one (a Python
        float handed to the op would pin it again: a recompile per lr value)."""
        lr = group["lr"]
        if not isinstance(lr, torch.Tensor) and self._k_dev is None \
                and torch.compiler.is_compiling() and backend.cpu_tensor_scalars:
            return torch.full((), lr, dtype=torch.float64)
        if isinstance(lr, torch.Tensor):
            if self._k_dev is not None:
                if lr.device != self._k_dev.device:
                    raise ValueError(
                        f"{type(self).__name__}: capturable=True reads a tensor lr in the kernels, "
                        f"so it must be on the parameters' device ({self._k_dev.device}), got "
                        f"{lr.device}: pass lr=torch.tensor(value, device='{self._k_dev.device}')")
                return lr
            if lr.device.type != "cpu":
                raise ValueError(f"{type(self).__name__}: lr is a tensor on {lr.device}: reading "
                                 f"it every step is a host sync; pass capturable=True (the kernels "
                                 f"then read it on the device) or a CPU tensor / float lr")
            if torch.compiler.is_compiling() and backend.cpu_tensor_scalars:
                return lr
            return float(lr)
        return lr

    def _finish_step(self, found_inf: torch.Tensor | None, known_skip: bool) -> None:
        if self._k_dev is not None:
            self._k_dev.add_(1)          # on the device (captured with the step)
        elif torch.compiler.is_compiling():
            self._k_t.add_(1)            # traced into the graph
        else:
            with unset_fake_temporarily():
                self._k_t.add_(1)
        self._last_found_inf = found_inf
        self._opt_called = True   # what torch's LR schedulers check, also when step() is compiled
        compiling = torch.compiler.is_compiling()
        read = None if compiling else self._step_found_read   # read by _skip_blocks_creation
        if not compiling:
            self._step_found = self._step_found_read = None
        if not (known_skip or read):
            if read is None and found_inf is not None and not compiling \
                    and not self._found_inf_on_host(found_inf):
                self._count_device_skip(found_inf)   # decided on the device: counted there
            return
        self._skipped_host = self._skipped_host + 1
        warnings.warn(f"{type(self).__name__}: non-finite gradient at step {self._k - 1}; the "
                      f"update was skipped and the parameters restored", RuntimeWarning,
                      stacklevel=4)

    # ----------------------------------------------------------------- skipped steps
    @property
    def skipped_steps(self) -> int:
        """How many steps were skipped for a non-finite gradient (own check or GradScaler's
        ``found_inf``). Skips decided on the device (CUDA) are counted there, without a
        sync, and added in when this is read (a device read) or the state is saved."""
        n = self.__dict__.get("_skipped_host", 0)
        for acc in self.__dict__.get("_skips_dev", {}).values():
            n += int(acc)
        return n

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped_host = int(value)
        for acc in self.__dict__.get("_skips_dev", {}).values():
            acc.zero_()   # in place: a captured CUDA graph keeps counting into it

    def _count_device_skip(self, found_inf: torch.Tensor) -> None:
        """skipped_steps += (found_inf != 0), on found_inf's device (no host sync)."""
        accs = self.__dict__.setdefault("_skips_dev", {})
        acc = accs.get(found_inf.device)
        if acc is None:
            acc = accs[found_inf.device] = torch.zeros((), dtype=torch.int64, device=found_inf.device)
        acc.add_(found_inf.reshape(()).ne(0))   # GradScaler's may be > 1 (a sum over devices)

    # ----------------------------------------------------------------- momentum
    def _momentum_lists(self, b: Bucket, idx: list[int], group: dict, create: bool):
        """torch.optim.SGD's momentum buffers of parameters ``idx`` as flat views, split by
        whether the buffer is new (the kernel then sets it to d, as SGD's ``clone(d)``).
        Returns [(indices, flat buffers or None, momentum_init)]. ``create=False`` (a step
        known to be skipped) creates none, as torch.optim.SGD, whose step is not taken; so
        does a step skipped on the device when the creation depends on it
        (:meth:`_skip_blocks_creation`)."""
        if group["momentum"] == 0:
            return [(idx, None, False)]
        old, new = [], []
        for j in idx:
            p = b.params[j]
            buf = self.state[p].get("momentum_buffer") if p in self.state else None
            if buf is None:
                if create and self._skip_blocks_creation(group):
                    create = False
                if not create:
                    continue
                self.state[p]["momentum_buffer"] = self._new_momentum(p)
                new.append(j)
            else:
                old.append(j)
        out = []
        for js, init in ((old, False), (new, True)):
            if js:
                out.append((js, [flat(self.state[b.params[j]]["momentum_buffer"]) for j in js], init))
        if not create:   # a skipped step: the kernels only restore, parameters without a buffer too
            rest = [j for j in idx if j not in set(old)]
            if rest:
                out.append((rest, None, False))
        return out

    def _new_momentum(self, p: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(p, dtype=torch.float32 if self._fp32_state(p) else p.dtype)

    # ----------------------------------------------------------------- torch.compile
    def _compile_init(self, part: str) -> None:
        """Under torch.compile, make the state that ``part`` of the step would create
        (:meth:`_init_group`) before the step is traced; eager: nothing."""
        if torch.compiler.is_compiling():
            self._state_maker._init_group(part)

    def _init_group(self, part: str) -> None:
        """The state a compiled step would create, made on the real optimizer: dynamo runs a
        torch.optim.Optimizer's ``_init_group`` eagerly when it traces a call to it (as for
        torch.optim.Adam's state; here through :class:`_StateMaker`, which spares the frame a
        guard on every value of ``param_groups``), so the first compiled step already sees
        what every later step sees and the step compiles once, where creating state in the
        graph would recompile it on the second step (dynamo guards on the state's contents).

        ``part``: 'update' (a step's update, SAM's second_step): the momentum buffers the
        update would create, of the parameters with a gradient, in groups with dampening 0,
        as zeros: the update then takes m = mu * 0 + d, which is d (SGD's first momentum)
        bit for bit; with dampening != 0 the buffer is left to the step (m = d needs the
        first-step flag: one recompile). The families add what their other passes make
        (:meth:`_init_family`). A step that is then skipped on the device (non-finite
        gradient) keeps these zero buffers where torch.optim.SGD would have none yet; the
        next step's momentum is the same."""
        if part == "update":
            self._init_momentum()
        self._init_family(part)

    def _init_momentum(self) -> None:
        """_init_group's momentum buffers (zeros) of the parameters with a gradient, in the
        groups with momentum and dampening 0."""
        state = self.state
        for g in self.param_groups:
            if g["momentum"] == 0 or g["dampening"] != 0:
                continue
            for p in g["params"]:
                if p.grad is not None and state[p].get("momentum_buffer") is None:
                    state[p]["momentum_buffer"] = self._new_momentum(p)

    def _init_family(self, part: str) -> None:   # the families' own state (backups)
        return None

    @property
    def step_count(self) -> int:
        """k, the number of step() calls so far (the noise stream's step index)."""
        return self._k

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last step was skipped for a non-finite gradient (syncs on CUDA)."""
        return self._last_found_inf is not None and bool(self._last_found_inf.item())

    # ----------------------------------------------------------------- checkpoints
    def _meta(self) -> dict:
        return {"format": STATE_FORMAT, "stream": noise.LAYOUT_VERSION, "kind": type(self).__name__,
                "seed": self.seed,
                "step": self._k, "skipped_steps": self.skipped_steps}

    def state_dict(self) -> dict:
        """torch.optim.SGD's format (per-parameter 'momentum_buffer') plus a 'fused_flat'
        entry with the seed and the step counter. The state-dict hooks registered on this
        optimizer run around the whole of it, as torch.optim.Optimizer runs them (a post-hook
        sees, and may replace, the dict returned, 'fused_flat' entry included)."""
        if self._is_perturbed():
            raise RuntimeError(f"{type(self).__name__}.state_dict(): the weights are perturbed; "
                               f"call step() or restore() first")
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        with self._own_hooks_suspended():
            sd = self._torch_state_dict()
        sd["fused_flat"] = self._meta()
        for hook in self._optimizer_state_dict_post_hooks.values():
            out = hook(self, sd)
            if out is not None:
                sd = out
        return sd

    _STATE_DICT_HOOKS = ("_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
                         "_optimizer_load_state_dict_pre_hooks",
                         "_optimizer_load_state_dict_post_hooks")

    @contextlib.contextmanager
    def _own_hooks_suspended(self):
        """torch's Optimizer.state_dict / load_state_dict, called for the per-parameter
        part, would run this optimizer's hooks a second time, in the middle: they run around
        the whole call instead (state_dict, load_state_dict)."""
        saved = {k: self.__dict__[k] for k in self._STATE_DICT_HOOKS if k in self.__dict__}
        for k in saved:
            self.__dict__[k] = type(saved[k])()
        try:
            yield
        finally:
            self.__dict__.update(saved)

    def _torch_state_dict(self) -> dict:
        return Optimizer.state_dict(self)

    def _torch_load_state_dict(self, sd: dict) -> None:
        Optimizer.load_state_dict(self, sd)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a fused_flat checkpoint (bit-exact resume), or a ``torch.optim.SGD`` one
        (warm start: its momentum and hyperparameters are taken, this optimizer's seed and
        step counter kept, with one warning). The load-state-dict hooks registered on this
        optimizer run as torch.optim.Optimizer runs them: the pre-hooks on a shallow copy
        of ``state_dict`` (a hook may edit or replace it) before anything is checked, the
        post-hooks after a successful load."""
        if isinstance(state_dict, dict):
            state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            if out is not None:
                state_dict = out
        with self._own_hooks_suspended():
            self._load_state_dict(state_dict)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _load_state_dict(self, state_dict: dict) -> None:
        name = type(self).__name__
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict:
            raise ValueError(f"{name}.load_state_dict: not an optimizer state_dict (no "
                             f"'param_groups')")
        meta = state_dict.get("fused_flat")
        if meta is not None:
            self._check_meta(meta)
        saved_groups = state_dict["param_groups"]
        if not isinstance(saved_groups, list) or len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{name}.load_state_dict: the state_dict has "
                             f"{len(saved_groups) if isinstance(saved_groups, list) else 'no'} param "
                             f"groups, this optimizer has {len(self.param_groups)}: it comes from a "
                             f"different model or optimizer")
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [i for g in saved_groups for i in g.get("params", [])]
        if len(ids) != len(params):
            raise ValueError(f"{name}.load_state_dict: the state_dict covers {len(ids)} parameters, "
                             f"this optimizer has {len(params)}: it comes from a different model")
        by_id = dict(zip(ids, params))
        for pid, st in state_dict.get("state", {}).items():
            if pid not in by_id:
                raise ValueError(f"{name}.load_state_dict: state for unknown parameter id {pid}")
            buf = st.get("momentum_buffer") if isinstance(st, dict) else None
            if buf is not None and tuple(buf.shape) != tuple(by_id[pid].shape):
                raise ValueError(f"{name}.load_state_dict: momentum_buffer of parameter {pid} has "
                                 f"shape {tuple(buf.shape)}, the parameter has "
                                 f"{tuple(by_id[pid].shape)}: the state_dict comes from a different model")
        self.restore()
        merged = []
        for cur, saved in zip(self.param_groups, saved_groups):
            g = {k: v for k, v in cur.items() if k != "params"}
            g.update({k: v for k, v in saved.items() if k in cur or k not in _SGD_ONLY_KEYS})
            merged.append(g)
        sd = {k: v for k, v in state_dict.items() if k != "fused_flat"}
        sd["param_groups"] = merged
        self._torch_load_state_dict(sd)
        for pid, st in state_dict.get("state", {}).items():   # torch cast them to the param dtype
            p = by_id[pid]
            if self._fp32_state(p) and isinstance(st, dict):
                for key in FP32_STATE_KEYS:
                    if isinstance(st.get(key), torch.Tensor):
                        t = torch.empty_like(p, dtype=torch.float32)
                        t.copy_(st[key])
                        self.state[p][key] = t
        for g in self.param_groups:
            self._validate_group(g)
        if meta is None:
            if not self._warned_warm_start:
                self._warned_warm_start = True
                warnings.warn(f"{name}.load_state_dict: a torch.optim state_dict (no 'fused_flat' "
                              f"entry): momentum and hyperparameters loaded, this optimizer's noise "
                              f"seed and step counter kept (warm start)", UserWarning, stacklevel=2)
        else:
            if meta.get("seed") is not None:
                self.seed = meta["seed"]
            self._k = meta["step"]
            self.skipped_steps = int(meta.get("skipped_steps", 0))
        self._layout = None
        self.buckets()

    def _check_meta(self, meta) -> None:
        name = type(self).__name__
        if not isinstance(meta, dict) or meta.get("format") not in READABLE_FORMATS:
            fmt = meta.get("format") if isinstance(meta, dict) else meta
            raise ValueError(f"{name}.load_state_dict: unknown format {fmt!r} (this version "
                             f"reads formats {READABLE_FORMATS})")
        seed, k = meta.get("seed"), meta.get("step")
        if (seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                                  or not 0 <= seed < 2 ** 63)) or not isinstance(k, int) or k < 0:
            raise ValueError(f"{name}.load_state_dict: corrupted 'fused_flat' entry "
                             f"(seed={seed!r}, step={k!r})")
        fmt = meta["format"]
        stream = meta.get("stream", fmt)   # not recorded before format 2 (format 1: layout 1)
        if isinstance(stream, bool) or not isinstance(stream, int) or stream < 1:
            raise ValueError(f"{name}.load_state_dict: corrupted 'fused_flat' entry "
                             f"(stream={stream!r}, the noise layout version)")
        if stream > noise.LAYOUT_VERSION:
            raise ValueError(f"{name}.load_state_dict: the checkpoint was written with noise "
                             f"layout {stream} by a newer fused_flat; this version knows layouts up "
                             f"to {noise.LAYOUT_VERSION}: upgrade fused_flat to resume it")
        if stream != noise.LAYOUT_VERSION or fmt != STATE_FORMAT:   # one warning per load
            where = ("" if fmt == STATE_FORMAT
                     else f" (state format {fmt}; this version writes {STATE_FORMAT})")
            warnings.warn(f"{name}.load_state_dict: checkpoint written with noise layout {stream}"
                          f"{where}; continues on layout {noise.LAYOUT_VERSION}: same law, other "
                          f"numbers (momentum, seed and step counter are loaded; the noise "
                          f"continues from a different, statistically equivalent stream)",
                          UserWarning, stacklevel=3)

    def restore(self) -> None:   # overridden by the families
        return None


class PlanPart:
    """A list of a bucket's parameters that a planned pass takes: their indices in the
    bucket (``whole``: all of them, in order), the tensors, their bucket offsets, their
    plan_layout record and (lists of parameters with gradients) their momentum buffers."""

    __slots__ = ("idx", "whole", "params", "offsets", "layout", "moms")

    def grads(self, gl: list) -> list:
        """This list's gradients out of ``gl``, the gradients of every bucket parameter."""
        return gl if self.whole else [gl[j] for j in self.idx]


class GradPlan:
    """The part of a :class:`StepPlan` that depends on which parameters have a gradient:
    their indices (``idx``) and mask (``has_grad``, bool [T], what the first pass checks),
    whether any gradient is non-empty, the list of them (``upd``, a PlanPart; None if none)
    and whether all their momentum buffers exist; the families' own lists (Langevin: the
    perturbed parameters with and without a gradient, those with one not perturbed; SAM:
    the backups)."""

    __slots__ = ("idx", "has_grad", "nonempty", "upd", "moms_ok", "both", "only_grad",
                 "only_pert", "backups")

    def __init__(self) -> None:
        self.upd = self.both = self.only_grad = self.only_pert = self.backups = None
        self.moms_ok = True


class StepPlan:
    """One bucket's step plan (FlatOptimizer._step_plans): the bucket's parameters and
    their plan_layout record, the stochastic-rounding flag, the families' lists (Langevin:
    the perturbed parameters ``pert``, a PlanPart, their restore mode and backups) and the
    gradient part (:class:`GradPlan`, built at the first step that reads the gradients).
    Built from the bucket and the state when a step needs it; dropped after any step that
    takes the general path and whenever the buckets are rebuilt."""

    __slots__ = ("bucket", "backend", "params", "layout", "sr", "grads", "pert", "mode", "backups")

    def __init__(self, bucket: Bucket, backend, layout: torch.Tensor, sr: bool) -> None:
        self.bucket, self.backend, self.params, self.layout = bucket, backend, bucket.params, layout
        self.sr = sr
        self.grads: GradPlan | None = None
        self.pert = self.mode = self.backups = None


class _Plans(list):
    """The StepPlans of every bucket (``ok`` False: these buckets run no plans), with what
    they were built from."""

    def __init__(self, config: tuple, state, ok: bool) -> None:
        super().__init__()
        self.config, self.state, self.ok = config, state, ok
