"""Client-level differential privacy at 500 clients (issue #25, item 4), at CPU scale.

One grid of runs through :func:`fedpac_hf.run.run_training` (the code path of
``fedpac-hf train``), cached one JSON per run under
``benchmarks/privacy_results/`` with the command that reproduces it; the
report, ``benchmarks/PRIVACY.md``, is written from those JSONs by the
``report`` subcommand.

Protocol
--------
* Task: ``configs/vit_mnist5k.yaml`` with a smaller ViT (hidden size 32, 2
  layers, 2 heads, MLP 64: 19,658 parameters, trained from scratch) so that
  the grid fits a 2-core CPU; MNIST-5k's 4,000 training rows split over
  **500 clients** with Dirichlet(0.3) label skew (8 rows per client on
  average), 20 clients per round (under DP: Poisson sampling at rate
  q = 20 / 500, 20 clients expected), 10 local steps of batch 8, 20 rounds,
  cosine learning-rate decay (the config's).
* Methods: ``fedavg_adamw``, ``fedadamw`` (AdamW's second moments shared),
  ``fedpac_soap`` (SOAP's Kronecker statistics shared) and
  ``fedpac_correct_soap``, the registered ablation "correction only, no
  alignment": ``fedpac_soap`` with Theta never shared.
* Privacy: ``dp_mode: client`` at epsilon in {inf, 8, 2}, delta = 500 ** -1.1
  (the package's default ``dp_delta``); epsilon = inf is
  ``dp_noise_multiplier: 0`` (clipping and Poisson sampling only), 8 and 2 are
  ``dp_target_epsilon`` (the noise multiplier is the package's calibration for
  20 rounds). ``dp_noise_seed`` is the run's seed (reproducible noise; a
  deployment leaves it unset).
* Learning rates: per method, on the validation split (the harness's
  :func:`~_harness.runs.validation_dataset`: 20 % of MNIST-5k's training rows,
  stratified; the test split is never read while tuning), **non-private**
  (``dp_mode: none``), seed 0, a 3-point grid (``1e-3, 3e-3, 1e-2`` for AdamW
  clients, ``3e-3, 1e-2, 3e-2`` for SOAP), scored by the mean validation
  accuracy of the last 3 rounds; the chosen rate is reused at every epsilon
  and seed. No grid point is added when an edge wins (time): the report marks
  such a rate with ``*``.
* Clip norms: from the same non-private tuning runs. This script records the
  L2 norm of every client's delta and Theta (what :func:`clip_update` would
  clip) by wrapping ``client_update`` in the worker process; ``dp_clip_norm``
  and ``dp_theta_clip_norm`` are the **median** over all clients and rounds of
  the tuning run at the chosen rate (4 significant digits), so about half of
  the clients are clipped at the start of a private run. Methods that do not
  align send no Theta under DP and get no Theta clip norm.
* Final runs: every method at every epsilon, 3 seeds (0, 1, 2), on the test
  split; plus ``fedpac_soap`` without DP (``dp_mode: none``, exactly 20
  clients per round), 3 seeds, for the cost of clipping (Theta's and the
  delta's) at epsilon = inf; last in the queue, the other methods without DP
  (3 seeds each), for context.
* Reported: the final round's test accuracy, mean +- sample std over seeds;
  the noise multiplier of each epsilon; the epsilon the runs logged after the
  last round; the fraction of clients clipped (``dp_clipped_delta``,
  ``dp_clipped_theta``, mean over rounds and seeds); the goal: at epsilon 8,
  ``fedpac_soap``'s lead over the best first-order method (``fedavg_adamw``,
  ``fedadamw``) is at least half its lead at epsilon = inf.

Usage (from the repository root)::

    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1
    python benchmarks/privacy_benchmark.py run &   # two workers share the queue
    python benchmarks/privacy_benchmark.py run &
    wait
    python benchmarks/privacy_benchmark.py report   # writes benchmarks/PRIVACY.md
"""

