"""The ``lora_r4`` goal, seventh part: what secure aggregation's fixed-size samples cost.

Not a goal row. Client-level DP now combines with Flower's SecAgg+, which
cannot aggregate the rounds of 0 or 1 client that Poisson sampling can draw,
so a secure run samples exactly ``clients_per_round`` clients
(``dp_sampling: fixed``). Its accountant (sampling without replacement,
replace-one adjacency) needs 2.6 times the noise multiplier for the same
epsilon here: z 1.44 instead of 0.55 at eps = 8 (500 clients, q = 0.1, 20
rounds; docs/privacy.md). In process the run is the secure run's up to
SecAgg+'s rounding (``tests/test_secagg_dp.py``), so it is measured with
``fedpac-hf train`` like every other run.

Hypotheses, written before any of these runs:

1. At eps = 8 with the first row's settings (rate, Theta's share and clip
   schedule tuned under Poisson sampling, not tuned again: the cost of
   switching a tuned run to secure aggregation), every goal method loses more
   than 2 points against its Poisson runs of the same seeds (paired by seed).
   Expected from the ``lora`` suite, where going from eps = 8 to eps = 2 (z
   0.55 to 1.03) cost fedpac_soap 2.6 points.
2. fedpac_soap's lead over the best first-order method is lower with
   fixed-size samples than with Poisson samples on the same seeds (the first
   row's lead over all 10 seeds: -0.9 +- 0.8 points): noise on the delta has
   cost fedpac_soap more than the first-order methods in every federation
   measured so far.

What runs: :data:`~_privacy_goal.GOAL_METHODS` at eps = 8 with the first
row's chosen settings (:func:`~_privacy_tuning.dp_chosen`) and
``dp_sampling: fixed``, test seeds ``0 .. SEEDS - 1``.

3. **The rate tuned again** (added after the results of 1 and 2, before any
   of its runs). All three methods chose the clip norm that follows the rate
   (``C ~ lr``), under which the noise on a round's update scales with the
   rate as the clipped updates do; a smaller rate shrinks both. Hypothesis:
   with the rate tuned again under fixed-size samples (validation split,
   seed 0, over the first row's DP grid, its share and clip schedule, each
   rate's clip norms as the first row's), every method recovers less than a
   third of what the switch cost it (test seeds 0-4, paired by seed against
   the untuned fixed-size runs); where the first row's rate is chosen again,
   nothing is recovered by construction. If it recovers more, the noise's
   scaling with the rate is not what limits these runs.

What runs for 3: :func:`retune_runs` (the DP grid's rates at fixed-size
samples, validation seed 0), then the test seeds at the chosen rate where it
is not the first row's (:func:`retuned`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from _harness.reporting import Summary, fmt, summarise
from _harness.runs import Record, tune_score
from _privacy_results import cell, lead_cell, paired_difference
from _privacy_suites import Suite
from _privacy_tuning import (
    CLIP_SCHEDULE,
    Run,
    clip_norms,
    dp_chosen,
    dp_grid,
    dp_tune_run,
    scheduled_clip_norm,
)

#: the sampling measured (``dp_sampling`` as passed)
SAMPLING = "fixed"
#: the privacy level
LEVEL = "8"
#: test seeds (the first row's Poisson runs of the same seeds are the pairs)
SEEDS = 5


def sampling_plan(
    suite: Suite, methods: tuple[str, ...], done: dict[str, Record], seeds: int
) -> tuple[list[Run], int]:
    """The runs (seed-major; then the rate's tuning runs and the finals at the rate tuned
    again) and how many wait for others; ``seeds`` (the goal's) is not used: this part runs
    :data:`SEEDS`."""
    runs, waiting = _finals(methods, lambda method: untuned(suite, method, done))
    for method in methods:
        runs += retune_runs(suite, method, done)
    more, missing = _finals(methods, lambda method: retuned(suite, method, done))
    return runs + more, waiting + missing


def _finals(
    methods: tuple[str, ...], pick_of: Callable[[str], Run | None]
) -> tuple[list[Run], int]:
    """Seed-major final runs of :data:`SEEDS` seeds from each method's ``pick_of(method)``
    (seed 0), and how many methods' picks are missing, once per seed."""
    runs: list[Run] = []
    waiting = 0
    for seed in range(SEEDS):
        for method in methods:
            pick = pick_of(method)
            if pick is None:
                waiting += 1
            else:
                runs.append(replace(pick, seed=seed))
    return runs, waiting


def untuned(suite: Suite, method: str, done: dict[str, Record]) -> Run | None:
    """The first row's final run (seed 0) at eps = 8 with fixed-size samples."""
    pick = dp_chosen(suite, method, LEVEL, done)
    return None if pick is None else replace(pick, sampling=SAMPLING)


def retune_runs(suite: Suite, method: str, done: dict[str, Record]) -> list[Run]:
    """The validation runs (seed 0) of the first row's DP grid at fixed-size samples, with the
    first row's share and clip schedule and each rate's clip norms (none before its choice)."""
    pick = dp_chosen(suite, method, LEVEL, done)
    grid = dp_grid(suite, method, done)
    if pick is None or grid is None:
        return []
    runs = []
    for lr in grid:
        clip, theta_clip = clip_norms(method, lr, done)
        if pick.clip_schedule == CLIP_SCHEDULE:
            clip = scheduled_clip_norm(method, lr, done)
        tune = replace(dp_tune_run(pick), lr=lr, clip=clip, theta_clip=theta_clip)
        runs.append(replace(tune, sampling=SAMPLING))
    return runs


def retuned(suite: Suite, method: str, done: dict[str, Record]) -> Run | None:
    """The final run (seed 0) at the rate tuned again under fixed-size samples (the first
    row's rate on a tie, whose final runs are the untuned ones; another rate's are marked
    ``tuned="dpfixed"``, since a final run's key does not hold its rate); None while a
    tuning run is missing."""
    pick = dp_chosen(suite, method, LEVEL, done)
    runs = retune_runs(suite, method, done)
    if pick is None or not runs or not all(run.key in done for run in runs):
        return None
    best = max(runs, key=lambda run: (tune_score(done[run.key]), run.lr == pick.lr))
    if best.lr == pick.lr:  # the first row's rate again: the untuned fixed-size runs
        return untuned(suite, method, done)
    return replace(best, stage="final", tuned="dpfixed")


def _summary_of(
    methods: tuple[str, ...], pick_of: Callable[[str], Run | None], done: dict[str, Record]
) -> dict[str, Summary]:
    """Each method's test accuracy over the done runs of :func:`_finals` from ``pick_of``."""
    runs, _ = _finals(methods, pick_of)
    return summarise([done[run.key] for run in runs if run.key in done], "eval_accuracy")


def sampling_section(
    lines: list[str], suite: Suite, methods: tuple[str, ...], done: dict[str, Record]
) -> None:
    """Poisson against fixed-size samples at eps = 8, the same settings and seeds."""
    fixed = _summary_of(methods, lambda method: untuned(suite, method, done), done)
    if not fixed:
        return
    poisson = _summary_of(methods, lambda method: dp_chosen(suite, method, LEVEL, done), done)
    lines += [
        "## Fixed-size samples: what secure aggregation costs under DP (seventh part)",
        "",
        "Not a goal row (`benchmarks/_privacy_sampling.py` states the hypotheses, written "
        f"before its runs). Test accuracy (%, final round, mean +- std over seeds 0-{SEEDS - 1})"
        f" at eps = {LEVEL} with the first row's settings: Poisson samples (the first row's "
        "runs) against exactly 50 clients per round (`dp_sampling: fixed`, SecAgg+'s "
        "sampling), each with the noise multiplier z the run resolved for that epsilon, and "
        "the difference paired by seed:",
        "",
        "| method | Poisson | z | fixed-size | z | fixed - Poisson, paired |",
        "|---|---|---|---|---|---|",
    ]
    for method in methods:
        paired = paired_difference(fixed.get(method), poisson.get(method))
        lines.append(
            f"| {method} | {cell(poisson.get(method))} | {_z(poisson.get(method))} | "
            f"{cell(fixed.get(method))} | {_z(fixed.get(method))} | {paired} |"
        )
    lines += [
        f"| fedpac_soap's lead | {lead_cell(poisson)} | | {lead_cell(fixed)} | | |",
        "",
    ]
    _retuned_section(lines, suite, methods, done, fixed)


def _retuned_section(
    lines: list[str],
    suite: Suite,
    methods: tuple[str, ...],
    done: dict[str, Record],
    fixed: dict[str, Summary],
) -> None:
    """The rate tuned again under fixed-size samples (the third hypothesis)."""
    tried = {method: retune_runs(suite, method, done) for method in methods}
    if not any(run.key in done for runs in tried.values() for run in runs):
        return
    lines += [
        "The rate tuned again under fixed-size samples (the third hypothesis): validation "
        "accuracy (%, mean of the last 3 rounds, seed 0) over the first row's DP grid, with "
        "its share and clip schedule (`*`: the first row's rate):",
        "",
        "| method | " + " | ".join(["rate: accuracy"] * max(map(len, tried.values()))) + " |",
        "|---|" + "---|" * max(map(len, tried.values())),
    ]
    for method, runs in tried.items():
        pick = dp_chosen(suite, method, LEVEL, done)
        cells = [
            f"{run.lr:g}{'*' if pick and run.lr == pick.lr else ''}: "
            + (fmt(tune_score(done[run.key])) if run.key in done else "-")
            for run in runs
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    again = _summary_of(methods, lambda method: retuned(suite, method, done), done)
    lines += [
        "",
        "Test accuracy (%, final round, seeds 0-4) at the rate chosen so, against the untuned "
        "fixed-size runs (paired by seed):",
        "",
        "| method | chosen rate | fixed-size, first row's rate | fixed-size, rate tuned "
        "again | difference, paired |",
        "|---|---|---|---|---|",
    ]
    for method in methods:
        pick = retuned(suite, method, done)
        paired = paired_difference(again.get(method), fixed.get(method))
        lines.append(
            f"| {method} | {'-' if pick is None else f'{pick.lr:g}'} | {cell(fixed.get(method))}"
            f" | {cell(again.get(method))} | {paired} |"
        )
    lines += [f"| fedpac_soap's lead | | {lead_cell(fixed)} | {lead_cell(again)} | |", ""]


def _z(summary: Summary | None) -> str:
    """The noise multipliers the runs of ``summary`` resolved ("-" without runs)."""
    values = sorted({r.get("noise_multiplier") for r in summary.runs} if summary else set())
    return ", ".join(f"{z:.3g}" for z in values if z is not None) or "-"
