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

This file holds the grid (methods, splits, learning-rate grids, seeds) and
how each run is trained; the report's text is in ``_efficiency_report.py``
and the shared machinery (run queue, run records, validation splits, lr
choice, summaries, tables, plots) in ``_harness/``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness.runs import (  # noqa: E402
    BENCH,
    CACHE,
    best_of,
    load_results,
    run_queue,
    scores_at,
    train_once,
    validation_dataset,
)

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
    """The config file of a job's suite."""
    return VIT_CONFIG if job.suite == "vit" else LM_CONFIG


def best_lr(suite: str, method: str, done: dict[str, dict[str, Any]], s: Settings) -> float | None:
    """The tuned learning rate of ``method`` (None while its tuning runs are missing).

    The ablations of FedPAC-X run at FedPAC-X's tuned rate, so that they
    differ from it in one knob only.
    """
    if method in ABLATIONS:
        method = "fedpac_" + method.rsplit("_", 1)[1]
    split = TUNE_SPLIT if suite == "vit" else "speaker"
    grid = vit_grid(method, s.quick) if suite == "vit" else lm_grid(method, s.quick)
    scores = scores_at(grid, Job(suite, split, "tune", method, 0).key, done)
    return None if scores is None else best_of(scores)


def resolve(job: Job, done: dict[str, dict[str, Any]], s: Settings) -> float | None:
    """The rate a job runs at: its own, or its method's tuned rate (None: not tuned yet)."""
    return job.lr if job.lr is not None else best_lr(job.suite, job.method, done, s)


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


# --------------------------------------------------------------------- main


def settings_from(ns: argparse.Namespace) -> Settings:
    """The grid's size from the command line."""
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
    """The command line (see the module docstring)."""
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
        work(s, time.time() + 60 * ns.minutes, ns.only)
    elif ns.command == "list":
        done = load_results(s.results)
        for job in all_jobs(s):
            lr = resolve(job, done, s)
            state = "?" if lr is None else ("done" if job.key(lr) in done else "todo")
            print(f"{state:5s} {job.key(lr) if lr is not None else job}")
    else:
        from _efficiency_report import report

        report(s, BENCH / ("RESULTS_quick.md" if s.quick else "RESULTS.md"))


if __name__ == "__main__":
    # The report imports this file as `statistical_efficiency`: run that one copy of it.
    import statistical_efficiency

    sys.exit(statistical_efficiency.main())
