"""The privacy benchmark's final runs summarised: per level and protocol, leads, the goal.

Used by ``_privacy_report.py`` (which writes the tables); the runs themselves
are defined in ``_privacy_tuning.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict

import numpy as np
from _harness.reporting import Summary, fmt, summarise
from _harness.runs import Record, series
from _privacy_suites import Suite
from _privacy_tuning import DP_TUNED, EPSILONS, FIRST_ORDER, METHODS, Run, dp_budgeted


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
    """The final runs' summaries (test accuracy), per privacy level and method, at the
    non-private rates (the first protocol)."""
    plain = first_protocol(finals)
    return {
        level: summarise([r for r in plain if r["privacy"] == level], "eval_accuracy")
        for level in ("nodp", *EPSILONS)
    }


def first_protocol(finals: Sequence[Record]) -> list[Record]:
    """The final runs of :data:`~_privacy_tuning.METHODS` at the non-private rates (records
    from before the second protocol have no ``tuned``; the public-curvature variants are
    reported apart)."""
    return [
        r
        for r in finals
        if r.get("tuned", "nodp") == "nodp"
        and r["method"] in METHODS
        and not any(tuned_as(r)[3:])  # every setting at its default (controls are reported apart)
    ]


def dp_tuned_levels(
    suite: Suite,
    finals: Sequence[Record],
    done: dict[str, Record],
    choose: Callable[[Suite, str, str, dict[str, Record]], Run | None] = dp_budgeted,
) -> dict[str, dict[str, Summary]]:
    """As :func:`by_level`, with every method at the settings ``choose`` tuned under DP at
    each level of ``DP_TUNED`` (the first protocol's runs where those are its own):
    :func:`~_privacy_tuning.dp_budgeted` (rate, Theta's share, clip schedule, quantile,
    the curvature's decay and Theta's size), :func:`~_privacy_tuning.dp_decayed` (Theta's
    size at its default), :func:`~_privacy_tuning.dp_final` (the decay at its default too)
    or :func:`~_privacy_tuning.dp_chosen` (the clip norms at the median too)."""
    levels = by_level(finals)
    for level in DP_TUNED:
        runs: list[Record] = []
        for method in METHODS:
            picked = choose(suite, method, level, done)
            if picked is None:
                continue
            wanted = tuned_as(asdict(picked))
            runs += [r for r in finals if tuned_as(r) == wanted]
        levels[level] = summarise(runs, "eval_accuracy")
    return levels


def tuned_as(r: Record) -> tuple[str, ...]:
    """What identifies a final run's protocol: method, level, where its rate was tuned,
    Theta's share, the clip schedule, the clip norms' quantile, the curvature's decay,
    Theta's size, beta, the emulated federation's size, SOAP's eps, the sampling and the
    projection (records from before a field have its default; ``tuned_as(asdict(run))`` is a planned
    run's)."""
    return (
        r["method"],
        r["privacy"],
        r.get("tuned", "nodp"),
        r.get("theta_share", ""),
        r.get("clip_schedule", ""),
        r.get("clip_quantile", ""),
        r.get("decay", ""),
        r.get("budget", ""),
        r.get("beta", ""),
        r.get("population", ""),
        r.get("eps", ""),
        r.get("sampling", ""),
        r.get("projection", ""),
    )


def setting_label(
    lr: float | str,
    share: str,
    schedule: str,
    quantile: str = "",
    decay: str = "",
    budget: str = "",
    beta: str = "",
    population: str = "",
    eps: str = "",
    sampling: str = "",
    projection: str = "",
) -> str:
    """A rate (a number or a cell) with its share, clip schedule, clip quantile, curvature
    decay, Theta's size, beta, the emulated federation's size, SOAP's eps, the sampling and
    the projection where not the defaults."""
    rate = lr if isinstance(lr, str) else f"{lr:g}"
    return (
        rate
        + (f", s = {share}" if share else "")
        + {"": "", "adaptive": ", adaptive C"}.get(schedule, ", C ~ lr")
        + (f", q = {quantile}" if quantile else "")
        + (f", decay {decay}" if decay else "")
        + (f", budget {budget}" if budget else "")
        + (f", beta {beta}" if beta else "")
        + (f", x{population} federation" if population else "")
        + (f", eps {eps}" if eps else "")
        + (f", {sampling} samples" if sampling else "")
        + (f", projected on {projection}" if projection else "")
    )


def lead(
    summ: dict[str, Summary], method: str = "fedpac_soap", rivals: Sequence[str] = FIRST_ORDER
) -> tuple[float, str, float] | None:
    """``method``'s lead over the best of ``rivals`` (the first-order methods) at one level
    (None: missing)."""
    if method not in summ or not all(m in summ for m in rivals):
        return None
    best = max(rivals, key=lambda m: summ[m].mean)
    return summ[method].mean - summ[best].mean, best, summ[best].mean


def lead_error(summ: dict[str, Summary], rival: str, method: str = "fedpac_soap") -> str:
    """The standard error of ``method``'s lead over ``rival`` (independent seeds), in
    points: ``sqrt(s_a^2 / n_a + s_b^2 / n_b)``."""
    a, b = summ[method], summ[rival]
    return fmt(math.sqrt(a.std**2 / a.seeds + b.std**2 / b.seeds))


def lead_cell(summ: dict[str, Summary]) -> str:
    """fedpac_soap's lead over the best first-order method at one level, as a table cell:
    ``+x.x +- se (vs rival)`` in points (``-`` while a method is missing)."""
    got = lead(summ)
    if got is None:
        return "-"
    return f"{100 * got[0]:+.1f} +- {lead_error(summ, got[1])} (vs {got[1]})"


def paired_difference(a: Summary | None, b: Summary | None) -> str:
    """``mean +- standard error`` (points) of the per-seed differences ``a - b`` of the final
    accuracy over the seeds both have (``-`` with fewer than two, or a summary missing)."""
    if a is None or b is None:
        return "-"
    by_seed = [{r["seed"]: r["history"][-1]["eval_accuracy"] for r in s.runs} for s in (a, b)]
    seeds = sorted(set(by_seed[0]) & set(by_seed[1]))
    diffs = [by_seed[0][seed] - by_seed[1][seed] for seed in seeds]
    if len(diffs) < 2:
        return "-"
    mean = sum(diffs) / len(diffs)
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    return f"{fmt(mean)} +- {fmt(std / math.sqrt(len(diffs)))}"


def lead_line(levels: dict[str, dict[str, Summary]], names: Sequence[str]) -> str:
    """fedpac_soap's lead at each of the levels ``names``, as one sentence."""
    leads = [(level, lead(levels[level])) for level in names]
    return (
        "fedpac_soap's lead over the best first-order method (points): "
        + "; ".join(
            f"{level_name(level)}: {100 * x[0]:+.1f} (vs {x[1]})" for level, x in leads if x
        )
        + "."
    )


def goal_rows(
    levels: dict[str, dict[str, Summary]],
    protocol: str = "",
    method: str = "fedpac_soap",
    rivals: Sequence[str] = FIRST_ORDER,
) -> list[tuple[str, str, bool]]:
    """The issue's goal from the seed means of the final accuracy (``protocol``: how the
    rates were tuned, appended to the goal's text; ``method`` in fedpac_soap's place, against
    the best of ``rivals``)."""
    inf, eight = lead(levels["inf"], method, rivals), lead(levels["8"], method, rivals)
    if inf is None or eight is None:
        return []
    lead_inf, best_inf, acc_inf = inf
    lead_8, best_8, acc_8 = eight
    ratio = lead_8 / lead_inf if lead_inf > 0 else float("nan")
    measured = (
        f"lead at eps = inf: {100 * lead_inf:+.1f} +- "
        f"{lead_error(levels['inf'], best_inf, method)} points "
        f"({fmt(levels['inf'][method].mean)} vs {best_inf} {fmt(acc_inf)}); "
        f"at eps = 8: {100 * lead_8:+.1f} +- {lead_error(levels['8'], best_8, method)} points "
        f"({fmt(levels['8'][method].mean)} vs {best_8} {fmt(acc_8)}); "
        + (f"ratio {ratio:.2f}" if math.isfinite(ratio) else "no lead at eps = inf")
    )
    met = lead_inf > 0 and lead_8 >= 0.5 * lead_inf
    return [
        (
            f"at eps = 8, {method}'s lead over the best first-order method is at least "
            "half its lead at eps = inf" + protocol,
            measured,
            met,
        )
    ]


def with_variant(
    levels: dict[str, dict[str, Summary]],
    summaries: dict[str, Summary],
    suffix: str,
    level: str = "8",
) -> dict[str, dict[str, Summary]]:
    """``levels`` plus a protocol variant's ``summaries`` at ``level``, each named
    ``"<method><suffix>"``; at eps = inf, where the variant changes nothing, the method's
    clip-only summary under that name (the reference of its lead)."""
    out = {name: dict(summ) for name, summ in levels.items()}
    for method, summary in summaries.items():
        out[level][method + suffix] = summary
        if method in out["inf"]:
            out["inf"][method + suffix] = out["inf"][method]
    return out


def variant_goal(
    levels: dict[str, dict[str, Summary]], suffix: str, protocol: str, level: str = "8"
) -> list[tuple[str, str, bool]]:
    """The goal row of a variant (:func:`with_variant`): fedpac_soap in it against the best
    first-order method with or without it (none while one of them is missing)."""
    rivals = [*FIRST_ORDER, *(m + suffix for m in FIRST_ORDER)]
    if not all(m in levels[level] for m in ("fedpac_soap" + suffix, *rivals)):
        return []
    return goal_rows(levels, protocol, "fedpac_soap" + suffix, rivals)
