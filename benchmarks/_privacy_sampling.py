"""The ``lora_r4`` goal, seventh part: what secure aggregation's fixed-size samples cost.

Not a goal row. Client-level DP now combines with Flower's SecAgg+, which
cannot aggregate the rounds of 0 or 1 client that Poisson sampling can draw,
so a secure run samples exactly ``clients_per_round`` clients
(``dp_sampling: fixed``). Its accountant (sampling without replacement,
replace-one adjacency) needs 2.6 times the noise multiplier for the same
epsilon here: z 1.44 instead of 0.55 at eps = 8 (500 clients, q = 0.1, 20
rounds; docs/privacy.md). In process the run is the secure run's up to
SecAgg+'s rounding (``tests/test_secagg.py``), so it is measured with
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
"""

from __future__ import annotations

from dataclasses import replace

from _harness.reporting import Summary, summarise
from _harness.runs import Record
from _privacy_results import cell, lead_cell
from _privacy_share import paired_difference
from _privacy_suites import Suite
from _privacy_tuning import Run, dp_chosen

#: the sampling measured (``dp_sampling`` as passed)
SAMPLING = "fixed"
#: the privacy level
LEVEL = "8"
#: test seeds (the first row's Poisson runs of the same seeds are the pairs)
SEEDS = 5


def sampling_plan(
    suite: Suite, methods: tuple[str, ...], done: dict[str, Record], seeds: int
) -> tuple[list[Run], int]:
    """The runs (seed-major) and how many wait for the first row's choices; ``seeds`` (the
    goal's) is not used: this part runs :data:`SEEDS`."""
    runs, waiting = [], 0
    for seed in range(SEEDS):
        for method in methods:
            pick = dp_chosen(suite, method, LEVEL, done)
            if pick is None:
                waiting += 1
            else:
                runs.append(replace(pick, seed=seed, sampling=SAMPLING))
    return runs, waiting


def _summaries(
    suite: Suite, methods: tuple[str, ...], done: dict[str, Record], sampling: str
) -> dict[str, Summary]:
    """Each method's test accuracy at the first row's settings with ``sampling``, seeds
    ``0 .. SEEDS - 1`` (those done)."""
    records = []
    for method in methods:
        pick = dp_chosen(suite, method, LEVEL, done)
        if pick is None:
            continue
        runs = [replace(pick, seed=seed, sampling=sampling) for seed in range(SEEDS)]
        records += [done[run.key] for run in runs if run.key in done]
    return summarise(records, "eval_accuracy")


def sampling_section(
    lines: list[str], suite: Suite, methods: tuple[str, ...], done: dict[str, Record]
) -> None:
    """Poisson against fixed-size samples at eps = 8, the same settings and seeds."""
    fixed = _summaries(suite, methods, done, SAMPLING)
    if not fixed:
        return
    poisson = _summaries(suite, methods, done, "")
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
        pair = {"noise": fixed.get(method), "clip only": poisson.get(method)}
        paired = paired_difference(pair) if all(pair.values()) else "-"
        lines.append(
            f"| {method} | {cell(poisson.get(method))} | {_z(poisson.get(method))} | "
            f"{cell(fixed.get(method))} | {_z(fixed.get(method))} | {paired} |"
        )
    lines += [
        f"| fedpac_soap's lead | {lead_cell(poisson)} | | {lead_cell(fixed)} | | |",
        "",
    ]


def _z(summary: Summary | None) -> str:
    """The noise multipliers the runs of ``summary`` resolved ("-" without runs)."""
    values = sorted({r.get("noise_multiplier") for r in summary.runs} if summary else set())
    return ", ".join(f"{z:.3g}" for z in values if z is not None) or "-"
