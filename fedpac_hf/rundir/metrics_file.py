"""A run's per-round metrics on disk: ``metrics.jsonl``, ``metrics.csv`` and the run config.

The training loop (the trainer's callback, the Flower ServerApp) appends one
JSON object per round to ``metrics.jsonl`` as the round ends and keeps
``metrics.csv`` beside it; a resumed run first cuts both back to the rounds of
its checkpoint. :func:`read_metrics` reads them back (the JSON lines, or the
CSV when those are missing) for :mod:`fedpac_hf.rundir.reporting` and
:mod:`fedpac_hf.rundir.plots`.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "METRICS_CSV",
    "METRICS_JSONL",
    "RUN_CONFIG",
    "append_metrics",
    "keep_metrics_through",
    "read_metrics",
    "read_run_config",
    "write_metrics_csv",
]

METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
RUN_CONFIG = "config.yaml"


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
