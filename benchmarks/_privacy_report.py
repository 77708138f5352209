"""``benchmarks/PRIVACY.md`` (and ``PRIVACY_full_vit.md``), from the JSONs of ``privacy_benchmark.py``.

The grid (suites, methods, privacy levels, tuned rates and clip norms) is
defined in ``privacy_benchmark.py``; tables, the goal and plots come from
here. The hand-written reading between the ``privacy analysis`` markers is
kept from the report being rewritten.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from _harness.reporting import (
    Summary,
    chosen_cell,
    command_block,
    fmt,
    goals_table,
    kept_block,
    plot_curves,
    tuning_table,
)
from _harness.runs import Record, load_results, series, tune_score
from _privacy_results import (
    by_level,
    cell,
    dp_tuned_levels,
    first_protocol,
    goal_rows,
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
    FIRST_GOAL_SEEDS,
    GOAL_SEEDS,
    METHODS,
    NODP_METHOD,
    SEEDS,
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


def tuning_section(lines: list[str], suite: Suite, done: dict[str, Record]) -> None:
    """The learning-rate table and the clip norms each method's tuning run gave."""
    rows = []
    for method in METHODS:
        cells = []
        for lr in lr_grid(suite, method):
            record = done.get(tune_key(method, lr))
            cells.append(f"{lr:g}: {fmt(tune_score(record))}" if record else f"{lr:g}: -")
        picked = chosen(suite, method, done)
        rows.append((method, cells, chosen_cell(picked and picked[0], lr_grid(suite, method))))
    tuning_table(
        lines,
        "Validation accuracy (%, mean of the last 3 rounds), non-private, seed 0 "
        "(`*`: the chosen rate is at an edge of the grid)",
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
    for method in METHODS:
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


def noise_section(lines: list[str], suite: Suite, finals: Sequence[Record], d: int) -> None:
    """Noise multiplier, noise on the mean delta, final logged epsilon, clipped fractions."""
    lines += [
        "| method | level | z | k | C | noise std per entry of the mean delta (z k C / qN) "
        "| its L2 norm over the d entries, in units of C (z k sqrt(d) / qN) "
        "| C_Theta, noise std per entry of the mean Theta (z k_Theta C_Theta / qN) "
        "| epsilon logged after the last round | delta | clients clipped: delta / Theta |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
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
        + ". Under DP the server sees only the clipped part of Theta each client adds, and "
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
        "validation split without DP (seed 0) and reused (first protocol) or tuned again "
        "under DP at eps = 8 and 2 (second protocol); clip norms = the median client "
        "update norm of the non-private tuning run at the rate; "
        f"{SEEDS} seeds per cell ({GOAL_SEEDS} where the goal compares), "
        "final-round test accuracy.",
        "",
        "Made by:",
        "",
    ]
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
    machines = sorted({r.get("machine", "?") for r in done.values()})
    wall = sum(r["wall_time_s"] for r in done.values())
    lines += [
        f"Machine: 2-core CPU, no GPU, shared with other work ({', '.join(machines)}). "
        f"Runs: {len(finals)} final, {len(done) - len(finals)} tuning; "
        f"{wall / 60:.0f} minutes of training in all (two workers). Library commit(s): "
        f"{', '.join(sorted({r['library_commit'] for r in done.values()}))}.",
        "",
        "## Goal",
        "",
    ]
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
        ),
    )
    lines += [
        "A lead's +- is its standard error over seeds (the two methods' seeds independent: "
        "sqrt(s_a^2 / n_a + s_b^2 / n_b)).",
        "",
        ANALYSIS[0],
        kept_block(suite.report, *ANALYSIS),
        ANALYSIS[1],
        "",
    ]
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
    lines += ["## Rates tuned under DP (the second protocol)", ""]
    dp_tuning_section(lines, suite, finals, done)
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
