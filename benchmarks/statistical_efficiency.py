"""Statistical efficiency of FedPAC vs its baselines at CPU scale, and what it costs.

Runs a grid of federated trainings through :func:`fedpac_hf.run.run_training`
(the code path of ``fedpac-hf train``) and caches one JSON per run under
``benchmarks/results/`` (the run's settings, the command that reproduces it
and its per-round metrics). A second step builds ``benchmarks/RESULTS.md``
(keeping the hand-written analysis between its ``<!-- analysis -->`` markers
near the top) and the accuracy/perplexity plots from whatever JSONs exist, so a
partial grid still yields a report.

Protocol
--------
* ViT: ``configs/vit_mnist5k.yaml`` (small ViT from scratch on MNIST-5k,
  20 clients, 5 per round, batch 32), ``--rounds`` rounds of ``--local-steps``
  local steps, cosine decay, clipping at 10.
* Learning rates are chosen per method on a *validation* split carved from the
  training rows (20 % of MNIST-5k's training split, stratified, seed 0; for
  Shakespeare 10 % of every speaker's training speeches); the clients then
  train on the remaining 80 % / 90 %. Tuning uses Dirichlet alpha = 0.1 and
  seed 0; the chosen rate is used for every split and seed. Final runs train
  on the full training split and are scored on the test split.
* Causal LM: ``configs/causal_lm_shakespeare.yaml`` (small Llama + LoRA,
  16 speakers = 16 clients, 4 per round), perplexity.

Usage (from the repository root)::

    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1
    # two workers share the queue through lock files; rerunning skips cached runs
    python benchmarks/statistical_efficiency.py run &
    python benchmarks/statistical_efficiency.py run &
    wait
    python benchmarks/statistical_efficiency.py report

``--quick`` shrinks everything to a smoke test (results go to
``benchmarks/results_quick/``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
CACHE = Path(os.environ.get("FEDPAC_BENCH_CACHE", "/tmp/fedpac_bench"))

VIT_CONFIG = "configs/vit_mnist5k.yaml"
LM_CONFIG = "configs/causal_lm_shakespeare.yaml"

VIT_METHODS = [
    "fedavg",
    "fedavg_adamw",
    "fedcm",
    "fedadamw",
    "local_soap",
    "local_muon",
    "local_sophia",
    "fedpac_soap",
    "fedpac_muon",
    "fedpac_sophia",
    "fedpac_align_soap",
    "fedpac_correct_soap",
    "fedpac_align_sophia",
    "fedpac_correct_sophia",
]
ABLATIONS = [
    "fedpac_align_soap",
    "fedpac_correct_soap",
    "fedpac_align_sophia",
    "fedpac_correct_sophia",
]
LM_METHODS = ["fedavg_adamw", "fedadamw", "local_soap", "fedpac_soap"]
PATHOLOGICAL_METHODS = [
    "fedavg",
    "fedavg_adamw",
    "fedadamw",
    "local_soap",
    "fedpac_soap",
    "local_muon",
    "fedpac_muon",
]
K50_METHODS = ["fedavg_adamw", "local_soap", "fedpac_soap"]
# Methods that are not FedPAC (or one of its ablations): the baselines.
BASELINES = [
    "fedavg",
    "fedavg_adamw",
    "fedcm",
    "fedadamw",
    "local_soap",
    "local_muon",
    "local_sophia",
]

SGD_GRID = (0.03, 0.1, 0.3)
ADAPTIVE_GRID = (1e-3, 3e-3, 1e-2)
LM_ADAMW_GRID = (3e-3, 1e-2, 3e-2)
LM_SOAP_GRID = (1e-2, 3e-2, 1e-1)

# split name -> overrides of the ViT config
VIT_SPLITS: dict[str, list[str]] = {
    "dir0.1": ["--partitioner", "dirichlet", "--dirichlet_alpha", "0.1"],
    "dir0.5": ["--partitioner", "dirichlet", "--dirichlet_alpha", "0.5"],
    "path2": ["--partitioner", "pathological", "--classes_per_client", "2"],
    # the paper's many local steps (K = 50) at alpha = 0.1, same rates as K = 20
    "dir0.1-K50": ["--partitioner", "dirichlet", "--dirichlet_alpha", "0.1"],
}
TUNE_SPLIT = "dir0.1"
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


@dataclass(frozen=True)
class Job:
    """One federated run of the grid."""

    suite: str  # "vit" or "lm"
    split: str  # "dir0.1", "dir0.5", "path2", "speaker"
    stage: str  # "tune" (validation split) or "final" (test split)
    method: str
    seed: int
    lr: float | None = None  # None: the method's tuned rate (known once tuning is done)

    def key(self, lr: float) -> str:
        return f"{self.suite}_{self.split}_{self.stage}_{self.method}_lr{lr:g}_s{self.seed}"


@dataclass
class Settings:
    """Size of the grid (see ``--help``)."""

    rounds: int
    local_steps: int
    lm_rounds: int
    seeds: int
    mild_seeds: int
    k50_seeds: int
    ablation_seeds: int
    pathological_seeds: int
    lm_seeds: int
    results: Path
    quick: bool


# ----------------------------------------------------------------- the grid


# One extra grid point past the edge, added after the first pass of the 3-point grid
# chose an edge rate for these methods (validation scores in RESULTS.md).
VIT_EDGE_EXTENSIONS: dict[str, tuple[float, ...]] = {
    "fedavg": (0.01,),
    "fedcm": (0.01,),
    "local_soap": (0.03,),
    "local_muon": (0.03,),
    "fedpac_muon": (0.03,),
    "local_sophia": (3e-4,),
    "fedpac_sophia": (3e-4,),
}


def vit_grid(method: str, quick: bool) -> tuple[float, ...]:
    """The learning-rate grid of a ViT method (SGD methods get their own), ascending."""
    grid = SGD_GRID if method in ("fedavg", "fedcm") else ADAPTIVE_GRID
    if quick:
        return grid[1:2]
    return tuple(sorted(grid + VIT_EDGE_EXTENSIONS.get(method, ())))


# Same rule for the LoRA runs: both AdamW methods chose the top rate of the first pass.
LM_EDGE_EXTENSIONS: dict[str, tuple[float, ...]] = {
    "fedavg_adamw": (0.1,),
    "fedadamw": (0.1,),
}


def lm_grid(method: str, quick: bool) -> tuple[float, ...]:
    """The learning-rate grid of a LoRA causal-LM method, ascending."""
    grid = LM_SOAP_GRID if "soap" in method else LM_ADAMW_GRID
    if quick:
        return grid[1:2]
    return tuple(sorted(grid + LM_EDGE_EXTENSIONS.get(method, ())))


def all_jobs(s: Settings) -> list[Job]:
    """Every job of the grid, in priority order (a worker takes the first ready one)."""
    jobs: list[Job] = []
    # 0. the edge extensions of the grid (added after the first pass)
    if not s.quick:
        for m, extra in VIT_EDGE_EXTENSIONS.items():
            jobs += [Job("vit", TUNE_SPLIT, "tune", m, 0, lr) for lr in extra]
        for m, extra in LM_EDGE_EXTENSIONS.items():
            jobs += [Job("lm", "speaker", "tune", m, 0, lr) for lr in extra]
    # 1. ViT tuning on the validation split, alpha = 0.1, seed 0 (lr-major: methods spread)
    for i in range(4):
        for m in VIT_METHODS:
            grid = vit_grid(m, s.quick)
            if i < len(grid) and m not in ABLATIONS:  # ablations reuse fedpac_X's rate
                jobs.append(Job("vit", TUNE_SPLIT, "tune", m, 0, grid[i]))
    # 2. ViT final runs at alpha = 0.1 (seed-major, so a partial grid covers every method)
    for seed in range(s.seeds):
        jobs += [Job("vit", "dir0.1", "final", m, seed) for m in VIT_METHODS]
    # 3. LoRA causal LM on Shakespeare: tuning, then final runs
    for m in LM_METHODS:
        jobs += [Job("lm", "speaker", "tune", m, 0, lr) for lr in lm_grid(m, s.quick)]
    for seed in range(s.lm_seeds):
        jobs += [Job("lm", "speaker", "final", m, seed) for m in LM_METHODS]
    # 4. high-drift pathological split (2 classes per client)
    for seed in range(s.pathological_seeds):
        jobs += [Job("vit", "path2", "final", m, seed) for m in PATHOLOGICAL_METHODS]
    # 5. milder alpha = 0.5
    for seed in range(s.mild_seeds):
        for m in VIT_METHODS:
            if m in ABLATIONS and seed >= s.ablation_seeds:
                continue
            jobs.append(Job("vit", "dir0.5", "final", m, seed))
    # 6. K = 50 local steps at alpha = 0.1: does the gap grow with K?
    for seed in range(s.k50_seeds):
        jobs += [Job("vit", "dir0.1-K50", "final", m, seed) for m in K50_METHODS]
    return jobs


# ------------------------------------------------------------ validation data


def validation_dataset(suite: str) -> Path:
    """A ``save_to_disk`` folder whose ``test`` split is a validation split carved from train.

    MNIST-5k: 20 % of the training split (stratified by label, seed 0).
    Shakespeare: 10 % of every speaker's training speeches (speakers with at
    least 50 speeches, as in the config). The test split is never read.
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
    tmp = CACHE / f"{suite}_validation.tmp{os.getpid()}"
    data.save_to_disk(str(tmp))
    with contextlib.suppress(OSError):
        os.replace(tmp, path)
    shutil.rmtree(tmp, ignore_errors=True)
    return path


