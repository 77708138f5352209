"""Quantity skew: clients of very different sizes, labels IID."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedpac_hf.partition.base import (
    Partitioner,
    check_enough_examples,
    check_min_examples,
    check_num_clients,
    check_positive,
    group_by_client,
)

if TYPE_CHECKING:  # datasets is needed only by whoever passes a Dataset
    from datasets import Dataset


class QuantitySkewPartitioner(Partitioner):
    """Unequal client sizes with an IID label mix inside each client.

    Isolates the effect of size imbalance (weighted aggregation, stragglers)
    from label skew. Each client first gets ``min_examples_per_client``
    examples; the rest are shared out by a multinomial draw with client
    weights from either

    - a Dirichlet: ``w ~ Dir(alpha * 1_K)`` (smaller ``alpha``, more skew), or
    - a power law: the client of rank ``r`` (in a seeded random order) has
      weight ``(r + 1) ** -power_law_exponent`` (larger exponent, more skew).

    Exactly one of ``alpha`` and ``power_law_exponent`` must be given. Every
    example is assigned; which examples a client gets is uniformly random.

    Parameters
    ----------
    num_clients : int
        Number of clients.
    alpha : float, optional
        Dirichlet concentration of the client sizes, > 0.
    power_law_exponent : float, optional
        Exponent of the power-law client sizes, > 0.
    min_examples_per_client : int
        Guaranteed examples per client (>= 1).
    seed : int
        Seed of every random draw.
    """

    name = "quantity_skew"

    def __init__(
        self,
        num_clients: int,
        alpha: float | None = None,
        power_law_exponent: float | None = None,
        min_examples_per_client: int = 1,
        seed: int = 0,
    ) -> None:
        self.num_clients = check_num_clients(num_clients)
        if (alpha is None) == (power_law_exponent is None):
            raise ValueError(
                "QuantitySkewPartitioner needs exactly one of alpha (Dirichlet client sizes, "
                "e.g. alpha=0.5) and power_law_exponent (power-law client sizes, e.g. 1.5); "
                f"got alpha={alpha!r}, power_law_exponent={power_law_exponent!r}."
            )
        self.alpha = None if alpha is None else check_positive("alpha", alpha)
        self.power_law_exponent = (
            None
            if power_law_exponent is None
            else check_positive("power_law_exponent", power_law_exponent)
        )
        self.min_examples_per_client = check_min_examples(min_examples_per_client)
        self.seed = seed

    def client_sizes(self, num_examples: int) -> np.ndarray:
        """The number of examples of each client for a dataset of ``num_examples`` rows."""
        check_enough_examples(num_examples, self.num_clients, self.min_examples_per_client)
        rng = np.random.default_rng(self.seed)
        if self.alpha is not None:
            weights = rng.dirichlet(np.full(self.num_clients, self.alpha))
        else:
            ranks = rng.permutation(self.num_clients)
            weights = (ranks + 1.0) ** -self.power_law_exponent
            weights /= weights.sum()
        spare = num_examples - self.num_clients * self.min_examples_per_client
        return self.min_examples_per_client + rng.multinomial(spare, weights)

    def assign(self, dataset: Dataset) -> list[np.ndarray]:
        """Draw the client sizes, then deal a seeded shuffle of the rows accordingly."""
        n = len(dataset)
        sizes = self.client_sizes(n)
        rng = np.random.default_rng([self.seed, 1])
        client_of = np.empty(n, dtype=np.int64)
        client_of[rng.permutation(n)] = np.repeat(np.arange(self.num_clients), sizes)
        return group_by_client(client_of, self.num_clients)
