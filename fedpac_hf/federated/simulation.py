"""A pure-PyTorch federated runner: rounds of sampled clients over one model.

:func:`simulate` is the shortest way to run any registered algorithm on your
own model and data loaders, without Trainer or Flower. It keeps one model in
memory whatever the number of clients: clients are loaded into it in turn.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .algorithms import Algorithm, get_algorithm
from .client import ClientUpdate, LossFn, client_update, cycle_batches, run_client
from .sampling import resolve_clients_per_round, sample_clients
from .server import RoundAggregator, Weighting
from .state import ServerState, load_trainable_state

__all__ = ["simulate", "round_learning_rate", "LR_SCHEDULES"]

logger = logging.getLogger(__name__)

LR_SCHEDULES: tuple[str, ...] = ("cosine", "constant", "linear")


def round_learning_rate(
    lr: float, round_index: int, num_rounds: int, schedule: str = "cosine"
) -> float:
    """The local learning rate eta_l of round ``round_index`` (0-based) of ``num_rounds``.

    ``cosine`` (the paper's choice) decays from ``lr`` towards 0 over the
    rounds, ``linear`` likewise on a straight line, ``constant`` keeps ``lr``.
    The last round's rate stays positive.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if schedule == "constant":
        return lr
    progress = round_index / max(num_rounds, 1)
    if schedule == "linear":
        return lr * (1.0 - progress)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def simulate(
    model: torch.nn.Module,
    client_loaders: Sequence[Any],
    algorithm: str | Algorithm,
    num_rounds: int,
    clients_per_round: int | float,
    local_steps: int,
    loss_fn: LossFn,
    eval_fn: Callable[[torch.nn.Module], float | dict[str, float]] | None = None,
    seed: int = 0,
    *,
    lr: float = 0.01,
    lr_schedule: str = "cosine",
    server_lr: float = 1.0,
    weighting: Weighting = "uniform",
    max_grad_norm: float | None = None,
    curvature_loss_fn: LossFn | None = None,
    min_clients_per_round: int = 1,
    progress: bool = False,
    callback: Callable[[ServerState, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Run ``num_rounds`` federated rounds and return one metrics dict per round.

    Parameters
    ----------
    model:
        The model; its trainable parameters are the federated ones. At the end
        it holds the final global parameters.
    client_loaders:
        One iterable of batches per client (e.g. a ``DataLoader``).
    algorithm:
        A registered name (see :func:`fedpac_hf.federated.list_algorithms`)
        or an :class:`Algorithm`.
    num_rounds, clients_per_round, local_steps:
        R, S (count or fraction of the clients) and K.
    loss_fn:
        ``loss_fn(model, batch) -> scalar loss``.
    eval_fn:
        Called on the global model after each round; a float is logged as
        ``eval``, a dict is merged into the round's metrics.
    seed:
        Seeds client sampling (a pure function of seed and round).
    lr, lr_schedule:
        Peak local learning rate and its schedule over rounds.
    server_lr, weighting:
        eta_g and the aggregation weights (``uniform`` or ``num_examples``).
    max_grad_norm:
        Clip local gradients (the paper clips at 10).
    curvature_loss_fn:
        Needed by Sophia: the loss whose gradient estimates its Hessian.
    min_clients_per_round:
        A client whose update fails (any exception, or a non-finite loss or
        update) is dropped with a logged reason (see
        :func:`~fedpac_hf.federated.run_client`); fewer survivors than this
        stops the run with :class:`~fedpac_hf.federated.RoundError`.
    progress:
        Show a progress bar over rounds.
    callback:
        Called after each round with the new server state and its metrics.

    Raises
    ------
    ValueError
        For impossible settings (no client, a client without data, zero local
        steps, a non-positive learning rate, too many clients per round).
    RoundError
        If a round ends with fewer than ``min_clients_per_round`` usable
        updates or a non-finite global model.
    """
    algorithm = get_algorithm(algorithm)
    if num_rounds < 1:
        raise ValueError(f"num_rounds must be at least 1, got {num_rounds}")
    if local_steps < 1:
        raise ValueError(f"local_steps must be at least 1, got {local_steps}")
    if not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"lr must be a positive number, got {lr}")
    if not client_loaders:
        raise ValueError("client_loaders is empty: a federation needs at least one client")
    for cid, loader in enumerate(client_loaders):
        if hasattr(loader, "__len__") and len(loader) == 0:
            raise ValueError(f"client {cid}'s loader is empty: every client needs data")
    num_sampled = resolve_clients_per_round(len(client_loaders), clients_per_round)
    if not 1 <= min_clients_per_round <= num_sampled:
        raise ValueError(
            f"min_clients_per_round must lie in [1, clients per round = {num_sampled}], "
            f"got {min_clients_per_round}"
        )
    state = ServerState.from_model(model)
    history: list[dict[str, float]] = []
    bar = tqdm(range(num_rounds), desc=f"{algorithm.name} rounds", disable=not progress)
    for r in bar:
        start = time.perf_counter()
        lr_r = round_learning_rate(lr, r, num_rounds, lr_schedule)
        aggregator = RoundAggregator(state, algorithm, weighting)
        for cid in sample_clients(len(client_loaders), num_sampled, seed, r):
            train = functools.partial(
                client_update,
                model,
                state,
                algorithm,
                cycle_batches(client_loaders[cid]),
                lr=lr_r,
                local_steps=local_steps,
                loss_fn=loss_fn,
                client_id=cid,
                max_grad_norm=max_grad_norm,
                curvature_loss_fn=curvature_loss_fn,
            )
            result = run_client(train, cid, r + 1, logger)
            if isinstance(result, ClientUpdate):
                aggregator.add(result)
            else:
                aggregator.drop(result)
        aggregator.require(min_clients_per_round, r + 1)
        state, metrics = aggregator.finalize(lr=lr_r, local_steps=local_steps, server_lr=server_lr)
        load_trainable_state(model, state.params)
        metrics = {"round": float(r + 1), "lr": lr_r, **metrics}
        metrics["num_dropped"] = float(len(aggregator.failures))
        if eval_fn is not None:
            model.eval()
            with torch.no_grad():
                result = eval_fn(model)
            metrics.update(result if isinstance(result, dict) else {"eval": float(result)})
        metrics["round_time"] = time.perf_counter() - start
        history.append(metrics)
        if callback is not None:
            callback(state, metrics)
        bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("train_loss", "eval")})
    return history
