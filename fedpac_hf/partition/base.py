"""The common shape of every partitioner and the helpers they share.

A partitioner decides which client holds which example of a
:class:`datasets.Dataset`. It only ever produces *indices*: ``assign`` returns
one sorted ``int64`` array per client and ``split`` turns them into
index-backed views with ``dataset.select`` (no example is copied).
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:  # datasets is needed only by whoever passes a Dataset
    from datasets import Dataset


class Partitioner(ABC):
    """Base class of the non-IID splitters in :mod:`fedpac_hf.partition`.

    Subclasses implement :meth:`assign`; :meth:`split` is shared. Every
    partitioner is deterministic given its ``seed`` (all randomness comes from
    one :func:`numpy.random.default_rng`) and gives each example to at most
    one client.

    Attributes
    ----------
    name : str
        The registry name (``get_partitioner(name)``), e.g. ``"dirichlet"``.
    """

    name: ClassVar[str] = ""

    @abstractmethod
    def assign(self, dataset: Dataset) -> list[np.ndarray]:
        """Decide which examples each client holds.

        Parameters
        ----------
        dataset : datasets.Dataset
            The data to split (read, never copied).

        Returns
        -------
        list of numpy.ndarray
            One sorted ``int64`` array of row indices per client. The arrays
            are pairwise disjoint and none is empty.
        """

    def split(self, dataset: Dataset) -> list[Dataset]:
        """Split ``dataset`` into one index-backed dataset per client.

        Parameters
        ----------
        dataset : datasets.Dataset
            The data to split.

        Returns
        -------
        list of datasets.Dataset
            ``dataset.select(indices)`` for each client of :meth:`assign`; the
            views share the original Arrow table, so no data is copied.
        """
        return [dataset.select(indices) for indices in self.assign(dataset)]

    def settings(self) -> dict[str, Any]:
        """The registry name and the constructor arguments: what makes two splits equal.

        A checkpoint records them so that a run resumed with another split is
        refused. Values are plain Python (JSON-serialisable).

        Returns
        -------
        dict
            ``{"partitioner": name, argument: value, ...}``.
        """
        settings: dict[str, Any] = {"partitioner": self.name or type(self).__name__}
        for key in inspect.signature(type(self).__init__).parameters:
            if key != "self" and hasattr(self, key):
                value = getattr(self, key)
                settings[key] = value.item() if isinstance(value, np.generic) else value
        return settings

    def __repr__(self) -> str:
        params = ", ".join(
            f"{key}={value!r}" for key, value in vars(self).items() if not key.startswith("_")
        )
        return f"{type(self).__name__}({params})"


def read_column(dataset: Dataset, column: str, argument: str = "label_column") -> np.ndarray:
    """Read one column of ``dataset`` as a numpy array, fast and without touching the others.

    Works on the Arrow table directly (no python loop, no format conversion)
    and honours an indices mapping left by ``select``/``shuffle``.

    Parameters
    ----------
    dataset : datasets.Dataset
        The dataset to read from.
    column : str
        The column name.
    argument : str
        The name of the argument that supplied ``column``, used in the error
        message.

    Returns
    -------
    numpy.ndarray
        The column values in row order (object dtype for strings).

    Raises
    ------
    ValueError
        If the column does not exist or holds missing values.
    """
    import pyarrow as pa  # a datasets.Dataset holds Arrow data; imported here, not with fedpac_hf

    if column not in dataset.column_names:
        raise ValueError(
            f"{argument}={column!r} is not a column of the dataset; available columns: "
            f"{dataset.column_names}. Pass {argument}=<one of them>."
        )
    chunked = dataset.data.column(column)
    if chunked.null_count:
        raise ValueError(
            f"{argument}={column!r} has {chunked.null_count} missing values; filter them out "
            f"first, e.g. dataset.filter(lambda x: x[{column!r}] is not None)."
        )
    indices_table = getattr(dataset, "_indices", None)
    if indices_table is not None:
        rows = indices_table.column(0)
        chunked = chunked.take(rows)
    if isinstance(chunked, pa.ChunkedArray):
        array = chunked.combine_chunks() if chunked.num_chunks != 1 else chunked.chunk(0)
    else:
        array = chunked
    if pa.types.is_dictionary(array.type):
        array = array.cast(array.type.value_type)
    return array.to_numpy(zero_copy_only=False)


def encode_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map arbitrary labels to dense class ids ``0..C-1`` (in sorted label order).

    Parameters
    ----------
    labels : numpy.ndarray
        One label per example (integers or strings).

    Returns
    -------
    classes : numpy.ndarray
        The distinct labels, sorted.
    codes : numpy.ndarray
        ``int64`` class id of every example, indexing ``classes``.
    """
    if labels.dtype.kind in "iu" and labels.size:
        low, high = int(labels.min()), int(labels.max())
        if low >= 0 and high < 4 * labels.size + 1024:
            present = np.bincount(labels, minlength=high + 1) > 0
            classes = np.flatnonzero(present)
            lookup = np.cumsum(present) - 1
            return classes.astype(labels.dtype), lookup[labels].astype(np.int64)
    classes, codes = np.unique(labels, return_inverse=True)
    return classes, codes.astype(np.int64).reshape(-1)


