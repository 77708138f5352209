"""The ``lora_r4`` goal, fifth part: how large a federation keeps fedpac_soap's lead at eps = 8.

Not a goal row: the goal's federation has 500 clients, and its four rows
missed. This asks what the readings of those rows imply for a user: the lead
lives at step sizes whose clip norm, and so whose noise, is large, and the
noise a round adds to the mean delta is ``z k C / (q N)``.

Hypothesis, written before any of these runs: at a fixed sampling rate q and
epsilon, a federation ``m`` times larger (``m N`` clients, ``m`` times more
per round) has about the same z (only delta, ``(m N) ** -1.1``, moves it) and
``m`` times less noise on the mean. At ``m = 10`` (5,000 clients, 500 per
round) fedpac_soap keeps at least half its clip-only lead at eps = 8 (+2.2
points of the first row's +4.4), and its DP-tuned rate moves back up towards
its non-private choice (0.1); at ``m = 3`` (1,500 clients, 150 per round) it
keeps part of it. (The cohort, not the population, is what matters: with 50
clients per round from 5,000, q = 0.01, the calibrated z only falls from
0.548 to 0.372.)

A third size, x100, was added after the x3 and x10 validation runs (x10's
rate tuning chose 0.03 for fedpac_soap, 0.1 scoring 76.4 against 81.6
without DP) and its first test seeds (no lead at either size), before any
x100 run. At x100 the noise on a round's mean delta is about 0.009 clip norms
(z k sqrt(d) / (q N) with z = 0.0069): next to nothing, so x100 separates the
noise from the other settings these runs keep from the 500-client tuning
(Theta's share 0.1, the clip norm following the rate). Hypothesis: at x100
fedpac_soap's lead comes back to within two standard errors of its clip-only
lead (+4.4 +- 0.6) at a rate of 0.1; if it does not, what costs the lead at
x10 is those settings, not the noise.

A control, added after x100's first test seeds (fedpac_soap 77.6 %, n = 4,
against 81.0 clipping only) and before any of its runs: besides the (tiny)
noise, x100 differs from the clip-only runs in two settings, the clip norm
following the rate and Theta's share 0.1 (which only moves noise between the
parts). :func:`control_runs`: clipping only (no noise) with the clip norm
following the rate, fedpac_soap at its non-private rate, :data:`CONTROL_SEEDS`
test seeds. Near x100's score: the clip schedule costs the lead; near 81:
the residual noise (mostly Theta's, at a share of 0.1) does.

Two more controls, added after the first control's 5 seeds (81.9 %) and
before any of their runs (:func:`theta_noise_runs`). The clip schedule is
ruled out, so x100's loss is the residual noise; on the delta it is 0.009
clip norms, which costs the first-order methods nothing, so the suspect is the
noise on Theta (std z k_Theta C_Theta / qN, 0.00048 per float at a share of
0.1). fedpac_soap at x100's rate and clip norms, 5 test seeds each: (a) x100
with Theta's share at its default 0.5 (Theta's noise 2.2 times smaller, the
delta's 1.34 times larger) and (b) x1000 at the share 0.1 (both 10 times
smaller). If Theta's noise costs the lead, both score above x100's 77.6 and
(b) close to the first control's 81.9.

How it is emulated: the runs keep the 500 clients and 50 per round (q = 0.1)
and train with ``dp_noise_multiplier`` set to ``z_m / m``, where ``z_m`` is
the package's calibration for eps = 8 in ``m N`` clients at q = 0.1 over the
same 20 rounds (:func:`population_noise_multiplier`): the noise on the mean
delta and on the mean Theta is then the larger federation's. What it does not
emulate: the mean over ``m`` times more clients per round (less spread from
client sampling) and ``m`` times more data. The epsilon these runs log is the
500-client federation's at that z, not the emulated one's (which is 8 by
construction).

What runs, for each ``m`` in :data:`POPULATIONS` and each goal method: the
rate over the DP grid (the non-private choice and up to three grid rates
below it) at the first row's eps = 8 share and clip schedule, on the
validation split (seed 0; the first row's rate on a tie); then
:data:`~_privacy_tuning.GOAL_SEEDS` test seeds at the chosen rate.
"""

from __future__ import annotations

import math
from dataclasses import replace

from _harness.reporting import Summary, fmt, summarise
from _harness.runs import Record, tune_score
from _privacy_results import cell, lead_cell
from _privacy_runs import population_noise_multiplier
from _privacy_suites import NUM_CLIENTS, Suite
from _privacy_tables import num_parameters
from _privacy_tuning import (
    CLIP_SCHEDULE,
    Run,
    chosen,
    clip_norms,
    dp_chosen,
    dp_grid,
    dp_tune_run,
    scheduled_clip_norm,
)