# ------------------------------------------------------------------ running


def job_overrides(job: Job, lr: float, s: Settings, run_dir: Path) -> list[str]:
    """The ``fedpac-hf train`` overrides of one job (the config file comes first)."""
    over = ["--algorithm", job.method, "--learning_rate", f"{lr:g}", "--seed", str(job.seed)]
    if job.suite == "vit":
        over += VIT_SPLITS[job.split]
        steps = 50 if job.split.endswith("-K50") else s.local_steps
        over += ["--num_rounds", str(s.rounds), "--local_steps", str(steps)]
    else:
        over += ["--num_rounds", str(s.lm_rounds), "--local_steps", str(s.local_steps)]
    if job.stage == "tune":
        over += ["--dataset", str(validation_dataset(job.suite))]
    over += ["--num_threads", "1", "--output_dir", str(run_dir)]
    return over


def config_of(job: Job) -> str:
    return VIT_CONFIG if job.suite == "vit" else LM_CONFIG


def load_results(results: Path) -> dict[str, dict[str, Any]]:
    """Every cached run JSON under ``results``, by key."""
    out = {}
    for path in sorted(results.glob("*.json")):
        with contextlib.suppress(json.JSONDecodeError, OSError):
            record = json.loads(path.read_text())
            if isinstance(record, dict) and "suite" in record:  # skip theta_bytes.json
                out[path.stem] = record
    return out


