"""The ``lora_r4`` goal's fourth row: the correction strength beta tuned under DP.

Why (decided after the third row's results, before any of its runs): every
local step adds ``-beta eta_l g_G``, and ``g_G`` is the previous round's
noised mean delta over ``-K eta_l``, so each client's delta carries ``beta``
times the last round's noise, the same in all of them: averaging does not
shrink it, and the next round carries ``beta`` of it again, a momentum of
``beta`` on the server's noise. The first row's losses to the noise follow the
correction: ``fedavg_adamw`` (no correction) lost 0.3 points, ``fedadamw``
(beta 0.5) 1.8, fedpac_soap (beta 0.5) 6.5. Rows 1 to 3 kept beta at 0.5.

What runs: for the goal's methods with a correction (``fedadamw`` and
fedpac_soap), at eps = 8 with every other setting as the first row chose it
(:func:`~_privacy_tuning.dp_chosen`), beta in :data:`BETAS` on the validation
split (seed 0) besides the first row's 0.5; the best (0.5 on a tie,
:func:`~_privacy_tuning.best_tried`) gets 10 test seeds where it is not 0.5.
The goal row: fedpac_soap at its beta against the best first-order method at
either beta; eps = inf is the first row's clip-only runs (beta 0.5, the
non-private choice).
"""

from __future__ import annotations

from dataclasses import replace

from _harness.reporting import Summary, fmt
from _harness.runs import Record, tune_score
from _privacy_results import cell, dp_tuned_levels, variant_goal, with_variant
from _privacy_suites import Suite
from _privacy_tuning import Run, algorithm_of, best_tried, dp_chosen, dp_tune_run

#: the correction strengths tried under DP besides the registry's 0.5
BETAS = ("0.25", "0")
#: the privacy level they are tried at
LEVEL = "8"
#: name suffix of a method's summary at its beta tuned under DP
SUFFIX = ", beta tuned"


def corrects(method: str) -> bool:
    """Whether ``method``'s algorithm has the correction (so beta matters)."""
    from fedpac_hf.federated import get_algorithm

    return get_algorithm(algorithm_of(method)).correction


def beta_runs(suite: Suite, method: str, done: dict[str, Record]) -> list[Run]:
    """The DP tuning runs of ``method``'s beta (none without a correction or before the first
    row's settings are chosen)."""
    base = dp_chosen(suite, method, LEVEL, done)
    if base is None or not corrects(method):
        return []
    return [replace(dp_tune_run(base), beta=beta) for beta in BETAS]


def beta_chosen(suite: Suite, method: str, level: str, done: dict[str, Record]) -> Run | None:
    """The first row's final run (seed 0) at ``level``, with beta tuned under DP at
    :data:`LEVEL` (None while a tuning run is missing)."""
    base = dp_chosen(suite, method, level, done)
    if base is None or level != LEVEL or not corrects(method):
        return base
    return best_tried(base, beta_runs(suite, method, done), done)


def beta_finals(suite: Suite, methods: tuple[str, ...], done: dict[str, Record], seeds: int):
    """The fourth row's runs in priority order (tuning, then finals seed-major where the
    chosen beta is not 0.5) and how many wait for others."""
    runs = [run for method in methods for run in beta_runs(suite, method, done)]
    waiting = 0
    for seed in range(seeds):
        for method in filter(corrects, methods):
            pick = beta_chosen(suite, method, LEVEL, done)
            if pick is None:
                waiting += 1
            elif pick.beta:
                runs.append(replace(pick, seed=seed))
    return runs, waiting


def beta_levels(
    suite: Suite,
    finals: list[Record],
    levels: dict[str, dict[str, Summary]],
    done: dict[str, Record],
) -> dict[str, dict[str, Summary]]:
    """``levels`` (the first row's) plus every method at its beta tuned under DP
    (``"<method>, beta tuned"``, :func:`~_privacy_results.with_variant`)."""
    tuned = dp_tuned_levels(suite, finals, done, beta_chosen)
    return with_variant(levels, tuned[LEVEL], SUFFIX, LEVEL)


def beta_goal(
    suite: Suite,
    finals: list[Record],
    levels: dict[str, dict[str, Summary]],
    done: dict[str, Record],
) -> list[tuple[str, str, bool]]:
    """The fourth row's goal (none before its runs)."""
    if not any(r.get("beta") for r in finals):
        return []
    return variant_goal(
        beta_levels(suite, finals, levels, done),
        SUFFIX,
        " (beta tuned under DP at the first row's other settings, against the best first-order "
        "method at either beta; eps = inf: the first row's clip-only runs)",
        LEVEL,
    )


def beta_section(
    lines: list[str],
    suite: Suite,
    finals: list[Record],
    levels: dict[str, dict[str, Summary]],
    methods: tuple[str, ...],
    done: dict[str, Record],
) -> None:
    """The beta tuning runs and the test accuracy at the chosen beta beside the first row's."""
    corrected = [m for m in methods if corrects(m)]
    if not any(run.key in done for m in corrected for run in beta_runs(suite, m, done)):
        return
    lines += [
        "## The correction strength tuned under DP (the fourth row)",
        "",
    ]
    lines += [
        "Validation accuracy (%, mean of the last 3 rounds) at eps = 8, seed 0, at the first "
        "row's rate, Theta's share and clip schedule, by beta (0.5: the first row's run):",
        "",
        "| method | beta 0.5 | " + " | ".join(f"beta {b}" for b in BETAS) + " | chosen beta |",
        "|---|" + "---|" * (len(BETAS) + 2),
    ]
    for method in corrected:
        base = dp_chosen(suite, method, LEVEL, done)
        tried = [dp_tune_run(base), *beta_runs(suite, method, done)] if base else []
        cells = [fmt(tune_score(done[run.key])) if run.key in done else "-" for run in tried]
        pick = beta_chosen(suite, method, LEVEL, done)
        chosen = "-" if pick is None else pick.beta or "0.5"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {chosen} |")
    lines.append("")
    both = beta_levels(suite, finals, levels, done)
    lines += [
        "Test accuracy (%, final round, mean +- std over seeds) at eps = 8:",
        "",
        "| method | beta 0.5 (first row) | chosen beta | at the chosen beta |",
        "|---|---|---|---|",
    ]
    for method in methods:
        runs = both[LEVEL].get(method + SUFFIX)
        betas = sorted({r.get("beta") or "0.5" for r in runs.runs}) if runs else []
        betas = betas if corrects(method) else ["- (no correction)"]
        lines.append(
            f"| {method} | {cell(both[LEVEL].get(method))} | {', '.join(betas) or '-'} | "
            f"{cell(runs) if runs else '-'} |"
        )
    lines += ["", "The goal's fourth row (top of this report) compares these.", ""]
