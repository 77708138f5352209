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

import contextlib
import inspect
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from fedpac_hf.optim.base import all_finite

from .algorithms import Algorithm, round_beta
from .failures import ClientError
from .local_step import (
    ClientHooks,
    LocalSteps,
    Tally,
    base_optimizer,
    base_step,
    refresh_curvature_if_due,
)
from .privacy import ClientDP
from .privacy_clip import clip_update, public_reference
from .record_privacy import RecordClient
from .state import ClientUpdate, ServerState, load_trainable_state, trainable_parameters

__all__ = [
    "DIVERGENCE_FACTOR",
    "client_update",
]

#: A client whose last local step's loss is more than this many times its first
#: step's diverged (a finite loss can run away too): it is dropped like a client
#: whose loss is not finite.
DIVERGENCE_FACTOR = 100.0


def _export_curvature(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's Theta, left on the parameters' device when it can say so."""
    export = getattr(optimizer, "export_curvature", None)
    if export is None:
        return {}
    if "device" in inspect.signature(export).parameters:
        return export(device=None)
    return export()


def client_update(
    model: torch.nn.Module,
    server_state: ServerState,
    algorithm: Algorithm,
    batches: Iterator[Any],
    steps: LocalSteps,
    hooks: ClientHooks,
    *,
    client_id: int = 0,
    privacy: ClientDP | RecordClient | None = None,
) -> ClientUpdate:
    """Run one client's local training for one round and return its update.

    The step rule, in the order the body reads:

    1. load theta^r into the model; the base optimizer runs at ``(1 - beta) * lr``;
    2. alignment: warm-start it from the global Theta (``algorithm.align``);
    3. K times: a base step on the client's gradient, then the correction
       ``theta <- theta - beta * lr * g_G`` (``algorithm.correction``);
    4. the update: delta, Theta, examples seen, metrics; under client-level
       DP (``privacy``) clipped before it leaves the client
       (:func:`~fedpac_hf.federated.privacy_clip.clip_update`).

    The local steps never wait for the device: the losses are summed where
    the model is, the optimizer's own per-step finiteness check is switched off
    (``check_finite_grads = False``, see
    :class:`~fedpac_hf.optim.base.CurvatureOptimizer`), and the delta and
    Theta stay on the model's device. Everything is checked once, after the
    last step, in one host sync: a client that diverged (a non-finite loss in
    any step, a non-finite update or curvature) is detected at the end of its
    steps and raises :class:`~fedpac_hf.federated.failures.ClientError`. With
    ``hooks.grad_scaler`` each step costs one host sync, the scaler's decision
    to skip it. Sophia's curvature pass on a masked batch adds one more on the
    steps that refresh it (counting the masked positions, see
    :func:`fedpac_hf.optim.gnb_loss`).

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
        :func:`~fedpac_hf.federated.algorithms.round_beta`).
    batches:
        An iterator yielding at least ``num_steps * gradient_accumulation_steps``
        batches (see :func:`~fedpac_hf.federated.batches.cycle_batches`).
    steps:
        The round's numbers: learning rate, K, accumulation, clipping.
    hooks:
        How to compute the loss, back-propagate, clip, build the optimizer.
    client_id:
        The client's index, named in its metrics and errors.
    privacy:
        Client-level DP (:class:`~fedpac_hf.federated.privacy.ClientDP`): clip
        the delta (and Theta when it is shared; drop it when not). Record-level
        DP (:class:`~fedpac_hf.federated.record_privacy.RecordClient`): every
        local step is Opacus's DP-SGD step; ``batches`` must be Poisson-sampled.

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
    params = trainable_parameters(model)
    device = _model_device(params)
    state = server_state.to(device)  # a no-op when the round engine put it there
    load_trainable_state(model, state.params)
    beta = round_beta(algorithm, state)
    optimizer = base_optimizer(model, algorithm, (1.0 - beta) * steps.lr, hooks)
    if algorithm.align and state.curvature:
        optimizer.import_curvature(state.curvature)  # alignment
    correction = None
    if algorithm.correction and state.direction is not None:
        correction = [
            state.direction[name].to(device=p.device, dtype=p.dtype) for name, p in params.items()
        ]

    param_list = list(params.values())
    # float64 where the device has it, as the per-step Python floats this sum replaces
    tally = Tally(torch.zeros((), dtype=_sum_dtype(device), device=device))
    hook = optimizer.register_step_post_hook(
        lambda *_: setattr(tally, "steps_taken", tally.steps_taken + 1)
    )
    was_training = model.training
    model.train()
    record = privacy if isinstance(privacy, RecordClient) else None
    try:
        with record.steps(model, param_list) if record else contextlib.nullcontext() as private:
            for _ in range(steps.num_steps):
                micro = [next(batches) for _ in range(steps.gradient_accumulation_steps)]
                refresh_curvature_if_due(model, optimizer, micro[0], algorithm, hooks, tally)
                taken = base_step(model, optimizer, micro, param_list, steps, hooks, tally, private)
                if correction is not None and taken:
                    with torch.no_grad():
                        torch._foreach_add_(param_list, correction, alpha=-beta * steps.lr)
    finally:
        # a failed client leaves no gradients or train mode behind for the next one
        hook.remove()
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
    # with public curvature the server has its own Theta: the client's stays here
    export = None if algorithm.public_curvature else optimizer
    update = _collect_update(params, state, export, steps, tally, client_id)
    if record is not None:
        update.metrics.update(record.metrics())
        return update
    if privacy is None:
        return update
    reference = public_reference(state, algorithm, steps.lr, steps.num_steps)
    return clip_update(update, privacy.at_rate(steps.lr, state.dp_clip_norms), reference)