def tune_score(record: dict[str, Any]) -> float:
    """Validation score of a tuning run: mean over its last 3 rounds (higher is better)."""
    hist = record["history"]
    if record["suite"] == "vit":
        values = [r.get("eval_accuracy", float("nan")) for r in hist[-3:]]
    else:
        values = [-r.get("eval_loss", float("nan")) for r in hist[-3:]]
    score = float(np.mean(values)) if values else float("nan")
    return score if math.isfinite(score) else -math.inf


def best_lr(suite: str, method: str, done: dict[str, dict[str, Any]], s: Settings) -> float | None:
    """The tuned learning rate of ``method`` (None while its tuning runs are missing).

    The ablations of FedPAC-X run at FedPAC-X's tuned rate, so that they
    differ from it in one knob only.
    """
    if method in ABLATIONS:
        method = "fedpac_" + method.rsplit("_", 1)[1]
    split = TUNE_SPLIT if suite == "vit" else "speaker"
    grid = vit_grid(method, s.quick) if suite == "vit" else lm_grid(method, s.quick)
    scores = {}
    for lr in grid:
        record = done.get(Job(suite, split, "tune", method, 0).key(lr))
        if record is None:
            return None
        scores[lr] = tune_score(record)
    return max(grid, key=lambda lr: scores[lr])


def resolve(job: Job, done: dict[str, dict[str, Any]], s: Settings) -> float | None:
    return job.lr if job.lr is not None else best_lr(job.suite, job.method, done, s)


def git_commit() -> str:
    with contextlib.suppress(Exception):
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    return "unknown"


def train_once(
    config: str, overrides: list[str], run_dir: Path, keys: Sequence[str] = KEPT_KEYS
) -> dict[str, Any]:
    """Train ``config`` with ``overrides`` through ``run_training`` (the CLI's code path).

    Returns the part of a run record that any grid shares: the overrides as
    shown (cache folders replaced by ``<validation folder>``), the
    ``fedpac-hf train`` command, the wall time, the library commit and the
    per-round metrics restricted to ``keys``. ``run_dir`` is deleted afterwards.
    """
    from fedpac_hf.run import parse_run_config, run_training

    model_args, training_args = parse_run_config(ROOT / config, overrides)
    start = time.perf_counter()
    run_training(model_args, training_args)
    wall = time.perf_counter() - start
    history = []
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            history.append({k: row[k] for k in keys if k in row})
    shutil.rmtree(run_dir, ignore_errors=True)
    shown = [o if not o.startswith(str(CACHE)) else "<validation folder>" for o in overrides]
    return {
        "config": config,
        "overrides": shown,
        "command": "fedpac-hf train " + shlex.join([config, *shown]),
        "wall_time_s": wall,
        "library_commit": git_commit(),
        "history": history,
    }


def run_job(job: Job, lr: float, s: Settings) -> dict[str, Any]:
    """Train one job through ``run_training`` and return its JSON record."""
    run_dir = CACHE / "runs" / job.key(lr)
    overrides = job_overrides(job, lr, s, run_dir)
    record = train_once(config_of(job), overrides, run_dir)
    return {
        **asdict(job),
        "lr": lr,
        "rounds": s.lm_rounds if job.suite == "lm" else s.rounds,
        "local_steps": s.local_steps,
        **record,
    }


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
    plan: Callable[[dict[str, dict[str, Any]]], tuple[list[tuple[str, Any]], int]],
    run: Callable[[str, Any], dict[str, Any]],
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


