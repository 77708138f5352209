"""A round's running sums over several processes (torchrun / accelerate launch).

The HF trainer spreads a round's clients over its processes; each process adds
its clients to its own :class:`~fedpac_hf.federated.server.RoundAggregator`,
then :func:`all_reduce` makes every process hold the sums over all clients, so
that ``finalize`` gives the same next state everywhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

from .failures import ClientFailure
from .server import RoundAggregator
from .state import ServerState

__all__ = ["all_reduce", "share_noise_seed"]


def all_reduce(aggregator: RoundAggregator) -> None:
    """Sum ``aggregator`` with its peers in the other processes (torch.distributed).

    Every process of the default process group calls this after adding
    its share of the round's clients; afterwards every process holds the
    sums over all clients, so ``finalize`` gives the same state everywhere.
    A process whose clients all failed contributes zeros.
    """
    key_lists: list[Any] = [None] * dist.get_world_size()
    mine = {k: tuple(t.shape) for k, t in aggregator.curvature_sum.items()}
    norms = torch.stack(aggregator.own_norms).cpu().tolist() if aggregator.own_norms else []
    dist.all_gather_object(
        key_lists,
        (mine, aggregator.client_ids, aggregator.failures, aggregator.record_epsilon, norms),
    )
    shapes: dict[str, tuple[int, ...]] = {}
    ids: list[int] = []
    failures: list[ClientFailure] = []
    epsilons = []
    all_norms: list[list[float]] = []
    for keys, client_ids, client_failures, epsilon, client_norms in key_lists:
        all_norms += client_norms
        shapes.update(keys)
        ids += client_ids
        failures += client_failures
        epsilons += [] if epsilon is None else [epsilon]
    aggregator.record_epsilon = max(epsilons) if epsilons else None
    aggregator.own_norms = [
        torch.tensor(pair, dtype=torch.float64, device=aggregator.device) for pair in all_norms
    ]
    for k, shape in shapes.items():
        if k not in aggregator.curvature_sum:
            zeros = torch.zeros(shape, dtype=torch.float64, device=aggregator.device)
            aggregator.curvature_sum[k] = zeros
            aggregator.curvature_weighted_sum[k] = zeros.clone()
    names, curv = sorted(aggregator.delta_sum), sorted(aggregator.curvature_sum)
    host = torch.tensor(
        [
            aggregator.weight_sum,
            aggregator.num_clients,
            aggregator.num_examples,
            aggregator.loss_sum,
            aggregator.losses_missing,
            aggregator.delta_bytes,
            aggregator.theta_bytes,
            aggregator.skipped_steps,
            aggregator.hessian_refreshes,
            *aggregator.clipped,
        ],
        dtype=torch.float64,
    )
    scalars = torch.cat(
        [
            aggregator.curvature_square_sum.reshape(1),
            aggregator.delta_square_sum.reshape(1),
            host.to(aggregator.device),
        ]
    )
    tensors = (
        [aggregator.delta_sum[n] for n in names]
        + [aggregator.curvature_sum[k] for k in curv]
        + [aggregator.curvature_weighted_sum[k] for k in curv]
        + [scalars]
    )
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    aggregator.curvature_square_sum = scalars[0].clone()
    aggregator.delta_square_sum = scalars[1].clone()
    (
        aggregator.weight_sum,
        num_clients,
        num_examples,
        aggregator.loss_sum,
        losses_missing,
        delta_bytes,
        theta_bytes,
        aggregator.skipped_steps,
        aggregator.hessian_refreshes,
        *aggregator.clipped,
    ) = scalars[2:].cpu().tolist()
    aggregator.num_clients, aggregator.num_examples = int(num_clients), int(num_examples)
    aggregator.delta_bytes, aggregator.theta_bytes = int(delta_bytes), int(theta_bytes)
    aggregator.losses_missing = int(losses_missing)
    aggregator.client_ids = sorted(ids)
    aggregator.failures = sorted(failures, key=lambda f: f.client_id)


def share_noise_seed(state: ServerState) -> ServerState:
    """``state`` with process 0's DP noise seed, so every process adds the same noise.

    Each process draws its own secret seed when it builds its engine; the
    sums are all-reduced and every process finalizes the round, so they must
    agree on the noise. A state without a seed (no DP) is returned as it is.
    """
    if state.noise_seed is None or not dist.is_available() or not dist.is_initialized():
        return state
    shared = [state.noise_seed]
    dist.broadcast_object_list(shared, src=0)
    return dataclasses.replace(state, noise_seed=int(shared[0]))
