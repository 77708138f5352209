"""The model and data of the app: what `FedPACTrainer` needs, built from the run config.

The ServerApp and every ClientApp call :func:`build_trainer` with the same
arguments, so they hold the same initial model (built from a config with a
fixed seed, no download) and the same split of the training data into
clients; each ClientApp then trains only its own partition.
"""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from transformers import ViTConfig, ViTForImageClassification

from fedpac_hf import FedPACArguments, FedPACTrainer

#: Which data the run uses: "mnist5k" (real, offline, needs `fedpac_hf[data]`)
#: or "synthetic" (banded 28x28 images, no extra package). Set by the run config.
DATASETS = ("mnist5k", "synthetic")


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


def make_builder(dataset: str):
    """A trainer factory for ``dataset`` (one of :data:`DATASETS`)."""
    if dataset not in DATASETS:
        raise ValueError(f"run config 'dataset' must be one of {DATASETS}, got {dataset!r}")

    def build_trainer(args: FedPACArguments) -> FedPACTrainer:
        data = load_mnist5k(args.seed) if dataset == "mnist5k" else synthetic_images(args.seed)
        return FedPACTrainer(
            model=tiny_vit(num_labels=10, seed=args.seed),
            args=args,
            train_dataset=data["train"],
            eval_dataset=data["test"],
            compute_metrics=accuracy,
        )

    return build_trainer


def accuracy(prediction) -> dict[str, float]:
    """Top-1 accuracy of an evaluation pass."""
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}
