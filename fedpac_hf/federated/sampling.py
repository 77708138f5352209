"""Partial participation: which clients train in a round.

Sampling is a pure function of ``(seed, round)``: a run resumed from a
checkpoint at round r samples exactly the clients an uninterrupted run would,
with no sampler state to save.
"""

from __future__ import annotations

import numpy as np

from fedpac_hf.optim.options import count_or_fraction, whole

__all__ = [
    "CLIENTS_PER_ROUND",
    "poisson_sample_clients",
    "resolve_clients_per_round",
    "sample_clients",
]

#: What ``clients_per_round`` accepts, from every door: a fraction of the clients or a count.
CLIENTS_PER_ROUND = count_or_fraction("clients")


def resolve_clients_per_round(num_clients: int, clients_per_round: int | float) -> int:
    """Turn a count or a fraction of ``num_clients`` into a count S in [1, num_clients].

    A value in (0, 1) is a fraction (rounded, at least one client); a value
    >= 1 is a count and must be whole, however it is written (``1``, ``1.0``
    and ``"1"`` all mean one client). Raises ``ValueError`` for impossible
    participation.
    """
    whole(1).check("num_clients", num_clients)
    CLIENTS_PER_ROUND.check("clients_per_round", clients_per_round)
    if 0.0 < clients_per_round < 1.0:
        return max(1, int(round(clients_per_round * num_clients)))
    count = int(clients_per_round)
    if count > num_clients:
        raise ValueError(
            f"clients_per_round={count} is more than the {num_clients} clients available; "
            f"use at most {num_clients} (or a fraction such as 0.1)"
        )
    return count


def sample_clients(
    num_clients: int, clients_per_round: int, seed: int, round_index: int
) -> list[int]:
    """Client indices for one round: S distinct clients, sorted, from ``(seed, round)``.

    With ``clients_per_round == num_clients`` every client takes part.
    """
    if clients_per_round >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([int(seed), int(round_index)])
    return sorted(int(i) for i in rng.choice(num_clients, size=clients_per_round, replace=False))


def poisson_sample_clients(
    num_clients: int, sample_rate: float, seed: int, round_index: int
) -> list[int]:
    """Client indices for one round by Poisson sampling, sorted, from ``(seed, round)``.

    Each client takes part independently with probability ``sample_rate``, so
    the number of clients varies from round to round (it may be 0): the
    sampling that client-level differential privacy accounts for
    (:mod:`~fedpac_hf.federated.privacy`). A stream apart from
    :func:`sample_clients`'s.
    """
    rng = np.random.default_rng([int(seed), int(round_index), 1])
    return [int(i) for i in np.flatnonzero(rng.random(int(num_clients)) < sample_rate)]
