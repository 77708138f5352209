"""The run directory of ``fedpac-hf train``: settings, partition, metrics as they come, report.

``config.yaml``
    Every model/data setting, the training arguments that differ from their
    defaults and, even at their defaults, those that every run uses
    (:data:`ALWAYS_WRITTEN`; ``fedpac-hf train RUN_DIR/config.yaml`` reruns it).
``partition.png`` / ``partition.txt``
    The client x class heatmap and statistics table of the trainer's split.
``metrics.jsonl`` / ``metrics.csv``
    One row per round, written as the run goes (:class:`RunFilesCallback`).
``accuracy.png`` (or ``perplexity.png``), ``loss.png``, ``drift.png``, ``bytes.png``, ``summary.md``
    Drawn by :mod:`fedpac_hf.rundir.reporting` at the end (``fedpac-hf report`` redraws them).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedpac_hf.config.arguments import FedPACArguments
from fedpac_hf.config.checks import PARTITIONER_FIELDS
from fedpac_hf.trainer.callbacks import FedPACCallback

from .config import ModelDataArguments
from .parsing import changed_training_arguments
from .tasks import TaskBundle

__all__ = [
    "ALWAYS_WRITTEN",
    "RunFilesCallback",
    "print_final",
    "render_config",
    "write_config",
    "write_partition_files",
]


class RunFilesCallback(FedPACCallback):
    """Write a run's files once the trainer has checked everything, then its metrics as they come.

    At the start of training, after the trainer has made the split and checked
    any checkpoint it resumes, the main process writes ``config.yaml`` and the
    partition files (nothing is written for a start that is refused) and records
    what the start runs on (``environment.jsonl``,
    :func:`~fedpac_hf.rundir.environment.record_start`); after
    every round it appends the round's metrics to ``metrics.jsonl`` and
    rewrites ``metrics.csv``; at the end it draws the figures and
    ``summary.md``. On resume, rows of rounds after the checkpoint are dropped
    so the files match the resumed history.

    Parameters
    ----------
    run_dir : str or os.PathLike
        The run directory (usually ``args.output_dir``).
    title : str, optional
        Prefix of the figure titles.
    config_text : str, optional
        The text of ``config.yaml`` (:func:`render_config`).
    write_partition : callable, optional
        Writes the partition files (called with no argument).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        title: str | None = None,
        config_text: str | None = None,
        write_partition: Callable[[], None] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.title = title
        self.config_text = config_text
        self.write_partition = write_partition

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: D102
        if not state.is_world_process_zero:
            return control
        from fedpac_hf.rundir.environment import record_start
        from fedpac_hf.rundir.metrics_file import keep_metrics_through

        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.config_text is not None:
            write_config(self.run_dir, self.config_text)
        if self.write_partition is not None:
            self.write_partition()
        keep_metrics_through(self.run_dir, state.global_step)
        record_start(self.run_dir, state.global_step)
        return control

    def on_round_end(self, args, state, control, **kwargs):  # noqa: D102
        if state.is_world_process_zero and kwargs.get("metrics") is not None:
            from fedpac_hf.rundir.metrics_file import append_metrics

            append_metrics(self.run_dir, kwargs["metrics"])
        return control

    def on_train_end(self, args, state, control, **kwargs):  # noqa: D102
        if state.is_world_process_zero:
            from fedpac_hf.rundir.reporting import write_report

            write_report(self.run_dir, title=self.title)
        return control


#: Training arguments ``config.yaml`` writes even at their defaults: every run uses them, so
#: the file (and summary.md, drawn from it) says which method ran, how long and how fast.
ALWAYS_WRITTEN = (
    "algorithm",
    "partitioner",
    "num_rounds",
    "clients_per_round",
    "local_steps",
    "learning_rate",
    "lr_scheduler_type",
    "per_device_train_batch_size",
    "max_grad_norm",
    "seed",
)


def render_config(margs: ModelDataArguments, args: FedPACArguments) -> str:
    """The text of ``config.yaml``: the model/data settings, the changed training arguments,
    :data:`ALWAYS_WRITTEN` and the settings the partitioner is built from (``natural_id``
    has one client per id, whatever ``num_clients`` says, so it writes no ``num_clients``).

    Call it before building the trainer: finding the defaults builds a fresh
    ``TrainingArguments``, which resets Accelerate's process-wide state.
    """
    import yaml

    settings = dataclasses.asdict(margs)
    changed = changed_training_arguments(args)
    current = args.to_dict()
    used = [PARTITIONER_FIELDS.get(k, k) for k in args.partitioner_kwargs()]
    for key in (*ALWAYS_WRITTEN, *used):
        if key in current:
            changed.setdefault(key, current[key])
    settings.update(changed)
    return yaml.safe_dump(settings, sort_keys=False)


def write_config(run_dir: Path, text: str) -> None:
    """Write ``config.yaml`` (:func:`render_config`) atomically."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, run_dir / "config.yaml")


def write_partition_files(run_dir: Path, trainer: Any, bundle: TaskBundle, title: str) -> None:
    """Write ``partition.txt`` and ``partition.png`` for the trainer's split of the training rows."""
    from fedpac_hf.partition import partition_stats, plot_label_heatmap, read_column

    trainer.setup_clients()
    partitioner = trainer.partitioner
    if bundle.class_column is not None:
        labels = read_column(bundle.train_dataset, bundle.class_column)
        num_classes = len(bundle.class_names) if bundle.class_names else None
    else:
        labels, num_classes = np.zeros(len(bundle.train_dataset), dtype=np.int64), None
    stats = partition_stats(
        trainer.client_indices,
        labels,
        num_classes=num_classes,
        client_names=getattr(partitioner, "client_ids", None),
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "partition.txt").write_text(
        f"{partitioner!r}\n\n{stats.table(max_clients=10)}\n", encoding="utf-8"
    )
    plot_label_heatmap(stats, run_dir / "partition.png", title=title)


# Trainer's evaluation entries that time the evaluation rather than score the model.
_TIMING_WORDS = ("runtime", "per_second", "preparation_time")


def print_final(metrics: dict[str, Any], run_dir: Path) -> None:
    """Print the final evaluation as one line, then where the run is.

    ``final accuracy after 30 rounds: 0.8660 (loss 0.4524)``: the quality
    metric first, the other evaluation metrics in brackets; Trainer's timing
    entries (``eval_runtime``, ``eval_model_preparation_time``, ...) are left out.
    """
    from fedpac_hf.rundir.plots import quality_metric

    key = quality_metric([metrics])
    count = int(metrics.get("round", 0))
    rounds = f"{count} round" + ("" if count == 1 else "s")
    shown = {
        k.removeprefix("eval_"): float(v)
        for k, v in metrics.items()
        if k.startswith("eval_")
        and isinstance(v, int | float)
        and not any(word in k for word in _TIMING_WORDS)
    }
    others = ", ".join(
        f"{name} {value:.4f}" for name, value in shown.items() if f"eval_{name}" != key
    )
    if key is not None:
        headline = f"final {key.removeprefix('eval_')} after {rounds}: {metrics[key]:.4f}"
        print(headline + (f" ({others})" if others else ""))
    elif others:
        print(f"final evaluation after {rounds}: {others}")
    print(f"run directory: {run_dir} (summary.md, metrics.jsonl/csv, plots, model)")
