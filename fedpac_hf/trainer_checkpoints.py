"""Round checkpoints of :class:`~fedpac_hf.FedPACTrainer`: save, resume, best model.

A checkpoint (``output_dir/checkpoint-round-{r}``, see :mod:`fedpac_hf.checkpoint`)
holds the engine's global state, the run's identity (model, algorithm,
sampling seed, the partition's settings and client sizes, parameter shapes),
the round history and Trainer's best-metric bookkeeping. Resuming refuses a
checkpoint whose identity differs from the run's, naming the setting.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fedpac_hf.checkpoint import (
    CHECKPOINT_PREFIX,
    check_resumable,
    latest_checkpoint,
    load_federated_checkpoint,
    rotate_checkpoints,
    run_identity,
    save_federated_checkpoint,
)
from fedpac_hf.federated import load_trainable_state

__all__ = ["RoundCheckpointsMixin"]

logger = logging.getLogger(__name__)


class RoundCheckpointsMixin:
    """Checkpoint, resume and best-model methods of ``FedPACTrainer`` (a round is a step)."""

    def _run_identity(self, num_clients: int) -> dict[str, Any]:
        """What must match for a checkpoint to be resumable by this run."""
        return run_identity(
            model=self.accelerator.unwrap_model(self.model),
            algorithm=self.algorithm,
            num_clients=num_clients,
            seed=self.args.seed,
            partition=self.partition_record(),
            params=self.engine.state.params,
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
        if isinstance(checkpoint, str) and checkpoint.strip().lower() in ("true", "latest"):
            if not Path(checkpoint).exists():  # `--resume_from_checkpoint true` on the CLI
                checkpoint = True
        if checkpoint is True:
            found = latest_checkpoint(self.args.output_dir)
            if found is None:
                raise FileNotFoundError(
                    f"resume_from_checkpoint=True but {self.args.output_dir} holds no "
                    f"{CHECKPOINT_PREFIX}* checkpoint (save them with save_strategy='steps' "
                    "and save_steps)"
                )
            checkpoint = str(found)
        state, meta = load_federated_checkpoint(checkpoint)
        if state.round > self.args.num_rounds:
            raise ValueError(
                f"cannot resume from {checkpoint}: it is at round {state.round}, past "
                f"num_rounds={self.args.num_rounds}; raise num_rounds to continue the run"
            )
        check_resumable(
            checkpoint,
            meta.get("run", {}),
            self._run_identity(num_clients),
            state,
            self.args.partition_setting_names(),
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
