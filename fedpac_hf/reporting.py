"""The metrics files and the summary of a run directory.

A run of ``fedpac-hf train`` (or :func:`fedpac_hf.run.run_training`) writes
one JSON object per round to ``metrics.jsonl`` while it trains (and keeps
``metrics.csv`` beside it). Everything here reads that file (or
``metrics.csv`` when the JSON lines are missing), so ``fedpac-hf report
RUN_DIR`` can redraw the figures (:mod:`fedpac_hf.plots`) and ``summary.md``
of a finished run or of one that is still going, and the training loop can
call :func:`write_report` at its end.

``summary.md`` holds the run's settings, final and best metrics, totals and a
per-round table.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedpac_hf.plots import finite, plot_metrics, quality_metric, series

__all__ = [
    "METRICS_CSV",
    "METRICS_JSONL",
    "SUMMARY_MD",
    "algorithm_table",
    "append_metrics",
    "keep_metrics_through",
    "plot_metrics",
    "quality_metric",
    "read_metrics",
    "read_run_config",
    "summary_table",
    "write_metrics_csv",
    "write_report",
    "write_summary",
]

METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
SUMMARY_MD = "summary.md"
RUN_CONFIG = "config.yaml"
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
    "max_grad_norm",
    "lora_r",
    "seed",
)
PARTITION_TABLE = "partition.txt"

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
    ("bytes_up_delta", "up: deltas", "{}"),
    ("bytes_up_theta", "up: Theta", "{}"),
    ("round_time", "time (s)", "{:.1f}"),
)


def append_metrics(run_dir: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one round's metrics to ``metrics.jsonl`` and rewrite ``metrics.csv``.

    Called once per round by the training loop so that both files are
    current while a run is going.

    Parameters
    ----------
    run_dir : str or os.PathLike
        The run directory.
    record : dict
        The round's metrics (numbers; ``round`` included).
    """
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    clean = {key: _jsonable(value) for key, value in record.items()}
    with open(path / METRICS_JSONL, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(clean, sort_keys=False) + "\n")
        handle.flush()
    write_metrics_csv(path, read_metrics(path))


def keep_metrics_through(run_dir: str | os.PathLike, last_round: int) -> list[dict[str, Any]]:
    """Drop the rows of rounds after ``last_round`` from ``metrics.jsonl`` and ``metrics.csv``.

    A resumed run calls it with its checkpoint's round, so rounds that a
    killed run logged after its last checkpoint are not kept twice. Both
    files are rewritten atomically (an absent ``metrics.jsonl`` becomes empty).

    Parameters
    ----------
    run_dir : str or os.PathLike
        The run directory.
    last_round : int
        The last round whose rows are kept.

    Returns
    -------
    list of dict
        The rows kept.
    """
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    jsonl = path / METRICS_JSONL
    kept = []
    if jsonl.is_file():
        kept = [r for r in read_metrics(path) if r.get("round", 0) <= last_round]
    tmp = jsonl.with_name(jsonl.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, jsonl)
    write_metrics_csv(path, kept)
    return kept


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_metrics_csv(run_dir: str | os.PathLike, records: Sequence[dict[str, Any]]) -> Path:
    """Write ``records`` as ``metrics.csv``: one row per round, the union of keys as columns.

    Rounds without evaluation leave the evaluation cells empty. Written to a
    temporary file and renamed, so a reader never sees half a file.

    Parameters
    ----------
    run_dir : str or os.PathLike
        The run directory.
    records : sequence of dict
        Per-round metrics, in round order.

    Returns
    -------
    pathlib.Path
        The CSV file.
    """
    columns: list[str] = []
    for record in records:
        columns.extend(key for key in record if key not in columns)
    target = Path(run_dir) / METRICS_CSV
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        for record in records:
            writer.writerow(record)
    os.replace(tmp, target)
    return target


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-round metrics of a run, from ``metrics.jsonl`` (else ``metrics.csv``).

    A last line cut short by a run that is still writing is skipped.

    Parameters
    ----------
    run_dir : str or os.PathLike
        The run directory.

    Returns
    -------
    list of dict
        One dict per round, in the order written.

    Raises
    ------
    FileNotFoundError
        If the directory holds neither file.
    """
    path = Path(run_dir)
    jsonl, csv_path = path / METRICS_JSONL, path / METRICS_CSV
    if jsonl.is_file():
        records = []
        for line in jsonl.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records
    if csv_path.is_file():
        with open(csv_path, newline="", encoding="utf-8") as handle:
            return [
                {key: _number(value) for key, value in row.items() if value != ""}
                for row in csv.DictReader(handle)
            ]
    raise FileNotFoundError(
        f"{path} holds no {METRICS_JSONL} or {METRICS_CSV}; give the output_dir of a "
        "`fedpac-hf train` run (the files appear after its first round)."
    )


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's ``config.yaml`` (settings as given to ``fedpac-hf train``), or ``{}``."""
    import yaml

    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        return {}
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    return loaded if isinstance(loaded, dict) else {}


def _number(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


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

    The settings come from ``config.yaml`` and the partition statistics
    from ``partition.txt`` when the run wrote them.

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
        for key in _SUMMARY_SETTINGS:
            if key in config:
                value = config[key]
                lines.append(
                    f"| {key} | {'(tiny model from config)' if value is None else value} |"
                )
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
    ``python -c "from fedpac_hf.reporting import algorithm_table; print(algorithm_table())"``.

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
