"""One step of a ``torch.optim.Adam`` without the wrapper of ``Optimizer.step``; ``zero_grad`` likewise.

Why: a balancer's private Adam (FAMO's logits, GradNorm's task weights) and the toy's Adam on UW's
log-variances step a K- or (B, K)-element tensor once per training step. The arithmetic takes a few
µs; ``Adam.step()`` spends 50–100 µs around it (the step hooks, a profiler ``record_function``,
grouping of the param lists, the dispatch between the single-tensor / foreach / fused
implementations). The toy engine pays that 35 000–50 000 times per run.

:func:`adam_step` performs, on the optimizer's own parameter and state tensors, exactly the
arithmetic of torch's single-tensor CPU implementation (``torch.optim.adam._single_tensor_adam``,
which ``Adam.step()`` runs for CPU parameters when neither ``foreach`` nor ``fused`` is asked for),
with the same torch ops in the same order, so the results are bit for bit those of
``optimizer.step()``::

    step += 1                                   (the state's 'step', a float32 CPU tensor)
    g = g + wd · param                          (only when weight_decay ≠ 0; L2, not decoupled)
    exp_avg.lerp_(g, 1 − β1)
    exp_avg_sq.mul_(β2).addcmul_(g, g, value=1 − β2)
    denom = (exp_avg_sq.sqrt() / sqrt(1 − β2^step)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=−lr / (1 − β1^step))

The training loop's own step (:meth:`~mtl_tune.balancers.base.Balancer.train_step`) takes it too,
with :func:`clear_grads` for ``zero_grad(set_to_none=True)``: on a small model on a CPU (the toy
benchmark, ~0.8 ms a step) the two wrappers are a tenth of the step; on a GPU the parameters are
not on the CPU and ``step()`` runs as before.

The optimizer itself is untouched as an object: its ``state`` and ``param_groups`` are the ones
``step()`` would have updated, so ``state_dict()`` / ``load_state_dict()`` (checkpoints), and
:func:`~mtl_tune.balancers.base.rebind_private_optimizer` work as before, and a later
``optimizer.step()`` continues identically.

Everything else falls back to ``optimizer.step()`` (same results, the usual cost): a subclass of
Adam or a patched ``step`` (an LR scheduler's counter), step hooks (global or the optimizer's
own), parameters not on the CPU (on CUDA torch's default is the foreach implementation, whose
arithmetic differs), complex or sparse tensors, a parameter whose state is not created yet (the
first step: torch creates it), a gradient that requires grad, tensor-valued hyperparameters,
and any of ``amsgrad``, ``maximize``, ``foreach``, ``fused``, ``capturable``,
``differentiable``, ``decoupled_weight_decay``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim import optimizer as _optimizer_module


def _plain_work(optimizer: torch.optim.Optimizer) -> list[tuple[dict, list[tuple[Tensor, Tensor, dict]]]] | None:
    """Per group, its (param, grad, state) to step when ``optimizer.step()`` would run the plain
    single-tensor CPU arithmetic on every one of them; None when anything asks for ``step()``."""
    if (type(optimizer) is not torch.optim.Adam or "step" in optimizer.__dict__
            or optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
            or _optimizer_module._global_optimizer_pre_hooks or _optimizer_module._global_optimizer_post_hooks
            or torch.compiler.is_compiling()):
        return None
    work = []
    for group in optimizer.param_groups:
        get = group.get
        if (get("amsgrad") or get("maximize") or get("foreach") or get("fused") or get("capturable")
                or get("differentiable") or get("decoupled_weight_decay")):
            return None
        beta1, beta2 = group["betas"]
        if (isinstance(group["lr"], Tensor) or isinstance(beta1, Tensor) or isinstance(beta2, Tensor)
                or isinstance(group["eps"], Tensor) or isinstance(group["weight_decay"], Tensor)):
            return None
        todo = []
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            state = optimizer.state.get(p)
            if (not state or not p.is_cpu or p.is_complex() or grad.is_sparse or grad.requires_grad
                    or not state["step"].is_cpu):
                return None
            todo.append((p, grad, state))
        work.append((group, todo))
    return work


def adam_step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()`` for a ``torch.optim.Adam`` on the gradients in the parameters'
    ``.grad``: the same results bit for bit, without ``Optimizer.step``'s wrapper when the
    configuration is the plain CPU one (see the module docstring; anything else calls ``step()``)."""
    work = _plain_work(optimizer)
    if work is None:
        optimizer.step()
        return
    for group, todo in work:
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        for param, grad, state in todo:
            if param.requires_grad:
                # step() updates under no_grad; a detached view (same memory, same version counter)
                # takes the same in-place updates without the ~3 µs of the context manager
                param = param.detach()
            step_t, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
            # step += 1: the exact sum (a float count plus 1, in float64) rounded to step's dtype, as
            # the in-place add rounds it; fill_ avoids the slower tensor-scalar add
            step_t.fill_(step_t.item() + 1)
            step = step_t.item()
            if weight_decay != 0:
                grad = grad.add(param, alpha=weight_decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1 = 1 - beta1 ** step
            bias_correction2 = 1 - beta2 ** step
            step_size = lr / bias_correction1
            denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(eps)
            param.addcdiv_(exp_avg, denom, value=-step_size)


def clear_grads(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.zero_grad(set_to_none=True)``: every parameter's ``.grad`` set to None, without the
    wrapper (a dynamo guard and a profiler ``record_function``) when ``zero_grad`` is torch's own
    (neither overridden by a subclass nor replaced on the object); otherwise ``zero_grad`` itself."""
    if (type(optimizer).zero_grad is not torch.optim.Optimizer.zero_grad or "zero_grad" in optimizer.__dict__
            or torch.compiler.is_compiling()):
        optimizer.zero_grad(set_to_none=True)
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad = None
