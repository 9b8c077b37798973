"""The argument bundles of the list passes: one typed object per pass family, and the one
place that checks a list pass's arguments.

Each bundle is a NamedTuple whose fields are, in order, the arguments of the registered
list op of its pass (``Perturb``, ``PerturbFrom``, ``RestoreAndStep``, ``SamSqNorm``,
``SamPerturb``, ``SamRestoreAndStep``, ``SamProbe``). A GPU list backend
(fused_flat.backends.triton.multi / .sam; fused_flat.backends.cuda / cuda_sam can do the
same) uses it three ways:

* ``op = register(lib, "name", Bundle, impl, fake)``: defines ``lib.ns::name`` with the
  schema written from the bundle's field annotations (``Bundle.WRITES``: the lists the op
  writes, ``Tensor(aK!)[]``) through fused_flat.backends.multi_tensor.register_list_op, whose
  kernels receive the bundle: ``impl(a: Bundle)``, ``fake(a: Bundle)``;
* ``a = perturb(what, ...)`` (one function per bundle, with the Backend list signature of
  fused_flat/backends/__init__.py): the argument checks and conversions -- metadata only,
  no host read of any tensor, so they trace under FakeTensorMode -- and the bundle, or
  None when the pass has nothing to do (no tensors, sigma = 0);
* ``op(*a)``: one call of the op.

Per-step values may be device tensors (``capturable=True``): ``step`` an int or a
one-element int64 tensor, ``lr`` / ``noise_std`` a float or a one-element float64 /
float32 tensor, ``coef`` a float or a one-element floating tensor, all on the params'
device. The bundle then holds the tensor in ``*_t`` and 0 in the number's field (a Python
number: the number, and None in ``*_t``); the kernel reads the tensor when it runs.

``dtypes`` (every check function): the parameter dtypes the calling backend's kernels take
(its Backend.dtypes); another dtype raises ValueError saying what to use. Bucket offsets
and seeds are int64 (offsets in [0, 2^63), seeds in [0, 2^63)).
"""
from typing import List, NamedTuple, Optional, Sequence, get_type_hints

import torch
from torch import Tensor

from fused_flat.backends import multi_tensor as mt
from fused_flat.noise import TAG_LIMIT, check_bucket_id

LOW_PRECISION = (torch.bfloat16, torch.float16)
STEP_DTYPES = (torch.int64,)
FLOAT_DTYPES = (torch.float64, torch.float32)


# ------------------------------------------------------------------ the bundles
# Every argument has one name and one type in every pass ("name?" in a bundle: optional).
_TYPES = dict(
    params=List[Tensor], grads=List[Tensor], moms=List[Tensor], backups=List[Tensor],
    masters=List[Tensor], offsets=List[int], grad_scale=Optional[Tensor],
    found_inf=Optional[Tensor], seed=int, bucket_id=int, step=int, step_t=Optional[Tensor],
    tag=int, restore_tag=int, sigma=float, lr=float, lr_t=Optional[Tensor],
    weight_decay=float, momentum=float, dampening=float, nesterov=bool, momentum_init=bool,
    noise_std=float, noise_std_t=Optional[Tensor], grad_mult=float,
    stochastic_rounding=bool, eta=float, adaptive=bool, coef=float, coef_t=Optional[Tensor],
    delta=float,
)


def _bundle(name: str, fields: str, writes: tuple, doc: str):
    """A NamedTuple ``name`` of the space-separated ``fields`` (types from _TYPES) whose op
    writes the lists ``writes``."""
    spec = []
    for f in fields.split():
        ty = _TYPES[f.rstrip("?")]
        spec.append((f.rstrip("?"), Optional[ty] if f.endswith("?") else ty))
    cls = NamedTuple(name, spec)
    cls.WRITES, cls.__doc__, cls.__module__ = writes, doc, __name__
    return cls


Perturb = _bundle(
    "Perturb", "params offsets seed bucket_id step step_t tag sigma", ("params",),
    "theta <- theta + sigma * eps(tag) (fused_flat.backends.reference.perturb_).")
PerturbFrom = _bundle(
    "PerturbFrom", "params masters offsets seed bucket_id step step_t tag sigma", ("params",),
    "param <- round(master + sigma * eps(tag)) (reference.perturb_from_), fp32 masters.")
