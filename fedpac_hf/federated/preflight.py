"""The preflight: one client's round in miniature, before anything is written.

A mistake in the settings or the data (a loss that is not finite at the
initial weights, an optimizer option the optimizer refuses, a batch the model
cannot take, a curvature state that does not warm-start) otherwise surfaces as
"round 1: only 0 of N client updates succeeded", after files were written.
:func:`preflight` runs, on the real model and then puts everything back:

1. one local step of one client from the initial weights (the configured
   client optimizer, its curvature collection, clipping, scaler);
2. one server aggregation of that update (the server rule, Theta's form;
   with ``public_curvature``, Theta from one step of the client rule on the
   server's public data first, or from the server's own runs on it where
   the caller runs them: a Flower ServerApp's ``train_public``);
3. one local step from the aggregated state (alignment: the warm start from
   the global Theta, and the correction);
4. one evaluation (``eval_fn``), when given.

Errors of the training code itself (:data:`~fedpac_hf.federated.failures.PROGRAMMING_ERRORS`:
a loss function that returns a tuple, a model called with a wrong argument)
pass through with their traceback, as in a round.

Afterwards the model's trainable parameters, its buffers, its train/eval mode
and every random stream (torch's CPU and CUDA generators, NumPy's and Python's
global ones) are as before, so a run with the preflight trains exactly as one
without. A failure raises :class:`PreflightError` naming the stage.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from fedpac_hf.optim.base import check_finite_curvature

from .algorithms import Algorithm
from .client import client_update
from .failures import PROGRAMMING_ERRORS, ClientError
from .local_step import ClientHooks, LocalSteps
from .server import RoundAggregator
from .state import ServerState, get_trainable_state, load_trainable_state

__all__ = ["PreflightError", "preflight", "restored", "server_preflight"]

logger = logging.getLogger(__name__)


class PreflightError(ValueError):
    """Training cannot work with these settings or this data (found before round 1)."""


@contextmanager
def restored(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model``'s trainable parameters, buffers and mode and every RNG back on exit."""
    params = {n: t.clone() for n, t in get_trainable_state(model).items()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    training = model.training
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    numpy_rng = np.random.get_state()
    python_rng = random.getstate()
    try:
        yield
    finally:
        load_trainable_state(model, params)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in buffers:
                    buffer.copy_(buffers[name])
        model.train(training)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        np.random.set_state(numpy_rng)
        random.setstate(python_rng)


def _finite_theta(theta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``theta``, checked to be finite everywhere (``ValueError`` naming the entries)."""
    check_finite_curvature(theta)
    return theta


def _stage(name: str, run: Callable[[], Any], lr: float, first: bool = False) -> Any:
    try:
        return run()
    except PROGRAMMING_ERRORS as error:  # the training code is wrong: its own traceback
        logger.error(
            "preflight, %s: %s: %s; this is a bug in the training code (the loss function, "
            "the model or the data collator): the run stops",
            name,
            type(error).__name__,
            " ".join(str(error).split()),
        )
        raise
    except ClientError as error:
        message = " ".join(str(error).split())
        if "non-finite training loss" in message and first:
            raise PreflightError(
                f"preflight, {name}: the training loss is not finite at the initial weights "
                "(the learning rate plays no part yet): check the model, its labels and the "
                f"data ({message})"
            ) from error
        raise PreflightError(
            f"preflight, {name}: {message} after one step at learning_rate={lr:g}: lower "
            "learning_rate or clip with max_grad_norm"
        ) from error
    except Exception as error:
        message = " ".join(str(error).split()) or "(no message)"
        raise PreflightError(f"preflight, {name}: {type(error).__name__}: {message}") from error


def preflight(
    model: torch.nn.Module,
    algorithm: Algorithm,
    batches: Callable[[], Iterator[Any]],
    steps: LocalSteps,
    hooks: ClientHooks,
    *,
    weighting: str = "uniform",
    eval_fn: Callable[[torch.nn.Module], Any] | None = None,
    public_batches: Callable[[], Iterator[Any]] | None = None,
    public_theta: Callable[[], dict[str, torch.Tensor]] | None = None,
) -> float:
    """Run the preflight (see the module docstring); return its time in seconds.

    Parameters
    ----------
    model:
        The model the run trains; it is left exactly as it was.
    algorithm:
        The run's algorithm, with its client-optimizer options.
    batches:
        Returns a fresh iterator over one client's batches (called for each
        local step, so both steps see the same first batches).
    steps:
        The run's local-step settings; the preflight takes one step of them
        (``num_steps`` is ignored) at their learning rate.
    hooks:
        How the run computes and applies gradients.
    weighting:
        The run's aggregation weighting.
    eval_fn:
        Evaluates the model (e.g. on one batch), or ``None``.
    public_batches:
        Returns a fresh iterator over the server's public curvature data, for
        algorithms with ``public_curvature`` (without it, a client's preflight:
        the aggregation has no Theta).
    public_theta:
        Instead of ``public_batches``: returns the server's Theta from its
        public data, computed in full (e.g. from a Flower strategy's
        ``train_public`` on the first round's plan); it must be finite.

    Raises
    ------
    PreflightError
        Naming the stage and the cause.
    """
    start = time.perf_counter()
    one = LocalSteps(
        lr=steps.lr,
        num_steps=1,
        gradient_accumulation_steps=steps.gradient_accumulation_steps,
        max_grad_norm=steps.max_grad_norm,
    )
    with restored(model):
        state = ServerState.from_model(model)
        state = ServerState({n: t.clone() for n, t in state.params.items()})
        first = _stage(
            "one local step from the initial weights",
            lambda: client_update(model, state, algorithm, batches(), one, hooks),
            one.lr,
            first=True,
        )

        public = None
        if algorithm.public_curvature and public_batches is not None:
            server_rule = algorithm.public_rule  # it returns its Theta
            public = _stage(
                "one step of the server on the public curvature data",
                lambda: client_update(model, state, server_rule, public_batches(), one, hooks),
                one.lr,
            ).curvature
        elif algorithm.public_curvature and public_theta is not None:
            public = _stage(
                "the server's runs on the public curvature data",
                lambda: _finite_theta(public_theta()),
                one.lr,
            )

        def aggregate() -> ServerState:
            aggregator = RoundAggregator(state, algorithm, weighting)  # type: ignore[arg-type]
            aggregator.add(first)
            if public is not None:
                aggregator.public_curvature = public
            return aggregator.finalize(lr=one.lr, local_steps=1)[0]

        following = _stage("the server's aggregation of that update", aggregate, one.lr)
        _stage(
            "one local step from the aggregated state (warm start and correction)",
            lambda: client_update(model, following, algorithm, batches(), one, hooks),
            one.lr,
        )
        if eval_fn is not None:
            load_trainable_state(model, state.params)
            model.eval()
            _stage("one evaluation", lambda: eval_fn(model), one.lr)
    return time.perf_counter() - start


def server_preflight(
    model: torch.nn.Module,
    algorithm: Algorithm,
    steps: LocalSteps,
    *,
    weighting: str = "uniform",
    eval_fn: Callable[[torch.nn.Module], Any] | None = None,
    public_theta: Callable[[], dict[str, torch.Tensor]] | None = None,
) -> float:
    """The preflight of a server that holds no training data (a Flower ServerApp).

    The same four stages as :func:`preflight` on the global model, with a
    synthetic loss in place of a client's batch: ``0.5 * mean((p - t)^2)`` over
    every trainable tensor ``p``, ``t`` a fixed normal draw. Its gradients have
    the shapes of the real ones, so the client optimizer's options, Theta's form,
    the server's aggregation and the warm start are checked on the real model
    before the server writes anything; ``eval_fn`` (the central evaluation) runs
    once on the initial weights. With ``public_theta`` (algorithms with
    ``public_curvature``) the server's Theta from its public data is computed
    first, in full, and must be finite; the aggregation then uses it. The
    model and every random stream are put back.

    Returns
    -------
    float
        Its time in seconds.

    Raises
    ------
    PreflightError
        Naming the stage (``"server preflight, ..."``) and the cause.
    """
    generator = torch.Generator().manual_seed(0)
    targets = {
        name: torch.randn(p.shape, generator=generator).to(p.device, p.dtype)
        for name, p in model.named_parameters()
        if p.requires_grad
    }

    def synthetic_loss(m: torch.nn.Module, _batch: Any) -> torch.Tensor:
        terms = [
            0.5 * (p - targets[name]).float().pow(2).mean()
            for name, p in m.named_parameters()
            if p.requires_grad
        ]
        return torch.stack(terms).sum()

    one_example = torch.zeros(1)
    try:
        return preflight(
            model,
            algorithm,
            lambda: iter(lambda: one_example, None),  # the same "batch", forever
            steps,
            ClientHooks(loss_fn=synthetic_loss, curvature_loss_fn=synthetic_loss),
            weighting=weighting,
            eval_fn=eval_fn,
            public_theta=public_theta,
        )
    except PreflightError as error:
        raise PreflightError(f"server {error}") from error.__cause__