from __future__ import annotations

import argparse
import json
import math
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
    chosen_cell,
    command_block,
    fmt,
    goals_table,
    kept_block,
    plot_curves,
    summarise,
    tuning_table,
)
from _harness.runs import (  # noqa: E402
    BENCH,
    CACHE,
    KEPT_KEYS,
    Record,
    best_of,
    load_results,
    machine,
    run_queue,
    scores_at,
    series,
    show_output_dir,
    train_once,
    tune_score,
    validation_dataset,
)

RESULTS = BENCH / "privacy_results"
REPORT = BENCH / "PRIVACY.md"
CONFIG = "configs/vit_mnist5k.yaml"
KEYS = (*KEPT_KEYS, "epsilon", "dp_clipped_delta", "dp_clipped_theta")

NUM_CLIENTS = 500
CLIENTS_PER_ROUND = 20
NUM_ROUNDS = 20
REGIME = [
    "--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "2",
    "--intermediate_size", "64",
    "--num_clients", str(NUM_CLIENTS), "--clients_per_round", str(CLIENTS_PER_ROUND),
    "--partitioner", "dirichlet", "--dirichlet_alpha", "0.3",
    "--num_rounds", str(NUM_ROUNDS), "--local_steps", "10",
    "--per_device_train_batch_size", "8",
]  # fmt: skip

#: method -> (algorithm, what the server receives besides the delta)
METHODS: dict[str, tuple[str, str]] = {
    "fedavg_adamw": ("fedavg_adamw", "nothing"),
    "fedadamw": ("fedadamw", "AdamW's second moments"),
    "fedpac_soap": ("fedpac_soap", "SOAP's Kronecker statistics"),
    "fedpac_correct_soap": ("fedpac_correct_soap", "nothing (Theta never shared)"),
}
FIRST_ORDER = ("fedavg_adamw", "fedadamw")
#: privacy levels of the final runs: "nodp" is dp_mode none, "inf" clipping only
EPSILONS = ("inf", "8", "2")
NODP_METHOD = "fedpac_soap"
SEEDS = 3


def lr_grid(method: str) -> tuple[float, ...]:
    """The 3-point learning-rate grid of ``method`` (AdamW clients prefer smaller rates)."""
    return (1e-3, 3e-3, 1e-2) if "adamw" in method else (3e-3, 1e-2, 3e-2)


def aligns(method: str) -> bool:
    """Whether ``method``'s algorithm shares Theta (and so needs ``dp_theta_clip_norm``)."""
    from fedpac_hf.federated import get_algorithm

    return bool(get_algorithm(METHODS[method][0]).align)


@dataclass(frozen=True)
class Run:
    """One training run: a non-private tuning run (validation) or a final run (test).

    ``privacy`` is ``"nodp"`` (``dp_mode: none``), ``"inf"`` (clipping only)
    or a target epsilon; ``clip`` and ``theta_clip`` are the clip norms as
    passed on the command line (``""`` when unused).
    """

    stage: str
    method: str
    privacy: str
    seed: int
    lr: float
    clip: str = ""
    theta_clip: str = ""

    @property
    def key(self) -> str:
        if self.stage == "tune":
            return f"tune_{self.method}_lr{self.lr:g}_s{self.seed}"
        return f"final_{self.method}_eps-{self.privacy}_s{self.seed}"


def tune_key(method: str, lr: float) -> str:
    """The cache key of ``method``'s tuning run at ``lr``."""
    return Run("tune", method, "nodp", 0, lr).key


