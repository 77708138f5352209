"""The ``lora_r4`` goal's third row: clip norms that adapt (``dp_clip_schedule: adaptive``).

Added after the library gained adaptive clipping (Andrew et al. 2021), which
the first two rows could not try, and decided before any of its runs: each
goal method at eps = 8 at the rate and Theta's share it was tuned to under
DP in the first row (:func:`~_privacy_tuning.dp_chosen`), the bounds starting
from the median client norms of its non-private tuning run at that rate (the
constant clip norms of the first row) and then following the clients' median
norm (the library's defaults: ``dp_clip_quantile`` 0.5, ``dp_clip_norm_lr``
0.2, ``dp_clipped_count_std`` = 50 / 20). Nothing about the rule is tuned;
no validation run decides anything here. The lead is measured against the best
first-order method under either clip rule (the first row's or this one), and
against fedpac_soap's clip-only lead of the first row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
from _harness.reporting import Summary, summarise
from _harness.runs import Record
from _privacy_results import cell, tuned_as, variant_goal, with_variant
from _privacy_suites import Suite
from _privacy_tuning import Run, aligns, clip_norms, dp_chosen

#: the clip schedule this row runs
ADAPTIVE = "adaptive"
#: the privacy level it runs at
LEVEL = "8"
#: name suffix of a method's summary under adaptive clipping
SUFFIX = ", adaptive C"


def adaptive_run(suite: Suite, method: str, done: dict[str, Record], seed: int) -> Run | None:
    """``method``'s final run at eps = 8 with adaptive clip norms (None while its first-row
    settings are not chosen)."""
    tuned = dp_chosen(suite, method, LEVEL, done)
    if tuned is None:
        return None
    clip, theta = clip_norms(method, tuned.lr, done)
    return Run(
        "final",
        method,
        LEVEL,
        seed,
        tuned.lr,
        clip,
        theta,
        tuned="dp",
        theta_share=tuned.theta_share,
        clip_schedule=ADAPTIVE,
    )


def _finals(suite: Suite, method: str, done: dict[str, Record]) -> list[Record]:
    pick = adaptive_run(suite, method, done, 0)
    if pick is None:
        return []
    wanted = tuned_as(asdict(pick))
    return [r for r in done.values() if r["stage"] == "final" and tuned_as(r) == wanted]


def adaptive_levels(
    suite: Suite,
    levels: dict[str, dict[str, Summary]],
    methods: Sequence[str],
    done: dict[str, Record],
) -> dict[str, dict[str, Summary]]:
    """``levels`` (the first row's summaries) plus each method under adaptive clipping at
    eps = 8 (``"<method>, adaptive C"``, :func:`~_privacy_results.with_variant`)."""
    runs = [r for method in methods for r in _finals(suite, method, done)]
    return with_variant(levels, summarise(runs, "eval_accuracy"), SUFFIX, LEVEL)


def adaptive_goal(
    suite: Suite,
    levels: dict[str, dict[str, Summary]],
    methods: Sequence[str],
    done: dict[str, Record],
) -> list[tuple[str, str, bool]]:
    """The third row's goal (none before its runs)."""
    return variant_goal(
        adaptive_levels(suite, levels, methods, done),
        SUFFIX,
        " (adaptive clip norms at the first row's DP-tuned rate and share, against the best "
        "first-order method under either clip rule; eps = inf: the first row's clip-only runs)",
        LEVEL,
    )


def adaptive_section(
    lines: list[str],
    suite: Suite,
    levels: dict[str, dict[str, Summary]],
    methods: Sequence[str],
    done: dict[str, Record],
) -> None:
    """Test accuracy under adaptive clipping beside the first row's, and where the bounds went."""
    if not any(_finals(suite, m, done) for m in methods):
        return
    both = adaptive_levels(suite, levels, methods, done)
    lines += [
        "## Adaptive clip norms (the third row)",
        "",
        "`dp_clip_schedule: adaptive` at eps = 8: each method at the rate and Theta's share "
        "it was tuned to under DP in the first row, its bounds starting from the median "
        "client norms of its non-private tuning run at that rate and then following the "
        "clients' median norm through noised counts (the library's defaults: quantile 0.5, "
        "rate 0.2, count noise std 2.5; the counts' share of the mechanism makes the sums' "
        "noise multiplier z_v, about 1 % above z). Nothing about the rule was tuned. Test "
        "accuracy (%, final round, mean +- std over seeds), and the bounds over the run "
        "(mean over seeds of the last round's bound over the first's; the fraction of "
        "clients clipped, over every round):",
        "",
        "| method | eps = 8, first row (tuned clip rule) | eps = 8, adaptive C | delta's bound: "
        "last / first | Theta's bound: last / first | clients clipped: delta / Theta |",
        "|---|---|---|---|---|---|",
    ]
    for method in methods:
        runs = _finals(suite, method, done)
        lines.append(
            f"| {method} | {cell(both[LEVEL].get(method))} | "
            f"{cell(both[LEVEL].get(method + SUFFIX))} | {_drift(runs, 'dp_clip_norm')} | "
            f"{_drift(runs, 'dp_theta_clip_norm')} | {_clipped(runs, aligns(method))} |"
        )
    lines += ["", "The goal's third row (top of this report) compares these.", ""]


def _drift(runs: Sequence[Record], key: str) -> str:
    ratios = [
        r["history"][-1][key] / r["history"][0][key]
        for r in runs
        if r["history"] and key in r["history"][0]
    ]
    return f"{np.mean(ratios):.2f}" if ratios else "-"


def _clipped(runs: Sequence[Record], theta: bool) -> str:
    parts = []
    for key in ("dp_clipped_delta", "dp_clipped_theta")[: 2 if theta else 1]:
        values = [h[key] for r in runs for h in r["history"] if key in h]
        parts.append(f"{100 * np.mean(values):.0f} %" if values else "-")
    return " / ".join(parts if theta else [*parts, "- (not sent)"])
