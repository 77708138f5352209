"""The per-round figures of a run directory, drawn from its metrics records.

Files written into the run directory by :func:`plot_metrics`:

``accuracy.png`` or ``perplexity.png``
    The evaluation metric against the round.
``loss.png``
    Training loss (the clients' mean) and evaluation loss against the round.
``drift.png``
    Relative preconditioner drift against the round (log scale), against the
    new global Theta and against the Theta the round started from, with the
    correction strength beta of every round on a second axis.
``bytes.png``
    Bytes sent up (clients to server) and down per round.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fedpac_hf.rundir.metrics_file import read_metrics

__all__ = ["finite", "plot_metrics", "quality_metric", "series"]


def finite(value: Any) -> bool:
    """Whether ``value`` is a finite number (a metric worth drawing)."""
    return isinstance(value, int | float) and math.isfinite(float(value))


def quality_metric(records: Iterable[dict[str, Any]]) -> str | None:
    """The headline evaluation metric of a run: accuracy, else f1, else perplexity, else loss."""
    keys = {key for record in records for key, value in record.items() if finite(value)}
    for key in ("eval_accuracy", "eval_f1", "eval_perplexity", "eval_loss"):
        if key in keys:
            return key
    return None


def series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, record in enumerate(records):
        value = record.get(key)
        if finite(value):
            xs.append(float(record.get("round", i + 1)))
            ys.append(float(value))
    return xs, ys


def _figure(title: str, ylabel: str, run_title: str | None = None):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.2), dpi=110)
    axes = figure.add_subplot(1, 1, 1)
    axes.set_title(f"{title}\n{run_title}" if run_title else title, fontsize=11)
    axes.set_xlabel("round")
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    return figure, axes


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    figure.savefig(tmp)
    os.replace(tmp, path)
    return path


def _lines_plot(
    records: list[dict],
    lines: Sequence[tuple[str, str, str]],
    target: Path,
    heading: str,
    ylabel: str,
    title: str | None,
    from_zero: bool = False,
) -> list[Path]:
    """Draw one line per ``(metric, label, color)`` present in ``records``; [] if none is."""
    figure, axes = _figure(heading, ylabel, title)
    drawn = False
    for key, label, color in lines:
        xs, ys = series(records, key)
        if ys:
            axes.plot(xs, ys, marker="o", markersize=3, label=label, color=color)
            drawn = True
    if not drawn:
        return []
    axes.legend()
    if from_zero:
        axes.set_ylim(bottom=0)
    return [_save(figure, target)]


def plot_metrics(
    run_dir: str | os.PathLike,
    records: Sequence[dict[str, Any]] | None = None,
    title: str | None = None,
) -> list[Path]:
    """Draw the per-round figures of a run into its directory.

    Parameters
    ----------
    run_dir : str or os.PathLike
        The run directory (figures are written there).
    records : sequence of dict, optional
        Per-round metrics; read from the directory when omitted.
    title : str, optional
        Second line of every figure title (e.g. ``"small ViT / mnist5k / fedpac_soap"``).

    Returns
    -------
    list of pathlib.Path
        The PNG files written (a figure whose metric was never logged is skipped).
    """
    path = Path(run_dir)
    records = list(records) if records is not None else read_metrics(path)
    written: list[Path] = []

    quality = quality_metric(records)
    if quality in ("eval_accuracy", "eval_f1", "eval_perplexity"):
        name = quality.removeprefix("eval_")
        figure, axes = _figure(f"{name} vs round", name, title)
        xs, ys = series(records, quality)
        axes.plot(xs, ys, marker="o", markersize=3, color="tab:blue")
        if ys:
            best = max(ys) if name != "perplexity" else min(ys)
            axes.annotate(
                f"last {ys[-1]:.4g} (best {best:.4g})",
                xy=(xs[-1], ys[-1]),
                xytext=(0.98, 0.04),
                textcoords="axes fraction",
                ha="right",
            )
        if name == "perplexity":
            axes.set_yscale("log")
        written.append(_save(figure, path / f"{name}.png"))

    loss_lines = (
        ("train_loss", "train (clients' mean)", "tab:orange"),
        ("eval_loss", "eval (global model)", "tab:blue"),
    )
    written += _lines_plot(records, loss_lines, path / "loss.png", "loss vs round", "loss", title)

    written += _drift_plot(records, path / "drift.png", title)

    byte_lines = (
        ("bytes_up_delta", "up: deltas", "tab:green"),
        ("bytes_up_theta", "up: curvature (Theta)", "tab:olive"),
        ("bytes_down_params", "down: parameters + direction", "tab:purple"),
        ("bytes_down_theta", "down: curvature (Theta)", "tab:pink"),
    )
    if not any("bytes_up_delta" in r for r in records):  # runs logged before the split
        byte_lines = (
            ("bytes_up", "up (clients to server)", "tab:green"),
            ("bytes_down", "down (server to clients)", "tab:purple"),
        )
    written += _lines_plot(
        records,
        byte_lines,
        path / "bytes.png",
        "communication per round",
        "bytes per round",
        title,
        from_zero=True,
    )
    return written


def _drift_plot(records: Sequence[dict[str, Any]], target: Path, title: str | None) -> list[Path]:
    """Relative drift (against the new and the starting global Theta), with beta beside it."""
    lines = (
        ("drift_relative", "clients vs the new global Theta", "tab:red"),
        ("drift_from_start_relative", "clients vs the Theta they started from", "tab:brown"),
    )
    figure, axes = _figure("preconditioner drift vs round", "relative drift", title)
    positive = True
    for key, label, color in lines:
        xs, ys = series(records, key)
        if ys:
            axes.plot(xs, ys, marker="o", markersize=3, label=label, color=color)
            positive = positive and all(y > 0 for y in ys)
    if not axes.lines:
        return []
    if positive:
        axes.set_yscale("log")
    xs, betas = series(records, "beta")
    if betas and any(b > 0 for b in betas):
        right = axes.twinx()
        right.plot(xs, betas, marker="s", markersize=3, color="tab:blue", label="beta (right)")
        right.set_ylabel("correction strength beta")
        right.set_ylim(0, 1)
        handles = axes.get_legend_handles_labels()
        extra = right.get_legend_handles_labels()
        axes.legend(handles[0] + extra[0], handles[1] + extra[1], loc="best")
    else:
        axes.legend()
    return [_save(figure, target)]
