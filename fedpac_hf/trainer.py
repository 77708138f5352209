"""`FedPACTrainer`: federated rounds of second-order clients inside HF `Trainer`.

A user who fine-tunes with ``Trainer`` swaps in :class:`FedPACTrainer` and
:class:`~fedpac_hf.arguments.FedPACArguments` and gets a federated run: the
training data is split into non-IID clients (or given as ``client_datasets``),
each round samples clients, each client runs the core's client rule
(:func:`fedpac_hf.federated.client_update`) with Trainer's data collator,
``compute_loss``, Accelerate's autocast and backward, and the server rule
aggregates deltas and curvature. Metrics go through ``self.log`` so every
``report_to`` integration works; evaluation is ``Trainer.evaluate``.

Under ``accelerate launch`` / ``torchrun`` with N processes, a round's sampled
clients are spread over the processes and their sums all-reduced: the model
is never wrapped in DDP, each process holds the whole trainable model.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler
from transformers import Trainer, TrainerCallback
from transformers.optimization import get_scheduler
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import TrainOutput

from fedpac_hf.arguments import FedPACArguments
from fedpac_hf.checkpoint import (
    CHECKPOINT_PREFIX,
    STATE_JSON,
    STATE_TENSORS,
    latest_checkpoint,
    load_federated_checkpoint,
    save_federated_checkpoint,
)
from fedpac_hf.federated import (
    ClientUpdate,
    RoundAggregator,
    ServerState,
    client_update,
    cycle_batches,
    load_trainable_state,
    resolve_clients_per_round,
    run_client,
    sample_clients,
    trainable_parameters,
)

__all__ = ["FedPACTrainer", "FedPACCallback"]

logger = logging.getLogger(__name__)


class FedPACCallback(TrainerCallback):
    """A ``TrainerCallback`` with round-level events.

    ``FedPACTrainer`` calls ``on_round_begin`` / ``on_round_end`` on every
    callback that defines them (this class's no-op defaults included), with
    the usual ``args, state, control`` and ``round`` / ``metrics`` keywords.
    The standard events fire too: a round is one ``global_step``.
    """

    def on_round_begin(self, args, state, control, **kwargs):  # noqa: D102
        return control

    def on_round_end(self, args, state, control, **kwargs):  # noqa: D102
        return control


def _client_seed(seed: int, round_index: int, client_id: int) -> int:
    """A seed for one client in one round, independent of which process trains it."""
    return int(np.random.SeedSequence([seed, round_index, client_id]).generate_state(1)[0])


class FedPACTrainer(Trainer):
    """Federated fine-tuning with FedPAC and its baselines, inside ``Trainer``.

    Takes ``Trainer``'s constructor arguments, plus:

    Parameters
    ----------
    client_datasets:
        One training dataset per client. If omitted, ``train_dataset`` is
        split by the partitioner the arguments describe
        (``args.partitioner``, ``args.num_clients``, ...).
    partitioner:
        A :class:`fedpac_hf.partition.Partitioner` overriding the one in
        ``args``.

    ``optimizers`` / ``optimizer_cls_and_kwargs`` are refused: each client
    builds its optimizer from ``args.algorithm`` every round.
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
        client_datasets: Sequence[Any] | None = None,
        partitioner: Any = None,
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
        self.client_datasets = list(client_datasets) if client_datasets is not None else None
        self.partitioner = partitioner
        self.algorithm = args.build_algorithm()
        self.server_state: ServerState | None = None
        self.round_history: list[dict[str, float]] = []
        self._client_partition: list[np.ndarray] | None = None
        self._train_columns_removed: Any = None

    # ------------------------------------------------------------------ data

    def setup_clients(self) -> int:
        """Decide the clients' data (partitioning ``train_dataset`` if needed); returns their number.

        Only indices are computed here: a client's dataset is built when it is
        sampled (:meth:`client_dataset`), so registering many clients costs
        neither time nor memory.
        """
        if self.client_datasets is not None:
            for i, ds in enumerate(self.client_datasets):
                if len(ds) == 0:
                    raise ValueError(f"client {i} has no training example")
            return len(self.client_datasets)
        if self._client_partition is None:
            self._client_partition = self.args.assign_clients(self.train_dataset, self.partitioner)
            self._train_columns_removed = self._remove_unused_columns(
                self.train_dataset, description="training"
            )
        return len(self._client_partition)

    def client_dataset(self, client_id: int) -> Any:
        """Client ``client_id``'s training data (index-backed, unused columns removed)."""
        if self.client_datasets is not None:
            ds = self.client_datasets[client_id]
            if hasattr(ds, "column_names"):
                return self._remove_unused_columns(ds, description="training")
            return ds
        return self._train_columns_removed.select(self._client_partition[client_id])

    def get_client_datasets(self) -> list[Any]:
        """All clients' training datasets (see :meth:`client_dataset`)."""
        return [self.client_dataset(i) for i in range(self.setup_clients())]

    def _client_dataloader(self, dataset: Any, seed: int) -> DataLoader:
        """A shuffling loader over one client's data, its order fixed by ``seed``."""
        generator = torch.Generator()
        generator.manual_seed(seed)
        collator = self.data_collator
        if not hasattr(dataset, "column_names"):
            collator = self._get_collator_with_removed_columns(collator, description="training")
        return DataLoader(
            dataset,
            batch_size=self.args.per_device_train_batch_size,
            sampler=RandomSampler(dataset, generator=generator),
            collate_fn=collator,
            drop_last=self.args.dataloader_drop_last,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available(),
        )

    # ----------------------------------------------------------- local steps

    def client_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """One micro-batch's loss: Trainer's ``compute_loss`` under Accelerate's autocast."""
        inputs = self._prepare_inputs(inputs)
        with self.accelerator.autocast():
            return self.compute_loss(model, inputs)

    def curvature_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> Any:
        """Sophia's Gauss-Newton-Bartlett loss: labels sampled from the model's softmax.

        Returns ``(loss, num_samples)``; padded positions (``attention_mask`` 0 or
        label -100) do not count. Sampling is seeded per client and round.
        """
        from fedpac_hf.optim import gnb_loss

        inputs = self._prepare_inputs(inputs)
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

    def train_client(self, client_id: int, dataset: Any, round_index: int, lr: float):
        """Run the client rule for one client; returns its ``ClientUpdate``."""
        seed = _client_seed(self.args.seed, round_index, client_id)
        torch.manual_seed(seed)  # dropout and other in-model randomness
        self._gnb_seed = seed
        return client_update(
            self.model,
            self.server_state,
            self.algorithm,
            cycle_batches(self._client_dataloader(dataset, seed)),
            lr=lr,
            local_steps=self.args.local_steps,
            loss_fn=self.client_loss,
            client_id=client_id,
            gradient_accumulation_steps=self.args.gradient_accumulation_steps,
            max_grad_norm=self.args.max_grad_norm,
            backward=self.accelerator.backward,
            curvature_loss_fn=self.curvature_loss,
        )

    def train_client_by_id(self, client_id: int, round_index: int, lr: float) -> ClientUpdate:
        """Build a sampled client's data and run its local steps (any failure is the client's)."""
        return self.train_client(client_id, self.client_dataset(client_id), round_index, lr)

    def round_learning_rates(self) -> list[float]:
        """eta_l for every round from ``lr_scheduler_type`` stepped once per round."""
        num_rounds = self.args.num_rounds
        dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=self.args.learning_rate)
        scheduler = get_scheduler(
            self.args.lr_scheduler_type,
            dummy,
            num_warmup_steps=self.args.get_warmup_steps(num_rounds),
            num_training_steps=num_rounds,
            scheduler_specific_kwargs=self.args.lr_scheduler_kwargs or {},
        )
        rates = []
        for _ in range(num_rounds):
            rates.append(float(dummy.param_groups[0]["lr"]))
            dummy.step()
            scheduler.step()
        if rates[0] <= 0:
            # warm-up starts at 0: a client step with lr 0 is wasted work, start at the first step
            rates[0] = rates[1] if num_rounds > 1 and rates[1] > 0 else self.args.learning_rate
        return rates

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
        args = self.args
        start_time = time.time()
        num_clients = self.setup_clients()
        per_round = resolve_clients_per_round(num_clients, args.clients_per_round)
        if args.min_clients_per_round > per_round:
            raise ValueError(
                f"min_clients_per_round={args.min_clients_per_round} is more than the "
                f"{per_round} clients sampled per round"
            )
        world, rank = args.world_size, args.process_index
        if world > 1 and per_round < world:
            raise ValueError(
                f"{world} processes but only {per_round} clients per round: every process "
                "needs at least one client; raise clients_per_round or use fewer processes"
            )
        model = self.model
        model.to(args.device)
        trainable_parameters(model)  # fails early without trainable parameters
        self.server_state = ServerState.from_model(model)
        self.round_history = []
        if resume_from_checkpoint:
            self._resume(resume_from_checkpoint, num_clients)
        rates = self.round_learning_rates()

        self.state = TrainerState(
            is_local_process_zero=self.is_local_process_zero(),
            is_world_process_zero=self.is_world_process_zero(),
        )
        self.state.epoch = None  # rounds, not epochs, are the unit here
        self.state.max_steps = args.num_rounds
        self.state.global_step = self.server_state.round
        self.state.train_batch_size = args.per_device_train_batch_size
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)

        for r in range(self.server_state.round, args.num_rounds):
            round_start = time.perf_counter()
            self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
            self._fire("on_round_begin", round=r + 1)
            sampled = sample_clients(num_clients, per_round, args.seed, r)
            aggregator = RoundAggregator(
                self.server_state, self.algorithm, args.aggregation_weighting
            )
            for cid in sampled[rank::world]:
                result = run_client(
                    functools.partial(self.train_client_by_id, cid, r, rates[r]),
                    cid,
                    r + 1,
                    logger,
                )
                if isinstance(result, ClientUpdate):
                    aggregator.add(result)
                else:
                    aggregator.drop(result)
            if world > 1:
                aggregator.all_reduce()
            # RoundError (too few clients, non-finite global model) leaves the last checkpoint
            aggregator.require(args.min_clients_per_round, r + 1)
            self.server_state, metrics = aggregator.finalize(
                lr=rates[r], local_steps=args.local_steps, server_lr=args.server_learning_rate
            )
            load_trainable_state(model, self.server_state.params)
            self.state.global_step = r + 1
            logs = {"round": float(r + 1), "learning_rate": rates[r], **metrics}
            logs["num_dropped"] = float(len(aggregator.failures))
            logs["round_time"] = time.perf_counter() - round_start
            self.round_history.append(dict(logs))
            self.log(logs)
            last = r + 1 == args.num_rounds
            if self.eval_dataset is not None and (
                last or (args.eval_every_rounds and (r + 1) % args.eval_every_rounds == 0)
            ):
                eval_metrics = self.evaluate(ignore_keys=ignore_keys_for_eval)
                self.round_history[-1].update(eval_metrics)
            if args.save_every_rounds and ((r + 1) % args.save_every_rounds == 0 or last):
                self.save_federated_checkpoint()
            self._fire("on_round_end", round=r + 1, metrics=self.round_history[-1])
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            if self.control.should_training_stop:
                break

        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        final_loss = self.round_history[-1]["train_loss"] if self.round_history else float("nan")
        metrics = {
            "train_runtime": time.time() - start_time,
            "train_loss": final_loss,
            "num_rounds": float(self.state.global_step),
        }
        return TrainOutput(self.state.global_step, final_loss, metrics)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """``Trainer.evaluate``, plus perplexity for causal language models."""
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        loss_key = f"{metric_key_prefix}_loss"
        if loss_key in metrics and self._is_causal_lm():
            ppl = {f"{metric_key_prefix}_perplexity": math.exp(min(metrics[loss_key], 50.0))}
            metrics.update(ppl)
            self.log(ppl)
        return metrics

    def _is_causal_lm(self) -> bool:
        model = self.accelerator.unwrap_model(self.model)
        base = getattr(getattr(model, "base_model", None), "model", model)
        return type(base).__name__.endswith("ForCausalLM") or type(model).__name__.endswith(
            "ForCausalLM"
        )

    def _fire(self, event: str, **kwargs: Any) -> None:
        for callback in self.callback_handler.callbacks:
            handler = getattr(callback, event, None)
            if handler is not None:
                result = handler(self.args, self.state, self.control, **kwargs)
                if result is not None:
                    self.control = result

    # ------------------------------------------------------------ checkpoints

    def _run_identity(self, num_clients: int) -> dict[str, Any]:
        """What must match for a checkpoint to be resumable by this run."""
        shapes = {n: list(t.shape) for n, t in self.server_state.params.items()}
        partition = None
        if self.client_datasets is None:
            partition = {
                "partitioner": self.args.partitioner,
                **{k: v for k, v in self.args.partitioner_kwargs().items() if k != "seed"},
            }
        model = self.accelerator.unwrap_model(self.model)
        base = getattr(getattr(model, "base_model", None), "model", model)
        return {
            "model": type(base).__name__,
            "algorithm": self.algorithm.name,
            "client_optimizer": self.algorithm.optimizer,
            "beta": self.algorithm.beta,
            "align": self.algorithm.align,
            "num_clients": num_clients,
            "seed": self.args.seed,
            "partition": partition,
            "param_shapes": shapes,
        }

    def save_federated_checkpoint(self) -> Path | None:
        """Write ``output_dir/checkpoint-round-{r}`` (main process only) and rotate old ones."""
        if not self.args.should_save:
            return None
        num_clients = len(self.client_datasets or self._client_partition or [])
        meta = {
            "run": self._run_identity(num_clients),
            "history": self.round_history,
        }
        target = Path(self.args.output_dir) / f"{CHECKPOINT_PREFIX}{self.server_state.round}"
        path = save_federated_checkpoint(target, self.server_state, meta, self.save_model)
        self._rotate_checkpoints()
        self.control = self.callback_handler.on_save(self.args, self.state, self.control)
        return path

    def _rotate_checkpoints(self) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        root = Path(self.args.output_dir)
        pattern = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
        found = sorted((int(m.group(1)), d) for d in root.iterdir() if (m := pattern.match(d.name)))
        for _, d in found[:-limit]:
            shutil.rmtree(d, ignore_errors=True)

    def _resume(self, checkpoint: str | bool, num_clients: int) -> None:
        if isinstance(checkpoint, str) and checkpoint.strip().lower() in ("true", "latest"):
            if not Path(checkpoint).exists():  # `--resume_from_checkpoint true` on the CLI
                checkpoint = True
        if checkpoint is True:
            found = latest_checkpoint(self.args.output_dir)
            if found is None:
                raise FileNotFoundError(
                    f"resume_from_checkpoint=True but {self.args.output_dir} holds no "
                    f"{CHECKPOINT_PREFIX}* checkpoint (save them with save_every_rounds)"
                )
            checkpoint = str(found)
        state, meta = load_federated_checkpoint(checkpoint)
        expected = self._run_identity(num_clients)
        saved = meta.get("run", {})
        for key, value in expected.items():
            if saved.get(key) != value:
                if key == "param_shapes":
                    detail = _shape_difference(saved.get(key) or {}, value)
                elif isinstance(value, dict) and isinstance(saved.get(key), dict):
                    detail = ", ".join(
                        f"{k}: checkpoint has {saved[key].get(k)!r}, this run has {value.get(k)!r}"
                        for k in sorted(set(saved[key]) | set(value))
                        if saved[key].get(k) != value.get(k)
                    )
                else:
                    detail = f"checkpoint has {saved.get(key)!r}, this run has {value!r}"
                raise ValueError(
                    f"cannot resume from {checkpoint}: {key} differs ({detail}); resume with the "
                    "same model, algorithm and partition, or start a new output_dir"
                )
        actual = {n: list(t.shape) for n, t in state.params.items()}
        if actual != expected["param_shapes"]:
            raise ValueError(
                f"cannot resume from {checkpoint}: its {STATE_TENSORS} does not match its "
                f"{STATE_JSON} ({_shape_difference(actual, expected['param_shapes'])}); the "
                "checkpoint is corrupt, resume from an earlier one"
            )
        self.server_state = state
        self.round_history = list(meta.get("history", []))
        load_trainable_state(self.model, state.params)
        logger.info("resumed from %s at round %d", checkpoint, state.round)


def _shape_difference(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """Name the first trainable parameter that differs between a checkpoint and this model."""
    only_saved = sorted(set(saved) - set(current))
    only_current = sorted(set(current) - set(saved))
    if only_saved or only_current:
        parts = []
        if only_saved:
            parts.append(f"only the checkpoint has {only_saved[:3]}")
        if only_current:
            parts.append(f"only this model has {only_current[:3]}")
        return "trainable parameters differ: " + ", ".join(parts)
    for name in sorted(current):
        if list(saved[name]) != list(current[name]):
            return (
                f"parameter {name!r} has shape {list(saved[name])} in the checkpoint and "
                f"{list(current[name])} in this model"
            )
    return "shapes differ"
