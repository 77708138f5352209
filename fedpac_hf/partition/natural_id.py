"""Natural partitioning: one client per distinct value of an id column."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedpac_hf.partition.base import Partitioner, group_by_client, read_column

if TYPE_CHECKING:  # datasets is needed only by whoever passes a Dataset
    from datasets import Dataset


class NaturalIdPartitioner(Partitioner):
    """One client per distinct value of ``column`` (a speaker, a writer, a device).

    This is how LEAF builds its naturally non-IID benchmarks (Shakespeare: one
    client per speaking role). Clients are ordered by the sorted id values, so
    client ``i`` is ``client_ids[i]`` whatever the row order. Every example is
    assigned and no client is empty. Nothing is random, so there is no seed.

    Parameters
    ----------
    column : str
        The id column.

    Attributes
    ----------
    client_ids : list or None
        The id of each client, set by :meth:`assign`.
    """

    name = "natural_id"

    def __init__(self, column: str) -> None:
        self.column = column
        self.client_ids: list | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(column={self.column!r})"

    @property
    def num_clients(self) -> int | None:
        """Number of clients found by the last :meth:`assign` (``None`` before)."""
        return None if self.client_ids is None else len(self.client_ids)

    def assign(self, dataset: Dataset) -> list[np.ndarray]:
        """Group the rows by the value of ``column``, clients in sorted id order."""
        if len(dataset) == 0:
            raise ValueError("the dataset is empty; NaturalIdPartitioner needs at least one row.")
        values = read_column(dataset, self.column, argument="column")
        import pyarrow as pa
        import pyarrow.compute as pc

        try:
            encoded = pc.dictionary_encode(pa.array(values))
            dictionary = encoded.dictionary.to_numpy(zero_copy_only=False)
            codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            dictionary, codes = np.unique(values, return_inverse=True)
            codes = codes.reshape(-1).astype(np.int64)
        order = np.argsort(dictionary, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        self.client_ids = [
            value.item() if hasattr(value, "item") else value for value in dictionary[order]
        ]
        return group_by_client(rank[codes], len(order))
