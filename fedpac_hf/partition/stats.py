"""How non-IID is a partition: label-count matrix, skew score, text table, heatmap."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedpac_hf.partition.base import encode_labels, read_column

if TYPE_CHECKING:  # datasets is needed only by whoever passes a Dataset
    from datasets import Dataset


@dataclass
class PartitionStats:
    """Summary of a partition's sizes and label distributions.

    Attributes
    ----------
    client_sizes : numpy.ndarray
        Number of examples of each client, shape ``(clients,)``.
    label_counts : numpy.ndarray
        ``label_counts[i, k]`` = examples of class ``k`` held by client ``i``,
        shape ``(clients, classes)``.
    classes : numpy.ndarray
        The label value of each column of ``label_counts``.
    skew : float
        Mean total-variation distance between each client's label
        distribution and the global one (the label distribution of all the
        examples held by some client), in ``[0, 1]``: 0 for identical mixes, 1
        when no client shares a class with the rest. Empty clients are
        skipped.
    client_names : list or None
        Optional name of each client (e.g. ``NaturalIdPartitioner.client_ids``),
        shown by :meth:`table`.
    """

    client_sizes: np.ndarray
    label_counts: np.ndarray
    classes: np.ndarray
    skew: float
    client_names: list | None = None

    @property
    def num_clients(self) -> int:
        """Number of clients."""
        return int(self.label_counts.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of classes (columns of ``label_counts``)."""
        return int(self.label_counts.shape[1])

    @property
    def classes_per_client(self) -> np.ndarray:
        """Number of distinct classes each client holds."""
        return (self.label_counts > 0).sum(axis=1)

    def table(self, max_clients: int = 10) -> str:
        """A readable text summary, plus the first ``max_clients`` clients' rows.

        Parameters
        ----------
        max_clients : int
            How many per-client rows to list (0 for the summary only).

        Returns
        -------
        str
            The table.
        """
        sizes = self.client_sizes
        per_client = self.classes_per_client

        def spread(values: np.ndarray) -> str:
            if values.size == 0:
                return "-"
            return f"min {values.min()} / median {np.median(values):g} / max {values.max()}"

        lines = [
            f"{'clients':<20}{self.num_clients}",
            f"{'examples':<20}{int(sizes.sum())}",
            f"{'classes':<20}{self.num_classes}",
            f"{'client size':<20}{spread(sizes)}",
            f"{'classes per client':<20}{spread(per_client)}",
            f"{'label skew (TV)':<20}{self.skew:.3f}  (0 = IID, 1 = disjoint classes)",
        ]
        shown = min(max_clients, self.num_clients)
        if shown > 0:
            lines += ["", f"{'client':>8}{'size':>10}{'classes':>9}  top classes (share)"]
            for i in range(shown):
                counts = self.label_counts[i]
                top = np.argsort(-counts, kind="stable")[:3]
                top_text = ", ".join(
                    f"{self.classes[k]} ({counts[k] / max(sizes[i], 1):.0%})"
                    for k in top
                    if counts[k] > 0
                )
                name = f"  [{self.client_names[i]}]" if self.client_names is not None else ""
                lines.append(f"{i:>8}{sizes[i]:>10}{per_client[i]:>9}  {top_text}{name}")
            if shown < self.num_clients:
                lines.append(f"{'...':>8}  ({self.num_clients - shown} more clients)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _is_hf_dataset(obj: object) -> bool:
    """Whether ``obj`` is a ``datasets.Dataset`` (never, when datasets was not imported)."""
    module = sys.modules.get("datasets")
    return module is not None and isinstance(obj, module.Dataset)


def partition_stats(
    parts_or_indices: Sequence[np.ndarray] | Sequence[Dataset],
    labels: np.ndarray | Sequence | str = "label",
    num_classes: int | None = None,
    client_names: Sequence | None = None,
) -> PartitionStats:
    """Measure a partition: client sizes, label counts and label skew.

    Parameters
    ----------
    parts_or_indices : sequence of numpy.ndarray or of datasets.Dataset
        Either the index arrays of :meth:`Partitioner.assign` or the client
        datasets of :meth:`Partitioner.split`.
    labels : array-like or str
        With index arrays: the label of every row of the full dataset. With
        client datasets: the name of their label column (default ``"label"``).
    num_classes : int, optional
        If given, labels are taken to be integers in ``[0, num_classes)`` and
        the matrix has exactly that many columns (classes no client holds stay
        as zero columns). Otherwise the columns are the distinct labels seen.
    client_names : sequence, optional
        A name per client (e.g. ``NaturalIdPartitioner.client_ids``) for the table.

    Returns
    -------
    PartitionStats
        The statistics.
    """
    parts = list(parts_or_indices)
    if parts and _is_hf_dataset(parts[0]):
        if not isinstance(labels, str):
            raise ValueError(
                "with client datasets, labels must be the name of their label column "
                f"(got {type(labels).__name__})."
            )
        per_client = [read_column(part, labels) for part in parts]
    else:
        if isinstance(labels, str):
            raise ValueError(
                "with index arrays, labels must be the label of every row of the full dataset "
                "(e.g. read_column(dataset, 'label')), not a column name."
            )
        all_labels = np.asarray(labels)
        per_client = [all_labels[np.asarray(part, dtype=np.int64)] for part in parts]
    sizes = np.array([len(values) for values in per_client], dtype=np.int64)
    joined = np.concatenate(per_client) if per_client else np.array([], dtype=np.int64)
    if num_classes is not None:
        classes = np.arange(int(num_classes))
        codes = joined.astype(np.int64)
        if codes.size and (codes.min() < 0 or codes.max() >= num_classes):
            raise ValueError(
                f"num_classes={num_classes} but labels range over [{codes.min()}, "
                f"{codes.max()}]; pass num_classes=None to infer the classes."
            )
    else:
        classes, codes = encode_labels(joined)
    owners = np.repeat(np.arange(len(parts)), sizes)
    width = len(classes)
    label_counts = np.bincount(owners * width + codes, minlength=len(parts) * width).reshape(
        len(parts), width
    )
    return PartitionStats(
        client_sizes=sizes,
        label_counts=label_counts,
        classes=classes,
        skew=label_skew(label_counts),
        client_names=None if client_names is None else list(client_names),
    )


def label_skew(label_counts: np.ndarray) -> float:
    """Mean total-variation distance of client label distributions from the global one.

    Parameters
    ----------
    label_counts : numpy.ndarray
        ``(clients, classes)`` count matrix.

    Returns
    -------
    float
        A number in ``[0, 1]``; empty clients are ignored, 0.0 if all are empty.
    """
    counts = np.asarray(label_counts, dtype=np.float64)
    sizes = counts.sum(axis=1)
    held = sizes > 0
    if not held.any():
        return 0.0
    global_dist = counts.sum(axis=0) / counts.sum()
    client_dist = counts[held] / sizes[held, None]
    distances = 0.5 * np.abs(client_dist - global_dist).sum(axis=1)
    return float(np.clip(distances.mean(), 0.0, 1.0))


def plot_label_heatmap(
    stats: PartitionStats,
    path: str | os.PathLike,
    title: str | None = None,
    normalize: bool = False,
) -> str:
    """Draw the client x class label counts as a heatmap PNG.

    Clients run along the horizontal axis and classes along the vertical one;
    the figure widens with the number of clients so that 100 clients stay
    readable. Uses the Agg backend through ``matplotlib.figure.Figure`` (no
    pyplot state, no display needed).

    Parameters
    ----------
    stats : PartitionStats
        Output of :func:`partition_stats`.
    path : str or os.PathLike
        Where to write the PNG (parent folders are created).
    title : str, optional
        Title; the skew score is always appended.
    normalize : bool
        Colour each client's column by class share instead of raw counts.

    Returns
    -------
    str
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    matrix = stats.label_counts.T.astype(np.float64)
    if normalize:
        matrix = matrix / np.maximum(matrix.sum(axis=0, keepdims=True), 1.0)
    clients, classes = stats.num_clients, stats.num_classes
    width = float(np.clip(2.5 + 0.09 * clients, 6.0, 30.0))
    height = float(np.clip(1.8 + 0.22 * classes, 3.0, 24.0))
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(matrix, aspect="auto", interpolation="nearest", cmap="viridis")
    colorbar = figure.colorbar(image, ax=axes, fraction=0.04, pad=0.01)
    colorbar.set_label("share of client" if normalize else "examples")
    axes.set_xlabel("client")
    axes.set_ylabel("class")
    x_step = max(1, int(np.ceil(clients / 50)))
    if x_step > 1:
        x_step = 5 * int(np.ceil(x_step / 5))
    axes.set_xticks(np.arange(0, clients, x_step))
    y_step = max(1, int(np.ceil(classes / 25)))
    y_ticks = np.arange(0, classes, y_step)
    axes.set_yticks(y_ticks)
    axes.set_yticklabels([str(stats.classes[k]) for k in y_ticks])
    axes.tick_params(axis="x", labelsize=7 if clients > 40 else 9)
    heading = title or f"Label distribution of {clients} clients"
    axes.set_title(f"{heading} (skew = {stats.skew:.3f})")
    figure.tight_layout()
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    figure.savefig(path, format="png")
    return path
