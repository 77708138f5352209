"""How :class:`~fedpac_hf.FedPACTrainer` runs one client: its round, loader and micro-batches.

:meth:`~ClientStepsMixin.train_client` runs the core's client rule for one
client from a global state (and :meth:`~ClientStepsMixin.train_public` for the
server's public curvature data); below it, the client's loader (shuffled, or Poisson-sampled under record-level DP) and
its privacy settings for the round; Trainer's ``compute_loss`` under
Accelerate's autocast, inputs copied to the device without blocking the host,
Accelerate's backward, a fresh gradient scaler per client and round under
``fp16``, and Sophia's Gauss-Newton-Bartlett loss, which :meth:`train_client`
hands to the core's :func:`~fedpac_hf.federated.client_update`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from fedpac_hf.federated import (
    ClientHooks,
    ClientUpdate,
    RoundPlan,
    ServerState,
    client_update,
    cycle_batches,
)
from fedpac_hf.federated.privacy import ClientDP
from fedpac_hf.federated.privacy_notes import describe_record_noise
from fedpac_hf.federated.record_privacy import RecordClient, poisson_loader

if TYPE_CHECKING:
    from accelerate import Accelerator

    from fedpac_hf.config.arguments import FedPACArguments
    from fedpac_hf.federated import Algorithm

__all__ = ["ClientStepsMixin", "NO_PUBLIC_DATA", "PUBLIC_CLIENT"]

logger = logging.getLogger(__name__)

NO_PUBLIC_DATA = (
    "public_curvature is set but the trainer has no curvature_dataset: pass "
    "FedPACTrainer(curvature_dataset=...) (the CLI: public_curvature_dataset)"
)

#: The client id the server's (first) run on the public curvature data has (its
#: seeds, logs and errors; the next runs count down from it): no client has it.
PUBLIC_CLIENT = -1


def _client_seed(seed: int, round_index: int, client_id: int) -> int:
    """A seed for one client in one round, independent of which process trains it."""
    return int(np.random.SeedSequence([seed, round_index, client_id % 2**32]).generate_state(1)[0])


class ClientStepsMixin:
    """The client methods of ``FedPACTrainer``: a client's round, loader, loss, backward, scaler.

    What it uses of the trainer it is mixed into is declared below: Trainer's
    ``args``, ``model``, ``accelerator``, ``compute_loss`` and ``_prepare_inputs``,
    and the trainer's ``server_state``, ``client_dataset``, ``partition_record``,
    ``curvature_dataset`` and ``ensure_accelerator``.
    """

    args: FedPACArguments
    accelerator: Accelerator
    algorithm: Algorithm
    data_collator: Callable[[list[Any]], Any]
    compute_loss: Callable[..., torch.Tensor]
    _prepare_inputs: Callable[[Any], Any]
    _get_collator_with_removed_columns: Callable[..., Callable[[list[Any]], Any]]
    _gnb_seed: int  # seeded per client and round by train_client
    model: torch.nn.Module
    curvature_dataset: Any
    server_state: ServerState | None
    client_dataset: Callable[[int], Any]
    partition_record: Callable[[], dict[str, Any]]
    client_transform: Callable[[Any], Any] | None
    _remove_unused_columns: Callable[..., Any]
    ensure_accelerator: Callable[[], None]

    def train_client(
        self,
        client_id: int,
        dataset: Any,
        round_index: int,
        lr: float,
        state: ServerState | None = None,
        *,
        public: bool = False,
    ) -> ClientUpdate:
        """Run the client rule for one client from ``state`` (default: the current global state).

        ``public=True``: the server's run on public data (:meth:`train_public`),
        without the run's DP and returning its Theta.
        """
        state = state if state is not None else self.server_state
        if state is None:
            raise ValueError("no global state to train from: call train() or pass state")
        self.ensure_accelerator()
        seed = _client_seed(self.args.seed, round_index, client_id)
        torch.manual_seed(seed)  # dropout and other in-model randomness
        self._gnb_seed = seed
        privacy = None if public else self.client_privacy(client_id, dataset, round_index)
        algorithm = self.algorithm.public_rule if public else self.algorithm
        return client_update(
            self.model,
            state,
            algorithm,
            cycle_batches(self.client_dataloader(dataset, seed, privacy)),
            self.args.local_step_settings(lr),
            ClientHooks(
                loss_fn=self.client_loss,
                backward=self.client_backward,
                curvature_loss_fn=self.curvature_loss,
                grad_scaler=self.client_grad_scaler(),
            ),
            client_id=client_id,
            privacy=privacy,
        )

    def train_client_by_id(
        self, client_id: int, round_index: int, lr: float, state: ServerState | None = None
    ) -> ClientUpdate:
        """Build a sampled client's data and run its local steps (any failure is the client's)."""
        return self.train_client(client_id, self.client_dataset(client_id), round_index, lr, state)

    def train_public(self, plan: RoundPlan) -> list[ClientUpdate]:
        """The client rule on ``curvature_dataset`` from the round's state, without DP.

        The server's own updates for algorithms with ``public_curvature``
        (:meth:`~fedpac_hf.federated.RoundPlan.use_public_curvature`), one per
        ``args.public_curvature_clients``, each on its own batches (client ids
        -1, -2, ...): their mean Theta becomes the next global Theta.
        """
        rows = self.public_rows()
        if rows is None:
            raise ValueError(NO_PUBLIC_DATA)
        lr, index = plan.learning_rate, plan.round_index
        return [
            self.train_client(PUBLIC_CLIENT - i, rows, index, lr, plan.state, public=True)
            for i in range(self.args.public_curvature_clients)
        ]

    def public_rows(self) -> Any:
        """``curvature_dataset`` prepared as a client's split is (``None`` without one)."""
        rows = self.curvature_dataset
        if rows is None:
            return None
        if self.client_transform is not None:
            return self.client_transform(rows)
        if hasattr(rows, "column_names"):
            return self._remove_unused_columns(rows, description="public curvature")
        return rows

    def check_record_privacy(self, model: torch.nn.Module) -> None:
        """Under record-level DP, before round 1: refuse a layer Opacus cannot cover and log
        the noise on each local step
        (:func:`~fedpac_hf.federated.privacy_notes.describe_record_noise`)."""
        record = self.args.record_privacy()
        if record is None:
            return
        record.check_model(model)
        sizes = self.partition_record()["client_sizes"]
        batch = self.args.per_device_train_batch_size
        describe_record_noise(
            record,
            sum(p.numel() for p in model.parameters() if p.requires_grad),
            [(size, batch) for size in sizes],
            self.args.local_steps,
            self.args.num_rounds,
            logger,
        )

    def client_privacy(
        self, client_id: int, dataset: Any, round_index: int
    ) -> ClientDP | RecordClient | None:
        """The client's DP for this round: client-level clipping, record-level DP-SGD, or none."""
        record = self.args.record_privacy()
        if record is None:
            return self.args.client_privacy(self.algorithm)
        return record.for_client(
            client_id=client_id,
            round_index=round_index,
            num_examples=len(dataset),
            batch_size=self.args.per_device_train_batch_size,
            local_steps=self.args.local_steps,
            num_rounds=self.args.num_rounds,
        )

    def client_dataloader(
        self, dataset: Any, seed: int, privacy: ClientDP | RecordClient | None = None
    ) -> DataLoader:
        """A shuffling loader over one client's data, its order fixed by ``seed``.

        Under record-level DP, Poisson-sampled batches instead (each example in
        a batch with probability ``privacy.sample_rate``; an empty batch is
        ``{}``), drawn from the client's secret sampling generator.
        """
        collator = self.data_collator
        if not hasattr(dataset, "column_names"):
            collator = self._get_collator_with_removed_columns(collator, description="training")
        workers: dict[str, Any] = dict(
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available(),
        )
        if isinstance(privacy, RecordClient):
            return poisson_loader(dataset, privacy, self.args.local_steps, collator, **workers)
        return DataLoader(
            dataset,
            batch_size=self.args.per_device_train_batch_size,
            sampler=RandomSampler(dataset, generator=torch.Generator().manual_seed(seed)),
            collate_fn=collator,
            drop_last=self.args.dataloader_drop_last,
            **workers,
        )

    def _inputs_on_device(self, inputs: Any) -> Any:
        """Trainer's ``_prepare_inputs``, with pinned batches copied without blocking the host.

        ``Trainer`` moves each tensor with a plain ``.to(device)``, which makes
        the host wait for the device on every micro-batch; a pinned tensor (the
        client loaders pin their batches on CUDA) can be copied asynchronously.
        """
        device = self.args.device
        if device.type == "cuda":

            def move(data: Any) -> Any:
                if isinstance(data, Mapping):
                    return type(data)({k: move(v) for k, v in data.items()})
                if isinstance(data, (list, tuple)):
                    return type(data)(move(v) for v in data)
                if (
                    isinstance(data, torch.Tensor)
                    and data.device.type == "cpu"
                    and data.is_pinned()
                ):
                    return data.to(device, non_blocking=True)
                return data

            inputs = move(inputs)
        return self._prepare_inputs(inputs)

    def client_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """One micro-batch's loss: Trainer's ``compute_loss`` under Accelerate's autocast."""
        inputs = self._inputs_on_device(inputs)
        with self.accelerator.autocast():
            return self.compute_loss(model, inputs)

    def client_backward(self, loss: torch.Tensor) -> None:
        """Back-propagate one client loss: Accelerate's ``backward``, except under fp16.

        With fp16 the client's own gradient scaler has scaled the loss already
        (:meth:`client_grad_scaler`), so Accelerate's scaler must not scale it again.
        """
        if self.accelerator.scaler is not None:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def client_grad_scaler(self) -> torch.amp.GradScaler | None:
        """A fresh gradient scaler for one client's round under ``fp16`` (else ``None``).

        Fresh for every client and round, so no client inherits another's loss
        scale; its options are Accelerate's (``GradScalerKwargs`` handler) when
        one was given. On the CPU, where Accelerate does not autocast to fp16,
        the scaler still scales and unscales (harmless in float32).
        """
        if not self.args.fp16:
            return None
        handler = getattr(self.accelerator, "scaler_handler", None)
        kwargs = handler.to_kwargs() if handler is not None else {}
        return torch.amp.GradScaler(self.args.device.type, **kwargs)

    def curvature_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> Any:
        """Sophia's Gauss-Newton-Bartlett loss: labels sampled from the model's softmax.

        Returns ``(loss, num_samples)``; padded positions (``attention_mask`` 0 or
        label -100) do not count. Sampling is seeded per client and round.
        """
        from fedpac_hf.optim import gnb_loss

        inputs = self._inputs_on_device(inputs)
        labels = inputs.pop("labels", None)
        with self.accelerator.autocast():
            logits = model(**inputs).logits
        generator = torch.Generator(device=logits.device)
        generator.manual_seed(self._gnb_seed)
        self._gnb_seed += 1
        mask = inputs.get("attention_mask")
        if logits.ndim == 3 and mask is not None:
            return gnb_loss(logits, attention_mask=mask, generator=generator)
        if labels is not None and labels.shape == logits.shape[:-1]:
            return gnb_loss(logits, labels=labels, generator=generator)
        return gnb_loss(logits, generator=generator)