def work(s: Settings, deadline: float, only: Sequence[str]) -> None:
    """Worker loop: take the first ready, unclaimed job until none is left or time is up."""
    jobs = [j for j in all_jobs(s) if not only or j.suite in only or j.split in only]

    def plan(done: dict[str, dict[str, Any]]) -> tuple[list[tuple[str, Any]], int]:
        runnable, waiting = [], 0
        for job in jobs:
            lr = resolve(job, done, s)
            if lr is None:
                waiting += 1
            elif job.key(lr) not in done:
                runnable.append((job.key(lr), (job, lr)))
        return runnable, waiting

    run_queue(plan, lambda key, spec: run_job(*spec, s), s.results, deadline)


# ------------------------------------------------------------------ report


def _group(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict]]:
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["suite"], r["split"], r["stage"]), []).append(r)
    return groups


def _curve(record: dict[str, Any], key: str) -> np.ndarray:
    return np.array([row.get(key, np.nan) for row in record["history"]], dtype=float)


def _mean_curve(records: list[dict[str, Any]], key: str) -> np.ndarray:
    n = min(len(r["history"]) for r in records)
    return np.nanmean(np.stack([_curve(r, key)[:n] for r in records]), axis=0)


def rounds_to(curve: np.ndarray, target: float, higher_is_better: bool = True) -> int | None:
    """First round (1-based) at which ``curve`` reaches ``target``; None if never."""
    hits = np.flatnonzero(curve >= target - 1e-12 if higher_is_better else curve <= target + 1e-12)
    return int(hits[0]) + 1 if len(hits) else None


@dataclass
class MethodSummary:
    """Per-method aggregates over seeds of one split."""

    method: str
    lr: float
    seeds: int
    final_mean: float
    final_std: float
    worst_last_mean: float
    drift_rel: float
    round_time: float
    refreshes: float
    bytes_up: float
    bytes_down: float
    curve: np.ndarray


def summarise(records: list[dict[str, Any]], metric: str, last: int) -> dict[str, MethodSummary]:
    """Aggregate the final runs of one split by method."""
    by_method: dict[str, list[dict]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    higher = metric == "eval_accuracy"
    out = {}
    for method, runs in by_method.items():
        finals = np.array([_curve(r, metric)[-1] for r in runs])
        worst = [(np.nanmin if higher else np.nanmax)(_curve(r, metric)[-last:]) for r in runs]
        drift = [np.nanmean(_curve(r, "drift_relative")) for r in runs]
        out[method] = MethodSummary(
            method=method,
            lr=runs[0]["lr"],
            seeds=len(runs),
            final_mean=float(np.mean(finals)),
            final_std=float(np.std(finals, ddof=1)) if len(runs) > 1 else float("nan"),
            worst_last_mean=float(np.mean(worst)),
            drift_rel=float(np.nanmean(drift)) if np.isfinite(drift).any() else float("nan"),
            round_time=float(np.median(np.concatenate([_curve(r, "round_time") for r in runs]))),
            refreshes=float(
                np.nanmean(np.concatenate([_curve(r, "hessian_refreshes") for r in runs]))
            ),
            bytes_up=float(np.median(np.concatenate([_curve(r, "bytes_up") for r in runs]))),
            bytes_down=float(
                np.median(np.concatenate([_curve(r, "bytes_down")[1:] for r in runs]))
            ),
            curve=_mean_curve(runs, metric),
        )
    return out


def _order(methods: Iterable[str], reference: Sequence[str]) -> list[str]:
    return sorted(methods, key=lambda m: reference.index(m) if m in reference else 99)


def _style(method: str) -> dict[str, Any]:
    if method.startswith("fedpac_align") or method.startswith("fedpac_correct"):
        return {"linestyle": "-.", "linewidth": 1.2}
    if method.startswith("fedpac"):
        return {"linestyle": "-", "linewidth": 2.2}
    if method.startswith("local"):
        return {"linestyle": "--", "linewidth": 1.4}
    return {"linestyle": ":", "linewidth": 1.6}


def plot(summaries: dict[str, MethodSummary], metric: str, title: str, path: Path) -> None:
    """Mean curve over seeds, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {
        "fedavg": "#7f7f7f",
        "fedavg_adamw": "#1f77b4",
        "fedcm": "#17becf",
        "fedadamw": "#9467bd",
        "local_soap": "#d62728",
        "local_muon": "#2ca02c",
        "local_sophia": "#ff7f0e",
        "fedpac_soap": "#d62728",
        "fedpac_muon": "#2ca02c",
        "fedpac_sophia": "#ff7f0e",
        "fedpac_align_soap": "#e377c2",
        "fedpac_correct_soap": "#8c564b",
        "fedpac_align_sophia": "#bcbd22",
        "fedpac_correct_sophia": "#c49c94",
    }
    fig, ax = plt.subplots(figsize=(8, 5))
    for m in _order(summaries, VIT_METHODS):
        s = summaries[m]
        y = s.curve * (100 if metric == "eval_accuracy" else 1)
        ax.plot(
            np.arange(1, len(y) + 1),
            y,
            label=f"{m} (lr {s.lr:g}, n={s.seeds})",
            color=colors.get(m),
            **_style(m),
        )
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    if metric == "eval_accuracy":
        ax.set_ylabel("test accuracy (%)")
    else:
        ax.set_ylabel("test perplexity")
        ax.set_yscale("log")
    finish_figure(fig, ax, title, path)


def finish_figure(fig: Any, ax: Any, title: str, path: Path) -> None:
    """Title, grid and legend of a benchmark figure, then save and close it."""
    import matplotlib.pyplot as plt

    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x: float, scale: float = 100.0, digits: int = 1) -> str:
    return "n/a" if not np.isfinite(x) else f"{x * scale:.{digits}f}"


def _mib(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{x / 2**20:.2f}"


def _human(x: float) -> str:
    """Bytes as B / KiB / MiB / GiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:.0f} B"


