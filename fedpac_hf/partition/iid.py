"""IID partitioning: a seeded shuffle cut into near-equal clients."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedpac_hf.partition.base import (
    Partitioner,
    check_enough_examples,
    check_num_clients,
    group_by_client,
)

if TYPE_CHECKING:  # datasets is needed only by whoever passes a Dataset
    from datasets import Dataset


class IidPartitioner(Partitioner):
    """Give every client a uniformly random, near-equal share of the data.

    The reference point of every non-IID experiment: client sizes differ by at
    most one and each client's label distribution matches the global one up to
    sampling noise. Examples are shuffled first, so clients never get
    contiguous slices (which would inherit any ordering of the source file).
    Every example is assigned.

    Parameters
    ----------
    num_clients : int
        Number of clients.
    seed : int
        Seed of the shuffle.
    """

    name = "iid"

    def __init__(self, num_clients: int, seed: int = 0) -> None:
        self.num_clients = check_num_clients(num_clients)
        self.seed = seed

    def assign(self, dataset: Dataset) -> list[np.ndarray]:
        """Shuffle the row indices and cut them into ``num_clients`` near-equal parts."""
        n = len(dataset)
        check_enough_examples(n, self.num_clients)
        rng = np.random.default_rng(self.seed)
        permutation = rng.permutation(n)
        sizes = np.full(self.num_clients, n // self.num_clients, dtype=np.int64)
        sizes[: n % self.num_clients] += 1
        client_of = np.empty(n, dtype=np.int64)
        client_of[permutation] = np.repeat(np.arange(self.num_clients), sizes)
        return group_by_client(client_of, self.num_clients)
