"""Running a benchmark grid: run records, the shared run queue, validation splits, lr choice.

See the package docstring (``_harness/__init__.py``) for what lives where.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
CACHE = Path(os.environ.get("FEDPAC_BENCH_CACHE", "/tmp/fedpac_bench"))

#: The per-round metrics a run record keeps (a grid may add its own).
KEPT_KEYS = (
    "round",
    "learning_rate",
    "eval_accuracy",
    "eval_perplexity",
    "eval_loss",
    "train_loss",
    "drift",
    "drift_relative",
    "update_norm",
    "bytes_up",
    "bytes_down",
    "round_time",
    "num_clients",
    "hessian_refreshes",
)
#: The per-round byte counts by part (delta and Theta up; params, direction, Theta down).
BYTE_KEYS = (
    "bytes_up_delta",
    "bytes_up_theta",
    "bytes_down_params",
    "bytes_down_direction",
    "bytes_down_theta",
)
#: A run record: the JSON of one run (settings, command, per-round ``history``).
Record = dict[str, Any]


# -------------------------------------------------------------- run records


def offline() -> None:
    """Keep the Hub and ``datasets`` offline (unless the caller's environment says otherwise)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def git_commit() -> str:
    """The short commit of the working tree (``unknown`` outside git)."""
    with contextlib.suppress(Exception):
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    return "unknown"


def machine() -> str:
    """CPU model and core count of this machine, e.g. ``"AMD EPYC 7B13, 2 cores"``."""
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores"


def train_once(
    config: str,
    overrides: list[str],
    run_dir: Path,
    keys: Sequence[str] = KEPT_KEYS,
    allow_divergence: bool = False,
) -> Record:
    """Train ``config`` with ``overrides`` through ``run_training`` (the CLI's code path).

    Parameters
    ----------
    config:
        The run's YAML config, relative to the repository root.
    overrides:
        ``fedpac-hf train`` overrides; ``--output_dir`` must name ``run_dir``.
    run_dir:
        The run's output folder (scratch: emptied first, read for
        ``metrics.jsonl``, then deleted).
    keys:
        The per-round metrics to keep.
    allow_divergence:
        A run that stops because its clients diverged (``ClientError`` /
        ``RoundError``) returns a record with the rounds it logged and the
        error under ``"error"`` instead of raising (a tuning grid's edge may
        diverge; :func:`tune_score` then scores it ``-inf``).

    Returns
    -------
    dict
        The part of a run record that every grid shares: ``config``, the
        overrides as shown (any folder under the cache, the output folder
        included, shown as ``<validation folder>``), the ``fedpac-hf train``
        ``command``, ``wall_time_s``, ``library_commit``, ``history`` (one
        dict of ``keys`` per round) and ``environment``, what the run recorded it
        ran on (its ``environment.jsonl``'s last start: CPU, torch's kernels and
        threads, package versions).
    """
    from fedpac_hf.federated.failures import ClientError, RoundError
    from fedpac_hf.run import parse_run_config, run_training
    from fedpac_hf.rundir.environment import read_starts

    model_args, training_args = parse_run_config(ROOT / config, overrides)
    # the folder is the harness's scratch: what a killed worker left there restarts
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    error = None
    try:
        run_training(model_args, training_args)
    except (ClientError, RoundError) as exc:
        if not allow_divergence:
            raise
        error = f"{type(exc).__name__}: {exc}"[:1000]
    wall = time.perf_counter() - start
    history = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        with open(metrics, encoding="utf-8") as handle:
            history = [{k: row[k] for k in keys if k in row} for row in map(json.loads, handle)]
    starts = read_starts(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    shown = [o if not o.startswith(str(CACHE)) else "<validation folder>" for o in overrides]
    return {
        "config": config,
        "overrides": shown,
        "command": "fedpac-hf train " + shlex.join([config, *shown]),
        "wall_time_s": wall,
        "library_commit": git_commit(),
        "history": history,
        **({"environment": starts[-1]} if starts else {}),
        **({"error": error} if error else {}),
    }


def show_output_dir(record: Record, shown: str) -> None:
    """Show ``shown`` as the ``--output_dir`` of a :func:`train_once` record (and its command)."""
    i = record["overrides"].index("--output_dir")
    record["overrides"][i + 1] = shown
    record["command"] = "fedpac-hf train " + shlex.join([record["config"], *record["overrides"]])


def load_results(results: Path) -> dict[str, Record]:
    """Every run record (a JSON with a ``suite``) under ``results``, by file stem."""
    out = {}
    for path in sorted(results.glob("*.json")):
        with contextlib.suppress(json.JSONDecodeError, OSError):
            record = json.loads(path.read_text())
            if isinstance(record, dict) and "suite" in record:  # skip bytes/theta tables
                out[path.stem] = record
    return out


def series(record: Record, key: str) -> np.ndarray:
    """The per-round values of ``key`` in a run record (NaN where a round lacks it)."""
    return np.array([row.get(key, np.nan) for row in record["history"]], dtype=float)


# ---------------------------------------------------------------- run queue


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(lock_dir: Path, key: str) -> bool:
    """Take the lock of ``key`` (False if another live worker holds it)."""
    lock = lock_dir / key
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        with contextlib.suppress(ValueError, OSError):
            if not _pid_alive(int(lock.read_text() or "0")):
                lock.unlink()
                return claim(lock_dir, key)
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def run_queue(
    plan: Callable[[dict[str, Record]], tuple[list[tuple[str, Any]], int]],
    run: Callable[[str, Any], Record],
    results: Path,
    deadline: float,
) -> None:
    """Worker loop shared by the benchmark grids: run the first runnable, unclaimed run.

    Parameters
    ----------
    plan:
        ``plan(done)`` -> ``(runnable, waiting)``: the runs not done yet whose
        settings are known, as ``(key, spec)`` in priority order, and how many
        runs still wait for others (a tuned rate, a chosen default). ``done``
        maps the keys of the cached JSONs to their records.
    run:
        ``run(key, spec)``: train one run and return its JSON record.
    results:
        Folder of the cached JSONs (``<key>.json``); workers share it through
        lock files under ``CACHE/locks/<results folder name>``.
    deadline:
        ``time.time()`` after which no new run is started.
    """
    import torch

    offline()
    torch.set_num_threads(1)
    results.mkdir(parents=True, exist_ok=True)
    lock_dir = CACHE / "locks" / results.name
    lock_dir.mkdir(parents=True, exist_ok=True)
    while time.time() < deadline:
        runnable, waiting = plan(load_results(results))
        if not runnable and not waiting:
            print(f"[{os.getpid()}] grid complete", flush=True)
            return
        ran = False
        for key, spec in runnable:
            if not claim(lock_dir, key):
                continue
            try:
                if (results / f"{key}.json").is_file():
                    break
                print(f"[{os.getpid()}] {time.strftime('%H:%M:%S')} start {key}", flush=True)
                record = run(key, spec)
                tmp = results / f".{key}.json.tmp"
                tmp.write_text(json.dumps(record, indent=1) + "\n")
                os.replace(tmp, results / f"{key}.json")
                print(
                    f"[{os.getpid()}] {time.strftime('%H:%M:%S')} done {key} "
                    f"in {record['wall_time_s']:.0f}s",
                    flush=True,
                )
            finally:
                (lock_dir / key).unlink(missing_ok=True)
            ran = True
            break
        if not ran:
            time.sleep(5)
    print(f"[{os.getpid()}] deadline reached", flush=True)


# --------------------------------------------------------- validation data


def validation_dataset(suite: str) -> Path:
    """A ``save_to_disk`` folder whose ``test`` split is a validation split carved from train.

    ``suite`` ``"vit"``: 20 % of MNIST-5k's training split (stratified by
    label, seed 0). ``"lm"``: 10 % of every Shakespeare speaker's training
    speeches (speakers with at least 50 speeches). The test split is never read.
    """
    from datasets import DatasetDict

    from fedpac_hf.data import load_dataset_by_name

    path = CACHE / f"{suite}_validation"
    if (path / "dataset_dict.json").is_file():
        return path
    if suite == "vit":
        train = load_dataset_by_name("mnist5k", seed=0)["train"]
        parts = train.train_test_split(test_size=0.2, seed=0, stratify_by_column="label")
        data = DatasetDict(train=parts["train"], test=parts["test"])
    else:
        from fedpac_hf.data.shakespeare import per_group_split

        train = load_dataset_by_name("shakespeare", seed=0, min_lines_per_speaker=50)["train"]
        held = per_group_split(np.asarray(train["speaker"], dtype=object), 0.1, 0)
        data = DatasetDict(
            train=train.select(np.flatnonzero(~held)), test=train.select(np.flatnonzero(held))
        )
    save_folder(data, path)
    return path


def save_folder(data: Any, path: Path) -> None:
    """``data.save_to_disk(path)`` through a temporary folder, so readers never see half of it."""
    tmp = path.parent / f"{path.name}.tmp{os.getpid()}"
    data.save_to_disk(str(tmp))
    with contextlib.suppress(OSError):
        os.replace(tmp, path)
    shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------- learning rates


def tune_score(record: Record) -> float:
    """Validation score of a tuning run: mean over its last 3 rounds (higher is better).

    ViT runs score their accuracy, the others minus their loss; a run that
    diverged scores ``-inf``.
    """
    hist = record["history"]
    if record.get("error"):
        return -math.inf
    if record["suite"] == "vit":
        values = [r.get("eval_accuracy", float("nan")) for r in hist[-3:]]
    else:
        values = [-r.get("eval_loss", float("nan")) for r in hist[-3:]]
    score = float(np.mean(values)) if values else float("nan")
    return score if math.isfinite(score) else -math.inf


def scores_at(
    lrs: Iterable[float], key_of: Callable[[float], str], done: Mapping[str, Record]
) -> dict[float, float] | None:
    """:func:`tune_score` of the tuning run at each rate (None while any of them is missing)."""
    scores = {}
    for lr in lrs:
        record = done.get(key_of(lr))
        if record is None:
            return None
        scores[lr] = tune_score(record)
    return scores


def best_of(scores: Mapping[float, float]) -> float:
    """The rate with the best score (the smallest such rate on a tie)."""
    return max(sorted(scores), key=lambda lr: scores[lr])


def edge_neighbour(scores: Mapping[float, float], ladder: Sequence[float]) -> float | None:
    """The next rate of ``ladder`` past the grid's edge when that edge wins, else None.

    ``scores`` covers a grid of consecutive ``ladder`` rates; the grid is
    extended by one point when its lowest or highest rate scores best.
    """
    points = sorted(scores)
    best = best_of(scores)
    i = ladder.index(best)
    if best == points[0] and i > 0:
        return ladder[i - 1]
    if best == points[-1] and i + 1 < len(ladder):
        return ladder[i + 1]
    return None