ANALYSIS_START, ANALYSIS_END = "<!-- analysis -->", "<!-- /analysis -->"


def _analysis(path: Path) -> str:
    """The hand-written analysis of an existing report (kept when the tables are rebuilt)."""
    if not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8")
    if ANALYSIS_START not in text or ANALYSIS_END not in text:
        return ""
    return text.split(ANALYSIS_START, 1)[1].split(ANALYSIS_END, 1)[0].strip()


def _section_markers(name: str) -> tuple[str, str]:
    return f"<!-- section:{name} -->", f"<!-- /section:{name} -->"


def write_section(path: Path, name: str, text: str) -> None:
    """Put ``text`` into the ``name`` section of the report at ``path`` (replaced if there,
    appended otherwise); :func:`report` keeps such sections when it rebuilds the rest."""
    start, end = _section_markers(name)
    block = f"{start}\n{text.strip()}\n{end}"
    current = path.read_text(encoding="utf-8") if path.is_file() else ""
    if start in current and end in current:
        before, rest = current.split(start, 1)
        current = before + block + rest.split(end, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(current, encoding="utf-8")


def _kept_sections(path: Path) -> list[str]:
    """The sections other benchmark scripts wrote into the report (see :func:`write_section`)."""
    if not path.is_file():
        return []
    text, blocks = path.read_text(encoding="utf-8"), []
    for part in text.split("<!-- section:")[1:]:
        name = part.split(" -->", 1)[0]
        start, end = _section_markers(name)
        if end in part:
            blocks.append(start + part.split(end, 1)[0].split(" -->", 1)[1] + end)
    return blocks


def report(s: Settings, out: Path) -> None:
    """Build RESULTS.md and the PNGs from the cached JSONs."""
    done = load_results(s.results)
    # final runs count only at the method's chosen rate (a grid extension can change it)
    groups = _group(
        r
        for r in done.values()
        if r["stage"] == "tune" or r["lr"] == best_lr(r["suite"], r["method"], done, s)
    )
    lines: list[str] = []
    add = lines.append
    run_cmd = "python benchmarks/statistical_efficiency.py" + (" --quick" if s.quick else "")
    add("# Does FedPAC beat the baselines here, and at what cost?\n")
    add(
        "Every number below comes from the JSON files under "
        f"`benchmarks/{s.results.name}/` (one per run: settings, the exact `fedpac-hf train` "
        "command that reproduces it, per-round metrics), made by\n"
    )
    add("```")
    add("export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1")
    add(f"{run_cmd} run &   # two workers share the queue (2-core machine)")
    add(f"{run_cmd} run &")
    add("wait")
    add(f"{run_cmd} report")
    add("```\n")
    add(
        f"Setting: ViT runs `{VIT_CONFIG}` (small ViT from scratch, 20 clients, 5 sampled per "
        f"round = 25 %, batch 32) with {s.rounds} rounds x K = {s.local_steps} local steps, "
        f"cosine decay, clipping at 10; LoRA runs `{LM_CONFIG}` (small Llama, LoRA r = 8 on "
        f"q/v + trained embeddings/head, 16 speakers = 16 clients, 4 per round) with "
        f"{s.lm_rounds} rounds x K = {s.local_steps}. CPU, one torch thread per run, two runs "
        "at a time on a shared 2-core machine (wall times are therefore noisy, +-30 %).\n"
    )
    notes = _analysis(out)
    if notes and not s.quick:
        add(f"{ANALYSIS_START}\n{notes}\n{ANALYSIS_END}\n")
    _tuning_section(lines, groups, s)
    metric_vit = "eval_accuracy"
    last = 5
    split_titles = {
        "dir0.1": "Dirichlet alpha = 0.1 (strong label skew)",
        "dir0.5": "Dirichlet alpha = 0.5 (milder skew)",
        "path2": "pathological, 2 classes per client (high drift)",
        "dir0.1-K50": "Dirichlet alpha = 0.1 with K = 50 local steps",
    }
    headline: dict[str, dict[str, MethodSummary]] = {}
    for split in ("dir0.1", "dir0.1-K50", "path2", "dir0.5"):
        records = groups.get(("vit", split, "final"), [])
        if not records:
            continue
        summ = summarise(records, metric_vit, last)
        headline[split] = summ
        png = f"accuracy_{split.replace('.', '')}.png"
        plot(
            summ,
            metric_vit,
            f"small ViT / MNIST-5k / {split_titles[split]}: mean over seeds",
            out.parent / png,
        )
        add(f"## ViT on MNIST-5k, {split_titles[split]}\n")
        add(f"![accuracy vs round]({png})\n")
        _vit_table(lines, summ, last)
        if split == "dir0.1":
            _goals(lines, summ)
    lm = groups.get(("lm", "speaker", "final"), [])
    if lm:
        summ = summarise(lm, "eval_perplexity", 3)
        plot(
            summ,
            "eval_perplexity",
            "small Llama + LoRA / Shakespeare per-speaker split: mean over seeds",
            out.parent / "perplexity_shakespeare.png",
        )
        add("## LoRA causal LM on Shakespeare (natural per-speaker split)\n")
        add("![perplexity vs round](perplexity_shakespeare.png)\n")
        _lm_table(lines, summ)
    _cost_section(lines, groups)
    lines += ["", *_kept_sections(out)]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}")