def _model_device(params: Mapping[str, torch.Tensor]) -> torch.device:
    """The device of the first trainable parameter (where the client's sums live)."""
    if not params:
        raise ValueError("the model has no trainable parameters")
    return next(iter(params.values())).device


def _sum_dtype(device: torch.device) -> torch.dtype:
    """float64 for the loss sum where the device has it (not on Apple's ``mps``)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _calm(tally: Tally) -> torch.Tensor:
    """Whether the last local step's loss stayed within :data:`DIVERGENCE_FACTOR` of the first's.

    A device tensor (no host sync); only a positive first loss is compared.
    """
    first, last = tally.first_loss, tally.last_loss
    if first is None or last is None or first is last:
        return torch.ones((), dtype=torch.bool, device=tally.loss_sum.device)
    return (first <= 0) | (last <= DIVERGENCE_FACTOR * first)


def _collect_update(
    params: Mapping[str, torch.Tensor],
    state: ServerState,
    optimizer: torch.optim.Optimizer | None,
    steps: LocalSteps,
    tally: Tally,
    client_id: int,
) -> ClientUpdate:
    """Delta, Theta (none without ``optimizer``) and metrics, checked in one host sync."""
    device = tally.loss_sum.device
    delta = {name: p.detach().to(torch.float32) - state.params[name] for name, p in params.items()}
    curvature = {} if optimizer is None else _export_curvature(optimizer)
    usable = all_finite(delta.values()).to(device) & all_finite(curvature.values()).to(device)
    calm = _calm(tally)
    # the one host sync of the client: its loss, or NaN when the update or Theta is not
    # finite or the loss ran away
    total_loss = float(torch.where(usable & calm, tally.loss_sum, float("nan")))
    if not math.isfinite(total_loss):
        loss_value = float(tally.loss_sum)
        if not math.isfinite(loss_value):
            raise ClientError(f"client {client_id}: non-finite training loss {loss_value}")
        if not bool(calm):
            raise ClientError(
                f"client {client_id}: diverged (its loss rose from {float(tally.first_loss):.4g} "
                f"to {float(tally.last_loss):.4g} in {steps.num_steps} local steps, more than "
                f"{DIVERGENCE_FACTOR:g}x); lower learning_rate or clip with max_grad_norm"
            )
        if not bool(all_finite(delta.values())):
            raise ClientError(f"client {client_id}: the parameter update is not finite")
        raise ClientError(f"client {client_id}: the curvature state is not finite")
    metrics = {
        "train_loss": total_loss / steps.num_steps,
        "skipped_steps": float(steps.num_steps - tally.steps_taken),
    }
    if tally.hessian_refreshes:
        metrics["hessian_refreshes"] = float(tally.hessian_refreshes)
    return ClientUpdate(
        client_id=client_id,
        delta=delta,
        curvature=curvature,
        num_examples=tally.num_examples,
        num_steps=steps.num_steps,
        metrics=metrics,
    )
