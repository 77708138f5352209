"""The tables of ``benchmarks/PRIVACY.md`` that come from the tuning runs: the rates and clip
norms without DP, everything tuned under DP (the second protocol), and the noise and
clipping at the chosen settings.

``_privacy_report.py`` writes the report and calls these; what was tuned and
how is defined in ``_privacy_tuning.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from _harness.reporting import (
    chosen_cell,
    fmt,
    tuning_table,
)
from _harness.runs import Record, series, tune_score
from _privacy_results import (
    cell,
    dp_tuned_levels,
    lead_line,
    level_name,
    pooled_mean,
    setting_label,
    tuned_as,
)
from _privacy_suites import Suite
from _privacy_tuning import (
    CURVATURE_LEVEL,
    DP_TUNED,
    EPSILONS,
    METHODS,
    THETA_SHARES,
    Run,
    aligns,
    budget_runs,
    chosen,
    decay_runs,
    dp_budgeted,
    dp_chosen,
    dp_constant,
    dp_decayed,
    dp_final,
    dp_grid,
    dp_rate,
    lr_grid,
    quantile_runs,
    schedule_runs,
    tune_key,
)


def tuning_section(
    lines: list[str], suite: Suite, done: dict[str, Record], methods: Sequence[str] = tuple(METHODS)
) -> None:
    """The learning-rate table and the clip norms each of ``methods``' tuning runs gave."""
    rows = []
    for method in methods:
        cells = []
        for lr in lr_grid(suite, method):
            record = done.get(tune_key(method, lr))
            cells.append(f"{lr:g}: {_score_and_norm(record)}" if record else f"{lr:g}: -")
        picked = chosen(suite, method, done)
        rows.append((method, cells, chosen_cell(picked and picked[0], lr_grid(suite, method))))
    tuning_table(
        lines,
        "Validation accuracy (%, mean of the last 3 rounds), non-private, seed 0; in "
        "brackets the median L2 norm of the clients' deltas in that run, every client of "
        "every round (a clip norm at the median is this norm, and client-level DP's noise "
        "is proportional to the clip norm; `*`: the chosen rate is at an edge of the grid)",
        rows,
    )
    lines += [
        "Clip norms: the median L2 norm of the clients' updates (every client of every "
        "round) in the tuning run at the chosen rate (at another rate, that rate's run); "
        "quartiles for scale:",
        "",
        "| method | delta norm: 25% / median / 75% | `dp_clip_norm` "
        "| Theta norm: 25% / median / 75% | `dp_theta_clip_norm` |",
        "|---|---|---|---|---|",
    ]
    for method in methods:
        picked = chosen(suite, method, done)
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


def _score_and_norm(record: Record) -> str:
    """A tuning run's score, with its clients' median delta norm when it was recorded."""
    norms = (record.get("client_norms") or {}).get("delta")
    median = f" ({float(np.median(norms)):.3g})" if norms else ""
    return f"{fmt(tune_score(record))}{median}"