def _tuning_section(lines: list[str], groups: dict, s: Settings) -> None:
    add = lines.append
    add("## Learning-rate selection (validation split, never the test set)\n")
    add(
        "Grid per method (factor ~3 apart): SGD methods (fedavg, fedcm) "
        f"{list(SGD_GRID)}; every adaptive/second-order ViT method {list(ADAPTIVE_GRID)}; "
        f"LoRA: AdamW methods {list(LM_ADAMW_GRID)}, SOAP methods {list(LM_SOAP_GRID)}. "
        "Tuning runs: seed 0, ViT at Dirichlet alpha = 0.1 on 80 % of MNIST-5k's training "
        "split scored on the held-out 20 % (stratified); LoRA on 90 % of every speaker's "
        "training speeches scored on the other 10 %. Score: mean validation accuracy "
        "(ViT) / mean validation loss (LoRA) over the last 3 rounds. The chosen rate is "
        "used for all splits and seeds (a cut to fit the CPU budget: no separate tuning at "
        "alpha = 0.5 or on the pathological split); the two ablations run at fedpac_soap's "
        "rate so that each differs from it in one knob only. FedPAC's base step is (1 - beta) lr, so "
        "its nominal rate is not comparable to the others'; each method is compared at its "
        "own best rate. A `*` marks a choice at the edge of the grid.\n"
    )
    for suite, split, label in (("vit", TUNE_SPLIT, "val acc %"), ("lm", "speaker", "val loss")):
        records = groups.get((suite, split, "tune"), [])
        if not records:
            continue
        by_m: dict[str, dict[float, float]] = {}
        for r in records:
            by_m.setdefault(r["method"], {})[r["lr"]] = tune_score(r)
        add(f"{'ViT / MNIST-5k' if suite == 'vit' else 'LoRA / Shakespeare'} ({label}):\n")
        add("| method | " + " | ".join(["lr: score"] * 4) + " | chosen lr |")
        add("|---|---|---|---|---|---|")
        for m in _order(by_m, VIT_METHODS if suite == "vit" else LM_METHODS):
            grid = vit_grid(m, s.quick) if suite == "vit" else lm_grid(m, s.quick)
            cells = []
            for lr in grid:
                v = by_m[m].get(lr)
                if v is None:
                    cells.append(f"{lr:g}: -")
                elif suite == "vit":
                    cells.append(f"{lr:g}: {_fmt(v)}")
                else:
                    cells.append(f"{lr:g}: {-v:.3f}" if np.isfinite(v) else f"{lr:g}: diverged")
            cells += [""] * (4 - len(cells))
            chosen = best_lr(suite, m, load_results(s.results), s)
            edge = chosen is not None and len(grid) > 1 and chosen in (grid[0], grid[-1])
            chosen_s = "-" if chosen is None else f"{chosen:g}{'*' if edge else ''}"
            add(f"| {m} | " + " | ".join(cells) + f" | {chosen_s} |")
        add("")


def _target(summ: dict[str, MethodSummary], higher: bool = True) -> tuple[str, float] | None:
    base = [m for m in summ if m in BASELINES]
    if not base:
        return None
    best = (max if higher else min)(base, key=lambda m: summ[m].final_mean)
    return best, summ[best].final_mean


