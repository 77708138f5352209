"""``benchmarks/PRIVACY.md`` (and ``PRIVACY_full_vit.md``), from the JSONs of ``privacy_benchmark.py``.

The grid (suites, methods, privacy levels, tuned rates and clip norms) is
defined in ``privacy_benchmark.py``; tables, the goal and plots come from
here. The hand-written reading between the ``privacy analysis`` markers is
kept from the report being rewritten.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from _harness.reporting import (
    Summary,
    command_block,
    fmt,
    goals_table,
    kept_block,
    plot_curves,
)
from _harness.runs import Record, load_results, series
from _privacy_public import public_goal, public_section
from _privacy_results import (
    by_level,
    cell,
    dp_tuned_levels,
    first_protocol,
    goal_rows,
    lead_line,
    level_name,
    pooled_mean,
)
from _privacy_suites import Suite
from _privacy_tables import dp_tuning_section, noise_section, num_parameters, tuning_section
from _privacy_tuning import (
    EPSILONS,
    FIRST_GOAL_SEEDS,
    GOAL_SEEDS,
    METHODS,
    NODP_METHOD,
    SEEDS,
    dp_chosen,
    dp_decayed,
    dp_final,
)


def drift_line(nodp: dict[str, Summary]) -> str:
    """The preconditioner drift of the runs without DP, one sentence."""
    cells = [
        f"{method} {pooled_mean(summary.runs, 'drift_relative'):.3g}"
        for method, summary in nodp.items()
    ]
    return (
        "Preconditioner drift without DP (`drift_relative`: the clients' Theta around "
        "their mean, relative to it; mean over rounds and seeds): "
        + ", ".join(cells)
        + ". Under DP the server sees only clipped Theta, and "
        "none from methods that do not align, so the drift is not comparable there and is "
        "not reported."
    )


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


def analysis_block(suite: Suite) -> list[str]:
    """What the goal's +- means, then the report's hand-written reading (kept on rewrites)."""
    return [
        "A lead's +- is its standard error over seeds (the two methods' seeds independent: "
        "sqrt(s_a^2 / n_a + s_b^2 / n_b)).",
        "",
        ANALYSIS[0],
        kept_block(suite.report, *ANALYSIS),
        ANALYSIS[1],
        "",
    ]


def made_by(lines: list[str], suite: Suite, done: dict[str, Record]) -> None:
    """The commands that made the suite's report, the machine, the runs and the commits."""
    lines += ["Made by:", ""]
    command_block(
        lines,
        [
            f"python benchmarks/privacy_benchmark.py run --suite {suite.name} &"
            "   # two workers share the queue",
            f"python benchmarks/privacy_benchmark.py run --suite {suite.name} &",
            "wait",
            f"python benchmarks/privacy_benchmark.py report --suite {suite.name}",
        ],
    )
    finals = [r for r in done.values() if r["stage"] == "final"]
    machines = sorted({r.get("machine", "?") for r in done.values()})
    wall = sum(r["wall_time_s"] for r in done.values())
    lines += [
        f"Machine: 2-core CPU, no GPU, shared with other work ({', '.join(machines)}). "
        f"Runs: {len(finals)} final, {len(done) - len(finals)} tuning; "
        f"{wall / 60:.0f} minutes of training in all (two workers). Library commit(s): "
        f"{', '.join(sorted({r['library_commit'] for r in done.values()}))}.",
        "",
    ]


