"""ViT image classification: a small ViT from ViTConfig on MNIST-5k (offline)
with 20 Dirichlet(0.1) clients and FedPAC-SOAP; with --model_name_or_path and
--dataset a Hub ViT (AutoModelForImageClassification, ignore_mismatched_sizes)
on CIFAR-10/100, full fine-tuning or LoRA (--lora_r 16, adapters on the
attention query/value projections; the classifier trained in full)::

    python examples/vit_image_classification.py
    python examples/vit_image_classification.py --num_rounds 2 --output_dir runs/try
    python examples/vit_image_classification.py --model_name_or_path google/vit-base-patch16-224-in21k \\
        --dataset uoft-cs/cifar10 --lora_r 16 --learning_rate 1e-3

Settings come from ``configs/vit_mnist5k.yaml``; pass another YAML file first
to replace it, and ``--field value`` for any ModelDataArguments or
FedPACArguments field. The script is the same code path as
``fedpac-hf train configs/vit_mnist5k.yaml``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedpac_hf.run import run_example

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "vit_mnist5k.yaml"


def main(argv: Sequence[str] | None = None) -> dict:
    """Train with the default config and ``argv`` overrides; return the final metrics."""
    return run_example(DEFAULT_CONFIG, argv)


if __name__ == "__main__":
    main()
