"""The client rule: K local steps of a (FedPAC-)preconditioned optimizer.

One function, :func:`client_update`, implements step 1-4 of the client side of
FedPAC (see ``docs/algorithm.md``) for every registered algorithm:

1. load the global trainable parameters into the (one, shared) model and build
   the base optimizer with learning rate ``(1 - beta) * lr``;
2. alignment: warm-start the optimizer from the global curvature Theta;
3. K local steps, each a base step followed by the correction
   ``theta <- theta - beta * lr * g_G``;
4. return the delta, the client's Theta, the examples seen and metrics.

It knows nothing of Trainer or Flower: the HF trainer and the Flower client
call it with their own loss function, backward (Accelerate's) and clipping.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from fedpac_hf.optim.base import all_finite

from .algorithms import Algorithm, round_beta
from .failures import ClientError
from .state import ClientUpdate, ServerState, load_trainable_state, trainable_parameters

__all__ = [
    "client_update",
    "cycle_batches",
    "batch_size",
]

LossFn = Callable[[torch.nn.Module, Any], Any]


def cycle_batches(loader: Iterable[Any]) -> Iterator[Any]:
    """Yield batches from ``loader`` forever, starting a new pass when one ends.

    Unlike ``itertools.cycle`` it keeps nothing in memory and re-shuffles
    each pass (a new ``iter`` of a shuffling DataLoader).
    """
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("a client's data loader yielded no batch: the client has no data")


def batch_size(batch: Any) -> int:
    """Number of examples in a batch: the leading size of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        values: Iterable[Any] = batch.values()
    elif isinstance(batch, (list, tuple)):
        values = batch
    else:
        raise TypeError(f"cannot count the examples in a batch of type {type(batch).__name__}")
    for value in values:
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    raise TypeError("cannot count the examples in a batch without a tensor")


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


