"""The privacy benchmark's sixth variant: Theta from public data at the server.

``fedpac_soap`` and ``fedadamw`` again, with ``public_curvature`` (the server's
Theta from scikit-learn's digits, :data:`~_privacy_tuning.PUBLIC_DATA`): their
summaries beside every other method's DP-tuned ones, the goal against the best
first-order method (``fedadamw`` with public curvature counts as one), and the
tuning table. ``_privacy_report.py`` writes them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict

from _harness.reporting import Summary, chosen_cell, fmt, summarise, tuning_table
from _harness.runs import Record, tune_score
from _privacy_results import (
    cell,
    dp_tuned_levels,
    goal_rows,
    level_name,
    setting_label,
    tuned_as,
)
from _privacy_suites import Suite
from _privacy_tuning import (
    CURVATURE_LEVEL,
    FIRST_ORDER,
    PUBLIC_CURVATURE,
    PUBLIC_RUNS,
    THETA_SHARES,
    Run,
    aligns,
    chosen,
    dp_budgeted,
    dp_chosen,
    dp_constant,
    dp_grid,
    dp_rate,
    lr_grid,
    schedule_runs,
    tune_key,
)

#: the first-order methods the public variant of fedpac_soap is compared with
RIVALS = (*FIRST_ORDER, *(m for m, base in PUBLIC_CURVATURE.items() if base in FIRST_ORDER))
#: the public variant whose lead the goal row measures
LEADER = next(m for m, base in PUBLIC_CURVATURE.items() if base == "fedpac_soap")
LEVELS = ("inf", CURVATURE_LEVEL)
#: how the other methods' DP settings were chosen (e.g. :func:`~_privacy_tuning.dp_budgeted`)
Choose = Callable[[Suite, str, str, dict[str, Record]], Run | None]


def dp_chosen_row(
    suite: Suite, method: str, level: str, done: dict[str, Record]
) -> tuple[list[str], str]:
    """A tuning table's cells for ``method`` under DP at ``level`` (the rates, then, for a method
    that sends Theta, the shares at the best, then the clip schedule's runs) and what
    :func:`~_privacy_tuning.dp_chosen` took from them."""
    grid = dp_grid(suite, method, done) or ()
    tried = [Run("dptune", method, level, 0, lr) for lr in grid]
    rate = dp_rate(suite, method, level, done)
    if aligns(method) and rate is not None:
        tried += [Run("dptune", method, level, 0, rate, theta_share=s) for s in THETA_SHARES]
    constant = dp_constant(suite, method, level, done)
    tried += schedule_runs(suite, constant, done) if constant else []
    cells = [
        setting_label(run.lr, run.theta_share, run.clip_schedule)
        + f": {fmt(tune_score(done[run.key])) if run.key in done else '-'}"
        for run in tried
    ]
    picked = dp_chosen(suite, method, level, done)
    if picked is None:
        return cells, "-"
    return cells, setting_label(
        chosen_cell(picked.lr, grid), picked.theta_share, picked.clip_schedule
    )


def public_pick(suite: Suite, method: str, level: str, done: dict[str, Record]) -> Run | None:
    """A public variant's final run (seed 0) at ``level``: the non-private rate at eps = inf,
    the rate and clip schedule tuned under DP at :data:`CURVATURE_LEVEL` (None: missing)."""
    if level != "inf":
        return dp_chosen(suite, method, level, done)
    picked = chosen(suite, method, done)
    return None if picked is None else Run("final", method, "inf", 0, *picked)


def public_levels(
    suite: Suite,
    finals: Sequence[Record],
    done: dict[str, Record],
    choose: Choose = dp_budgeted,
) -> dict[str, dict[str, Summary]]:
    """Every method at its DP-tuned settings (``choose``: by default the fifth variant's), plus
    the public variants."""
    levels = dp_tuned_levels(suite, finals, done, choose)
    for level in LEVELS:
        runs: list[Record] = []
        for method in PUBLIC_CURVATURE:
            pick = public_pick(suite, method, level, done)
            if pick is not None:
                wanted = tuned_as(asdict(pick))
                runs += [r for r in finals if tuned_as(r) == wanted]
        levels[level] = {**levels[level], **summarise(runs, "eval_accuracy")}
    return levels


def public_goal(
    suite: Suite, finals: Sequence[Record], done: dict[str, Record], choose: Choose = dp_budgeted
) -> list[tuple[str, str, bool]]:
    """The goal row of the sixth variant (none before its runs)."""
    return goal_rows(
        public_levels(suite, finals, done, choose),
        " (Theta from public data at the server, the rate and clip schedule tuned under DP; "
        f"against the best of {', '.join(RIVALS)})",
        LEADER,
        RIVALS,
    )


def public_section(
    lines: list[str],
    suite: Suite,
    finals: Sequence[Record],
    done: dict[str, Record],
    choose: Choose = dp_budgeted,
    variant: str = "the sixth variant",
) -> None:
    """Validation scores of the public variants, then their test accuracy beside the rest."""
    if not any(r["method"] in PUBLIC_CURVATURE for r in done.values()):
        return
    lines += [
        f"## Theta from public data ({variant})",
        "",
        f"`public_curvature_dataset: digits`, `public_curvature_clients: {PUBLIC_RUNS}`: "
        "each round the server runs the client rule on scikit-learn's 8x8 digits (digits "
        "5-9 of its training split, 717 images resized to 28 x 28) from the round's state, "
        f"{PUBLIC_RUNS} times, and the mean of their Theta is the next global Theta; clients "
        "send no Theta, so under DP the delta gets the whole mechanism (k = 1). Tuned as "
        "methods of their own: the rate without DP, then at eps = 8 the rate and the clip "
        "schedule under DP, as in the second protocol.",
        "",
    ]
    rows = []
    for method in PUBLIC_CURVATURE:
        grid = lr_grid(suite, method)
        cells = [
            f"{lr:g}: {fmt(tune_score(done[tune_key(method, lr)]))}"
            if tune_key(method, lr) in done
            else f"{lr:g}: -"
            for lr in grid
        ]
        picked = chosen(suite, method, done)
        rows.append((f"{method}, no DP", cells, chosen_cell(picked and picked[0], grid)))
        label = f"{method}, {level_name(CURVATURE_LEVEL)}"
        rows.append((label, *dp_chosen_row(suite, method, CURVATURE_LEVEL, done)))
    tuning_table(
        lines,
        "Validation accuracy (%, mean of the last 3 rounds), seed 0: the rates without DP, "
        'then under DP at a constant clip norm and with the clip norm following the rate ("C '
        '~ lr"; `*`: the chosen rate is at an edge of the grid)',
        rows,
    )
    levels = public_levels(suite, finals, done, choose)
    lines += [
        "Test accuracy (%, final round, mean +- std over seeds), every method at its "
        "settings tuned under DP (eps = inf: the non-private rate):",
        "",
        "| method | " + " | ".join(level_name(level) for level in LEVELS) + " |",
        "|---|" + "---|" * len(LEVELS),
    ]
    for method in (LEADER, "fedpac_soap", *RIVALS):
        lines.append(
            f"| {method} | "
            + " | ".join(cell(levels[level].get(method)) for level in LEVELS)
            + " |"
        )
    lines.append("")
