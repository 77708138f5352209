"""Tiny models, data, run arguments and app builders for the trainer tests (offline).

The setup the trainer and Flower tests share, built from configs with fixed
seeds (no download):

* models: :func:`tiny_vit` (16x16 greyscale images, 4 labels),
  :func:`tiny_llama` and :func:`tiny_lora_llama`;
* data: :func:`image_data` (banded images, a learnable toy task) and
  :func:`text_clients` (non-IID token sequences); :func:`accuracy`;
* run arguments: :func:`small_run_args` and its two presets, :func:`vit_args`
  (``test_trainer.py``'s run) and :func:`flower_args` (the Flower tests' run);
* the app builders the Flower tests hand to ``run_fedpac_simulation``
  (:func:`build_trainer`, :func:`build_model`, :func:`build_evaluator`, the
  same trio as the example app's ``task.py``, on the tiny ViT), a trainer
  whose client 1 fails, and :data:`BACKEND` (one Ray worker, one thread).

The example app (``examples/flower_app``) keeps its own, larger model and
data: it is a self-contained example for users and imports nothing from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import torch
from transformers import (
    EvalPrediction,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

from fedpac_hf import FedPACArguments, FedPACTrainer
from fedpac_hf.partition import IidPartitioner
from fedpac_hf.trainer.evaluation import Evaluator, make_evaluator

if TYPE_CHECKING:
    from peft import PeftModel

NUM_LABELS = 4


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    """A 2-layer ViT for 16x16 greyscale images with ``NUM_LABELS`` classes, no dropout."""
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=NUM_LABELS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification._from_config(config, attn_implementation="eager")


def image_data(n: int = 320, seed: int = 0) -> datasets.DatasetDict:
    """Images whose label is the bright horizontal band they carry."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_LABELS, n)
    x = rng.normal(size=(n, 1, 16, 16)).astype("float32") * 0.5
    for i, label in enumerate(labels):
        x[i, 0, label * 4 : (label + 1) * 4, :] += 1.5
    ds = datasets.Dataset.from_dict({"pixel_values": x, "label": labels}).with_format("torch")
    return ds.train_test_split(test_size=0.25, seed=seed)


def accuracy(pred: EvalPrediction) -> dict[str, float]:
    """Top-1 accuracy of an evaluation pass (a ``compute_metrics``)."""
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama over a 48-token vocabulary."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM._from_config(config, attn_implementation="eager")


def tiny_lora_llama(seed: int = 0) -> PeftModel:
    """:func:`tiny_llama` with LoRA r = 4 adapters on ``q_proj`` and ``v_proj``."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        tiny_llama(seed),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )


def text_clients(
    num_clients: int = 4, per_client: int = 24, length: int = 16, seed: int = 0
) -> list[datasets.Dataset]:
    """Token sequences counting up with a client-specific stride (a non-IID text task)."""
    rng = np.random.default_rng(seed)
    clients = []
    for c in range(num_clients):
        stride = 1 + c % 3
        starts = rng.integers(0, 48, per_client)
        ids = (starts[:, None] + stride * np.arange(length)[None, :]) % 48
        clients.append(
            datasets.Dataset.from_dict(
                {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}
            ).with_format("torch")
        )
    return clients


# ------------------------------------------------------------ run arguments

#: test_trainer.py's ViT run: 3 rounds of 5 local steps, 4 of 8 clients per round,
#: Dirichlet 0.3, batch 16.
TRAINER_RUN: dict[str, Any] = dict(
    num_rounds=3,
    num_clients=8,
    clients_per_round=0.5,
    local_steps=5,
    per_device_train_batch_size=16,
    per_device_eval_batch_size=80,
    partitioner="dirichlet",
    dirichlet_alpha=0.3,
    seed=0,
)
#: The Flower tests' run: 2 rounds of 3 local steps, 2 of 3 clients per round,
#: Dirichlet 0.5, batch 8, seed 7.
FLOWER_RUN: dict[str, Any] = dict(
    num_rounds=2,
    num_clients=3,
    clients_per_round=2,
    local_steps=3,
    per_device_train_batch_size=8,
    per_device_eval_batch_size=64,
    partitioner="dirichlet",
    dirichlet_alpha=0.5,
    seed=7,
)


def small_run_args(output_dir: Path | str, **settings: Any) -> FedPACArguments:
    """FedPACArguments of a small, quiet run: ``fedpac_soap`` at rate 3e-3, no reporting
    integrations, no progress bars; ``settings`` add to or replace these."""
    defaults: dict[str, Any] = dict(
        algorithm="fedpac_soap", learning_rate=3e-3, report_to=[], disable_tqdm=True
    )
    return FedPACArguments(output_dir=str(output_dir), **{**defaults, **settings})


def vit_args(tmp_path: Path, **overrides: Any) -> FedPACArguments:
    """:data:`TRAINER_RUN` into ``tmp_path / "run"``, with ``overrides``."""
    return small_run_args(tmp_path / "run", **{**TRAINER_RUN, **overrides})


def trained_and_resumed(
    tmp_path: Path, num_rounds: int, **overrides: Any
) -> tuple[FedPACTrainer, FedPACTrainer]:
    """The tiny ViT trained for ``num_rounds`` on :func:`image_data` (a checkpoint every round),
    and a second trainer from other initial weights resumed from round 1's checkpoint."""
    data = image_data()
    first = FedPACTrainer(
        model=tiny_vit(),
        args=vit_args(
            tmp_path, num_rounds=num_rounds, save_strategy="steps", save_steps=1, **overrides
        ),
        train_dataset=data["train"],
    )
    first.train()
    resumed = FedPACTrainer(
        model=tiny_vit(seed=123),
        args=vit_args(tmp_path, num_rounds=num_rounds, **overrides),
        train_dataset=data["train"],
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-round-1"))
    return first, resumed


def flower_args(output_dir: Path, **overrides: Any) -> FedPACArguments:
    """:data:`FLOWER_RUN` into ``output_dir``, with ``overrides``."""
    return small_run_args(output_dir, **{**FLOWER_RUN, **overrides})


# ------------------------------------------------------------- app builders

#: Flower's simulation backend for the tests: one Ray worker with one thread (SOAP's
#: eigendecompositions depend on the thread count).
BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 1}}


