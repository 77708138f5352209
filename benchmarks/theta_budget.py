"""Cheap curvature that keeps the LoRA gain (issue #24): Theta's budget, at CPU scale.

One grid of runs through :func:`fedpac_hf.run.run_training` (the code path of
``fedpac-hf train``), cached one JSON per run under
``benchmarks/theta_budget_results/`` with the command that reproduces it; the
report is the section "Theta budget" of ``benchmarks/LORA.md``.

Protocol
--------
* Task: ``configs/vit_lora_mnist5k.yaml`` (the pretrained base
  ``base:vit-mnist5k-0to4``, built here from MNIST-5k digits 0-4, seeded and
  cached, learns digits 5-9) with LoRA on *every* linear layer of the encoder
  (``q_proj, k_proj, v_proj, o_proj, fc1, fc2``) and the new head trained in
  full, 40 clients, 4 per round, 30 local steps, 30 rounds, Dirichlet label
  skew 0.05 and 0.1, ranks 4 and 16.
* Arms: ``fedavg_adamw``, ``fedadamw`` (server-side second moments),
  ``local_soap`` and ``fedpac_soap`` with full Theta, with ``theta_budget``
  1.0 (the default) and 0.25, and with each compressed long side measured:
  ``sketch`` (the form of earlier versions: diagonal plus a fixed-test-matrix
  sketch, rebuilt on each client), ``basis-mixed`` (the basis form with half
  of its sketch columns random every round) and ``basis-random`` (all random).
  At rank 4, budget 1.0 gives the basis form with 2 steered columns; at rank
  16 more columns fit.
* Learning rates are chosen per arm on a validation split carved from the
  training rows (20 % of MNIST-5k's training split, stratified; the test
  split is never read while tuning), seed 0, scored by the mean validation
  accuracy over the last 3 rounds, at Dirichlet 0.05 for each rank and reused
  at 0.1; a 3-point grid grows by one point when its edge wins. The three
  compressed variants run at the rate tuned for ``theta_budget`` 1.0 (the same
  optimizer, a CPU cut). Final runs: 3 seeds on the test split (``--seeds``).
* Full-model ViT rows: ``configs/vit_mnist5k.yaml`` (the README's main run)
  with ``theta_budget`` 1.0 against full Theta at the config's rate, 3 seeds on
  the validation split (which decides the default for models without adapters)
  and on the test split.

Usage (from the repository root)::

    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1
    python benchmarks/theta_budget.py run &   # two workers share the queue
    python benchmarks/theta_budget.py run &
    wait
    python benchmarks/theta_budget.py report   # the "Theta budget" section of LORA.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness.reporting import (  # noqa: E402
    Summary,
    command_block,
    fmt,
    goals_table,
    kept_block,
    summarise,
    write_section,
)
from _harness.runs import (  # noqa: E402
    BENCH,
    BYTE_KEYS,
    CACHE,
    KEPT_KEYS,
    Record,
    best_of,
    edge_neighbour,
    load_results,
    machine,
    run_queue,
    scores_at,
    series,
    train_once,
    validation_dataset,
)

RESULTS = BENCH / "theta_budget_results"
REPORT = BENCH / "LORA.md"
LORA_CONFIG = "configs/vit_lora_mnist5k.yaml"
FULL_CONFIG = "configs/vit_mnist5k.yaml"
KEYS = (*KEPT_KEYS, *BYTE_KEYS)
REGIME = [
    "--lora_target_modules", "q_proj,k_proj,v_proj,o_proj,fc1,fc2",
    "--num_clients", "40", "--clients_per_round", "4", "--local_steps", "30",
    "--num_rounds", "30", "--partitioner", "dirichlet",
]  # fmt: skip
# split -> (config, overrides)
SPLITS: dict[str, tuple[str, list[str]]] = {
    "r4-dir0.05": (LORA_CONFIG, [*REGIME, "--lora_r", "4", "--dirichlet_alpha", "0.05"]),
    "r4-dir0.1": (LORA_CONFIG, [*REGIME, "--lora_r", "4", "--dirichlet_alpha", "0.1"]),
    "r16-dir0.05": (LORA_CONFIG, [*REGIME, "--lora_r", "16", "--dirichlet_alpha", "0.05"]),
    "r16-dir0.1": (LORA_CONFIG, [*REGIME, "--lora_r", "16", "--dirichlet_alpha", "0.1"]),
    "full-model": (FULL_CONFIG, []),
}
TUNED_ON = {"r4-dir0.1": "r4-dir0.05", "r16-dir0.1": "r16-dir0.05"}


# arm -> (algorithm, overrides, what travels)
ARMS: dict[str, tuple[str, list[str], str]] = {
    "fedavg_adamw": ("fedavg_adamw", [], "no Theta"),
    "fedadamw": ("fedadamw", [], "AdamW's second moments (1x)"),
    "local_soap": ("local_soap", [], "no Theta"),
    "full": ("fedpac_soap", ["--curvature", "full"], "every statistic in full"),
    "budget1.0": ("fedpac_soap", ["--theta_budget", "1.0"], "the default: budget 1.0"),
    "budget0.25": ("fedpac_soap", ["--theta_budget", "0.25"], "budget 0.25"),
    "sketch": (
        "fedpac_soap",
        ["--curvature", "lora"],
        "earlier default: long side diag + fixed sketch, min(4, r - 2) columns",
    ),
    "basis-mixed": ("fedpac_soap", [], "budget 1.0's basis form, half the columns random"),
    "basis-random": ("fedpac_soap", [], "budget 1.0's basis form, every column random"),
}
STEERED = {"basis-mixed": 0.5, "basis-random": 0.0}
RATE_OF = {"sketch": "budget1.0", "basis-mixed": "budget1.0", "basis-random": "budget1.0"}
TUNED_ARMS = [a for a in ARMS if a not in RATE_OF]
FULL_MODEL_ARMS = ["full", "budget1.0"]
FULL_MODEL_RATE = 3e-3  # configs/vit_mnist5k.yaml's learning_rate
LADDER = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


@dataclass(frozen=True)
class Run:
    """One training run of ``arm`` on ``split``: tuning (validation) or final (test)."""

    split: str
    stage: str
    arm: str
    seed: int
    lr: float

    @property
    def key(self) -> str:
        return f"{self.split}_{self.stage}_{self.arm}_lr{self.lr:g}_s{self.seed}"


def grid(arm: str) -> tuple[float, ...]:
    """The 3-point learning-rate grid of ``arm`` (AdamW clients prefer smaller rates)."""
    return (1e-3, 3e-3, 1e-2) if "adamw" in arm else (3e-3, 1e-2, 3e-2)


def best_lr(split: str, arm: str, done: dict[str, Record]) -> float | None:
    """The rate ``arm`` was tuned to (None while its tuning runs are missing)."""
    if split == "full-model":
        return FULL_MODEL_RATE
    split, arm = TUNED_ON.get(split, split), RATE_OF.get(arm, arm)

    def key(lr: float) -> str:
        return Run(split, "tune", arm, 0, lr).key

    scores = scores_at(grid(arm), key, done)
    if scores is None:
        return None
    extra = edge_neighbour(scores, LADDER)
    if extra is not None:
        more = scores_at([extra], key, done)
        if more is None:
            return None
        scores.update(more)
    return best_of(scores)


VALIDATION_SEEDS = 3  # of the full-model rows on the validation split


def plan(done: dict[str, Record], seeds: int) -> tuple[list[Run], int]:
    """The runs in priority order (tuning, then finals seed-major), and how many wait."""
    runs: list[Run] = []
    waiting = 0
    for split in ("r4-dir0.05", "r16-dir0.05"):
        for lr_index in range(3):
            runs += [Run(split, "tune", arm, 0, grid(arm)[lr_index]) for arm in TUNED_ARMS]
        for arm in TUNED_ARMS:
            scores = scores_at(
                grid(arm), lambda lr, a=arm, s=split: Run(s, "tune", a, 0, lr).key, done
            )
            if scores is None:
                waiting += 1
            elif (extra := edge_neighbour(scores, LADDER)) is not None:
                runs.append(Run(split, "tune", arm, 0, extra))
    # the full model's default is decided on the validation split, over 3 seeds
    runs += [
        Run("full-model", "tune", arm, seed, FULL_MODEL_RATE)
        for seed in range(VALIDATION_SEEDS)
        for arm in FULL_MODEL_ARMS
    ]
    for seed in range(seeds):
        for split in SPLITS:
            for arm in FULL_MODEL_ARMS if split == "full-model" else ARMS:
                lr = best_lr(split, arm, done)
                if lr is None:
                    waiting += 1
                else:
                    runs.append(Run(split, "final", arm, seed, lr))
    return [r for r in runs if r.key not in done], waiting


def overrides(run: Run, run_dir: Path) -> list[str]:
    """The ``fedpac-hf train`` overrides of one run (after its config file)."""
    algorithm, arm_overrides, _ = ARMS[run.arm]
    over = [*SPLITS[run.split][1], "--algorithm", algorithm, *arm_overrides]
    if run.arm in STEERED:
        over += ["--client_optimizer_kwargs", json.dumps(steered_form(run.split, run.arm))]
    over += ["--learning_rate", f"{run.lr:g}", "--seed", str(run.seed)]
    if run.stage == "tune":
        over += ["--dataset", str(validation_dataset("vit"))]
    return [*over, "--num_threads", "1", "--output_dir", str(run_dir)]


def steered_form(split: str, arm: str) -> dict[str, Any]:
    """Budget 1.0's SOAP options on ``split``'s model, with ``STEERED[arm]`` of the columns steered."""
    import math

    from fedpac_hf.federated.theta_budget import theta_options
    from fedpac_hf.run import build_task, parse_run_config

    config, split_overrides = SPLITS[split]
    margs, args = parse_run_config(
        Path(__file__).resolve().parents[1] / config,
        [*split_overrides, "--output_dir", str(CACHE / "form_probe")],
    )
    form = theta_options(build_task(margs, args).model, "soap", "auto", 1.0)
    return {**form, "theta_steered": math.ceil(STEERED[arm] * form["theta_sketch_dim"])}


def run_one(run: Run) -> Record:
    """Train one run and return its JSON record."""
    run_dir = CACHE / "runs" / run.key
    record = train_once(SPLITS[run.split][0], overrides(run, run_dir), run_dir, KEYS)
    return {**asdict(run), "suite": "vit", "method": run.arm, **record, "machine": machine()}


# ------------------------------------------------------------------- report


def per_client(record: Record, key: str) -> float:
    """A byte count per client and round (median over rounds)."""
    values = series(record, key) / np.maximum(series(record, "num_clients"), 1)
    return float(np.median(values))


def table(lines: list[str], finals: list[Record], arms: Sequence[str]) -> None:
    """Accuracy, worst of the last 10 rounds, drift, bytes and round time of ``arms``."""
    summary: dict[str, Summary] = summarise(finals, "eval_accuracy")
    lines += [
        "| arm | what travels | rate | accuracy | worst of last 10 | drift (rel.) "
        "| up per client: delta / Theta | Theta / delta | down per client: Theta | round time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arm in arms:
        if arm not in summary:
            continue
        s = summary[arm]
        r = s.runs[0]
        delta, theta = per_client(r, "bytes_up_delta"), per_client(r, "bytes_up_theta")
        down = per_client(r, "bytes_down_theta")
        lines.append(
            f"| {arm} | {ARMS[arm][2]} | {s.lr:g} | {fmt(s.mean)} +- {fmt(s.std)} "
            f"| {fmt(s.worst_last(10))} | {s.drift:.3f} "
            f"| {delta / 1024:.1f} / {theta / 1024:.1f} KiB | {theta / delta:.2f}x "
            f"| {down / 1024:.1f} KiB | {s.pooled('round_time'):.2f} s |"
        )


FIRST_ORDER = ["fedavg_adamw", "fedadamw"]
# the hand-written reading of the tables, kept when the report rebuilds them
ANALYSIS = ("<!-- theta-budget analysis -->", "<!-- /theta-budget analysis -->")


def goal_rows(finals: list[Record], tuned: list[Record]) -> list[tuple[str, str, bool]]:
    """The issue's goals, per setting, from the seed means of the final accuracy."""
    rows: list[tuple[str, str, bool]] = []
    for split in [s for s in SPLITS if s != "full-model"]:
        summary = summarise([r for r in finals if r["split"] == split], "eval_accuracy")
        if "budget1.0" not in summary or "full" not in summary:
            continue
        default, full = summary["budget1.0"], summary["full"]
        rows.append((
            f"{split}: budget 1.0 within 1.5 points of full Theta",
            f"{fmt(default.mean)} vs {fmt(full.mean)} ({100 * (default.mean - full.mean):+.1f})",
            default.mean >= full.mean - 0.015,
        ))  # fmt: skip
        first = [(summary[m].mean, m) for m in FIRST_ORDER if m in summary]
        if first:
            best, name = max(first)
            rows.append((
                f"{split}: budget 1.0 at least 3 points above the best first-order method",
                f"{fmt(default.mean)} vs {name} {fmt(best)} ({100 * (default.mean - best):+.1f})",
                default.mean >= best + 0.03,
            ))  # fmt: skip
        run = default.runs[0]
        ratio = per_client(run, "bytes_up_theta") / per_client(run, "bytes_up_delta")
        rows.append((f"{split}: Theta up at most 1x the adapter", f"{ratio:.2f}x", ratio <= 1.0))
        down, full_down = (per_client(s.runs[0], "bytes_down_theta") for s in (default, full))
        rows.append((
            f"{split}: Theta down at most full Theta's",
            f"{down / 1024:.1f} vs {full_down / 1024:.1f} KiB ({down / full_down:.2f}x)",
            down <= full_down,
        ))  # fmt: skip
    for stage, records in (
        ("validation", tuned),
        ("test", [r for r in finals if r["split"] == "full-model"]),
    ):
        summary = summarise(records, "eval_accuracy")
        if "budget1.0" in summary and "full" in summary:
            cost = summary["full"].mean - summary["budget1.0"].mean
            rows.append((
                f"full-model ViT ({stage} split): budget 1.0 costs at most 1 point",
                f"{fmt(summary['budget1.0'].mean)} vs {fmt(summary['full'].mean)} ({-100 * cost:+.1f})",
                cost <= 0.01,
            ))  # fmt: skip
    return rows


