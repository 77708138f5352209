"""The machinery the benchmark grids share; the scripts say only what they measure.

``statistical_efficiency.py``, ``lora_benchmark.py`` and ``adaptive_beta.py``
each define a grid of federated trainings (their configs, splits, arms and
learning-rate grids) and the text of their report; what they have in common
lives in this package, in two modules:

``_harness.runs``: running a grid.
    Paths and the cache (``$FEDPAC_BENCH_CACHE``, default ``/tmp/fedpac_bench``:
    validation folders, run folders, locks); run records (:func:`train_once`
    trains one run through :func:`fedpac_hf.run.run_training`, the code path of
    ``fedpac-hf train``, and returns its JSON record; :func:`load_results`
    reads a results folder back); the run queue that several worker processes
    share through lock files (:func:`run_queue`); the validation splits the
    learning rates are tuned on (:func:`validation_dataset`, never the test
    split); the learning-rate choice (:func:`tune_score`, :func:`scores_at`,
    :func:`best_of`, :func:`edge_neighbour` for one more grid point when an
    edge of the grid wins).

``_harness.reporting``: turning records into a report.
    Summaries over seeds (:class:`Summary`: final value and spread, best and
    worst rounds, seed-mean curve, drift, pooled per-round metrics;
    :func:`summarise`, :func:`rounds_to`, :func:`best_baseline`); number
    formats and tables (:func:`goals_table`, :func:`tuning_table`,
    :func:`command_block`); plots (:func:`plot_curves`, :func:`finish_figure`);
    report sections (the hand-written analysis kept between markers,
    :func:`kept_block`; the sections other scripts write into a report,
    :func:`write_section` and :func:`kept_sections`).

The scripts import from the defining module, e.g. ``from _harness.runs import
run_queue`` (the benchmarks folder is on ``sys.path`` when a script runs).
"""