def chosen(method: str, done: dict[str, Record]) -> tuple[float, str, str] | None:
    """``method``'s tuned rate and clip norms (None while a tuning run is missing).

    Returns
    -------
    tuple
        ``(lr, dp_clip_norm, dp_theta_clip_norm)``; the norms are the medians
        of the clients' delta and Theta norms in the tuning run at ``lr``,
        written with 4 significant digits (``""``: Theta does not travel).
    """
    scores = scores_at(lr_grid(method), lambda lr: tune_key(method, lr), done)
    if scores is None:
        return None
    lr = best_of(scores)
    norms = done[tune_key(method, lr)]["client_norms"]
    clip = f"{float(np.median(norms['delta'])):.4g}"
    theta = f"{float(np.median(norms['theta'])):.4g}" if aligns(method) else ""
    return lr, clip, theta


def plan(done: dict[str, Record]) -> tuple[list[Run], int]:
    """The runs in priority order (tuning, then finals seed-major), and how many wait."""
    runs: list[Run] = []
    waiting = 0
    for lr_index in range(3):
        runs += [Run("tune", m, "nodp", 0, lr_grid(m)[lr_index]) for m in METHODS]
    for seed in range(SEEDS):
        for method in METHODS:
            picked = chosen(method, done)
            levels = ("nodp", *EPSILONS) if method == NODP_METHOD else EPSILONS
            if picked is None:
                waiting += len(levels)
                continue
            lr, clip, theta = picked
            for level in levels:
                if level == "nodp":
                    runs.append(Run("final", method, level, seed, lr))
                else:
                    runs.append(Run("final", method, level, seed, lr, clip, theta))
    # last: the other methods without DP (context: what DP costs each of them)
    for seed in range(SEEDS):
        for method in METHODS:
            if method == NODP_METHOD:
                continue
            picked = chosen(method, done)
            if picked is None:
                waiting += 1
            else:
                runs.append(Run("final", method, "nodp", seed, picked[0]))
    return [r for r in runs if r.key not in done], waiting


def overrides(run: Run, run_dir: Path) -> list[str]:
    """The ``fedpac-hf train`` overrides of one run (after its config file)."""
    over = [*REGIME, "--algorithm", METHODS[run.method][0]]
    over += ["--learning_rate", f"{run.lr:g}", "--seed", str(run.seed)]
    if run.privacy != "nodp":
        over += ["--dp_mode", "client", "--dp_clip_norm", run.clip]
        if run.theta_clip:
            over += ["--dp_theta_clip_norm", run.theta_clip]
        if run.privacy == "inf":
            over += ["--dp_noise_multiplier", "0"]
        else:
            over += ["--dp_target_epsilon", run.privacy]
        over += ["--dp_noise_seed", str(run.seed)]
    if run.stage == "tune":
        over += ["--dataset", str(validation_dataset("vit"))]
    return [*over, "--num_threads", "1", "--output_dir", str(run_dir)]


def resolved_privacy(run: Run) -> dict[str, float]:
    """The noise multiplier z and delta a DP run trains with (the package's own resolution).

    ``ClientDP.resolve`` is what the run engine calls: the default delta
    ``num_clients ** -1.1`` and, for a target epsilon, the calibrated z.
    """
    from fedpac_hf.federated.privacy import ClientDP

    target = None if run.privacy == "inf" else float(run.privacy)
    dp = ClientDP.from_settings(
        "client",
        clip_norm=float(run.clip),
        theta_clip_norm=float(run.theta_clip) if run.theta_clip else None,
        noise_multiplier=0.0 if target is None else None,
        target_epsilon=target,
        share_theta=aligns(run.method),
    ).resolve(NUM_CLIENTS, CLIENTS_PER_ROUND / NUM_CLIENTS, NUM_ROUNDS)
    return {
        "noise_multiplier": float(dp.noise_multiplier or 0.0),
        "noise_scale": dp.noise_scale,
        "delta": float(dp.delta or 0.0),
    }