def report(suite: Suite) -> None:
    """Write the suite's report (``benchmarks/PRIVACY.md`` for ``lora``) from its records."""
    done = load_results(suite.results)
    finals = [r for r in done.values() if r["stage"] == "final"]
    plain = first_protocol(finals)
    levels = by_level(finals)
    lines = [
        f"# {suite.title} (issue #25)",
        "",
        f"Written by `python benchmarks/privacy_benchmark.py report --suite {suite.name}` from "
        f"the run records in `benchmarks/{suite.results.name}/` (one JSON per run, with the "
        "`fedpac-hf train` command that reproduces it). The protocol in full is the docstring "
        "of `benchmarks/privacy_benchmark.py`; in short: "
        + suite.setting.format(d=num_parameters(done))
        + "; client-level DP at delta = 500^-1.1; learning rates tuned per method on the "
        "validation split without DP (seed 0) and reused"
        + (
            " (first protocol) or tuned again under DP at eps = 8 and 2 (second protocol)"
            if any(r.get("tuned") == "dp" for r in finals)
            else ""
        )
        + "; clip norms = the median client update norm of the non-private tuning run at "
        f"the rate; {SEEDS} seeds per cell"
        + (
            f" ({GOAL_SEEDS} where the goal compares)"
            if any(r["seed"] >= SEEDS for r in finals)
            else ""
        )
        + ", final-round test accuracy.",
        "",
    ]
    made_by(lines, suite, done)
    lines += ["## Goal", ""]
    goals_table(
        lines,
        goal_rows(levels, " (rates tuned without DP)")
        + goal_rows(
            dp_tuned_levels(suite, finals, done, dp_chosen),
            " (rate, Theta's share and clip schedule tuned under DP)",
        )
        + goal_rows(
            dp_tuned_levels(
                suite, [r for r in finals if r["seed"] < FIRST_GOAL_SEEDS], done, dp_chosen
            ),
            f" (the same, seeds 0-{FIRST_GOAL_SEEDS - 1} only, as measured before "
            f"seeds {FIRST_GOAL_SEEDS}-{GOAL_SEEDS - 1} were added)",
        )
        + goal_rows(
            dp_tuned_levels(suite, finals, done, dp_final),
            " (the same and the clip norms' quantile tuned under DP)",
        )
        + goal_rows(
            dp_tuned_levels(suite, finals, done, dp_decayed),
            " (the same and the curvature's decay tuned under DP)",
        )
        + goal_rows(
            dp_tuned_levels(suite, finals, done),
            " (the same and Theta's size tuned under DP)",
        )
        + public_goal(suite, finals, done),
    )
    lines += analysis_block(suite)
    lines += [
        "## Test accuracy (%, final round, mean +- std over seeds; rates tuned without DP)",
        "",
        "| method | what the server receives besides the delta | lr | "
        + " | ".join(level_name(level) for level in ("nodp", *EPSILONS))
        + " |",
        "|---|---|---|" + "---|" * (1 + len(EPSILONS)),
    ]
    for method in METHODS:
        lrs = {r["lr"] for r in plain if r["method"] == method}
        lr = ", ".join(f"{x:g}" for x in sorted(lrs)) or "-"
        row = [cell(levels[level].get(method)) for level in ("nodp", *EPSILONS)]
        lines.append(f"| {method} | {METHODS[method][1]} | {lr} | " + " | ".join(row) + " |")
    lines.append("")
    lines += [lead_line(levels, ("nodp", *EPSILONS)), "", drift_line(levels["nodp"]), ""]
    lines += [
        "## Noise and clipping",
        "",
        "z: the noise multiplier (0 at eps = inf; for eps = 8 and 2 the package's "
        f"calibration for {suite.num_rounds} rounds); k = 1 / sqrt(1 - s) and k_Theta = "
        "1 / sqrt(s) when Theta travels with the delta (s = `dp_theta_share`, 0.5 unless "
        "stated: both sqrt(2)), k = 1 otherwise; C: the method's `dp_clip_norm`. Clipped "
        "fractions: the share of a "
        "round's clients whose part was scaled down, mean over rounds and seeds.",
        "",
    ]
    noise_section(lines, suite, plain, num_parameters(done))
    lines += [
        "## What clipping costs fedpac_soap at eps = inf",
        "",
        "`fedpac_soap` without DP (`dp_mode: none`: no clipping, exactly "
        f"{suite.clients_per_round} clients per round) "
        "against `dp_mode: client` with `dp_noise_multiplier: 0` (delta and Theta clipped at "
        "their medians, Poisson sampling), same rate, test accuracy after the last round:",
        "",
    ]
    theta_cost(lines, finals)
    lines += ["## Learning rates and clip norms (validation split, no DP)", ""]
    tuning_section(lines, suite, done)
    if any(r["stage"] == "dptune" for r in done.values()):  # the second protocol ran
        lines += ["## Rates tuned under DP (the second protocol)", ""]
        dp_tuning_section(lines, suite, finals, done)
    public_section(lines, suite, finals, done)
    for level in EPSILONS:
        summ = levels[level]
        if not summ:
            continue
        path = suite.results / f"accuracy_eps-{level}.png"
        plot_curves(
            summ,
            list(METHODS),
            f"{suite.name}: 500 clients, Dirichlet 0.3, {level_name(level)}: "
            "test accuracy (seed mean)",
            path,
        )
        lines.append(f"![{level_name(level)}]({suite.results.name}/{path.name})")
    lines.append("")
    suite.report.write_text("\n".join(lines), encoding="utf-8")