def build_trainer(args: FedPACArguments, run_config: dict | None = None) -> FedPACTrainer:
    """The tiny ViT on banded images, split over args.num_clients clients."""
    data = image_data(n=120)
    return FedPACTrainer(
        model=tiny_vit(), args=args, train_dataset=data["train"], eval_dataset=data["test"]
    )


def build_model(args: FedPACArguments, run_config: dict | None = None) -> ViTForImageClassification:
    """The server's global model: the clients' tiny ViT, same initial weights."""
    return tiny_vit()


def build_evaluator(args: FedPACArguments, run_config: dict | None = None) -> Evaluator:
    """Central evaluation on the banded images' test split (no trainer on the server)."""
    return make_evaluator(args, image_data(n=120)["test"])


class FailingClientTrainer(FedPACTrainer):
    """A trainer whose client 1 cannot train (its data source is broken)."""

    def train_client(self, client_id, dataset, round_index, lr, state=None):
        if client_id == 1:
            raise OSError("client 1: the local data volume is not mounted")
        return super().train_client(client_id, dataset, round_index, lr, state)


def build_failing_trainer(args: FedPACArguments, run_config: dict | None = None) -> FedPACTrainer:
    """:func:`build_trainer`'s model and training data in a :class:`FailingClientTrainer`."""
    data = image_data(n=120)
    return FailingClientTrainer(model=tiny_vit(), args=args, train_dataset=data["train"])


def tiny_lora_vit(seed: int = 0):
    """:func:`tiny_vit` with rank-4 LoRA adapters on its query/value projections, head trained."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]
    )
    return get_peft_model(tiny_vit(seed), lora)


def build_lora_model(args: FedPACArguments, run_config: dict | None = None):
    """The server's global model when the clients train :func:`tiny_lora_vit`."""
    return tiny_lora_vit()


def one_example_per_client(
    args: FedPACArguments, run_config: dict | None = None, model: Any = None
) -> FedPACTrainer:
    """Four clients holding one image each: every shell sees the same batches."""
    data = image_data(n=8)["train"].select(range(4)).rename_column("label", "labels")
    return FedPACTrainer(
        model=tiny_vit() if model is None else model,
        args=args,
        train_dataset=data,
        partitioner=IidPartitioner(4, seed=0),
    )


def one_lora_example_per_client(
    args: FedPACArguments, run_config: dict | None = None
) -> FedPACTrainer:
    """:func:`one_example_per_client` training the adapters of :func:`tiny_lora_vit`."""
    return one_example_per_client(args, run_config, model=tiny_lora_vit())
