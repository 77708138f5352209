"""Client-level differential privacy at 500 clients (issue #25, item 4), at CPU scale.

One grid of runs per federation (``--suite``) through
:func:`fedpac_hf.run.run_training` (the code path of ``fedpac-hf train``),
cached one JSON per run under ``benchmarks/privacy_results_lora/`` (suite
``lora``) or ``benchmarks/privacy_results/`` (suite ``vit``) with the command
that reproduces it; the reports, ``benchmarks/PRIVACY.md`` (``lora``) and
``benchmarks/PRIVACY_full_vit.md`` (``vit``), are written from those JSONs by
the ``report`` subcommand.

Protocol
--------
* Federations (both: 500 clients, Dirichlet(0.3) label skew, batch 8,
  20 rounds, the config's cosine learning-rate decay; under DP, Poisson
  sampling at rate q = clients per round / 500):

  - ``lora`` (the default, the headline case): ``configs/vit_lora_mnist5k.yaml``,
    the pretrained small ViT ``base:vit-mnist5k-0to4`` learning digits 5-9
    with **rank-2** LoRA adapters (query/value) and a new head; MNIST-5k's
    training rows of digits 5-9 over the 500 clients (about 4 per client),
    **50 clients per round** (q = 0.1), 5 local steps. Rank 2 and q = 0.1
    because the noise on the mean delta has L2 norm z k sqrt(d) / (q N) times
    the clip norm: few trainable parameters and many clients per round keep
    it below the clip norm (0.7 C at eps = 8 here);
  - ``vit``: ``configs/vit_mnist5k.yaml`` with a smaller ViT (hidden size
    32, 2 layers, 2 heads, MLP 64: 19,658 parameters) trained in full from
    scratch on all 4,000 training rows, 20 clients per round (q = 0.04),
    10 local steps (noise 3-7 C on the mean delta: nothing learns under DP).
  - ``lora_r4``: ``lora`` with rank-4 adapters, where fedpac_soap's lead
    without noise is larger (``privacy_screen.py``); only what the goal
    compares runs there (``_privacy_goal.py``, written to
    ``benchmarks/PRIVACY_lora_r4.md``).
* Methods: ``fedavg_adamw``, ``fedadamw`` (AdamW's second moments shared),
  ``fedpac_soap`` (SOAP's Kronecker statistics shared) and
  ``fedpac_correct_soap``, the registered ablation "correction only, no
  alignment": ``fedpac_soap`` with Theta never shared.
* Privacy: ``dp_mode: client`` at epsilon in {inf, 8, 2}, delta = 500 ** -1.1
  (the package's default ``dp_delta``); epsilon = inf is
  ``dp_noise_multiplier: 0`` (clipping and Poisson sampling only), 8 and 2 are
  ``dp_target_epsilon`` (the noise multiplier is the package's calibration for
  20 rounds). ``dp_noise_seed`` is the run's seed (reproducible noise; a
  deployment leaves it unset).
* Learning rates: per method, on the validation split (the harness's
  :func:`~_harness.runs.validation_dataset`: 20 % of MNIST-5k's training rows,
  stratified; the test split is never read while tuning), **non-private**
  (``dp_mode: none``), seed 0, a grid per suite (:attr:`Suite.grids`: AdamW
  clients prefer smaller rates), scored by the mean validation accuracy of
  the last 3 rounds (a run whose clients diverge scores -inf); the chosen
  rate is reused at every epsilon and seed. No grid point is added when an
  edge wins (time): the report marks such a rate with ``*``.
* Rates tuned under DP (a second protocol, reported beside the first): at
  epsilon 8 and 2, each method's rate is tuned again on the validation split
  **with DP at that epsilon** (seed 0), over the non-private choice and the
  grid's next three rates below it (the noise on a round's mean delta is a
  fixed multiple of the clip norm, which grows with the rate, so noise
  favours smaller steps); the clip norms at each rate are that rate's
  non-private medians (below). Then, for the methods that send Theta, Theta's
  share of the mechanism (``dp_theta_share``, :data:`THETA_SHARES` besides
  the default 0.5) at that rate, the default kept on a tie. Then, with that
  share, the clip norm following the rate (``dp_clip_schedule:
  learning_rate``) at every rate of the DP grid, its peak clip norm the
  median of the non-private run's delta norms each divided by its round's
  rate over the peak, and for the methods that send Theta the other two
  shares at the best of those rates (the constant clip norm kept on a tie).
  Last (added after the 10-seed results below were queued), at the rate,
  share and schedule chosen, the clip norms at other quantiles
  (:data:`CLIP_QUANTILES`) of the same non-private norms instead of the
  median, delta and Theta at the same quantile (the median kept on a tie);
  where a quantile wins, final runs at it (3 seeds; 10 at epsilon 8 for the
  methods the goal compares), reported as a third variant of the protocol.
  Then (a fourth variant), at epsilon 8 only and for the methods that send
  Theta, the curvature's decay per local step at those settings
  (:data:`CURVATURE_DECAYS`: SOAP's ``shampoo_beta``, default 0.95, and
  AdamW's second-moment rate, default 0.999, through
  ``client_optimizer_kwargs``): the shared Theta is a moving average, and a
  longer memory averages the noise added to it over more rounds; each decay
  gets a non-private tuning run at the rate for its clip norms, then a DP
  tuning run (the default kept on a tie); where a decay wins, final runs at
  it (10 seeds). Then (a fifth variant, added after the decay's 10-seed
  results), at epsilon 8 and for ``fedpac_soap`` (the one method whose Theta
  has compact forms), Theta's size (:data:`THETA_BUDGETS`: ``theta_budget``
  0.5, each long side's diagonal alone, and 0.25, only the short sides)
  at the settings chosen so far, in the same way: a non-private tuning run
  at the rate for the clip norms, a DP tuning run, the default kept on a
  tie, final runs (10 seeds) where a size wins.
  Then (a sixth variant, added after the fifth's 10-seed results; a
  mechanism, not a knob) ``fedpac_soap`` and ``fedadamw`` again with Theta
  from public data at the server (:data:`PUBLIC_CURVATURE`:
  ``public_curvature_dataset: digits``, scikit-learn's 8x8 digits 5-9, a
  dataset apart from MNIST-5k; ``public_curvature_clients: 10``): clients
  send no Theta, so under DP the delta gets the whole mechanism and no noise
  is added to Theta. Each is tuned as a method of its own: the rate without
  DP (its grid, seed 0), then at epsilon 8 the rate (the DP grid below the
  non-private choice) and the clip schedule under DP as above (shares,
  quantiles, decays and sizes do not apply or were not tried); final runs at
  epsilon = inf (the non-private rate) and 8, 10 seeds each. The goal row
  of this variant compares it with the best of ``fedavg_adamw``,
  ``fedadamw`` (each at its fifth-variant settings) and ``fedadamw`` with
  public curvature.
  Final runs at the DP-tuned rate, share and schedule where any differs
  from the first protocol's (3 seeds); where all are the same, the first
  protocol's runs are reused. epsilon = inf keeps the non-private rate (no noise to tune
  for). The privacy cost of tuning itself is not accounted, as usual in DP
  benchmarks.
* Clip norms: from the same non-private tuning runs (at the rate used). This
  script (``_privacy_runs.py``) records, for every client, the L2 norm of
  what :func:`clip_update` would clip (the delta and Theta minus their public
  parts, :func:`own_part`) by wrapping ``client_update`` in the worker
  process; ``dp_clip_norm`` and
  ``dp_theta_clip_norm`` are the **median** over all clients and rounds of
  the tuning run at the chosen rate (4 significant digits), so about half of
  the clients are clipped. Methods that do not align send no Theta under DP
  and get no Theta clip norm. (The ``vit`` grid ran before clients clipped
  only their own part, and its clip norms are of the whole delta and Theta.)
* Final runs: every method at every epsilon, 3 seeds (0, 1, 2), on the test
  split; plus ``fedpac_soap`` without DP (``dp_mode: none``, exactly the
  suite's clients per round), 3 seeds, for the cost of clipping (Theta's and
  the delta's) at epsilon = inf; last in the queue, the other methods without
  DP (3 seeds each), for context. Last, seeds 3 to 9 (:data:`GOAL_SEEDS`)
  of the cells the goal compares: ``fedpac_soap``, ``fedavg_adamw`` and
  ``fedadamw`` at epsilon = inf and at epsilon 8 with the DP-tuned settings.
  Seeds 3 and 4 because with 3 seeds the non-private lead was within the
  seeds' spread (decided before the 3-seed results of the clip schedule were
  known); seeds 5 to 9 because with 5 the lead at epsilon 8 (-0.3 points)
  was within its standard error (decided after the 5-seed results, before
  any of seeds 5 to 9 ran; the report gives both).
* Reported: the final round's test accuracy, mean +- sample std over seeds;
  the noise multiplier of each epsilon; the epsilon the runs logged after the
  last round; the fraction of clients clipped (``dp_clipped_delta``,
  ``dp_clipped_theta``, mean over rounds and seeds); the goal: at epsilon 8,
  ``fedpac_soap``'s lead over the best first-order method (``fedavg_adamw``,
  ``fedadamw``) is at least half its lead at epsilon = inf.

Usage (from the repository root)::

    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1
    python benchmarks/privacy_benchmark.py run &   # two workers share the queue
    python benchmarks/privacy_benchmark.py run &
    wait
    python benchmarks/privacy_benchmark.py report   # writes benchmarks/PRIVACY.md
    # the same with --suite vit for benchmarks/PRIVACY_full_vit.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from itertools import zip_longest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness.runs import (  # noqa: E402
    Record,
    load_results,
    run_queue,
)
from _privacy_runs import run_one  # noqa: E402
from _privacy_suites import SUITES, Suite  # noqa: E402
from _privacy_tuning import (  # noqa: E402
    CURVATURE_DECAYS,
    CURVATURE_LEVEL,
    DP_TUNED,
    EPSILONS,
    FIRST_ORDER,
    GOAL_SEEDS,
    METHODS,
    NODP_METHOD,
    PUBLIC_CURVATURE,
    SEEDS,
    THETA_BUDGETS,
    Run,
    budget_runs,
    chosen,
    clip_norms,
    decay_runs,
    dp_budgeted,
    dp_chosen,
    dp_constant,
    dp_decayed,
    dp_final,
    dp_grid,
    dp_rate_runs,
    lr_grid,
    quantile_runs,
    schedule_runs,
)


def plan(suite: Suite, done: dict[str, Record]) -> tuple[list[Run], int]:
    """The runs in priority order (tuning, then finals seed-major), and how many wait."""
    runs: list[Run] = []
    waiting = 0
    for lr_index in range(len(suite.grids[0])):
        runs += [Run("tune", m, "nodp", 0, lr_grid(suite, m)[lr_index]) for m in METHODS]
    for seed in range(SEEDS):
        for method in METHODS:
            picked = chosen(suite, method, done)
            levels = ("nodp", *EPSILONS) if method == NODP_METHOD else EPSILONS
            if picked is None:
                waiting += len(levels)
                continue
            lr, clip, theta = picked
            for level in levels:
                if level == "nodp":
                    runs.append(Run("final", method, level, seed, lr))
                else:
                    runs.append(Run("final", method, level, seed, lr, clip, theta))
    # rates, then Theta's shares, tuned under DP; then the final runs where either differs
    for level in DP_TUNED:
        for method in METHODS:
            tuning, missing = dp_rate_runs(suite, method, level, done)
            runs += tuning
            waiting += missing
    for seed in range(SEEDS):
        for level in DP_TUNED:
            for method in METHODS:
                picked = dp_chosen(suite, method, level, done)
                if picked is None:
                    waiting += 1
                elif picked.tuned == "dp":
                    runs.append(replace(picked, seed=seed))
    # the clip norm following the rate, at the rates and shares tuned above
    for level in DP_TUNED:
        for method in METHODS:
            pick = dp_constant(suite, method, level, done)
            runs += schedule_runs(suite, pick, done) if pick else []
            waiting += pick is None
    # more seeds where the goal compares (the lead is within the spread of 3 seeds)
    for seed in range(SEEDS, GOAL_SEEDS):
        for method in (*FIRST_ORDER, NODP_METHOD):
            picked, tuned = chosen(suite, method, done), dp_chosen(suite, method, "8", done)
            if picked is None or tuned is None:
                waiting += 2
                continue
            runs += [Run("final", method, "inf", seed, *picked), replace(tuned, seed=seed)]
    # the clip norms' quantile at the settings chosen above; final runs where it changes
    for level in DP_TUNED:
        for method in METHODS:
            pick = dp_chosen(suite, method, level, done)
            runs += quantile_runs(pick, done) if pick else []
            waiting += pick is None
    for level in DP_TUNED:
        for method in METHODS:
            final = dp_final(suite, method, level, done)
            goal = level == "8" and method in (*FIRST_ORDER, NODP_METHOD)
            seeds = GOAL_SEEDS if goal else SEEDS
            if final is None:
                waiting += 1
            elif final.clip_quantile:
                runs += [replace(final, seed=seed) for seed in range(seeds)]
    # at eps = 8, the curvature's decay (methods that send Theta), then Theta's size (those
    # with a compact form): the tuning runs, then final runs where the setting changes
    for field, methods, before, tried, after in (
        ("decay", CURVATURE_DECAYS, dp_final, decay_runs, dp_decayed),
        ("budget", THETA_BUDGETS, dp_decayed, budget_runs, dp_budgeted),
    ):
        for method in methods:
            pick = before(suite, method, CURVATURE_LEVEL, done)
            runs += tried(pick, done) if pick else []
            final = after(suite, method, CURVATURE_LEVEL, done)
            if final is None:
                waiting += 1
            elif getattr(final, field):
                runs += [replace(final, seed=seed) for seed in range(GOAL_SEEDS)]
    # Theta from public data (the aligning methods again): their rate tuned without DP, then
    # under DP at eps = 8 (constant clip norm, then following the rate); final runs at eps =
    # inf and at eps = 8, seed-major, as many seeds as the goal compares
    finals: list[list[Run]] = []
    for method in PUBLIC_CURVATURE:
        runs += [Run("tune", method, "nodp", 0, lr) for lr in lr_grid(suite, method)]
        picked = chosen(suite, method, done)
        pick = dp_constant(suite, method, CURVATURE_LEVEL, done)
        final = dp_chosen(suite, method, CURVATURE_LEVEL, done)
        grid = dp_grid(suite, method, done) or ()
        runs += [
            Run("dptune", method, CURVATURE_LEVEL, 0, lr, *clip_norms(method, lr, done))
            for lr in grid
        ]
        runs += schedule_runs(suite, pick, done) if pick else []
        waiting += (picked is None) + (final is None)
        finals += [
            [Run("final", method, "inf", seed, *picked) for seed in range(GOAL_SEEDS)]
            if picked
            else [],
            [replace(final, seed=seed) for seed in range(GOAL_SEEDS)] if final else [],
        ]
    runs += [run for seed_runs in zip_longest(*finals) for run in seed_runs if run is not None]
    # last: the other methods without DP (context: what DP costs each of them)
    for seed in range(SEEDS):
        for method in METHODS:
            if method == NODP_METHOD:
                continue
            picked = chosen(suite, method, done)
            if picked is None:
                waiting += 1
            else:
                runs.append(Run("final", method, "nodp", seed, picked[0]))
    return [r for r in runs if r.key not in done], waiting


def suite_plan(suite: Suite, done: dict[str, Record]) -> tuple[list[Run], int]:
    """The runs of ``suite``'s protocol not done yet (see :attr:`Suite.protocol`)."""
    if suite.protocol == "goal":
        from _privacy_goal import plan_goal

        return plan_goal(suite, done)
    return plan(suite, done)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "report", "list"])
    parser.add_argument("--hours", type=float, default=12.0, help="start no run after this")
    parser.add_argument(
        "--suite", choices=sorted(SUITES), default="lora", help="which federation (see Protocol)"
    )
    ns = parser.parse_args(argv)
    suite = SUITES[ns.suite]
    if ns.command == "list":
        runs, waiting = suite_plan(suite, load_results(suite.results))
        print(json.dumps([r.key for r in runs], indent=1), f"\n{waiting} waiting")
    elif ns.command == "run":
        run_queue(
            lambda done: (lambda p: ([(r.key, r) for r in p[0]], p[1]))(suite_plan(suite, done)),
            lambda key, run: run_one(suite, run),
            suite.results,
            time.time() + 3600 * ns.hours,
        )
    elif suite.protocol == "goal":
        from _privacy_goal import report_goal

        report_goal(suite)
    else:
        from _privacy_report import report

        report(suite)


if __name__ == "__main__":
    main()
