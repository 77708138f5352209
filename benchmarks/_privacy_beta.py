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

from _harness.reporting import Summary, fmt
from _harness.runs import Record, tune_score
from _privacy_results import cell
from _privacy_suites import Suite
from _privacy_tuning import algorithm_of
from _privacy_variant import TunedSetting

#: the correction strengths tried under DP besides the registry's 0.5
BETAS = ("0.25", "0")
#: the privacy level they are tried at
LEVEL = "8"


def corrects(method: str) -> bool:
    """Whether ``method``'s algorithm has the correction (so beta matters)."""
    from fedpac_hf.federated import get_algorithm

    return get_algorithm(algorithm_of(method)).correction


#: the fourth row: beta tuned under DP (a method's summary at its beta: "<method>, beta tuned")
BETA = TunedSetting(
    "beta",
    BETAS,
    corrects,
    ", beta tuned",
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
    if not BETA.started(suite, methods, done):
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
    for method in filter(corrects, methods):
        tried = BETA.tried(suite, method, done)
        cells = [fmt(tune_score(done[run.key])) if run.key in done else "-" for run in tried]
        pick = BETA.chosen(suite, method, LEVEL, done)
        chosen = "-" if pick is None else pick.beta or "0.5"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {chosen} |")
    lines.append("")
    both = BETA.levels(suite, finals, levels, done)
    lines += [
        "Test accuracy (%, final round, mean +- std over seeds) at eps = 8:",
        "",
        "| method | beta 0.5 (first row) | chosen beta | at the chosen beta |",
        "|---|---|---|---|",
    ]
    for method in methods:
        runs = both[LEVEL].get(method + BETA.suffix)
        betas = sorted({r.get("beta") or "0.5" for r in runs.runs}) if runs else []
        betas = betas if corrects(method) else ["- (no correction)"]
        lines.append(
            f"| {method} | {cell(both[LEVEL].get(method))} | {', '.join(betas) or '-'} | "
            f"{cell(runs) if runs else '-'} |"
        )
    lines += ["", "The goal's fourth row (top of this report) compares these.", ""]
