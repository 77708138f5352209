"""One client's batches: cycling a loader through its local steps, counting a batch's examples."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

__all__ = ["batch_size", "cycle_batches"]


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
    """Number of examples in a batch: the leading size of its first tensor (0 for an empty
    mapping or sequence: a Poisson-sampled batch that drew no example)."""
    if isinstance(batch, (Mapping, list, tuple)) and len(batch) == 0:
        return 0
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
