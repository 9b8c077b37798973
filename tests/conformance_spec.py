"""The conformance table of tests/test_conformance.py, as data: optimizer x configuration x
idiom, each case with its oracle (in the spirit of optimi's test spec and torch's
test/test_optim.py + common_optimizers.optim_db).

A case is a record; the table is built from a few blocks (not the full product, which would
be thousands of cases for little gain), then filtered by EXCLUSION_RULES, each with the reason
the combination does not apply. ``EXCLUDED`` keeps what was left out and why.

Oracles
- 'sgd'     torch.optim.SGD driven through the same idiom: the limits where the spec says
            the optimizer *is* SGD (ALGORITHMS.md §2: sigma = 0, beta = inf; §3: rho = 0).
- 'davda54' a davda54/sam-style SAM written in plain torch in the test file (global norm,
            exact restore, base torch.optim.SGD step).
- 'backend' the same run on the 'reference' backend (pure torch, the spec's readable form)
            compared with 'cpp' (noise-driven runs, which have no closed-form oracle).
- 'self'    an uninterrupted run of the same optimizer, same seed: a transparent idiom
            (state_dict round trip, deepcopy) must leave the trajectory bit-identical.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

INF = math.inf

# ----------------------------------------------------------------------------- optimizers
# family: how a user steps it ('langevin': step(closure); 'sam': first backward then
# step(closure); 'msam': step(closure(mb), batch); 'rwsam': step(closure -> per-sample losses))
# limit: 'sgd' when the optimizer is torch.optim.SGD by the spec, 'davda54' for SAM with
# rho > 0, None for noise-driven ones (oracle: the reference backend, or itself).
OPTIMIZERS = {
    "SGLD-inf": dict(cls="SGLD", kw=dict(beta=INF), family="langevin", limit="sgd"),
    "FSGLD-inf": dict(cls="FSGLD", kw=dict(beta=INF), family="langevin", limit="sgd"),   # sigma = beta^-(1+eta)/4 -> 0
    "RWP-0": dict(cls="RWP", kw=dict(sigma=0.0), family="langevin", limit="sgd"),
    "SAM-0": dict(cls="SAM", kw=dict(rho=0.0), family="sam", limit="sgd"),
    "SAM": dict(cls="SAM", kw=dict(rho=0.05), family="sam", limit="davda54"),
    "ASAM": dict(cls="SAM", kw=dict(rho=0.5, adaptive=True), family="sam", limit="davda54"),
    "USAM": dict(cls="SAM", kw=dict(rho=0.05, normalize=False), family="sam", limit="davda54"),
    "FSGLD": dict(cls="FSGLD", kw=dict(beta=1e4), family="langevin", limit=None),
    "SGLD": dict(cls="SGLD", kw=dict(beta=1e4), family="langevin", limit=None),
    "RWP": dict(cls="RWP", kw=dict(sigma=0.01), family="langevin", limit=None),
    "MSAM": dict(cls="MSAM", kw=dict(rho=0.05, micro_batch_size=4), family="msam", limit=None),
    "RWSAM": dict(cls="RWSAM", kw=dict(rho=0.05, delta=1e-3), family="rwsam", limit=None),
}
SGD_LIMITS = [k for k, v in OPTIMIZERS.items() if v["limit"] == "sgd"]
DAVDA = [k for k, v in OPTIMIZERS.items() if v["limit"] == "davda54"]
NOISY = ["FSGLD", "SGLD", "RWP"]

# ----------------------------------------------------------------------------- configurations
# kw: constructor keywords (also given to the SGD / davda54 oracle unless the key is ours);
# lr: the learning rate (a tensor with tensor_lr / capturable); scaler: run under
# torch.amp.GradScaler('cpu'); dtype: overrides the dtype axis.
OURS_ONLY_KEYS = ("n_perturbations", "check_finite", "capturable", "exact_restore",
                  "master_weights", "stochastic_rounding")
CONFIGS = {
    # torch.optim.SGD's own option space (common_optimizers.optim_inputs_func_sgd)
    "plain": dict(kw={}),
    "momentum": dict(kw=dict(momentum=0.9)),
    "nesterov": dict(kw=dict(momentum=0.9, nesterov=True, weight_decay=0.1)),
    "dampening": dict(kw=dict(momentum=0.9, dampening=0.5)),
    "wd": dict(kw=dict(weight_decay=0.1)),
    "wd_momentum": dict(kw=dict(momentum=0.9, weight_decay=0.1)),
    "maximize": dict(kw=dict(weight_decay=0.1, maximize=True)),
    "maximize_momentum": dict(kw=dict(momentum=0.9, maximize=True)),
    # fused_flat's own options
    "npert2": dict(kw=dict(momentum=0.9, n_perturbations=2)),
    "check_finite_off": dict(kw=dict(momentum=0.9, check_finite=False)),
    "capturable": dict(kw=dict(momentum=0.9, capturable=True), tensor_lr=True),
    "tensor_lr": dict(kw=dict(momentum=0.9), tensor_lr=True),
    "grad_scaler": dict(kw=dict(momentum=0.9, weight_decay=0.1), scaler=True),
    "exact_restore": dict(kw=dict(momentum=0.9, exact_restore=True)),
    "bf16_master": dict(kw=dict(momentum=0.9, master_weights=True), dtype="bfloat16"),
    "bf16_sr": dict(kw=dict(momentum=0.9, stochastic_rounding=True), dtype="bfloat16"),
}
SGD_CONFIGS = ["plain", "momentum", "nesterov", "dampening", "wd", "wd_momentum", "maximize",
               "maximize_momentum"]

# ----------------------------------------------------------------------------- idioms
# symmetric: applied to the optimizer and to its oracle alike (the oracle must do the same);
# transparent: applied to the optimizer only (the oracle runs uninterrupted).
IDIOMS = {
    "list": "params as a list of tensors",
    "generator": "params as model.parameters()",
    "named": "params as model.named_parameters() (torch >= 2.6 named params)",
    "dict_groups": "two dict groups, the first with its own lr and weight_decay (and rho)",
    "groups3": "three param groups of one or two tensors each",
    "add_param_group": "the second layer added with add_param_group after 2 steps (own lr)",
    "frozen_unfrozen": "first weight requires_grad=False, unfrozen after 3 steps",
    "grad_none": "one parameter's grad set to None after backward on odd steps",
    "zero_grad_keep": "zero_grad(set_to_none=False) instead of the default",
    "mixed_dtype": "float32 first layer, float64 second layer, one param group",
    "empty_param": "a zero-size parameter first in the group (an empty FSDP shard, a pruned layer)",
    "inf_grad": "an inf written into one gradient at step 2",
    "state_dict_every_step": "named params; state_dict -> torch.save/load(weights_only) -> fresh "
                             "optimizer (other seed) -> load_state_dict, after every step",
    "deepcopy_mid": "model and optimizer replaced by copy.deepcopy((model, opt)) after 3 steps",
}
TRANSPARENT = ("state_dict_every_step", "deepcopy_mid")
STRUCTURAL = ["list", "generator", "named", "dict_groups", "groups3", "add_param_group",
              "frozen_unfrozen", "grad_none", "zero_grad_keep", "mixed_dtype", "inf_grad",
              "empty_param"]


@dataclass(frozen=True)
class Case:
    opt: str
    config: str
    idiom: str
    dtype: str          # 'float32' | 'float64' | 'bfloat16' | 'mixed'
    backend: str        # 'reference' | 'cpp' | 'auto' ; oracle 'backend': compares cpp and reference
    oracle: str         # 'sgd' | 'davda54' | 'backend' | 'self'
    xfail: str | None = field(default=None, compare=False)

    @property
    def id(self) -> str:
        return f"{self.opt}-{self.config}-{self.idiom}-{self.dtype}-{self.backend}"


# (predicate, reason): a case for which a predicate holds is left out, with the reason.
def _fam(c):
    return OPTIMIZERS[c.opt]["family"]


EXCLUSION_RULES = [
    (lambda c: c.config == "npert2" and _fam(c) != "langevin",
     "n_perturbations is a Langevin-family option (fSGLD's n perturbations); SAM has none"),
    (lambda c: c.config == "exact_restore" and _fam(c) != "langevin",
     "exact_restore is a Langevin-family option; SAM always restores from its backup"),
    (lambda c: c.config == "grad_scaler" and c.oracle == "davda54",
     "davda54/sam does not support GradScaler (its issue #97): no oracle"),
    (lambda c: c.config == "grad_scaler" and _fam(c) in ("msam", "rwsam"),
     "MSAM/RWSAM.step run their own backward passes: no GradScaler (documented)"),
    (lambda c: c.config == "check_finite_off" and c.idiom == "inf_grad" and _fam(c) == "sam",
     "SAM with a non-finite g1 and check_finite=False: e = rho g/||g|| is NaN even at rho = 0 "
     "(0 * inf), as in davda54/sam: no SGD limit to compare with"),
    (lambda c: c.config.startswith("bf16") and c.idiom == "mixed_dtype",
     "the bf16 configurations fix the dtype"),
    (lambda c: c.idiom == "inf_grad" and c.oracle == "davda54" and c.config == "check_finite_off",
     "davda54/sam propagates NaN from a non-finite g1: nothing to compare"),
    (lambda c: c.idiom == "add_param_group" and _fam(c) in ("msam", "rwsam"),
     "covered for SAM; MSAM/RWSAM add nothing to add_param_group"),
]

EXCLUDED: list[tuple[Case, str]] = []

# (predicate, finding): cases that fail today because a fix is in progress; they run as
# strict xfails, so they turn into failures the moment the fix lands (then drop the rule).
# Empty now: the last ones (layout 3 not yet in the built extension; an empty first tensor
# with momentum on the C++ list kernel, fixed in restore_and_step_list_) landed.
XFAIL_RULES: list = []


def _add(cases, opts, configs, idioms, dtypes, backends, oracle):
    for o in opts:
        for cfg in configs:
            for idiom in idioms:
                for dt in dtypes:
                    dt = "mixed" if idiom == "mixed_dtype" else CONFIGS[cfg].get("dtype", dt)
                    for be in backends:
                        orc = oracle
                        c = Case(o, cfg, idiom, dt, be, orc)
                        c = Case(o, cfg, idiom, dt, be, orc,
                                 next((r for pred, r in XFAIL_RULES if pred(c)), None))
                        why = next((r for pred, r in EXCLUSION_RULES if pred(c)), None)
                        if why is not None:
                            EXCLUDED.append((c, why))
                        elif c not in cases:
                            cases.append(c)


def build_table(cpu_backends: list[str]) -> list[Case]:
    """The cases, for the CPU backends present (``tests.conftest.cpu_backends()``)."""
    EXCLUDED.clear()
    cases: list[Case] = []
    both = "cpp-vs-reference" if "cpp" in cpu_backends else None
    # A. torch.optim.SGD's configurations x every SGD limit x dtype x backend (one idiom)
    _add(cases, SGD_LIMITS, SGD_CONFIGS, ["generator"], ["float32", "float64"], cpu_backends, "sgd")
    # B. every idiom x every SGD limit (momentum + weight decay: the most state), fp32 and
    #    mixed, backend 'auto' (what a user gets)
    _add(cases, SGD_LIMITS, ["wd_momentum"], STRUCTURAL + list(TRANSPARENT), ["float32"], ["auto"], "sgd")
    # C. fused_flat's own options in the SGD limit
    _add(cases, SGD_LIMITS, ["npert2", "check_finite_off", "capturable", "tensor_lr", "grad_scaler"],
         ["generator", "inf_grad"], ["float32"], cpu_backends, "sgd")
    _add(cases, SGD_LIMITS, ["plain", "momentum", "npert2"], ["empty_param"], ["float32"], cpu_backends, "sgd")
    _add(cases, SGD_LIMITS, ["capturable"], ["state_dict_every_step", "dict_groups", "add_param_group",
                                             "frozen_unfrozen"], ["float32"], ["auto"], "sgd")
    _add(cases, SGD_LIMITS, ["npert2"], ["zero_grad_keep", "grad_none", "frozen_unfrozen"], ["float32"],
         ["auto"], "sgd")
    _add(cases, SGD_LIMITS, ["grad_scaler"], ["dict_groups", "grad_none", "state_dict_every_step"],
         ["float32"], ["auto"], "sgd")
    # D. SAM / ASAM / USAM with rho > 0 against davda54/sam
    _add(cases, DAVDA, SGD_CONFIGS, ["generator"], ["float64"], cpu_backends, "davda54")
    _add(cases, DAVDA, ["wd_momentum"], STRUCTURAL + list(TRANSPARENT), ["float64"], ["auto"], "davda54")
    _add(cases, ["SAM"], ["wd_momentum"], ["generator"], ["float32"], cpu_backends, "davda54")
    _add(cases, DAVDA, ["check_finite_off", "capturable", "tensor_lr"], ["generator"], ["float64"],
         ["auto"], "davda54")
    # E. noise-driven optimizers: cpp against the reference backend (symmetric idioms) and
    #    against themselves (transparent idioms)
    if both:
        _add(cases, NOISY, ["wd_momentum"], ["generator", "dict_groups", "groups3", "frozen_unfrozen",
                                              "grad_none", "mixed_dtype", "add_param_group",
                                              "empty_param"],
             ["float32"], [both], "backend")
        _add(cases, NOISY, ["nesterov", "dampening", "maximize", "check_finite_off"], ["generator"],
             ["float32", "float64"], [both], "backend")
        _add(cases, ["FSGLD"], ["npert2", "exact_restore", "capturable"], ["generator", "grad_none"],
             ["float32"], [both], "backend")
        _add(cases, ["FSGLD", "SGLD", "RWP", "SAM"], ["bf16_master", "bf16_sr"],
             ["generator", "frozen_unfrozen"], ["bfloat16"], [both], "backend")
    _add(cases, NOISY + DAVDA + ["MSAM", "RWSAM"], ["wd_momentum"], list(TRANSPARENT), ["float32"],
         cpu_backends, "self")
    _add(cases, ["FSGLD", "SAM"], ["npert2", "capturable", "bf16_master", "bf16_sr", "grad_scaler"],
         list(TRANSPARENT), ["float32"], ["auto"], "self")
    _add(cases, ["FSGLD"], ["exact_restore"], list(TRANSPARENT), ["float32"], ["auto"], "self")
    return cases


# ----------------------------------------------------------------------------- torch's checks
# The TestOptimRenewed checks (torch's test/test_optim.py) and how each maps here; the ported
# ones run in tests/test_conformance.py (part 2), the others do not apply, for the reason given.
TORCH_CHECKS_PORTED = {
    "test_optim_inputs (optim_inputs_func_sgd)": "test_torch_sgd_inputs_match_sgd",
    "scheduler_inputs of SGD's OptimizerInfo": "test_torch_scheduler_inputs_match_sgd",
    "test_errors (optim_error_inputs_func_sgd)": "test_torch_error_inputs",
    "test_forloop_goes_right_direction": "test_goes_right_direction",
    "test_param_groups_lr / _weight_decay": "test_goes_right_direction[param_groups] + table dict_groups",
    "test_param_group_with_lrscheduler_goes_right_direction": "test_goes_right_direction[scheduler]",
    "test_tensor_lr": "test_tensor_lr_equals_float_lr",
    "test_step_is_noop_when_params_have_no_grad": "test_step_is_noop_without_grads",
    "test_step_is_noop_for_zero_grads": "test_step_is_noop_for_zero_grads",
    "test_state_dict_deterministic": "test_state_dict_deterministic",
    "test_can_load_older_state_dict": "test_can_load_older_state_dict",
    "test_save_load_equality_with_weights_only": "table: state_dict_every_step (torch.load weights_only)",
    "test_load_state_dict into a deepcopy": "test_load_state_dict_into_deepcopy",
    "test_deepcopy_copies_all_public_attrs": "test_deepcopy_copies_all_public_attrs",
    "test_optimizer_can_be_printed": "test_repr",
    "test_step_pre_hook / test_step_post_hook / test_step_all_hooks": "test_step_hooks",
    "test_state_dict_pre_hook / _post_hook / _pre_post_hook": "test_state_dict_hooks",
    "test_load_state_dict_pre_hook_and_prepend / _post_hook / _pre_post_hook": "test_load_state_dict_hooks",
    "test_zero_grad": "test_zero_grad",
    "add_param_group with overlapping params": "test_add_param_group_overlap_raises",
    "duplicate params in one group (warning)": "test_torch_error_inputs[duplicate]",
    "test_complex / test_complex_2d": "test_complex_params_raise",
    "test_mixed_device_dtype (dtype part)": "table: mixed_dtype",
}
NOT_APPLICABLE = {
    "foreach / fused / differentiable implementations (test_foreach_matches_forloop, "
    "test_fused_matches_forloop, test_fused_large_tensor, test_differentiable_*)":
        "fused_flat has one implementation per backend and no autograd through the step; "
        "the backends are compared with each other instead ('backend' oracle, part 3)",
    "test_peak_memory_foreach": "no foreach path; memory is counted by "
                                "tests/test_optim.py::test_extra_memory_no_parameter_sized_buffer",
    "test_state_dict_with_cuda_params / test_mixed_device_dtype (device part) / "
    "test_defaults_changed_to_foreach": "no GPU here (tests/test_cuda_gpu.py, make gpu-check)",
    "test_load_nontensor_step / test_step_tensor_on_cpu": "SGD keeps no per-parameter 'step'; the step "
                                                          "counter is the 'fused_flat' entry, an int",
    "test_rosenbrock_sparse / sparse gradients": "sparse gradients raise a clear ValueError by design "
                                                 "(tests/test_optim.py::test_sparse_gradients_raise)",
    "test_step_is_noop_when_params_have_no_grad (SAM family)":
        "SAM needs g1: step(closure) without any gradient raises by design (asserted instead)",
    "step() without a closure (FSGLD, RWP with sigma > 0)":
        "closure required: fSGLD/RWP need the closure to evaluate the gradient at the perturbed "
        "weights, or perturb() before the forward pass (the two-call form)",
    "test_non_empty_state / test_empty_state": "covered by the momentum state checks of the table "
                                               "(state_dict_every_step, deepcopy_mid)",
    "bit-exact equality with SGD in the limits": "torch.optim.SGD uses fused multiply-adds, the "
                                                 "library rounds each product: equal to a few ulp",
}