class NormRecorder:
    """Records the L2 norms of every client's delta and Theta while installed.

    Wraps ``client_update`` where the trainer calls it
    (``fedpac_hf.trainer.fedpac_trainer``); in a run without DP the update it
    returns is the unclipped one, whose norms :func:`clip_update` would bound.
    """

    def __init__(self) -> None:
        self.delta: list[float] = []
        self.theta: list[float] = []

    def __enter__(self) -> NormRecorder:
        import torch

        from fedpac_hf.trainer import fedpac_trainer

        self._module = fedpac_trainer
        self._original = original = fedpac_trainer.client_update

        def norm(tensors: dict[str, Any]) -> float:
            values = [t.detach().double().norm() for t in tensors.values()]
            return float(torch.stack(values).norm()) if values else 0.0

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            update = original(*args, **kwargs)
            self.delta.append(norm(update.delta))
            self.theta.append(norm(update.curvature))
            return update

        fedpac_trainer.client_update = wrapped
        return self

    def __exit__(self, *exc: object) -> None:
        self._module.client_update = self._original


def run_one(run: Run) -> Record:
    """Train one run and return its JSON record."""
    run_dir = CACHE / "runs" / run.key
    extra: dict[str, Any] = {}
    if run.stage == "tune":
        with NormRecorder() as norms:
            record = train_once(CONFIG, overrides(run, run_dir), run_dir, KEYS)
        extra["client_norms"] = {"delta": norms.delta, "theta": norms.theta}
    else:
        record = train_once(CONFIG, overrides(run, run_dir), run_dir, KEYS)
        if run.privacy != "nodp":
            extra.update(resolved_privacy(run))
    show_output_dir(record, f"runs/privacy/{run.key}")
    return {**asdict(run), "suite": "vit", **record, **extra, "machine": machine()}


# ------------------------------------------------------------------- report


def pooled_mean(records: Sequence[Record], key: str) -> float:
    """Mean of ``key`` over every round of every record (NaN when no round has it)."""
    values = np.concatenate([series(r, key) for r in records]) if records else np.array([])
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


def cell(s: Summary | None) -> str:
    """``mean +- std (n)`` of a summary's final accuracy, in %."""
    if s is None:
        return "-"
    return f"{fmt(s.mean)} +- {fmt(s.std)} (n={s.seeds})"


def level_name(level: str) -> str:
    """A privacy level as the report's column heads show it."""
    return {"nodp": "no DP", "inf": "eps = inf (clip only)"}.get(level, f"eps = {level}")


def by_level(finals: Sequence[Record]) -> dict[str, dict[str, Summary]]:
    """The final runs' summaries (test accuracy), per privacy level and method."""
    return {
        level: summarise([r for r in finals if r["privacy"] == level], "eval_accuracy")
        for level in ("nodp", *EPSILONS)
    }


def lead(summ: dict[str, Summary]) -> tuple[float, str, float] | None:
    """``fedpac_soap``'s lead over the best first-order method at one level (None: missing)."""
    if "fedpac_soap" not in summ or not all(m in summ for m in FIRST_ORDER):
        return None
    best = max(FIRST_ORDER, key=lambda m: summ[m].mean)
    return summ["fedpac_soap"].mean - summ[best].mean, best, summ[best].mean


def goal_rows(levels: dict[str, dict[str, Summary]]) -> list[tuple[str, str, bool]]:
    """The issue's goal from the seed means of the final accuracy."""
    inf, eight = lead(levels["inf"]), lead(levels["8"])
    if inf is None or eight is None:
        return []
    lead_inf, best_inf, acc_inf = inf
    lead_8, best_8, acc_8 = eight
    ratio = lead_8 / lead_inf if lead_inf > 0 else float("nan")
    measured = (
        f"lead at eps = inf: {100 * lead_inf:+.1f} points "
        f"({fmt(levels['inf']['fedpac_soap'].mean)} vs {best_inf} {fmt(acc_inf)}); "
        f"at eps = 8: {100 * lead_8:+.1f} points "
        f"({fmt(levels['8']['fedpac_soap'].mean)} vs {best_8} {fmt(acc_8)}); "
        + (f"ratio {ratio:.2f}" if math.isfinite(ratio) else "no lead at eps = inf")
    )
    met = lead_inf > 0 and lead_8 >= 0.5 * lead_inf
    return [
        (
            "at eps = 8, fedpac_soap's lead over the best first-order method is at least "
            "half its lead at eps = inf",
            measured,
            met,
        )
    ]