def _vit_table(lines: list[str], summ: dict[str, MethodSummary], last: int) -> None:
    add = lines.append
    target = _target(summ)
    tname, tval = target if target else ("-", float("nan"))
    add(
        f"Best baseline by final mean test accuracy: **{tname}** ({_fmt(tval)} %). "
        "Rounds to target: first round at which the seed-mean curve reaches that value. "
        f"Worst: lowest test accuracy over the last {last} rounds, averaged over seeds "
        "(stability). Drift: relative preconditioner drift "
        "sum||Theta_i - Theta||^2 / sum||Theta||^2, averaged over rounds and seeds "
        "(n/a: no curvature). Gain: final accuracy minus that of the same optimizer's naive "
        "`local_*` variant (FedPAC rows) or minus the best baseline.\n"
    )
    add(
        "| method | lr | seeds | final acc % (mean ± std) | gain vs best baseline | "
        "gain vs local_<opt> | rounds to target | worst last-5 % | drift (rel.) |"
    )
    add("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m in _order(summ, VIT_METHODS):
        s = summ[m]
        opt = m.rsplit("_", 1)[-1]
        local = summ.get(f"local_{opt}")
        gain_local = (
            f"{(s.final_mean - local.final_mean) * 100:+.1f}"
            if local and m.startswith("fedpac")
            else ""
        )
        rt = rounds_to(s.curve, tval) if np.isfinite(tval) else None
        add(
            f"| {m} | {s.lr:g} | {s.seeds} | {_fmt(s.final_mean)} ± {_fmt(s.final_std)} | "
            f"{(s.final_mean - tval) * 100:+.1f} | {gain_local} | "
            f"{rt if rt is not None else 'never'} | {_fmt(s.worst_last_mean)} | "
            f"{_fmt(s.drift_rel, 1, 3)} |"
        )
    add("")


def _goals(lines: list[str], summ: dict[str, MethodSummary]) -> None:
    add = lines.append
    if "fedpac_soap" not in summ:
        return
    f = summ["fedpac_soap"]
    add("### Goals at alpha = 0.1 (fedpac_soap)\n")
    rows = []
    if "local_soap" in summ:
        d = (f.final_mean - summ["local_soap"].final_mean) * 100
        rows.append(("≥ 3 points above local_soap", f"{d:+.1f} points", d >= 3))
    fam = [m for m in ("fedavg", "fedavg_adamw", "fedadamw") if m in summ]
    if fam:
        best = max(fam, key=lambda m: summ[m].final_mean)
        d = (f.final_mean - summ[best].final_mean) * 100
        rows.append(
            (
                "≥ 3 points above the best of fedavg / fedavg_adamw / fedadamw",
                f"{d:+.1f} points (vs {best})",
                d >= 3,
            )
        )
    target = _target(summ)
    if target:
        name, value = target
        rb = rounds_to(summ[name].curve, value)
        rf = rounds_to(f.curve, value)
        ok = rf is not None and rb is not None and rf <= rb / 2
        rows.append(
            (
                f"reaches the best baseline's final accuracy ({name}, {_fmt(value)} %) in "
                "at most half its rounds",
                f"fedpac_soap: {rf if rf else 'never'}, {name}: {rb}",
                ok,
            )
        )
    add("| goal | measured | met? |")
    add("|---|---|---|")
    for goal, measured, ok in rows:
        add(f"| {goal} | {measured} | {'yes' if ok else '**no**'} |")
    add("")


def _lm_table(lines: list[str], summ: dict[str, MethodSummary]) -> None:
    add = lines.append
    target = _target(summ, higher=False)
    tname, tval = target if target else ("-", float("nan"))
    add(
        f"Best baseline by final mean test perplexity: **{tname}** ({tval:.2f}). "
        "Worst: highest perplexity over the last 3 rounds, averaged over seeds.\n"
    )
    add(
        "| method | lr | seeds | final perplexity (mean ± std) | rounds to target | "
        "worst last-3 | drift (rel.) |"
    )
    add("|---|---:|---:|---:|---:|---:|---:|")
    for m in _order(summ, LM_METHODS):
        s = summ[m]
        rt = rounds_to(s.curve, tval, higher_is_better=False) if np.isfinite(tval) else None
        std = "n/a" if not np.isfinite(s.final_std) else f"{s.final_std:.2f}"
        add(
            f"| {m} | {s.lr:g} | {s.seeds} | {s.final_mean:.2f} ± {std} | "
            f"{rt if rt is not None else 'never'} | {s.worst_last_mean:.2f} | "
            f"{_fmt(s.drift_rel, 1, 3)} |"
        )
    add("")


def _cost_section(lines: list[str], groups: dict) -> None:
    add = lines.append
    add("## Cost\n")
    add(
        "Per-round wall time: median `round_time` (all sampled clients' local steps plus "
        "aggregation, one thread, without evaluation) over every round of the final runs "
        "of the split. Bytes: `bytes_up` / `bytes_down` per round, all sampled clients "
        "together (float32; down from round 2 on, when Theta and g_G exist). GNB refreshes: "
        "Sophia's Hessian refreshes per round, all sampled clients together (each one extra "
        "forward and backward on a batch with sampled labels; its cost is in the round time; "
        "empty for runs logged before the count existed).\n"
    )
    add(
        "| workload | method | round time (s) | x fedavg_adamw | GNB refreshes / round | "
        "MiB up / round | MiB down / round |"
    )
    add("|---|---|---:|---:|---:|---:|---:|")
    for suite, split, order in (("vit", "dir0.1", VIT_METHODS), ("lm", "speaker", LM_METHODS)):
        records = groups.get((suite, split, "final"), [])
        if not records:
            continue
        metric = "eval_accuracy" if suite == "vit" else "eval_perplexity"
        summ = summarise(records, metric, 3)
        ref = summ.get("fedavg_adamw")
        label = "ViT / MNIST-5k" if suite == "vit" else "LoRA Llama / Shakespeare"
        for m in _order(summ, order):
            s = summ[m]
            ratio = f"{s.round_time / ref.round_time:.2f}" if ref else "n/a"
            refreshes = f"{s.refreshes:.0f}" if np.isfinite(s.refreshes) else ""
            add(
                f"| {label} | {m} | {s.round_time:.2f} | {ratio} | {refreshes} | "
                f"{_mib(s.bytes_up)} | {_mib(s.bytes_down)} |"
            )
    add("")
    theta = BENCH / "results" / "theta_bytes.json"
    if theta.is_file():
        data = json.loads(theta.read_text())
        add("### Theta size for LoRA: two-sided vs one-sided SOAP preconditioning\n")
        add(f"Command: `{data['command']}`\n")
        add(data["description"] + "\n")
        add(
            "| model | trainable params | trainable (delta) size | max_precond_dim | "
            "Theta size (exported) | Theta / delta |"
        )
        add("|---|---:|---:|---:|---:|---:|")
        for row in data["rows"]:
            add(
                f"| {row['model']} | {row['lora_params']:,} | {_human(row['adapter_bytes'])} | "
                f"{row['max_precond_dim']} | {_human(row['theta_bytes'])} | "
                f"{row['theta_bytes'] / row['adapter_bytes']:.3g}x |"
            )
        add("")
    add(
        "Optimizer step time and peak memory: [optimizer_step.md](optimizer_step.md) "
        "(step-time ratios vs torch AdamW), [client_memory.md](client_memory.md) (peak "
        "memory at 10 vs 1,000 clients), [overhead.md](overhead.md) (the lead's overhead "
        "measurement, `benchmarks/overhead.py`).\n"
    )


# --------------------------------------------------------------------- main


def settings_from(ns: argparse.Namespace) -> Settings:
    if ns.quick:
        return Settings(
            rounds=3,
            local_steps=3,
            lm_rounds=2,
            seeds=1,
            mild_seeds=1,
            k50_seeds=1,
            ablation_seeds=1,
            pathological_seeds=1,
            lm_seeds=1,
            results=BENCH / "results_quick",
            quick=True,
        )
    return Settings(
        rounds=ns.rounds,
        local_steps=ns.local_steps,
        lm_rounds=ns.lm_rounds,
        seeds=ns.seeds,
        mild_seeds=ns.mild_seeds,
        k50_seeds=ns.k50_seeds,
        ablation_seeds=ns.ablation_seeds,
        pathological_seeds=ns.pathological_seeds,
        lm_seeds=ns.lm_seeds,
        results=BENCH / "results",
        quick=False,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("run", "report", "list"))
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test grid")
    parser.add_argument("--rounds", type=int, default=20, help="ViT rounds")
    parser.add_argument("--local-steps", type=int, default=20, help="local steps K")
    parser.add_argument("--lm-rounds", type=int, default=10, help="LoRA causal-LM rounds")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the final ViT runs")
    parser.add_argument(
        "--mild-seeds", type=int, default=2, help="seeds of the final runs at alpha = 0.5"
    )
    parser.add_argument("--k50-seeds", type=int, default=2, help="seeds of the K = 50 runs")
    parser.add_argument("--ablation-seeds", type=int, default=1, help="seeds of ablations (0.5)")
    parser.add_argument("--pathological-seeds", type=int, default=3)
    parser.add_argument("--lm-seeds", type=int, default=3)
    parser.add_argument(
        "--only", nargs="*", default=(), help="restrict to suites/splits (vit, lm, dir0.1, ...)"
    )
    parser.add_argument(
        "--minutes", type=float, default=1e9, help="stop taking new runs after this long"
    )
    ns = parser.parse_args(argv)
    s = settings_from(ns)
    if ns.command == "run":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        CACHE.mkdir(parents=True, exist_ok=True)
        work(s, time.time() + 60 * ns.minutes, ns.only)
    elif ns.command == "list":
        done = load_results(s.results)
        for job in all_jobs(s):
            lr = resolve(job, done, s)
            state = "?" if lr is None else ("done" if job.key(lr) in done else "todo")
            print(f"{state:5s} {job.key(lr) if lr is not None else job}")
    else:
        report(s, BENCH / ("RESULTS_quick.md" if s.quick else "RESULTS.md"))


if __name__ == "__main__":
    sys.exit(main())
