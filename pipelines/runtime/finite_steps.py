"""Optimizer steps that never apply a non-finite gradient, for the DeepSpeed engines of both trainers (the
supervised ``Trainer`` and the GRPO learner), at every ZeRO stage.

At an accumulation boundary, after the last backward and before ``engine.step()``, :func:`step_if_finite`
has each rank check the gradient values it holds, and every rank agree (``all_ranks_true``):

- ZeRO-0: the parameters' ``.grad`` (already averaged over the ranks by the backward);
- ZeRO-1/2, and bf16 wrappers: the fragment of the reduced gradient linked to each parameter
  (``param._hp_mapping``, the partition the rank's optimizer steps);
- ZeRO-3: the rank's partition of each parameter's gradient (``safe_get_local_grad``).

A non-finite gradient, or a non-finite loss the caller saw in the window, skips the step on every rank the
way DeepSpeed skips an fp16 overflow: the optimizer does not step (weights and optimizer state untouched),
the gradients are cleared, the LR schedule holds and ``engine.skipped_steps`` counts it. To take that path
at any stage and precision, the skip makes one gradient element the rank's optimizer reads NaN (so the
optimizer wrapper's own overflow check fires on every rank) and, for a plain torch optimizer, which has no
such check, stands in for its ``step`` for that one call. ``engine.was_step_applied()`` must then be False,
else it raises: the weights would no longer be trustworthy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch

from .collectives import all_ranks_true


def _trained(engine) -> Iterator[torch.nn.Parameter]:
    return (param for param in engine.module.parameters() if param.requires_grad)


def _local_gradients(param: torch.nn.Parameter) -> list[torch.Tensor]:
    """The gradient values of ``param`` this rank holds at the boundary (views, where DeepSpeed keeps them)."""
    held = [param.grad] if param.grad is not None else []
    if hasattr(param, "ds_id"):  # ZeRO-3 partitioned parameter
        from deepspeed.utils import safe_get_local_grad

        local = safe_get_local_grad(param)
        return held + ([local] if local is not None else [])
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is not None:
        try:
            held.append(mapping.get_lp_grad_fragment(param._index_in_param_group))
        except ValueError:  # no gradient reached this fragment in the window
            pass
    return held


def gradients_finite(engine) -> bool:
    """Whether every gradient value this rank holds is finite (no collective)."""
    flags = [torch.isfinite(grad).all() for param in _trained(engine) for grad in _local_gradients(param)
             if grad.numel()]
    return bool(torch.stack(flags).all()) if flags else True


def step_if_finite(engine, loss_finite: bool = True) -> bool:
    """Collective, at an accumulation boundary after the backward: ``engine.step()`` when the loss (as seen by
    the caller) and the gradients are finite on every rank; else the step skipped on every rank. Returns
    whether the step was taken."""
    if all_ranks_true(loss_finite and gradients_finite(engine)):
        engine.step()
        return True
    skip_step(engine)
    return False


def skip_step(engine) -> None:
    """``engine.step()`` at a boundary without an optimizer update (DeepSpeed's overflow path); every rank
    calls it."""
    optimizer = engine.optimizer
    before = engine.skipped_steps
    _poison_one_gradient(engine)
    with ExitStack() as stack:
        if not hasattr(optimizer, "overflow"):  # a plain torch optimizer: no overflow check of its own
            stack.enter_context(_instance_attributes(optimizer, step=_no_step, overflow=True))
        elif getattr(optimizer, "check_grad_overflow", True) is False:  # ZeRO-1/2 in bf16 checks only when asked
            stack.enter_context(_instance_attributes(optimizer, check_grad_overflow=True))
        engine.step()
    if engine.was_step_applied() or engine.skipped_steps != before + 1:
        raise RuntimeError(f"DeepSpeed applied an optimizer step with a non-finite gradient "
                           f"({type(optimizer).__name__}): its overflow path did not skip it")


def _no_step(*args, **kwargs) -> None:
    return None


def _poison_one_gradient(engine) -> None:
    """One element NaN in the first gradient this rank holds for the optimizer (each rank poisons its own part,
    so that any rank's overflow check sees it)."""
    nan = float("nan")
    for param in _trained(engine):
        if hasattr(param, "ds_id"):
            from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

            local = safe_get_local_grad(param)
            if local is not None and local.numel():
                local = local.clone()
                local[(0,) * local.dim()] = nan
                safe_set_local_grad(param, local)
                return
            continue
        grads = [grad for grad in _local_gradients(param) if grad.numel()]
        for grad in grads:
            with torch.no_grad():
                grad[(0,) * grad.dim()] = nan
        if grads:
            return


@contextmanager
def _instance_attributes(obj, **values):
    """``obj``'s instance attributes set to ``values`` inside, then put back as they were (or removed)."""
    missing = object()
    saved = {name: obj.__dict__.get(name, missing) for name in values}
    for name, value in values.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is missing:
                delattr(obj, name)
            else:
                setattr(obj, name, value)