from fedpac_hf.federated.accounting import epsilon_after

#: how many times larger the emulated federations are (clients and clients per round)
POPULATIONS = ("3", "10", "100")
#: the privacy level they are emulated at
LEVEL = "8"
#: test seeds of the control (:func:`control_runs`)
CONTROL_SEEDS = 5
#: the method the control runs
CONTROL_METHOD = "fedpac_soap"


def control_runs(suite: Suite, done: dict[str, Record]) -> list[Run]:
    """Clipping only with the clip norm following the rate: :data:`CONTROL_METHOD` at its
    non-private rate and clip norms (none before they are chosen)."""
    picked = chosen(suite, CONTROL_METHOD, done)
    if picked is None:
        return []
    lr, _, theta_clip = picked
    clip = scheduled_clip_norm(CONTROL_METHOD, lr, done)
    return [
        Run("final", CONTROL_METHOD, "inf", seed, lr, clip, theta_clip, clip_schedule=CLIP_SCHEDULE)
        for seed in range(CONTROL_SEEDS)
    ]


def theta_noise_runs(suite: Suite, done: dict[str, Record]) -> dict[str, list[Run]]:
    """The controls on Theta's noise: :data:`CONTROL_METHOD` at x100's final settings with
    Theta's default share, and at x1000 (none before x100's rate is chosen)."""
    pick = population_chosen(suite, CONTROL_METHOD, "100", done)
    if pick is None:
        return {}
    seeds = range(CONTROL_SEEDS)
    return {
        "x100, Theta's share 0.5": [replace(pick, seed=s, theta_share="") for s in seeds],
        f"x1000, Theta's share {pick.theta_share or '0.5'}": [
            replace(pick, seed=s, population="1000") for s in seeds
        ],
    }


def population_runs(
    suite: Suite, method: str, population: str, done: dict[str, Record]
) -> list[Run]:
    """The validation runs of ``method``'s rate at the noise of a ``population`` times larger
    federation (none before the first row's eps = 8 settings are chosen)."""
    base = dp_chosen(suite, method, LEVEL, done)
    if base is None:
        return []
    runs: list[Run] = []
    for lr in dp_grid(suite, method, done) or ():
        clip, theta_clip = clip_norms(method, lr, done)
        if base.clip_schedule:
            clip = scheduled_clip_norm(method, lr, done)
        tune = dp_tune_run(base)
        runs.append(replace(tune, lr=lr, clip=clip, theta_clip=theta_clip, population=population))
    return runs


def population_chosen(
    suite: Suite, method: str, population: str, done: dict[str, Record]
) -> Run | None:
    """The final run (seed 0) at the rate that scored best on the validation split at that
    noise (the first row's rate on a tie; None while a run is missing)."""
    base = dp_chosen(suite, method, LEVEL, done)
    runs = population_runs(suite, method, population, done)
    if base is None or not runs or not all(run.key in done for run in runs):
        return None
    best = max(runs, key=lambda run: (tune_score(done[run.key]), run.lr == base.lr))
    return replace(best, stage="final", tuned="dp")


def population_plan(
    suite: Suite, methods: tuple[str, ...], done: dict[str, Record], seeds: int
) -> tuple[list[Run], int]:
    """The runs in priority order (every tuning run, then the finals seed-major) and how many
    wait for others."""
    runs = [
        r
        for m in POPULATIONS
        for method in methods
        for r in population_runs(suite, method, m, done)
    ]
    waiting = 0
    for seed in range(seeds):
        for population in POPULATIONS:
            for method in methods:
                pick = population_chosen(suite, method, population, done)
                waiting += pick is None
                runs += [] if pick is None else [replace(pick, seed=seed)]
    extra = [run for runs in theta_noise_runs(suite, done).values() for run in runs]
    return runs + control_runs(suite, done) + extra, waiting


def population_levels(
    suite: Suite, methods: tuple[str, ...], done: dict[str, Record], seeds: int
) -> dict[str, dict[str, Summary]]:
    """Test accuracy per population multiple and method, at the chosen rates."""
    levels = {}
    for population in POPULATIONS:
        picks = [population_chosen(suite, m, population, done) for m in methods]
        keys = [replace(p, seed=s).key for p in picks if p is not None for s in range(seeds)]
        levels[population] = summarise([done[k] for k in keys if k in done], "eval_accuracy")
    return levels