def group_by_client(client_of: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Turn a per-example client id into sorted per-client index arrays.

    Parameters
    ----------
    client_of : numpy.ndarray
        Client id of every example, ``-1`` for an example no client holds.
    num_clients : int
        The number of clients.

    Returns
    -------
    list of numpy.ndarray
        Sorted ``int64`` indices per client. Disjoint by construction, since
        each example carries a single client id.
    """
    held = np.flatnonzero(client_of >= 0)
    owners = client_of[held]
    order = np.argsort(owners, kind="stable")
    counts = np.bincount(owners, minlength=num_clients)
    sorted_indices = held[order].astype(np.int64, copy=False)
    return list(np.split(sorted_indices, np.cumsum(counts)[:-1]))


def check_num_clients(num_clients: int) -> int:
    """Validate ``num_clients`` (a positive integer) and return it as ``int``."""
    if isinstance(num_clients, bool) or int(num_clients) != num_clients or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer (got {num_clients!r}).")
    return int(num_clients)


def check_positive(name: str, value: float, hint: str = "") -> float:
    """Validate that a concentration/exponent parameter is a finite number > 0."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number > 0 (got {value!r}).{hint}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a finite number > 0 (got {value!r}).{hint}")
    return number


def check_enough_examples(num_examples: int, num_clients: int, min_per_client: int = 1) -> None:
    """Raise if ``num_examples`` cannot give every client ``min_per_client`` examples."""
    if num_examples < num_clients * max(min_per_client, 1):
        raise ValueError(
            f"num_clients={num_clients} is too many for {num_examples} examples"
            + (f" with min_examples_per_client={min_per_client}" if min_per_client > 1 else "")
            + f"; use num_clients <= {num_examples // max(min_per_client, 1)}"
            + (" or lower min_examples_per_client." if min_per_client > 1 else ".")
        )


def check_no_empty_client(parts: list[np.ndarray], hint: str) -> list[np.ndarray]:
    """Raise a ``ValueError`` naming the first empty client, else return ``parts``."""
    sizes = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
    empty = np.flatnonzero(sizes == 0)
    if empty.size:
        raise ValueError(
            f"{empty.size} of {len(parts)} clients would get no example (first: client "
            f"{int(empty[0])}); {hint}"
        )
    return parts


def check_min_examples(value: int) -> int:
    """Validate ``min_examples_per_client`` (an integer >= 1)."""
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(
            f"min_examples_per_client must be an integer >= 1 (got {value!r}); an empty "
            "client is never allowed."
        )
    return int(value)