RestoreAndStep = _bundle(
    "RestoreAndStep", "params grads moms offsets grad_scale found_inf seed bucket_id step step_t "
    "restore_tag sigma lr lr_t weight_decay momentum dampening nesterov momentum_init "
    "noise_std noise_std_t grad_mult stochastic_rounding", ("params", "moms"),
    "The fused restore + decay + momentum + Langevin + update pass "
    "(reference.restore_and_step_); ``moms`` empty: no momentum buffers; "
    "``stochastic_rounding`` already False for fp32 / fp64 params.")
SamSqNorm = _bundle(
    "SamSqNorm", "grads params eta", (),
    "sum t^2 over the lists, t = g or (|theta| + eta) g (ASAM: ``params`` non-empty).")
SamPerturb = _bundle(
    "SamPerturb", "params grads backups adaptive coef coef_t eta", ("params", "backups"),
    "backup <- theta ; theta <- theta + (coef * s) g (sam_reference.sam_perturb_).")
SamRestoreAndStep = _bundle(
    "SamRestoreAndStep", "params backups grads moms grad_scale found_inf lr lr_t weight_decay "
    "momentum dampening nesterov momentum_init grad_mult stochastic_rounding seed bucket_id "
    "step step_t offsets?", ("params", "moms"),
    "theta <- backup, then SGD's update (sam_reference.sam_restore_and_step_); ``offsets`` "
    "(of the stochastic rounding bits) None: the packed prefix sums of the numels.")
SamProbe = _bundle(
    "SamProbe", "params backups offsets seed bucket_id step step_t delta", ("params", "backups"),
    "backup <- theta ; theta <- theta + delta * v (RW-SAM's Rademacher probe, tag 16).")


# ------------------------------------------------------------------ op registration
_SCHEMA_TYPES = {
    List[Tensor]: "Tensor[]", Optional[Tensor]: "Tensor?", List[int]: "SymInt[]",
    Optional[List[int]]: "SymInt[]?", int: "SymInt", float: "float", bool: "bool",
}


def schema(name: str, bundle, returns: str = "()") -> str:
    """The op schema ``name(args) -> returns`` of a bundle: its fields in order, the lists it
    WRITES annotated ``Tensor(aK!)[]``."""
    args = []
    for k, (field, ann) in enumerate(get_type_hints(bundle).items()):
        ty = _SCHEMA_TYPES[ann]
        if field in bundle.WRITES:
            ty = f"Tensor(a{k}!)[]"
        args.append(f"{ty} {field}")
    return f"{name}({', '.join(args)}) -> {returns}"


def register(lib: torch.library.Library, name: str, bundle, impl, fake=None,
             returns: str = "()"):
    """Define ``lib.ns::name`` over ``bundle``'s fields (multi_tensor.register_list_op) and
    return the op; ``impl`` / ``fake`` receive the bundle (``fake`` None: returns nothing)."""
    def real(*args):
        return impl(bundle(*args))

    def fake_impl(*args):
        return None if fake is None else fake(bundle(*args))

    real.__name__, real.__qualname__, real.__doc__ = impl.__name__, impl.__qualname__, impl.__doc__
    real.__module__ = impl.__module__
    return mt.register_list_op(lib, schema(name, bundle, returns), real, fake_impl)


# ------------------------------------------------------------------ single-argument checks
def check_dtype(what: str, t: Tensor, dtypes: Sequence[torch.dtype] | None) -> None:
    """ValueError unless ``t``'s dtype is one of ``dtypes`` (None: any)."""
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{what}: {t.dtype} tensors are not supported (this backend's kernels "
                         f"take {names}); let fused_flat.backends.resolve pick the backend of "
                         f"the bucket (backend='auto'), or call the backend it names")


def check_offsets(what: str, params: Sequence[Tensor], offsets: Sequence[int]) -> list[int]:
    """The bucket offsets as ints: one per tensor, each in [0, 2^63)."""
    if len(offsets) != len(params):
        raise ValueError(f"{what}: {len(offsets)} offsets for {len(params)} tensors")
    out = [int(o) for o in offsets]
    if any(o < 0 or o >= 2 ** 63 for o in out):
        raise ValueError(f"{what}: offsets must be in [0, 2^63), got {out}")
    return out


def check_noise(what: str, seed: int, bucket_id: int, tag: int | None = None,
                min_tag: int = 0) -> None:
    """seed in [0, 2^63), bucket id in [0, 2^24), tag (if given) in [min_tag, 256)."""
    if not 0 <= seed < 2 ** 63:
        raise ValueError(f"{what}: seed must be in [0, 2^63), got {seed}")
    check_bucket_id(bucket_id)
    if tag is not None and not min_tag <= tag < TAG_LIMIT:
        raise ValueError(f"{what}: tag must be in [{min_tag}, {TAG_LIMIT}), got {tag}")