def population_section(
    lines: list[str],
    suite: Suite,
    levels: dict[str, dict[str, Summary]],
    methods: tuple[str, ...],
    done: dict[str, Record],
    seeds: int,
) -> None:
    """The emulated federations: their noise, the rates tuned at it, the test accuracy and
    fedpac_soap's lead beside the first row's (``levels``); nothing before their first run."""
    tried = {p: {m: population_runs(suite, m, p, done) for m in methods} for p in POPULATIONS}
    if not any(run.key in done for runs in tried.values() for r in runs.values() for run in r):
        return
    emulated = population_levels(suite, methods, done, seeds)
    lines += [
        "## A larger federation at eps = 8, emulated (not a goal row)",
        "",
        "The noise a federation `m` times larger (`m` x 500 clients, `m` x 50 per round, q = "
        "0.1, 20 rounds, delta = (m x 500)^-1.1) gets at eps = 8, in this one: "
        "`dp_noise_multiplier` z_m / m, z_m the package's calibration for the larger "
        "federation (`benchmarks/_privacy_population.py` says why and what it leaves out; "
        "the hypothesis there was written before these runs). Each method at its first-row "
        "share and clip schedule, the rate tuned again at this noise on the validation split "
        "(seed 0).",
        "",
        "| federation | z_m | its epsilon | noise multiplier here (z_m / m) | epsilon at 500 "
        "clients (what the runs log) | noise on a round's mean delta, in clip norms, before k "
        "(z sqrt(d) / qN; k is 1 to 1.12 here, the noise table above) |",
        "|---|---|---|---|---|---|",
    ]
    d = num_parameters(done)
    for population in ("1", *POPULATIONS):  # x1: the first row's federation
        m = int(population)
        z = population_noise_multiplier(suite, population)
        here = epsilon_after(suite.num_rounds, z, suite.sample_rate, NUM_CLIENTS**-1.1)
        there = epsilon_after(suite.num_rounds, z * m, suite.sample_rate, (m * NUM_CLIENTS) ** -1.1)
        lines.append(
            f"| {m * NUM_CLIENTS:,} clients, {m * suite.clients_per_round:,} per round"
            + (" (the first row)" if m == 1 else "")
            + " | "
            f"{z * m:.3f} | {there:.2f} | {z:.4f} | {here:.3g} | "
            f"{z * math.sqrt(d) / suite.clients_per_round:.3g} |"
        )
    lines += [
        "",
        "Validation accuracy (%, mean of the last 3 rounds), seed 0, by rate:",
        "",
        "| method | federation | " + "lr: score | " * 4 + "chosen lr |",
        "|---|---|" + "---|" * 5,
    ]
    for method in methods:
        for population in POPULATIONS:
            runs = tried[population][method]
            cells = [
                f"{run.lr:g}: " + (fmt(tune_score(done[run.key])) if run.key in done else "-")
                for run in runs
            ]
            cells += [""] * (4 - len(cells))
            pick = population_chosen(suite, method, population, done)
            chosen = "-" if pick is None else f"{pick.lr:g}"
            lines.append(f"| {method} | x{population} | " + " | ".join(cells) + f" | {chosen} |")
    lines += [
        "",
        "Test accuracy (%, final round, mean +- std over seeds) and fedpac_soap's lead over "
        "the best first-order method (+- its standard error):",
        "",
        "| method | eps = inf (clip only) | eps = 8, 500 clients (first row) | "
        + " | ".join(f"eps = 8, x{p} (emulated)" for p in POPULATIONS)
        + " |",
        "|---|---|---|" + "---|" * len(POPULATIONS),
    ]
    columns = [levels["inf"], levels[LEVEL], *(emulated[p] for p in POPULATIONS)]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(cell(c.get(method)) for c in columns) + " |")
    leads = [lead_cell(column) for column in columns]
    lines += ["| fedpac_soap's lead | " + " | ".join(leads) + " |", ""]
    control = summarise(
        [done[r.key] for r in control_runs(suite, done) if r.key in done], "eval_accuracy"
    )
    if CONTROL_METHOD in control:
        lines += [
            f"Control: {CONTROL_METHOD} with clipping only (no noise) and the clip norm "
            f"following the rate, at its non-private rate: {cell(control[CONTROL_METHOD])}, "
            f"against {cell(levels['inf'].get(CONTROL_METHOD))} with the constant clip norm "
            "(the first column).",
            "",
        ]
    for name, runs in theta_noise_runs(suite, done).items():
        summary = summarise([done[r.key] for r in runs if r.key in done], "eval_accuracy")
        if CONTROL_METHOD in summary:
            lines += [
                f"Control on Theta's noise: {CONTROL_METHOD} at x100's rate and clip norms, "
                f"{name}: {cell(summary[CONTROL_METHOD])}.",
                "",
            ]
