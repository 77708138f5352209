"""`FedPACTrainer`: federated rounds of second-order clients inside HF `Trainer`.

A user who fine-tunes with ``Trainer`` swaps in :class:`FedPACTrainer` and
:class:`~fedpac_hf.config.arguments.FedPACArguments` and gets a federated run. The
trainer owns the split of ``train_dataset`` into clients (``args.partitioner``
or a given partitioner), so every checkpoint records the split it was made
on. Rounds run through the core's :class:`~fedpac_hf.federated.RoundEngine`
(sampling, schedule, aggregation, failures); each client runs the core's
client rule (:func:`fedpac_hf.federated.client_update`) with Trainer's data
collator, ``compute_loss``, Accelerate's autocast and backward; with ``fp16``
each client gets a fresh ``torch.amp.GradScaler`` for its round (overflowing
steps are skipped and counted in the round's ``skipped_steps``).

A round is one ``global_step``: Trainer's own ``eval_strategy``/``eval_steps``,
``save_strategy``/``save_steps``, ``logging_steps``, ``metric_for_best_model``,
``load_best_model_at_end``, ``state.best_metric`` and
``transformers.EarlyStoppingCallback`` behave as in ``Trainer``. Metrics go
through ``self.log`` so every ``report_to`` integration works.

Under ``accelerate launch`` / ``torchrun`` with N processes, a round's sampled
clients are spread over the processes and their sums all-reduced: the model
is never wrapped in DDP, each process holds the whole trainable model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerState
from transformers.trainer_utils import SaveStrategy, TrainOutput

from fedpac_hf.config.arguments import FedPACArguments
from fedpac_hf.federated import (
    ClientUpdate,
    RoundEngine,
    RoundPlan,
    ServerState,
    load_trainable_state,
    trainable_parameters,
)
from fedpac_hf.federated.distributed import all_reduce, share_noise_seed
from fedpac_hf.federated.failures import require_finite_evaluation
from fedpac_hf.rundir.output_dir import check_writable, claim_output_dir, no_new_folders
from fedpac_hf.trainer.callbacks import RoundProgressCallback
from fedpac_hf.trainer.client_steps import NO_PUBLIC_DATA, ClientStepsMixin
from fedpac_hf.trainer.preflight import PreflightMixin
from fedpac_hf.trainer.round_checkpoints import RoundCheckpointsMixin

__all__ = ["FedPACTrainer"]

logger = logging.getLogger(__name__)


class FedPACTrainer(ClientStepsMixin, RoundCheckpointsMixin, PreflightMixin, Trainer):
    """Federated fine-tuning with FedPAC and its baselines, inside ``Trainer``.

    Takes ``Trainer``'s constructor arguments, plus:

    Parameters
    ----------
    partitioner:
        A :class:`fedpac_hf.partition.Partitioner` that splits ``train_dataset``
        into clients, overriding the one ``args`` describes
        (``args.partitioner``, ``args.num_clients``, ...).
    client_transform:
        Applied to each client's split of ``train_dataset`` when the client is
        sampled, e.g. ``lambda ds: ds.with_transform(to_pixels)``, for data
        whose model inputs are made on the fly. Its output goes to the data
        collator as it is (no column removal).
    client_datasets:
        One training dataset per client, instead of ``train_dataset``. The
        checkpoint then records only the clients' sizes: prefer giving
        ``train_dataset`` and a partitioner.
    curvature_dataset:
        Public data the server computes the global Theta from, with
        ``args.public_curvature`` (``docs/privacy.md``): each round the
        client rule runs on it from the round's state, without DP, and its
        Theta replaces the clients' (who then send none). Prepared like a
        client's split (``client_transform``, column removal).

    ``optimizers`` / ``optimizer_cls_and_kwargs`` are refused: each client
    builds its optimizer from ``args.algorithm`` every round.

    Attributes
    ----------
    engine:
        The round engine of the current (or last) ``train()``.
    client_indices:
        Rows of ``train_dataset`` held by each client, once partitioned.
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        args: FedPACArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        model_init: Callable | None = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        optimizer_cls_and_kwargs: Any = None,
        preprocess_logits_for_metrics: Callable | None = None,
        *,
        partitioner: Any = None,
        client_transform: Callable[[Any], Any] | None = None,
        client_datasets: Sequence[Any] | None = None,
        curvature_dataset: Any = None,
    ) -> None:
        if args is None:
            args = FedPACArguments(output_dir="trainer_output")
        if not isinstance(args, FedPACArguments):
            raise TypeError(
                f"FedPACTrainer needs FedPACArguments, got {type(args).__name__}; build them with "
                "FedPACArguments(output_dir=..., algorithm=..., num_rounds=...)"
            )
        if optimizers != (None, None) or optimizer_cls_and_kwargs is not None:
            raise ValueError(
                "FedPACTrainer builds each client's optimizer from args.algorithm / "
                "args.client_optimizer every round; do not pass optimizers or "
                "optimizer_cls_and_kwargs"
            )
        if client_datasets is None and train_dataset is None:
            raise ValueError("pass train_dataset (split by args.partitioner) or client_datasets")
        if client_datasets is not None and len(client_datasets) == 0:
            raise ValueError("client_datasets is empty: a federation needs at least one client")
        if client_datasets is not None and (partitioner is not None or client_transform):
            raise ValueError(
                "client_datasets are already split: pass train_dataset with partitioner / "
                "client_transform instead"
            )
        if curvature_dataset is not None and not args.public_curvature:
            raise ValueError(
                "curvature_dataset is the public data of public_curvature: set "
                "public_curvature=True with it"
            )
        if args is not None and args.should_save:
            check_writable(args.output_dir)
        with no_new_folders(args.output_dir if args is not None else None):
            super().__init__(
                model=model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                model_init=model_init,
                compute_loss_func=compute_loss_func,
                compute_metrics=compute_metrics,
                callbacks=callbacks,
                preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            )
        # one readable line per round instead of Trainer's dict-per-log printers
        self.remove_callback(PrinterCallback)
        self.remove_callback(ProgressCallback)
        self.add_callback(RoundProgressCallback)
        self.client_datasets = list(client_datasets) if client_datasets is not None else None
        self.partitioner = partitioner
        self.client_transform = client_transform
        self.curvature_dataset = curvature_dataset
        self.algorithm = args.build_algorithm(self.model)
        self.engine: RoundEngine | None = None
        self.client_indices: list[np.ndarray] | None = None
        self._train_rows: Any = None
        self._gnb_seed = 0

    @property
    def server_state(self) -> ServerState | None:
        """theta, Theta and g_G after the last completed round (``None`` before ``train``)."""
        return self.engine.state if self.engine is not None else None

    @property
    def round_history(self) -> list[dict[str, float]]:
        """One metrics dict per completed round (training and evaluation)."""
        return self.engine.history if self.engine is not None else []

    def ensure_accelerator(self) -> None:
        """Rebuild Accelerate's state if something reset it since this trainer was made.

        Accelerate keeps one process-wide state, and building any new
        ``TrainingArguments`` resets it; a trainer that lives on (a Flower
        client reused across messages, a script that builds other arguments)
        would otherwise fail with "Please make sure to properly initialize
        your accelerator".
        """
        from accelerate.state import AcceleratorState

        if not AcceleratorState._shared_state:
            self.create_accelerator_and_postprocess()

    # ------------------------------------------------------------------ data

    def setup_clients(self) -> int:
        """Split the training data into clients (indices only); returns their number.

        A client's dataset is built when it is sampled (:meth:`client_dataset`),
        so registering many clients costs neither time nor memory.
        """
        if self.client_datasets is not None:
            for i, ds in enumerate(self.client_datasets):
                if len(ds) == 0:
                    raise ValueError(f"client {i} has no training example")
            return len(self.client_datasets)
        if self.client_indices is None:
            if self.partitioner is None:
                self.partitioner = self.args.build_partitioner()
            self.client_indices = self.args.assign_clients(self.train_dataset, self.partitioner)
            self._train_rows = (
                self.train_dataset
                if self.client_transform is not None
                else self._remove_unused_columns(self.train_dataset, description="training")
            )
        return len(self.client_indices)

    def client_dataset(self, client_id: int) -> Any:
        """Client ``client_id``'s training data (index-backed, transformed when it is sampled)."""
        if self.client_datasets is not None:
            ds = self.client_datasets[client_id]
            if hasattr(ds, "column_names"):
                return self._remove_unused_columns(ds, description="training")
            return ds
        if self.client_indices is None:
            self.setup_clients()
        ds = self._train_rows.select(self.client_indices[client_id])
        return self.client_transform(ds) if self.client_transform is not None else ds

    def get_client_datasets(self) -> list[Any]:
        """All clients' training datasets (see :meth:`client_dataset`)."""
        return [self.client_dataset(i) for i in range(self.setup_clients())]

    def partition_record(self) -> dict[str, Any]:
        """How the training data was split: partitioner settings and client sizes."""
        if self.client_datasets is not None:
            return {"client_sizes": [len(ds) for ds in self.client_datasets]}
        self.setup_clients()
        return {
            **self.partitioner.settings(),
            "client_sizes": [len(ix) for ix in self.client_indices],
        }

    # ----------------------------------------------------------- local steps

    def round_learning_rates(self) -> list[float]:
        """eta_l for every round (see :meth:`FedPACArguments.round_learning_rates`)."""
        return self.args.round_learning_rates()

    # -------------------------------------------------------------- training

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ) -> TrainOutput:
        """Run ``args.num_rounds`` federated rounds (resuming from a checkpoint if asked).

        ``resume_from_checkpoint`` is a checkpoint directory or ``True`` for
        the latest one under ``output_dir``.
        """
        if trial is not None:
            raise ValueError("hyperparameter search is not supported by FedPACTrainer")
        if self.args.secure_aggregation:
            raise ValueError(
                "secure_aggregation=true needs Flower's SecAgg+, but FedPACTrainer.train "
                "aggregates in process (the server would see every update anyway): run on "
                "Flower (fedpac_hf.flower, flwr run) or set secure_aggregation=false"
            )
        if self.args.preflight and self.preflight_seconds is None:  # before anything is written
            self.preflight()
        claim = None
        if self.args.should_save:  # one run per output_dir, and never over another run's files
            claim = claim_output_dir(
                self.args.output_dir,
                resume=bool(resume_from_checkpoint),
                overwrite=self.args.overwrite_output_dir,
            )
        try:
            return self._train_rounds(resume_from_checkpoint, trial, ignore_keys_for_eval)
        finally:
            if claim is not None:
                claim.release()

    def _train_rounds(
        self, resume_from_checkpoint: str | bool | None, trial: Any, ignore_keys_for_eval: Any
    ) -> TrainOutput:
        args = self.args
        start_time = time.time()
        self.ensure_accelerator()
        num_clients = self.setup_clients()
        world, rank = args.world_size, args.process_index
        model = self.model
        model.to(args.device)
        trainable_parameters(model)  # fails early without trainable parameters
        if self.algorithm.public_curvature and self.curvature_dataset is None:
            raise ValueError(NO_PUBLIC_DATA)
        self.check_record_privacy(model)  # a layer Opacus cannot cover: refused before round 1
        self.state = TrainerState(
            is_local_process_zero=self.is_local_process_zero(),
            is_world_process_zero=self.is_world_process_zero(),
        )
        self.state.epoch = None  # rounds, not epochs, are the unit here
        self.state.max_steps = args.num_rounds
        self.state.compute_steps(args, args.num_rounds)
        self.state.train_batch_size = args.per_device_train_batch_size
        self.engine = args.round_engine(
            ServerState.from_model(model), num_clients, algorithm=self.algorithm, device=args.device
        )
        if world > 1:  # under DP every process adds process 0's noise
            self.engine.state = share_noise_seed(self.engine.state)
        if world > 1 and self.engine.clients_per_round < world:
            raise ValueError(
                f"{world} processes but only {self.engine.clients_per_round} clients per round: "
                "every process needs at least one client; raise clients_per_round or use fewer "
                "processes"
            )
        if resume_from_checkpoint:
            self._resume(resume_from_checkpoint, num_clients)
        self.state.global_step = self.engine.state.round
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)

        def train_one(client_id: int, plan: RoundPlan) -> ClientUpdate:
            return self.train_client_by_id(
                client_id, plan.round_index, plan.learning_rate, plan.state
            )

        while not self.engine.finished and not self.control.should_training_stop:
            self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
            round_number = self.engine.state.round + 1
            self._fire("on_round_begin", round=round_number)
            # RoundError (too few clients, non-finite global model) leaves the last checkpoint
            metrics = self.engine.run_round(
                train_one,
                share=(lambda ids: ids[rank::world]) if world > 1 else None,
                reduce=all_reduce if world > 1 else None,
                train_public=self.train_public,
            )
            load_trainable_state(model, self.engine.state.params)
            self.state.global_step = round_number
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            self._log_evaluate_save(metrics, trial, ignore_keys_for_eval)
            self._fire("on_round_end", round=round_number, metrics=metrics)

        if args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            self._load_best_params()
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        final_loss = self.round_history[-1]["train_loss"] if self.round_history else float("nan")
        metrics = {
            "train_runtime": time.time() - start_time,
            "train_loss": final_loss,
            "num_rounds": float(self.state.global_step),
        }
        return TrainOutput(self.state.global_step, final_loss, metrics)

    def _log_evaluate_save(
        self, metrics: dict[str, float], trial: Any, ignore_keys: list[str] | None
    ) -> None:
        """Trainer's ``_maybe_log_save_evaluate`` for a round (a round is one global step)."""
        if self.control.should_log:
            self.log(dict(metrics))
        if self.control.should_evaluate and self.eval_dataset is not None:
            evaluation = self._evaluate(trial, ignore_keys)
            require_finite_evaluation(evaluation, self.state.global_step)
            metrics.update(evaluation)
            try:
                is_best = self._determine_best_metric(metrics=evaluation, trial=trial)
            except KeyError as err:  # a setting the user chose, not a bug: say which
                raise ValueError(str(err.args[0]) if err.args else str(err)) from None
            if self.args.save_strategy == SaveStrategy.BEST:
                self.control.should_save = is_best
        if self.control.should_save:
            self.save_federated_checkpoint()

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """``Trainer.evaluate``, plus perplexity for causal language models."""
        from fedpac_hf.trainer.evaluation import add_perplexity

        self.ensure_accelerator()
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        model = self.accelerator.unwrap_model(self.model)
        added = add_perplexity(metrics, model, metric_key_prefix)
        if added:
            self.log(added)
        return metrics

    def _fire(self, event: str, **kwargs: Any) -> None:
        for callback in self.callback_handler.callbacks:
            handler = getattr(callback, event, None)
            if handler is not None:
                result = handler(self.args, self.state, self.control, **kwargs)
                if result is not None:
                    self.control = result