def tuning_section(lines: list[str], done: dict[str, Record]) -> None:
    """The learning-rate table and the clip norms each method's tuning run gave."""
    rows = []
    for method in METHODS:
        cells = []
        for lr in lr_grid(method):
            record = done.get(tune_key(method, lr))
            cells.append(f"{lr:g}: {fmt(tune_score(record))}" if record else f"{lr:g}: -")
        picked = chosen(method, done)
        rows.append((method, cells, chosen_cell(picked and picked[0], lr_grid(method))))
    tuning_table(
        lines,
        "Validation accuracy (%, mean of the last 3 rounds), non-private, seed 0 "
        "(`*`: the chosen rate is at an edge of the grid)",
        rows,
    )
    lines += [
        "Clip norms: the median L2 norm of the clients' updates (every client of every "
        "round) in the tuning run at the chosen rate; quartiles for scale:",
        "",
        "| method | delta norm: 25% / median / 75% | `dp_clip_norm` "
        "| Theta norm: 25% / median / 75% | `dp_theta_clip_norm` |",
        "|---|---|---|---|---|",
    ]
    for method in METHODS:
        picked = chosen(method, done)
        if picked is None:
            continue
        lr, clip, theta = picked
        norms = done[tune_key(method, lr)]["client_norms"]

        def quart(values: list[float]) -> str:
            q = np.percentile(values, [25, 50, 75])
            return " / ".join(f"{v:.3g}" for v in q)

        theta_cell = theta or "- (Theta stays on the client)"
        lines.append(
            f"| {method} | {quart(norms['delta'])} | {clip} | {quart(norms['theta'])} "
            f"| {theta_cell} |"
        )
    lines.append("")


def num_parameters(done: dict[str, Record]) -> int:
    """The model's trainable parameters, from a ``fedavg_adamw`` run's upload (0: none ran).

    ``fedavg_adamw`` sends its float32 delta and nothing else, so a round's
    ``bytes_up`` is ``4 d`` per client.
    """
    for r in done.values():
        if r["method"] == "fedavg_adamw" and r["privacy"] == "nodp":
            row = r["history"][0]
            return round(row["bytes_up"] / row["num_clients"] / 4)
    return 0


