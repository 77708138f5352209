"""Pathological label skew: every client holds exactly k classes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedpac_hf.partition.base import (
    Partitioner,
    check_enough_examples,
    check_no_empty_client,
    check_num_clients,
    encode_labels,
    group_by_client,
    read_column,
)

if TYPE_CHECKING:  # datasets is needed only by whoever passes a Dataset
    from datasets import Dataset


class PathologicalPartitioner(Partitioner):
    """Give each client ``classes_per_client`` classes (McMahan et al.'s "pathological non-IID").

    Classes are dealt to clients round-robin over a seeded permutation of the
    classes: client ``i`` holds classes ``perm[(i*k + j) % C]`` for ``j < k``.
    So every client has ``k`` distinct classes and, whenever
    ``num_clients * k >= C``, every class has a holder and the holders of a
    class differ by at most one in number. Each class's examples are shuffled
    and split as evenly as possible among the clients that hold it. When
    ``num_clients * k < C`` the examples of classes nobody holds are left out.

    Parameters
    ----------
    num_clients : int
        Number of clients.
    classes_per_client : int
        Classes per client, between 1 and the number of classes.
    label_column : str
        Column holding the class label.
    seed : int
        Seed of the class permutation and of the shuffles.
    """

    name = "pathological"

    def __init__(
        self,
        num_clients: int,
        classes_per_client: int,
        label_column: str = "label",
        seed: int = 0,
    ) -> None:
        self.num_clients = check_num_clients(num_clients)
        if (
            isinstance(classes_per_client, bool)
            or int(classes_per_client) != classes_per_client
            or classes_per_client < 1
        ):
            raise ValueError(
                f"classes_per_client must be an integer >= 1 (got {classes_per_client!r})."
            )
        self.classes_per_client = int(classes_per_client)
        self.label_column = label_column
        self.seed = seed

    def assign(self, dataset: Dataset) -> list[np.ndarray]:
        """Deal classes to clients and split each class among its holders."""
        labels = read_column(dataset, self.label_column)
        classes, codes = encode_labels(labels)
        num_classes = len(classes)
        if self.classes_per_client > num_classes:
            raise ValueError(
                f"classes_per_client={self.classes_per_client} exceeds the {num_classes} "
                f"classes in column {self.label_column!r}; use classes_per_client <= "
                f"{num_classes}."
            )
        check_enough_examples(len(codes), self.num_clients)
        rng = np.random.default_rng(self.seed)
        class_order = rng.permutation(num_classes)
        slots = np.arange(self.num_clients * self.classes_per_client)
        holder = slots // self.classes_per_client
        held_class = class_order[slots % num_classes]

        order = np.argsort(codes, kind="stable")
        pools = np.split(order, np.cumsum(np.bincount(codes, minlength=num_classes))[:-1])
        client_of = np.full(len(codes), -1, dtype=np.int64)
        for k in range(num_classes):
            holders = holder[held_class == k]
            if holders.size == 0:
                continue
            pool = rng.permutation(pools[k])
            sizes = np.full(holders.size, len(pool) // holders.size, dtype=np.int64)
            sizes[: len(pool) % holders.size] += 1
            client_of[pool] = np.repeat(holders, sizes)
        parts = group_by_client(client_of, self.num_clients)
        return check_no_empty_client(
            parts,
            "their classes have fewer examples than holders; lower num_clients or raise "
            "classes_per_client.",
        )