def report() -> None:
    """Write the section "Theta budget" of LORA.md from the cached records."""
    done = load_results(RESULTS)
    finals = [r for r in done.values() if r["stage"] == "final"]
    lines = [
        "## Theta budget: cheap curvature that keeps the LoRA gain (issue #24)",
        "",
        "Made by (the full protocol is the docstring of `benchmarks/theta_budget.py`):",
        "",
    ]
    command_block(
        lines,
        [
            "python benchmarks/theta_budget.py run &   # two workers share the queue",
            "python benchmarks/theta_budget.py run &",
            "wait",
            "python benchmarks/theta_budget.py report",
        ],
    )
    machines = sorted({r.get("machine", "?") for r in done.values()})
    lines += [f"Machine: {', '.join(machines)}. Runs: {len(finals)} final, "
              f"{len(done) - len(finals)} tuning.", ""]  # fmt: skip
    tuned = [r for r in done.values() if r["split"] == "full-model" and r["stage"] == "tune"]
    lines += ["### Goals (accuracy: the final round's, mean over seeds)", ""]
    goals_table(lines, goal_rows(finals, tuned))
    lines += [ANALYSIS[0], kept_block(REPORT, *ANALYSIS), ANALYSIS[1], ""]
    if tuned:
        lines += ["### full-model, validation split (decides the default without adapters)", ""]
        table(lines, tuned, FULL_MODEL_ARMS)
        lines.append("")
    for split in SPLITS:
        rows = [r for r in finals if r["split"] == split]
        if not rows:
            continue
        seeds = len({r["seed"] for r in rows})
        lines += [f"### {split} ({seeds} seed{'s' if seeds > 1 else ''}, test split)", ""]
        table(lines, rows, FULL_MODEL_ARMS if split == "full-model" else list(ARMS))
        lines.append("")
    write_section(REPORT, "theta-budget", "\n".join(lines))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "report", "list"])
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the final runs")
    parser.add_argument("--hours", type=float, default=12.0, help="start no run after this")
    ns = parser.parse_args(argv)
    if ns.command == "list":
        runs, waiting = plan(load_results(RESULTS), ns.seeds)
        print(json.dumps([r.key for r in runs], indent=1), f"\n{waiting} waiting")
    elif ns.command == "run":
        run_queue(
            lambda done: (lambda p: ([(r.key, r) for r in p[0]], p[1]))(plan(done, ns.seeds)),
            lambda key, run: run_one(run),
            RESULTS,
            time.time() + 3600 * ns.hours,
        )
    else:
        report()


if __name__ == "__main__":
    main()
