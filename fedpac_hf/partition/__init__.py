"""Non-IID partitioning of a :class:`datasets.Dataset` across federated clients.

Every partitioner returns per-client row indices (``assign``) or index-backed
client datasets (``split``); :func:`partition_stats` and
:func:`plot_label_heatmap` show how skewed the result is.

Examples
--------
>>> from fedpac_hf.partition import get_partitioner, partition_stats, read_column
>>> partitioner = get_partitioner("dirichlet", num_clients=100, alpha=0.1)  # doctest: +SKIP
>>> parts = partitioner.assign(dataset)  # doctest: +SKIP
>>> print(partition_stats(parts, read_column(dataset, "label")))  # doctest: +SKIP
"""

from fedpac_hf.partition.base import Partitioner, read_column
from fedpac_hf.partition.dirichlet import DirichletPartitioner
from fedpac_hf.partition.iid import IidPartitioner
from fedpac_hf.partition.natural_id import NaturalIdPartitioner
from fedpac_hf.partition.pathological import PathologicalPartitioner
from fedpac_hf.partition.quantity_skew import QuantitySkewPartitioner
from fedpac_hf.partition.registry import PARTITIONERS, get_partitioner
from fedpac_hf.partition.stats import (
    PartitionStats,
    label_skew,
    partition_stats,
    plot_label_heatmap,
)

__all__ = [
    "PARTITIONERS",
    "DirichletPartitioner",
    "IidPartitioner",
    "NaturalIdPartitioner",
    "PartitionStats",
    "Partitioner",
    "PathologicalPartitioner",
    "QuantitySkewPartitioner",
    "get_partitioner",
    "label_skew",
    "partition_stats",
    "plot_label_heatmap",
    "read_column",
]