def check_flag(what: str, name: str, t: Tensor | None, ref: Tensor) -> None:
    """``grad_scale`` / ``found_inf``: None or a one-element float32 tensor on ref's device
    (read by the kernel)."""
    if t is not None and (t.numel() != 1 or t.dtype != torch.float32 or t.device != ref.device):
        raise ValueError(f"{what}: {name} must be a one-element float32 tensor on {ref.device}, "
                         f"got {t.numel()} elements of {t.dtype} on {t.device}")


def device_scalar(what: str, name: str, value, ref: Tensor, dtypes: tuple):
    """(number, tensor) of a per-step value: (the Python number, None), or (0, the tensor)
    for a one-element tensor of ``dtypes`` on ref's device (read by the kernel; metadata
    checks only, no host read)."""
    if not isinstance(value, Tensor):
        cast = int if dtypes == STEP_DTYPES else float
        return cast(value), None
    if value.dtype not in dtypes or value.numel() != 1 or value.device != ref.device:
        kind = str(dtypes[0])
        number = "an int" if dtypes == STEP_DTYPES else "a float"
        if len(dtypes) > 1:
            kind += " (or " + ", ".join(str(d).replace("torch.", "") for d in dtypes[1:]) + ")"
        raise ValueError(f"{what}: {name} must be {number} or a one-element {kind} tensor on "
                         f"{ref.device} (read by the kernel, no host sync), e.g. "
                         f"torch.tensor(v, dtype={dtypes[0]}, device='{ref.device}'); got "
                         f"{value.numel()} elements of {value.dtype} on {value.device}")
    return (0 if dtypes == STEP_DTYPES else 0.0), value


def _step_head(what: str, params, dtypes, grad_scale, found_inf) -> Tensor | None:
    """The checks of an update pass once the lists are checked: None for no tensors, else
    the first param after its dtype and the flags (grad_scale, found_inf) are checked."""
    if not params:
        return None
    ref = params[0]
    check_dtype(what, ref, dtypes)
    check_flag(what, "grad_scale", grad_scale, ref)
    check_flag(what, "found_inf", found_inf, ref)
    return ref


# ------------------------------------------------------------------ the passes
def perturb(what: str, params, offsets, seed, bucket_id, step, tag, sigma,
            dtypes=None) -> Optional[Perturb]:
    mt.check_lists(what, "params", params)
    offsets = check_offsets(what, params, offsets)
    check_noise(what, seed, bucket_id, tag)
    if not params:
        return None
    check_dtype(what, params[0], dtypes)
    step, step_t = device_scalar(what, "step", step, params[0], STEP_DTYPES)
    if sigma == 0.0:
        return None
    return Perturb(list(params), offsets, int(seed), int(bucket_id), step, step_t, int(tag),
                   float(sigma))


def perturb_from(what: str, params, masters, offsets, seed, bucket_id, step, tag, sigma,
                 dtypes=None) -> Optional[PerturbFrom]:
    mt.check_lists(what, "params", params)
    mt.check_lists(what, "masters", masters)
    offsets = check_offsets(what, params, offsets)
    check_noise(what, seed, bucket_id, tag)
    if len(masters) != len(params) or any(m.numel() != p.numel() for p, m in zip(params, masters)):
        raise ValueError(f"{what}: masters must match params tensor for tensor (numels "
                         f"{[p.numel() for p in params]}), got {[m.numel() for m in masters]}")
    if not params:
        return None
    check_dtype(what, params[0], dtypes)
    if masters[0].dtype != torch.float32 or masters[0].device != params[0].device:
        raise ValueError(f"{what}: masters must be float32 on {params[0].device}, got "
                         f"{masters[0].dtype} on {masters[0].device}")
    step, step_t = device_scalar(what, "step", step, params[0], STEP_DTYPES)
    return PerturbFrom(list(params), list(masters), offsets, int(seed), int(bucket_id), step,
                       step_t, int(tag), float(sigma))


