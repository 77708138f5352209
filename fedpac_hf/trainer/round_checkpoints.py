"""Round checkpoints of :class:`~fedpac_hf.FedPACTrainer`: save, resume, best model.

A checkpoint (``output_dir/checkpoint-round-{r}``, see :mod:`fedpac_hf.rundir.checkpoint`)
holds the engine's global state, the run's identity (model, algorithm,
sampling seed, the partition's settings and client sizes, parameter shapes),
the round history and Trainer's best-metric bookkeeping. Resuming refuses a
checkpoint whose identity differs from the run's, naming the setting.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedpac_hf.federated import Algorithm, RoundEngine, load_trainable_state
from fedpac_hf.rundir.checkpoint import (
    CHECKPOINT_PREFIX,
    load_federated_checkpoint,
    rotate_checkpoints,
    save_federated_checkpoint,
)
from fedpac_hf.rundir.resume import load_resumable_checkpoint, run_identity

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers.trainer_callback import CallbackHandler, TrainerControl, TrainerState

    from fedpac_hf.config.arguments import FedPACArguments

__all__ = ["RoundCheckpointsMixin"]

logger = logging.getLogger(__name__)


class RoundCheckpointsMixin:
    """Checkpoint, resume and best-model methods of ``FedPACTrainer`` (a round is a step).

    What it uses of the trainer it is mixed into is declared below: Trainer's
    ``args``, ``accelerator``, ``model``, ``state``, ``control``,
    ``callback_handler`` and ``save_model``, and ``FedPACTrainer``'s
    ``algorithm``, ``engine``, ``round_history`` and ``partition_record``.
    """

    args: FedPACArguments
    accelerator: Accelerator
    model: torch.nn.Module
    state: TrainerState
    control: TrainerControl
    callback_handler: CallbackHandler
    save_model: Callable[..., None]
    algorithm: Algorithm
    engine: RoundEngine
    round_history: list[dict[str, Any]]
    partition_record: Callable[[], dict[str, Any]]

    def _run_identity(self, num_clients: int) -> dict[str, Any]:
        """What must match for a checkpoint to be resumable by this run."""
        return run_identity(
            model=self.accelerator.unwrap_model(self.model),
            algorithm=self.algorithm,
            num_clients=num_clients,
            seed=self.args.seed,
            partition=self.partition_record(),
            params=self.engine.state.params,
            training=self.args.training_settings(self.algorithm),
        )

    def save_federated_checkpoint(self) -> Path | None:
        """Write ``output_dir/checkpoint-round-{r}`` (main process only) and rotate old ones."""
        if not self.args.should_save:
            return None
        state = self.engine.state
        meta = {
            "run": self._run_identity(self.engine.num_clients),
            "history": self.round_history,
            "trainer_state": {
                "best_metric": self.state.best_metric,
                "best_global_step": self.state.best_global_step,
            },
        }
        target = Path(self.args.output_dir) / f"{CHECKPOINT_PREFIX}{state.round}"
        path = save_federated_checkpoint(target, state, meta, self.save_model)
        if self.state.best_global_step:
            best = Path(self.args.output_dir) / f"{CHECKPOINT_PREFIX}{self.state.best_global_step}"
            if best.is_dir():
                self.state.best_model_checkpoint = str(best)
        rotate_checkpoints(
            self.args.output_dir, self.args.save_total_limit, self.state.best_model_checkpoint
        )
        self.control = self.callback_handler.on_save(self.args, self.state, self.control)
        return path

    def _resume(self, checkpoint: str | bool, num_clients: int) -> None:
        checkpoint, state, meta = load_resumable_checkpoint(
            checkpoint,
            self.args.output_dir,
            identity=self._run_identity(num_clients),
            num_rounds=self.args.num_rounds,
            setting_names=self.args.partition_setting_names(),
        )
        self.engine = self.args.round_engine(
            state,
            num_clients,
            history=meta.get("history", []),
            algorithm=self.algorithm,
            device=self.args.device,
        )
        saved = meta.get("trainer_state") or {}
        self.state.best_metric = saved.get("best_metric")
        self.state.best_global_step = saved.get("best_global_step") or 0
        if self.state.best_global_step:
            best = Path(self.args.output_dir) / f"{CHECKPOINT_PREFIX}{self.state.best_global_step}"
            self.state.best_model_checkpoint = str(best) if best.is_dir() else None
        load_trainable_state(self.model, state.params)
        logger.info("resumed from %s at round %d", checkpoint, state.round)

    def _load_best_params(self) -> None:
        """Load the global parameters of the best checkpoint into the model (``load_best_model_at_end``)."""
        state, _ = load_federated_checkpoint(self.state.best_model_checkpoint)
        load_trainable_state(self.model, state.params)
        logger.info(
            "loaded the best global model from %s (%s = %s)",
            self.state.best_model_checkpoint,
            self.args.metric_for_best_model,
            self.state.best_metric,
        )
