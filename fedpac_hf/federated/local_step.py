"""One local step of a client: its settings, the caller's hooks, the base optimizer, the step.

:func:`~fedpac_hf.federated.client.client_update` runs K of these per round:
:class:`LocalSteps` holds the round's numbers (rate, K, accumulation,
clipping), :class:`ClientHooks` how the caller computes and applies gradients
(plain PyTorch by default; the HF trainer passes Accelerate's), and
:func:`base_step` accumulates the micro-batches' gradients, clips and steps,
counting into a :class:`Tally` without waiting for the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fedpac_hf.optim.options import whole

from .algorithms import Algorithm
from .batches import batch_size

__all__ = [
    "ClientHooks",
    "LocalSteps",
    "LossFn",
    "Tally",
    "base_optimizer",
    "base_step",
    "refresh_curvature_if_due",
]

LossFn = Callable[[torch.nn.Module, Any], Any]


def _scalar_loss(loss: Any) -> torch.Tensor:
    """The loss as ``loss_fn`` returned it, if it is a one-element tensor (else ``TypeError``)."""
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return loss
    shape = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else None
    raise TypeError(
        "loss_fn(model, batch) must return the batch's loss as a scalar tensor, got "
        + (shape or f"a {type(loss).__name__}")
        + " (reduce it with .mean(), or return outputs.loss rather than the model output)"
    )


def _default_clip(params: list[torch.Tensor], max_norm: float) -> None:
    torch.nn.utils.clip_grad_norm_(params, max_norm)


def _default_backward(loss: torch.Tensor) -> None:
    loss.backward()


@dataclass(frozen=True)
class LocalSteps:
    """The numbers of one client's round: K optimizer steps at the local rate eta_l.

    Attributes
    ----------
    lr:
        This round's local learning rate eta_l (the schedule over rounds is
        the caller's). The base optimizer runs at ``(1 - beta) * lr``.
    num_steps:
        K, optimizer steps per round.
    gradient_accumulation_steps:
        Micro-batches averaged into each optimizer step.
    max_grad_norm:
        Clip the gradient norm before each base step (``None`` or 0: no clipping).
    """

    lr: float
    num_steps: int
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        whole(1).check("local_steps", self.num_steps)
        whole(1).check("gradient_accumulation_steps", self.gradient_accumulation_steps)
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ValueError(f"the local learning rate must be a positive number, got {self.lr}")
        norm = self.max_grad_norm
        if norm is not None and not (math.isfinite(norm) and norm >= 0):
            raise ValueError(
                f"max_grad_norm must be a finite number >= 0 (0 or None: no clipping), got {norm}"
            )


@dataclass
class ClientHooks:
    """How a client computes and applies its gradients; plain PyTorch by default.

    Attributes
    ----------
    loss_fn:
        ``loss_fn(model, batch) -> scalar loss``.
    backward:
        How to back-propagate a loss (default ``loss.backward()``; the HF
        trainer passes ``accelerator.backward``).
    clip_grad:
        How to clip, ``clip_grad(params, max_norm)`` (default
        ``torch.nn.utils.clip_grad_norm_``).
    curvature_loss_fn:
        For optimizers that refresh curvature from an extra pass (Sophia's
        Gauss-Newton-Bartlett estimate): ``fn(model, batch) -> loss`` or
        ``(loss, num_samples)`` (e.g. :func:`fedpac_hf.optim.gnb_loss`'s result);
        the optimizer turns the loss's gradient into its Hessian estimate.
    optimizer_factory:
        Builds the base optimizer, ``factory(name, model, lr=..., **kwargs)``;
        default :func:`fedpac_hf.optim.create_optimizer`.
    grad_scaler:
        A fresh ``torch.amp.GradScaler`` for this client and round (fp16 mixed
        precision): each micro-batch's loss is scaled before ``backward``, the
        gradients are unscaled before clipping, and a step whose gradients
        overflow is skipped (parameters, optimizer state and correction left
        as they were) and counted in ``metrics["skipped_steps"]``; the scale
        backs off as usual. Sophia's curvature pass is not scaled. ``None``:
        no loss scaling (fp32, bf16).
    """

    loss_fn: LossFn
    backward: Callable[[torch.Tensor], None] | None = None
    clip_grad: Callable[[list[torch.Tensor], float], None] | None = None
    curvature_loss_fn: LossFn | None = None
    optimizer_factory: Callable[..., torch.optim.Optimizer] | None = None
    grad_scaler: torch.amp.GradScaler | None = None


@dataclass
class Tally:
    """What a client counts during its local steps (the loss stays on the device)."""

    loss_sum: torch.Tensor
    first_loss: torch.Tensor | None = None  # of the first and the latest local step
    last_loss: torch.Tensor | None = None
    num_examples: int = 0
    steps_taken: int = 0  # on the host: GradScaler calls step() only for finite gradients
    hessian_refreshes: int = 0


def base_optimizer(
    model: torch.nn.Module, algorithm: Algorithm, lr: float, hooks: ClientHooks
) -> torch.optim.Optimizer:
    """The algorithm's base optimizer at rate ``lr``, its per-step finiteness check off."""
    factory = hooks.optimizer_factory
    if factory is None:
        from fedpac_hf.optim import create_optimizer as factory
    optimizer = factory(algorithm.optimizer, model, lr=lr, **dict(algorithm.optimizer_kwargs))
    if hasattr(optimizer, "check_finite_grads"):
        optimizer.check_finite_grads = False  # checked once, after the last step
    return optimizer


def refresh_curvature_if_due(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Any,
    algorithm: Algorithm,
    hooks: ClientHooks,
    tally: Tally,
) -> None:
    """Sophia-style optimizers: an extra pass that refreshes the curvature, when due."""
    refresh_due = getattr(optimizer, "hessian_update_due", None)
    if refresh_due is None or not refresh_due():
        return
    if hooks.curvature_loss_fn is None:
        raise ValueError(
            f"optimizer {algorithm.optimizer!r} refreshes its curvature from an extra "
            "pass: pass curvature_loss_fn (e.g. a Gauss-Newton-Bartlett loss on the "
            "model's logits)"
        )
    optimizer.zero_grad(set_to_none=True)
    result = hooks.curvature_loss_fn(model, batch)
    if isinstance(result, tuple):
        curvature_loss, num_samples = result
    else:
        curvature_loss, num_samples = result, batch_size(batch)
    (hooks.backward or _default_backward)(curvature_loss)
    optimizer.update_hessian(int(num_samples))
    tally.hessian_refreshes += 1


def base_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro: list[Any],
    param_list: list[torch.Tensor],
    steps: LocalSteps,
    hooks: ClientHooks,
    tally: Tally,
    privatize: Callable[[], None] | None = None,
) -> bool:
    """Accumulate the micro-batches' gradients, clip, take one base step.

    Under record-level DP ``privatize`` turns the per-example gradients into
    DP-SGD's noised mean first (an empty Poisson batch: noise alone).
    Returns whether the step was taken (a ``GradScaler`` skips one that overflowed).
    """
    backward = hooks.backward or _default_backward
    scaler = hooks.grad_scaler
    optimizer.zero_grad(set_to_none=True)
    step_loss = torch.zeros_like(tally.loss_sum)
    for batch in micro:
        if privatize is not None and batch_size(batch) == 0:
            continue  # a Poisson batch without an example: the step is noise alone
        loss = _scalar_loss(hooks.loss_fn(model, batch))
        if steps.gradient_accumulation_steps > 1:
            loss = loss / steps.gradient_accumulation_steps
        backward(loss if scaler is None else scaler.scale(loss))
        step_loss += loss.detach().reshape(()).to(step_loss.device)
        tally.num_examples += batch_size(batch)
    tally.loss_sum += step_loss
    if tally.first_loss is None:
        tally.first_loss = step_loss
    tally.last_loss = step_loss
    if privatize is not None:
        privatize()
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients
    if steps.max_grad_norm:
        (hooks.clip_grad or _default_clip)(param_list, steps.max_grad_norm)
    taken = tally.steps_taken
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)  # one host sync: skips a step that overflowed
        scaler.update()
    return tally.steps_taken > taken