def _export_curvature(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's Theta, left on the parameters' device when it can say so."""
    export = getattr(optimizer, "export_curvature", None)
    if export is None:
        return {}
    if "device" in inspect.signature(export).parameters:
        return export(device=None)
    return export()


def _model_device(params: Mapping[str, torch.Tensor]) -> torch.device:
    """The device of the first trainable parameter (where the client's sums live)."""
    return next(iter(params.values())).device


def client_update(
    model: torch.nn.Module,
    server_state: ServerState,
    algorithm: Algorithm,
    batches: Iterator[Any],
    *,
    lr: float,
    local_steps: int,
    loss_fn: LossFn,
    client_id: int = 0,
    gradient_accumulation_steps: int = 1,
    max_grad_norm: float | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
    clip_grad: Callable[[list[torch.Tensor], float], None] | None = None,
    curvature_loss_fn: LossFn | None = None,
    optimizer_factory: Callable[..., torch.optim.Optimizer] | None = None,
    grad_scaler: torch.amp.GradScaler | None = None,
) -> ClientUpdate:
    """Run one client's local training for one round and return its update.

    The local steps never wait for the device: the losses are summed where
    the model is, the optimizer's own per-step finiteness check is switched off
    (``check_finite_grads = False``, see
    :class:`~fedpac_hf.optim.base.CurvatureOptimizer`), and the delta and
    Theta stay on the model's device. Everything is checked once, after the
    last step, in one host sync: a client that diverged (a non-finite loss in
    any step, a non-finite update or curvature) is detected at the end of its
    steps and raises :class:`ClientError`. With ``grad_scaler`` each step
    costs one host sync, the scaler's decision to skip it. Sophia's curvature
    pass on a masked batch adds one more on the steps that refresh it (counting
    the masked positions, see :func:`fedpac_hf.optim.gnb_loss`).

    Parameters
    ----------
    model:
        The one model shared by all clients; its trainable parameters are
        overwritten with ``server_state.params`` first.
    server_state:
        Global parameters, curvature and direction of this round.
    algorithm:
        The client rule's knobs (optimizer, alignment, beta; with ``beta="auto"``
        the round's value travels as ``server_state.beta``, see
        :func:`~fedpac_hf.federated.round_beta`).
    batches:
        An iterator yielding at least ``local_steps * gradient_accumulation_steps``
        batches (see :func:`cycle_batches`).
    lr:
        This round's local learning rate eta_l (the schedule over rounds is
        the caller's). The base optimizer runs at ``(1 - beta) * lr``.
    local_steps:
        K, optimizer steps per round.
    loss_fn:
        ``loss_fn(model, batch) -> scalar loss``.
    gradient_accumulation_steps:
        Micro-batches averaged into each optimizer step.
    max_grad_norm:
        Clip the gradient norm before each base step (None: no clipping).
    backward:
        How to back-propagate a loss (default ``loss.backward()``; the HF
        trainer passes ``accelerator.backward``).
    clip_grad:
        How to clip (default ``torch.nn.utils.clip_grad_norm_``).
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

    Returns
    -------
    ClientUpdate
        Delta and Theta as float32 tensors on the model's device.

    Raises
    ------
    ClientError
        If a loss, the update or the curvature state is not finite (checked
        once, after the last local step).
    """
    if local_steps < 1:
        raise ValueError(f"local_steps must be at least 1, got {local_steps}")
    if gradient_accumulation_steps < 1:
        raise ValueError(
            f"gradient_accumulation_steps must be at least 1, got {gradient_accumulation_steps}"
        )
    if lr <= 0 or not math.isfinite(lr):
        raise ValueError(f"the local learning rate must be a positive number, got {lr}")
    if max_grad_norm is not None and not (math.isfinite(max_grad_norm) and max_grad_norm >= 0):
        raise ValueError(
            f"max_grad_norm must be a finite number >= 0 (0 or None: no clipping), got "
            f"{max_grad_norm}"
        )
    if optimizer_factory is None:
        from fedpac_hf.optim import create_optimizer as optimizer_factory
    backward = backward or (lambda loss: loss.backward())
    clip_grad = clip_grad or _default_clip

    params = trainable_parameters(model)
    device = _model_device(params)
    state = server_state.to(device)  # a no-op when the round engine put it there
    load_trainable_state(model, state.params)
    param_list = list(params.values())
    beta = round_beta(algorithm, state)
    optimizer = optimizer_factory(
        algorithm.optimizer, model, lr=(1.0 - beta) * lr, **dict(algorithm.optimizer_kwargs)
    )
    if hasattr(optimizer, "check_finite_grads"):
        optimizer.check_finite_grads = False  # checked once, after the last step
    if algorithm.align and state.curvature:
        optimizer.import_curvature(state.curvature)

    correction: list[torch.Tensor] | None = None
    if algorithm.correction and state.direction is not None:
        correction = [
            state.direction[name].to(device=p.device, dtype=p.dtype) for name, p in params.items()
        ]

    steps_taken = [0]  # counted on the host: GradScaler calls step() only for finite gradients
    hook = optimizer.register_step_post_hook(
        lambda *_: steps_taken.__setitem__(0, steps_taken[0] + 1)
    )
    was_training = model.training
    model.train()
    # float64 where the device has it, as the per-step Python floats this sum replaces
    loss_sum = torch.zeros(
        (), dtype=torch.float32 if device.type == "mps" else torch.float64, device=device
    )
    num_examples = 0
    hessian_refreshes = 0
    refresh_due = getattr(optimizer, "hessian_update_due", None)
    try:
        for _ in range(local_steps):
            micro = [next(batches) for _ in range(gradient_accumulation_steps)]
            if refresh_due is not None and refresh_due():
                if curvature_loss_fn is None:
                    raise ValueError(
                        f"optimizer {algorithm.optimizer!r} refreshes its curvature from an extra "
                        "pass: pass curvature_loss_fn (e.g. a Gauss-Newton-Bartlett loss on the "
                        "model's logits)"
                    )
                optimizer.zero_grad(set_to_none=True)
                result = curvature_loss_fn(model, micro[0])
                if isinstance(result, tuple):
                    curvature_loss, num_samples = result
                else:
                    curvature_loss, num_samples = result, batch_size(micro[0])
                backward(curvature_loss)
                optimizer.update_hessian(int(num_samples))
                hessian_refreshes += 1
            optimizer.zero_grad(set_to_none=True)
            for batch in micro:
                loss = _scalar_loss(loss_fn(model, batch))
                if gradient_accumulation_steps > 1:
                    loss = loss / gradient_accumulation_steps
                backward(loss if grad_scaler is None else grad_scaler.scale(loss))
                loss_sum += loss.detach().reshape(()).to(loss_sum.device)
                num_examples += batch_size(batch)
            if grad_scaler is not None:
                grad_scaler.unscale_(optimizer)  # clip the true gradients
            if max_grad_norm is not None and max_grad_norm > 0:
                clip_grad(param_list, max_grad_norm)
            taken = steps_taken[0]
            if grad_scaler is None:
                optimizer.step()
            else:
                grad_scaler.step(optimizer)  # one host sync: skips a step that overflowed
                grad_scaler.update()
            if correction is not None and steps_taken[0] > taken:
                with torch.no_grad():
                    torch._foreach_add_(param_list, correction, alpha=-beta * lr)
    finally:
        # a failed client leaves no gradients or train mode behind for the next one
        hook.remove()
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)

    delta = {name: p.detach().to(torch.float32) - state.params[name] for name, p in params.items()}
    curvature = _export_curvature(optimizer)
    usable = all_finite(delta.values()).to(device) & all_finite(curvature.values()).to(device)
    # the one host sync of the client: its loss, or NaN when the update or Theta is not finite
    total_loss = float(torch.where(usable, loss_sum, float("nan")))
    if not math.isfinite(total_loss):
        loss_value = float(loss_sum)
        if not math.isfinite(loss_value):
            raise ClientError(f"client {client_id}: non-finite training loss {loss_value}")
        if not bool(all_finite(delta.values())):
            raise ClientError(f"client {client_id}: the parameter update is not finite")
        raise ClientError(f"client {client_id}: the curvature state is not finite")
    metrics = {
        "train_loss": total_loss / local_steps,
        "skipped_steps": float(local_steps - steps_taken[0]),
    }
    if hessian_refreshes:
        metrics["hessian_refreshes"] = float(hessian_refreshes)
    return ClientUpdate(
        client_id=client_id,
        delta=delta,
        curvature=curvature,
        num_examples=num_examples,
        num_steps=local_steps,
        metrics=metrics,
    )
