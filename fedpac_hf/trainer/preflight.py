"""The preflight of :class:`~fedpac_hf.FedPACTrainer`, run before anything is written.

:meth:`PreflightMixin.preflight` checks the labels of the whole training split
against the model's classification head, then runs the core's
:func:`~fedpac_hf.federated.preflight.preflight` with the trainer's own
machinery: client 0's data loader and collator, ``compute_loss`` under
Accelerate, its backward and gradient scaler, Sophia's curvature pass, the
configured client optimizer and Theta's form, and one evaluation batch. The
model and every random stream are put back afterwards, so the run trains
exactly as without it (``preflight=False`` skips it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from fedpac_hf.federated import Algorithm, cycle_batches
from fedpac_hf.federated.local_step import ClientHooks
from fedpac_hf.federated.preflight import PreflightError, preflight
from fedpac_hf.rundir.resume import model_name

if TYPE_CHECKING:
    from fedpac_hf.config.arguments import FedPACArguments

__all__ = ["PreflightMixin"]

logger = logging.getLogger(__name__)

_CLASSIFIERS = ("ForSequenceClassification", "ForImageClassification", "ForAudioClassification")


class PreflightMixin:
    """The preflight of ``FedPACTrainer`` (see the module docstring).

    What it uses of the trainer it is mixed into is declared below.
    """

    args: FedPACArguments
    model: torch.nn.Module
    algorithm: Algorithm
    train_dataset: Any
    eval_dataset: Any
    data_collator: Any
    client_loss: Callable[..., torch.Tensor]
    client_backward: Callable[[torch.Tensor], None]
    curvature_loss: Callable[..., Any]
    client_grad_scaler: Callable[[], torch.amp.GradScaler | None]
    client_dataset: Callable[[int], Any]
    prediction_step: Callable[..., Any]
    client_dataloader: Callable[..., DataLoader]
    _gnb_seed: int
    #: Seconds the preflight took once it passed (``train`` then skips it).
    preflight_seconds: float | None = None

    def check_labels(self) -> None:
        """Refuse training labels outside the classification head (every row, before round 1).

        Otherwise the client holding such a label fails in every round it is
        sampled, and the run goes on without it.
        """
        if not model_name(self.model).endswith(_CLASSIFIERS):
            return
        config = getattr(self.model, "config", None)
        num_labels = getattr(config, "num_labels", None)
        data = self.train_dataset
        columns = getattr(data, "column_names", None) or []
        column = next((c for c in ("labels", "label") if c in columns), None)
        if num_labels is None or column is None:
            return
        from fedpac_hf.partition import read_column

        labels = read_column(data, column)
        if labels.dtype == object or labels.ndim != 1:  # multi-label rows: nothing to check
            return
        labels = labels[labels != -100]
        bad = labels[(labels < 0) | (labels >= num_labels)]
        if bad.size:
            shown = ", ".join(str(v) for v in np.unique(bad)[:5])
            raise PreflightError(
                f"the training data's {column!r} column holds {shown} (in {bad.size} rows), "
                f"outside the model's {num_labels} labels 0..{num_labels - 1}: give the model "
                "num_labels to cover every class (or drop those rows)"
            )

    def _eval_one_batch(self) -> Callable[[torch.nn.Module], Any] | None:
        """Evaluation of one batch of ``eval_dataset`` (None without one)."""
        if self.eval_dataset is None or isinstance(self.eval_dataset, dict):
            return None
        dataset = self.eval_dataset
        collator = self.data_collator
        if hasattr(dataset, "column_names"):
            dataset = self._remove_unused_columns(dataset, description="evaluation")  # type: ignore[attr-defined]
        else:
            collator = self._get_collator_with_removed_columns(collator, description="evaluation")  # type: ignore[attr-defined]
        loader = DataLoader(
            dataset, batch_size=self.args.per_device_eval_batch_size, collate_fn=collator
        )

        def evaluate(model: torch.nn.Module) -> Any:
            with torch.no_grad():
                return self.prediction_step(model, next(iter(loader)), prediction_loss_only=False)

        return evaluate

    def _public_batches(self, seed: int) -> Callable[[], Any] | None:
        """Fresh batches of the server's public curvature data (None without it)."""
        rows = self.public_rows()  # type: ignore[attr-defined]
        if rows is None:
            return None
        return lambda: cycle_batches(self.client_dataloader(rows, seed))

    def preflight(self, client_id: int = 0) -> float:
        """Check the labels, then one client step, one aggregation, one warm-started step and one
        evaluation batch on the real model, all put back; returns the seconds it took.

        ``client_id`` is the client whose data the steps draw (a Flower node: its own).

        Raises
        ------
        PreflightError
            Naming the stage and the cause.
        """
        self.ensure_accelerator()  # type: ignore[attr-defined]
        self.setup_clients()  # type: ignore[attr-defined]
        self.model.to(self.args.device)
        self.check_labels()
        seed = int(self.args.seed)
        dataset = self.client_dataset(client_id)
        self._gnb_seed = seed
        steps = self.args.local_step_settings(self.args.round_learning_rates()[0], 1)
        hooks = ClientHooks(
            loss_fn=self.client_loss,
            backward=self.client_backward,
            curvature_loss_fn=self.curvature_loss,
            grad_scaler=self.client_grad_scaler(),
        )
        seconds = preflight(
            self.model,
            self.algorithm,
            lambda: cycle_batches(self.client_dataloader(dataset, seed)),
            steps,
            hooks,
            weighting=self.args.aggregation_weighting,
            eval_fn=self._eval_one_batch(),
            public_batches=self._public_batches(seed),
        )
        logger.info("preflight passed in %.1f s (preflight=False skips it)", seconds)
        self.preflight_seconds = seconds
        return seconds
