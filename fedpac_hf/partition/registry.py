"""Partitioners by name, for the CLI and run configs."""

from __future__ import annotations

from typing import Any

from fedpac_hf.partition.base import Partitioner
from fedpac_hf.partition.dirichlet import DirichletPartitioner
from fedpac_hf.partition.iid import IidPartitioner
from fedpac_hf.partition.natural_id import NaturalIdPartitioner
from fedpac_hf.partition.pathological import PathologicalPartitioner
from fedpac_hf.partition.quantity_skew import QuantitySkewPartitioner

PARTITIONERS: dict[str, type[Partitioner]] = {
    cls.name: cls
    for cls in (
        IidPartitioner,
        DirichletPartitioner,
        PathologicalPartitioner,
        QuantitySkewPartitioner,
        NaturalIdPartitioner,
    )
}


def get_partitioner(name: str, **kwargs: Any) -> Partitioner:
    """Build a partitioner from its registry name and constructor arguments.

    Parameters
    ----------
    name : str
        One of ``"iid"``, ``"dirichlet"``, ``"pathological"``,
        ``"quantity_skew"``, ``"natural_id"`` (``-`` is accepted for ``_``).
    **kwargs
        Passed to the partitioner's constructor, e.g.
        ``get_partitioner("dirichlet", num_clients=100, alpha=0.1)``.

    Returns
    -------
    Partitioner
        The configured partitioner.

    Raises
    ------
    ValueError
        For an unknown name, or arguments the partitioner does not take or
        lacks.
    """
    key = name.strip().lower().replace("-", "_")
    if key not in PARTITIONERS:
        raise ValueError(f"unknown partitioner {name!r}; choose one of {sorted(PARTITIONERS)}.")
    cls = PARTITIONERS[key]
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ValueError(f"partitioner {key!r}: {error}") from None