def restore_and_step(what: str, params, grads, moms, offsets, grad_scale, found_inf, seed,
                     bucket_id, step, restore_tag, sigma, lr, weight_decay, momentum, dampening,
                     nesterov, momentum_init, noise_std, grad_mult, stochastic_rounding=False,
                     dtypes=None) -> Optional[RestoreAndStep]:
    mt.check_lists(what, "params", params, grads=grads, moms=moms)
    offsets = check_offsets(what, params, offsets)
    check_noise(what, seed, bucket_id, restore_tag, min_tag=-1)
    if restore_tag < 0 and sigma != 0.0:
        raise ValueError(f"{what}: restore_tag must be >= 0 when sigma != 0 (-1: no restore)")
    ref = _step_head(what, params, dtypes, grad_scale, found_inf)
    if ref is None:
        return None
    step, step_t = device_scalar(what, "step", step, ref, STEP_DTYPES)
    lr, lr_t = device_scalar(what, "lr", lr, ref, FLOAT_DTYPES)
    noise_std, noise_std_t = device_scalar(what, "noise_std", noise_std, ref, FLOAT_DTYPES)
    return RestoreAndStep(
        list(params), list(grads), list(moms) if moms is not None else [], offsets, grad_scale,
        found_inf, int(seed), int(bucket_id), step, step_t, int(restore_tag), float(sigma), lr,
        lr_t, float(weight_decay), float(momentum), float(dampening), bool(nesterov),
        bool(momentum_init), noise_std, noise_std_t, float(grad_mult),
        bool(stochastic_rounding) and ref.dtype in LOW_PRECISION)


def sam_sq_norm(what: str, grads, params, eta, dtypes=None) -> Optional[SamSqNorm]:
    mt.check_lists(what, "grads", grads, params=params)
    if not grads:
        return None
    check_dtype(what, grads[0], dtypes)
    return SamSqNorm(list(grads), list(params) if params is not None else [], float(eta))


def sam_perturb(what: str, params, grads, backups, adaptive, coef, eta,
                dtypes=None) -> Optional[SamPerturb]:
    mt.check_lists(what, "params", params, grads=grads, backups=backups)
    if not params:
        return None
    check_dtype(what, params[0], dtypes)
    coef_t = None
    if isinstance(coef, Tensor):
        if coef.numel() != 1 or coef.device != params[0].device or not coef.is_floating_point():
            raise ValueError(f"{what}: coef must be a float or a one-element floating tensor on "
                             f"{params[0].device}, got {coef.numel()} elements of {coef.dtype} "
                             f"on {coef.device}")
        coef, coef_t = 0.0, coef.reshape(())
    return SamPerturb(list(params), list(grads), list(backups), bool(adaptive), float(coef),
                      coef_t, float(eta))


def sam_restore_and_step(what: str, params, backups, grads, moms, grad_scale, found_inf, lr,
                         weight_decay, momentum, dampening, nesterov, momentum_init, grad_mult,
                         stochastic_rounding=False, seed=0, bucket_id=0, step=0, offsets=None,
                         dtypes=None) -> Optional[SamRestoreAndStep]:
    mt.check_lists(what, "params", params, backups=backups, grads=grads, moms=moms)
    if offsets is not None:
        offsets = check_offsets(what, params, offsets)
    ref = _step_head(what, params, dtypes, grad_scale, found_inf)
    if ref is None:
        return None
    sr = bool(stochastic_rounding) and ref.dtype in LOW_PRECISION
    if sr:
        check_noise(what, seed, bucket_id)
    lr, lr_t = device_scalar(what, "lr", lr, ref, FLOAT_DTYPES)
    step, step_t = device_scalar(what, "step", step, ref, STEP_DTYPES)
    return SamRestoreAndStep(
        list(params), list(backups), list(grads), list(moms) if moms is not None else [],
        grad_scale, found_inf, lr, lr_t, float(weight_decay), float(momentum), float(dampening),
        bool(nesterov), bool(momentum_init), float(grad_mult), sr, int(seed), int(bucket_id),
        step, step_t, offsets)


def sam_probe(what: str, params, backups, offsets, seed, bucket_id, step, delta,
              dtypes=None) -> Optional[SamProbe]:
    mt.check_lists(what, "params", params, backups=backups)
    offsets = check_offsets(what, params, offsets)
    check_noise(what, seed, bucket_id)
    if not params:
        return None
    check_dtype(what, params[0], dtypes)
    step, step_t = device_scalar(what, "step", step, params[0], STEP_DTYPES)
    return SamProbe(list(params), list(backups), offsets, int(seed), int(bucket_id), step,
                    step_t, float(delta))


__all__ = ["Perturb", "PerturbFrom", "RestoreAndStep", "SamSqNorm", "SamPerturb",
           "SamRestoreAndStep", "SamProbe", "schema", "register", "check_dtype",
           "check_offsets", "check_noise", "check_flag", "device_scalar", "perturb",
           "perturb_from", "restore_and_step", "sam_sq_norm", "sam_perturb",
           "sam_restore_and_step", "sam_probe"]