def dp_tuning_section(
    lines: list[str], suite: Suite, finals: Sequence[Record], done: dict[str, Record]
) -> None:
    """Validation scores under DP per level, the rates chosen, and the test accuracy at them."""
    rows = []
    for level in DP_TUNED:
        for method in METHODS:
            grid = dp_grid(suite, method, done) or ()
            cells = []
            for lr in grid:
                record = done.get(Run("dptune", method, level, 0, lr).key)
                cells.append(f"{lr:g}: {fmt(tune_score(record))}" if record else f"{lr:g}: -")
            rate = dp_rate(suite, method, level, done)
            tried = [
                Run("dptune", method, level, 0, rate, theta_share=share)
                for share in (THETA_SHARES if aligns(method) and rate is not None else ())
            ]
            constant = dp_constant(suite, method, level, done)
            tried += schedule_runs(suite, constant, done) if constant else []
            chosen_run = dp_chosen(suite, method, level, done)
            tried += quantile_runs(chosen_run, done) if chosen_run else []
            final_run = dp_final(suite, method, level, done)
            decayed = dp_decayed(suite, method, level, done)
            if level == CURVATURE_LEVEL and final_run and decayed:
                tried += [r for r in decay_runs(final_run, done) if r.stage == "dptune"]
                tried += [r for r in budget_runs(decayed, done) if r.stage == "dptune"]
            for run in tried:
                score = fmt(tune_score(done[run.key])) if run.key in done else "-"
                label = setting_label(
                    run.lr,
                    run.theta_share,
                    run.clip_schedule,
                    run.clip_quantile,
                    run.decay,
                    run.budget,
                )
                cells.append(f"{label}: {score}")
            picked = dp_budgeted(suite, method, level, done)
            choice = chosen_cell(picked and picked.lr, grid)
            if picked:
                choice = setting_label(
                    choice,
                    picked.theta_share,
                    picked.clip_schedule,
                    picked.clip_quantile,
                    picked.decay,
                    picked.budget,
                )
            rows.append((f"{method}, {level_name(level)}", cells, choice))
    tuning_table(
        lines,
        "Validation accuracy (%, mean of the last 3 rounds) under DP, seed 0: the rates at "
        "Theta's default share s = 0.5, then, for methods that send Theta, other shares "
        "(`dp_theta_share`) at the best of those rates, then the clip norm following the "
        'rate (`dp_clip_schedule: learning_rate`, "C ~ lr") at each rate with the chosen '
        "share, then the clip norms at other quantiles q of the non-private norms (no q: "
        "the median) with what was chosen, then at eps = 8 for the methods that send Theta "
        "the curvature's decay per step (SOAP's `shampoo_beta`, AdamW's second-moment rate) "
        "with what was chosen, then for fedpac_soap Theta's size (`theta_budget`, 1.0 by "
        "default) with what was chosen (`*`: the chosen rate is at an edge of "
        "the grid; the grid's top is the non-private choice)",
        rows,
    )
    levels = dp_tuned_levels(suite, finals, done)
    lines += [
        "Test accuracy (%, final round, mean +- std over seeds) at the rates (and Theta's "
        'shares s, where not 0.5; "C ~ lr": the clip norm follows the rate; q: the clip '
        "norms' quantile, where not the median; decay: the curvature's, where not the "
        "optimizer's default; budget: `theta_budget`, where not 1.0) tuned under DP (eps = inf: the non-private "
        "rate):",
        "",
        "| method | "
        + " | ".join(f"{level_name(level)}: lr | accuracy" for level in EPSILONS)
        + " |",
        "|---|" + "---|---|" * len(EPSILONS),
    ]
    for method in METHODS:
        row = []
        for level in EPSILONS:
            summary = levels[level].get(method)
            used = sorted({(r["lr"], *tuned_as(r)[3:]) for r in summary.runs} if summary else [])
            rates = "; ".join(setting_label(*u) for u in used)
            row += [rates or "-", cell(summary)]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    lines += ["", lead_line(levels, EPSILONS), "", "Noise and clipping at these rates:", ""]
    tuned = [r for level in DP_TUNED for summary in levels[level].values() for r in summary.runs]
    noise_section(lines, suite, tuned, num_parameters(done))


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


def noise_section(
    lines: list[str],
    suite: Suite,
    finals: Sequence[Record],
    d: int,
    methods: Sequence[str] = tuple(METHODS),
) -> None:
    """Noise multiplier, noise on the mean delta, final logged epsilon, clipped fractions."""
    lines += [
        "| method | level | z | k | C | noise std per entry of the mean delta (z k C / qN) "
        "| its L2 norm over the d entries, in units of C (z k sqrt(d) / qN) "
        "| C_Theta, noise std per entry of the mean Theta (z k_Theta C_Theta / qN) "
        "| epsilon logged after the last round | delta | clients clipped: delta / Theta |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        for level in EPSILONS:
            runs = [r for r in finals if r["method"] == method and r["privacy"] == level]
            if not runs:
                continue
            r = runs[0]
            z, k = r["noise_multiplier"], r["noise_scale"]
            k_theta = r.get("theta_noise_scale", k)  # runs before dp_theta_share: the same k
            std = z * k * float(r["clip"]) / suite.clients_per_round
            clip = r["clip"] + (" (peak, C ~ lr)" if r.get("clip_schedule") else "")
            eps = [series(x, "epsilon")[-1] for x in runs]
            eps_cell = ", ".join(sorted({f"{e:.3g}" for e in eps}))
            theta = pooled_mean(runs, "dp_clipped_theta")
            theta_cell = fmt(theta, digits=0) + " %" if r["theta_clip"] else "- (not sent)"
            ratio = z * k * math.sqrt(d) / suite.clients_per_round
            theta_noise = "-"
            if r["theta_clip"]:
                std_theta = z * k_theta * float(r["theta_clip"]) / suite.clients_per_round
                theta_noise = f"{r['theta_clip']}, {std_theta:.3g}"
            lines.append(
                f"| {method} | {level_name(level)} | {z:.4g} | {k:.3g} | {clip} | {std:.3g} "
                f"| {ratio:.3g} | {theta_noise} "
                f"| {eps_cell} | {r['delta']:.3g} "
                f"| {fmt(pooled_mean(runs, 'dp_clipped_delta'), digits=0)} % / {theta_cell} |"
            )
    lines.append("")
