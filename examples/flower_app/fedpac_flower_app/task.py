"""The model and data of the app, built from the run's arguments and run config.

The ServerApp builds the global model (:func:`build_model`) and the central
evaluation (:func:`build_evaluator`); every ClientApp builds the trainer
(:func:`build_trainer`), whose model is the same (built from a config with a
fixed seed, no download) and whose split of the training data into clients
is the same on every node; each ClientApp then trains only its own partition.
The run config's ``dataset`` key chooses the data.
"""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from transformers import ViTConfig, ViTForImageClassification

from fedpac_hf import FedPACArguments, FedPACTrainer
from fedpac_hf.trainer.evaluation import make_evaluator

#: Which data the run uses: "mnist5k" (real, offline, needs `fedpac_hf[data]`)
#: or "synthetic" (banded 28x28 images, no extra package). Set by the run config.
DATASETS = ("mnist5k", "synthetic")

#: Run-config keys of this app beside the FedPACArguments fields.
APP_SETTINGS = ("dataset",)


def tiny_vit(num_labels: int, seed: int) -> ViTForImageClassification:
    """A 2-layer ViT for 28x28 grayscale images, initialised from ``seed``."""
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=28,
        patch_size=7,
        num_channels=1,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=96,
        num_labels=num_labels,
    )
    return ViTForImageClassification._from_config(config, attn_implementation="eager")


def _to_pixels(batch: dict) -> dict:
    images = np.stack([np.asarray(img, dtype=np.float32) for img in batch["image"]])
    return {"pixel_values": ((images / 255.0 - 0.5) / 0.5)[:, None]}


def load_mnist5k(seed: int) -> DatasetDict:
    """MNIST-5k as ``pixel_values`` (1x28x28, normalised) and ``label``."""
    from fedpac_hf.data import load_mnist5k as load

    data = load(seed=seed)
    data = data.map(_to_pixels, batched=True, remove_columns=["image"])
    return data.with_format("torch")


def synthetic_images(seed: int, n: int = 1000, num_labels: int = 10) -> DatasetDict:
    """Noise images whose label is the row band that is bright (a learnable toy task)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_labels, n)
    x = rng.normal(size=(n, 1, 28, 28)).astype("float32") * 0.5
    band = 28 // num_labels
    for i, label in enumerate(labels):
        x[i, 0, label * band : (label + 1) * band, :] += 1.5
    data = Dataset.from_dict({"pixel_values": x, "label": labels}).with_format("torch")
    return data.train_test_split(test_size=0.2, seed=seed)


def load_data(args: FedPACArguments, run_config: dict) -> DatasetDict:
    """The run config's ``dataset`` (one of :data:`DATASETS`), split into train and test."""
    dataset = str(run_config.get("dataset", "synthetic"))
    if dataset not in DATASETS:
        raise ValueError(f"run config 'dataset' must be one of {DATASETS}, got {dataset!r}")
    return load_mnist5k(args.seed) if dataset == "mnist5k" else synthetic_images(args.seed)


def build_model(args: FedPACArguments, run_config: dict) -> ViTForImageClassification:
    """The global model: the same initial weights on the server and every node."""
    return tiny_vit(num_labels=10, seed=args.seed)


def build_evaluator(args: FedPACArguments, run_config: dict):
    """Central evaluation of the global model on the test split."""
    test = load_data(args, run_config)["test"]
    return make_evaluator(args, test, compute_metrics=accuracy)


def build_trainer(args: FedPACArguments, run_config: dict) -> FedPACTrainer:
    """A node's trainer: the model and the training data it partitions by ``args.partitioner``."""
    return FedPACTrainer(
        model=build_model(args, run_config),
        args=args,
        train_dataset=load_data(args, run_config)["train"],
    )


def accuracy(prediction) -> dict[str, float]:
    """Top-1 accuracy of an evaluation pass."""
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}
