"""The entry points of a config-driven run: ``fedpac-hf train`` and the config-driven examples.

:func:`run_training` builds the task, hands the raw training rows to
:class:`~fedpac_hf.FedPACTrainer` (which splits them into clients), trains,
saves the final model and fills the run directory; :func:`run_example` is the
same behind a default config, for scripts.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedpac_hf.config.arguments import FedPACArguments
from fedpac_hf.rundir.output_dir import claim_output_dir
from fedpac_hf.trainer.callbacks import EvaluateLastRoundCallback
from fedpac_hf.trainer.logs import show_package_log

from .config import ModelDataArguments
from .parsing import config_parser, parse_run_config, settings_stage
from .rundir import RunFilesCallback, print_final, render_config, write_partition_files
from .tasks import DEFAULT_MODEL_NAMES, TaskBundle, build_task

__all__ = ["run_example", "run_training"]


def run_training(
    model_args: ModelDataArguments,
    training_args: FedPACArguments,
    callbacks: Sequence[Any] = (),
) -> dict[str, float]:
    """Train one federated run end to end and fill its run directory.

    Builds the task's model and data (:func:`~fedpac_hf.run.build_task`),
    lets ``FedPACTrainer`` split the training rows with
    ``training_args.partitioner``, trains for ``num_rounds`` (resuming if
    ``resume_from_checkpoint`` is set), saves the final model into
    ``output_dir`` (pushed to the Hub when ``push_to_hub`` is set) and prints
    the final metrics.

    Parameters
    ----------
    model_args : ModelDataArguments
        Task, model, data and LoRA settings.
    training_args : FedPACArguments
        Federated training arguments; ``output_dir`` is the run directory.
    callbacks : sequence of TrainerCallback
        Extra callbacks for the trainer.

    Returns
    -------
    dict
        The last round's metrics (training and evaluation).
    """
    import torch

    threads = torch.get_num_threads()
    if model_args.num_threads:
        torch.set_num_threads(model_args.num_threads)
    try:
        return _train(model_args, training_args, callbacks)
    finally:
        torch.set_num_threads(threads)


def _train(
    model_args: ModelDataArguments, args: FedPACArguments, callbacks: Sequence[Any]
) -> dict[str, float]:
    run_dir = Path(args.output_dir)
    config_text = render_config(model_args, args)
    with settings_stage("building the model, the data and the trainer from the settings"):
        bundle, trainer = _build(run_dir, model_args, args, config_text, callbacks)
    if args.preflight:  # before the run directory is claimed: a failure writes nothing
        trainer.preflight()
    # one owner for the run directory, for the whole command (the trainer's claim nests)
    with (
        claim_output_dir(
            run_dir, resume=bool(args.resume_from_checkpoint), overwrite=args.overwrite_output_dir
        )
        if args.should_save
        else contextlib.nullcontext()
    ):
        return _train_in(run_dir, args, bundle, trainer)


def _build(
    run_dir: Path,
    model_args: ModelDataArguments,
    args: FedPACArguments,
    config_text: str,
    callbacks: Sequence[Any],
) -> tuple[TaskBundle, Any]:
    """The task (model, data, processing) and its ``FedPACTrainer``; nothing is written."""
    from transformers import set_seed

    from fedpac_hf.trainer.fedpac_trainer import FedPACTrainer

    set_seed(args.seed)
    bundle = build_task(model_args, args)
    if not bundle.remove_unused_columns and args.remove_unused_columns:
        # the images become pixel_values inside a with_transform: keep the raw columns
        args.remove_unused_columns = False
    model_name = model_args.model_name_or_path or DEFAULT_MODEL_NAMES[model_args.task]
    title = f"{model_name} / {model_args.dataset} / {args.algorithm}"
    partition_title = f"{model_args.dataset}, {args.partitioner}"
    files = RunFilesCallback(
        run_dir,
        title=title,
        config_text=config_text,
        write_partition=lambda: write_partition_files(run_dir, trainer, bundle, partition_title),
    )
    trainer = FedPACTrainer(
        model=bundle.model,
        args=args,
        data_collator=bundle.data_collator,
        train_dataset=bundle.train_dataset,
        eval_dataset=bundle.eval_dataset,
        processing_class=bundle.processing_class,
        compute_metrics=bundle.compute_metrics,
        callbacks=[files, EvaluateLastRoundCallback(), *callbacks],
        client_transform=bundle.client_transform,
        curvature_dataset=bundle.curvature_dataset,
    )
    return bundle, trainer


def _train_in(run_dir: Path, args: FedPACArguments, bundle: TaskBundle, trainer: Any) -> dict:
    """Train (resuming if asked), save the model and print the final line."""
    # nothing is written before the trainer has split the data and checked any
    # checkpoint it resumes: config.yaml and the partition files come at train begin
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint or None)
    final = dict(trainer.round_history[-1]) if trainer.round_history else {}
    if bundle.base_model_to_save is not None and args.should_save:
        # A LoRA adapter needs its base weights to load back: keep the config-built base.
        base_dir = (run_dir / "base_model").resolve()
        bundle.base_model_to_save.save_pretrained(base_dir)
        if bundle.processing_class is not None:
            bundle.processing_class.save_pretrained(base_dir)
        for config in trainer.model.peft_config.values():
            config.base_model_name_or_path = str(base_dir)
    trainer.save_model(str(run_dir))
    if args.should_save:
        print_final(final, run_dir)
    return final


def run_example(default_config: str | os.PathLike, argv: Sequence[str] | None = None) -> dict:
    """Entry point of the scripts in ``examples/``: a default config plus overrides.

    ``argv`` may start with another YAML file that replaces ``default_config``;
    the rest are ``--field value`` overrides. A user error (unknown setting,
    bad value, missing file) ends the program with a one-line message and
    exit status 2.

    Parameters
    ----------
    default_config : str or os.PathLike
        The example's YAML config under ``configs/``.
    argv : sequence of str, optional
        Command-line arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    dict
        The last round's metrics (see :func:`run_training`).
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    config: str | os.PathLike = default_config
    if argv and argv[0].endswith((".yaml", ".yml")):
        config, argv = argv[0], argv[1:]
    if any(item in ("-h", "--help") for item in argv):
        print(f"usage: {Path(sys.argv[0]).name} [CONFIG.yaml] [--field value ...]")
        print(f"default config: {default_config}\n")
        config_parser().print_help()
        raise SystemExit(0)
    try:
        model_args, training_args = parse_run_config(config, argv)
        show_package_log(training_args)
        return run_training(model_args, training_args)
    except (ValueError, OSError, ImportError) as error:
        message = " ".join(str(error).split())
        print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