def noise_section(lines: list[str], finals: Sequence[Record], d: int) -> None:
    """Noise multiplier, noise on the mean delta, final logged epsilon, clipped fractions."""
    lines += [
        "| method | level | z | k | C | noise std per entry of the mean delta (z k C / qN) "
        "| its L2 norm over the d entries, in units of C (z k sqrt(d) / qN) "
        "| C_Theta, noise std per entry of the mean Theta (z k C_Theta / qN) "
        "| epsilon logged after the last round | delta | clients clipped: delta / Theta |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        for level in EPSILONS:
            runs = [r for r in finals if r["method"] == method and r["privacy"] == level]
            if not runs:
                continue
            r = runs[0]
            z, k = r["noise_multiplier"], r["noise_scale"]
            std = z * k * float(r["clip"]) / CLIENTS_PER_ROUND
            eps = [series(x, "epsilon")[-1] for x in runs]
            eps_cell = ", ".join(sorted({f"{e:.3g}" for e in eps}))
            theta = pooled_mean(runs, "dp_clipped_theta")
            theta_cell = fmt(theta, digits=0) + " %" if r["theta_clip"] else "- (not sent)"
            ratio = z * k * math.sqrt(d) / CLIENTS_PER_ROUND
            theta_noise = "-"
            if r["theta_clip"]:
                std_theta = z * k * float(r["theta_clip"]) / CLIENTS_PER_ROUND
                theta_noise = f"{r['theta_clip']}, {std_theta:.3g}"
            lines.append(
                f"| {method} | {level_name(level)} | {z:.4g} | {k:.3g} | {r['clip']} | {std:.3g} "
                f"| {ratio:.3g} | {theta_noise} "
                f"| {eps_cell} | {r['delta']:.3g} "
                f"| {fmt(pooled_mean(runs, 'dp_clipped_delta'), digits=0)} % / {theta_cell} |"
            )
    lines.append("")


def theta_cost(lines: list[str], finals: Sequence[Record]) -> None:
    """fedpac_soap without DP versus clipping only (eps = inf), per seed and on average."""
    pairs = {}
    for level in ("nodp", "inf"):
        for r in finals:
            if r["method"] == NODP_METHOD and r["privacy"] == level:
                pairs.setdefault(r["seed"], {})[level] = series(r, "eval_accuracy")[-1]
    both = {s: p for s, p in sorted(pairs.items()) if len(p) == 2}
    if not both:
        lines += ["(runs missing)", ""]
        return
    lines += ["| seed | no DP | eps = inf (clip only) | cost |", "|---|---|---|---|"]
    for seed, p in both.items():
        lines.append(
            f"| {seed} | {fmt(p['nodp'])} | {fmt(p['inf'])} | {100 * (p['nodp'] - p['inf']):+.1f} |"
        )
    costs = np.array([p["nodp"] - p["inf"] for p in both.values()])
    spread = f" +- {100 * costs.std(ddof=1):.1f}" if len(costs) > 1 else ""
    lines += [
        f"| mean | {fmt(np.mean([p['nodp'] for p in both.values()]))} "
        f"| {fmt(np.mean([p['inf'] for p in both.values()]))} "
        f"| {100 * costs.mean():+.1f}{spread} |",
        "",
    ]


ANALYSIS = ("<!-- privacy analysis -->", "<!-- /privacy analysis -->")


def report() -> None:
    """Write ``benchmarks/PRIVACY.md`` from the cached records."""
    done = load_results(RESULTS)
    finals = [r for r in done.values() if r["stage"] == "final"]
    levels = by_level(finals)
    lines = [
        "# Client-level differential privacy at 500 clients (issue #25)",
        "",
        "Written by `python benchmarks/privacy_benchmark.py report` from the run records in "
        "`benchmarks/privacy_results/` (one JSON per run, with the `fedpac-hf train` command "
        "that reproduces it). The protocol in full is the docstring of "
        "`benchmarks/privacy_benchmark.py`; in short: a small ViT "
        f"(d = {num_parameters(done):,} parameters) trained "
        "from scratch on MNIST-5k's 4,000 training rows split over 500 clients (Dirichlet 0.3 "
        f"label skew), {CLIENTS_PER_ROUND} clients per round expected (Poisson sampling, "
        f"q = {CLIENTS_PER_ROUND / NUM_CLIENTS:g}), 10 local steps of batch 8, {NUM_ROUNDS} "
        "rounds; client-level DP at delta = 500^-1.1; learning rates tuned per method on the "
        "validation split without DP (seed 0) and reused; clip norms = the median client "
        "update norm of that tuning run; 3 seeds per cell, final-round test accuracy.",
        "",
        "Made by:",
        "",
    ]
    command_block(
        lines,
        [
            "python benchmarks/privacy_benchmark.py run &   # two workers share the queue",
            "python benchmarks/privacy_benchmark.py run &",
            "wait",
            "python benchmarks/privacy_benchmark.py report",
        ],
    )
    machines = sorted({r.get("machine", "?") for r in done.values()})
    wall = sum(r["wall_time_s"] for r in done.values())
    lines += [
        f"Machine: 2-core CPU, no GPU, shared with other work ({', '.join(machines)}). "
        f"Runs: {len(finals)} final, {len(done) - len(finals)} tuning; "
        f"{wall / 60:.0f} minutes of training in all (two workers). Library commit(s): "
        f"{', '.join(sorted({r['library_commit'] for r in done.values()}))} (the grid ran "
        "while this script was being committed; the commits differ only in `benchmarks/`).",
        "",
        "## Goal",
        "",
    ]
    goals_table(lines, goal_rows(levels))
    lines += [ANALYSIS[0], kept_block(REPORT, *ANALYSIS), ANALYSIS[1], ""]
    lines += [
        "## Test accuracy (%, final round, mean +- std over seeds)",
        "",
        "| method | what the server receives besides the delta | lr | "
        + " | ".join(level_name(level) for level in ("nodp", *EPSILONS))
        + " |",
        "|---|---|---|" + "---|" * (1 + len(EPSILONS)),
    ]
    for method in METHODS:
        lrs = {r["lr"] for r in finals if r["method"] == method}
        lr = ", ".join(f"{x:g}" for x in sorted(lrs)) or "-"
        row = [cell(levels[level].get(method)) for level in ("nodp", *EPSILONS)]
        lines.append(f"| {method} | {METHODS[method][1]} | {lr} | " + " | ".join(row) + " |")
    lines.append("")
    leads = [(level, lead(levels[level])) for level in ("nodp", *EPSILONS)]
    lines += [
        "fedpac_soap's lead over the best first-order method (points): "
        + "; ".join(
            f"{level_name(level)}: {100 * x[0]:+.1f} (vs {x[1]})"
            for level, x in leads
            if x is not None
        )
        + ".",
        "",
        "## Noise and clipping",
        "",
        "z: the noise multiplier (0 at eps = inf; for eps = 8 and 2 the package's "
        f"calibration for {NUM_ROUNDS} rounds); k = sqrt(2) when Theta travels with the delta, "
        "1 otherwise; C: the method's `dp_clip_norm`. Clipped fractions: the share of a "
        "round's clients whose part was scaled down, mean over rounds and seeds.",
        "",
    ]
    noise_section(lines, finals, num_parameters(done))
    lines += [
        "## What clipping costs fedpac_soap at eps = inf",
        "",
        "`fedpac_soap` without DP (`dp_mode: none`: no clipping, exactly 20 clients per round) "
        "against `dp_mode: client` with `dp_noise_multiplier: 0` (delta and Theta clipped at "
        "their medians, Poisson sampling), same rate, test accuracy after the last round:",
        "",
    ]
    theta_cost(lines, finals)
    lines += ["## Learning rates and clip norms (validation split, no DP)", ""]
    tuning_section(lines, done)
    for level in EPSILONS:
        summ = levels[level]
        if not summ:
            continue
        path = RESULTS / f"accuracy_eps-{level}.png"
        plot_curves(
            summ,
            list(METHODS),
            f"500 clients, Dirichlet 0.3, {level_name(level)}: test accuracy (seed mean)",
            path,
        )
        lines.append(f"![{level_name(level)}](privacy_results/{path.name})")
    lines.append("")
    REPORT.write_text("\n".join(lines), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "report", "list"])
    parser.add_argument("--hours", type=float, default=12.0, help="start no run after this")
    ns = parser.parse_args(argv)
    if ns.command == "list":
        runs, waiting = plan(load_results(RESULTS))
        print(json.dumps([r.key for r in runs], indent=1), f"\n{waiting} waiting")
    elif ns.command == "run":
        run_queue(
            lambda done: (lambda p: ([(r.key, r) for r in p[0]], p[1]))(plan(done)),
            lambda key, run: run_one(run),
            RESULTS,
            time.time() + 3600 * ns.hours,
        )
    else:
        report()


if __name__ == "__main__":
    main()
