"""The compiled ops with per-tensor signatures, for tests that drive one tensor at a time:
each call is the list op (torch.ops.fused_flat.*_list_, the only op set the optimizers call,
fused_flat.backends.cpp / cpp_sam) over a one-tensor list at the tensor's bucket offset.
Signatures: fused_flat.backends.reference / sam_reference; step, lr, noise_std and coef
may be one-element tensors (the list ops' tensor arguments)."""
from __future__ import annotations

from fused_flat.backends import cpp, cpp_sam


def perturb_(param, seed, bucket_id, step, tag, sigma, offset=0):
    cpp.perturb_list_([param], [offset], seed, bucket_id, step, tag, sigma)


def restore_and_step_(param, grad, momentum_buffer, grad_scale, found_inf, seed, bucket_id, step,
                      offset, restore_tag, sigma, lr, weight_decay, momentum, dampening, nesterov,
                      momentum_init, noise_std, grad_mult, stochastic_rounding=False):
    cpp.restore_and_step_list_([param], [grad], None if momentum_buffer is None else [momentum_buffer],
                               [offset], grad_scale, found_inf, seed, bucket_id, step, restore_tag,
                               sigma, lr, weight_decay, momentum, dampening, nesterov, momentum_init,
                               noise_std, grad_mult, stochastic_rounding)


def sam_grad_sq_norm(grad, param=None, eta=0.0):
    """0-dim float64: sum_i s_i^2, s = g, or (|theta| + eta) * g when ``param`` is given."""
    adaptive = param is not None
    return cpp_sam.sam_grad_sq_norm_list([grad], [param] if adaptive else [], adaptive, eta)[0]


def sam_perturb_(param, grad, backup, adaptive, coef, eta=0.0):
    cpp_sam.sam_perturb_list_([param], [grad], [backup], adaptive, coef, eta)


def sam_restore_and_step_(param, backup, grad, momentum_buffer, grad_scale, found_inf, lr,
                          weight_decay, momentum, dampening, nesterov, momentum_init, grad_mult,
                          stochastic_rounding=False, seed=0, bucket_id=0, step=0, offset=0):
    cpp_sam.sam_restore_and_step_list_(
        [param], [backup], [grad], None if momentum_buffer is None else [momentum_buffer],
        grad_scale, found_inf, lr, weight_decay, momentum, dampening, nesterov, momentum_init,
        grad_mult, stochastic_rounding, seed, bucket_id, step, [offset])


def sam_probe_(param, backup, seed, bucket_id, step, delta, offset=0):
    cpp_sam.sam_probe_list_([param], [backup], [offset], seed, bucket_id, step, delta)
