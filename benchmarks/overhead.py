"""Orchestration overhead of FedPACTrainer against plain ``Trainer``.

Both train the same small ViT for the same number of AdamW steps on batches of
the same size from the same data: ``FedPACTrainer`` as ``fedavg_adamw`` with
R rounds x S clients x K local steps (so it also builds a client optimizer,
loads/extracts parameters and aggregates every round), plain ``Trainer`` as
R * S * K steps. The two alternate, several repeats each, and the report
gives the median wall time of ``train()`` and their ratio (target <= 1.10).

Usage::

    python benchmarks/overhead.py                 # prints, writes overhead.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

from fedpac_hf import FedPACArguments, FedPACTrainer

HERE = Path(__file__).resolve().parent


def make_model() -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=4,
        num_channels=3,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        num_labels=10,
    )
    return ViTForImageClassification._from_config(config, attn_implementation="eager")


def make_data(n: int) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3, 32, 32)).astype("float32")
    y = rng.integers(0, 10, n)
    return datasets.Dataset.from_dict({"pixel_values": x, "label": y}).with_format("torch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients-per-round", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "overhead.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.rounds * args.clients_per_round * args.local_steps
    data = make_data(n=16 * args.batch_size * args.local_steps // 4)
    common = dict(
        per_device_train_batch_size=args.batch_size,
        learning_rate=1e-3,
        weight_decay=0.0,
        report_to=[],
        disable_tqdm=True,
        logging_strategy="no",
        save_strategy="no",
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        seed=0,
        dataloader_pin_memory=False,
    )

    def run_plain() -> float:
        targs = TrainingArguments(
            output_dir=tempfile.mkdtemp(), max_steps=steps, optim="adamw_torch", **common
        )
        trainer = Trainer(model=make_model(), args=targs, train_dataset=data)
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start

    def run_federated() -> float:
        fargs = FedPACArguments(
            output_dir=tempfile.mkdtemp(),
            algorithm="fedavg_adamw",
            num_rounds=args.rounds,
            num_clients=16,
            clients_per_round=args.clients_per_round,
            local_steps=args.local_steps,
            partitioner="iid",
            **common,
        )
        trainer = FedPACTrainer(model=make_model(), args=fargs, train_dataset=data)
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start

    run_plain(), run_federated()  # warm-up: imports, allocator, kernels
    plain, federated = [], []
    for _ in range(args.repeats):
        plain.append(run_plain())
        federated.append(run_federated())
    p, f = statistics.median(plain), statistics.median(federated)
    lines = [
        "# Orchestration overhead: FedPACTrainer vs plain Trainer",
        "",
        f"Command: `python benchmarks/overhead.py` (defaults: {args.rounds} rounds x "
        f"{args.clients_per_round} clients x {args.local_steps} local steps = {steps} AdamW "
        f"steps, batch {args.batch_size}, ViT 32px hidden 128 x 4 layers, "
        f"{args.threads} threads, {args.repeats} alternating repeats, median).",
        "Machine: 2-core CPU.",
        "",
        "| run | median train() wall time (s) | all repeats (s) |",
        "| --- | ---: | --- |",
        f"| plain `Trainer`, {steps} steps | {p:.2f} | {', '.join(f'{t:.2f}' for t in plain)} |",
        f"| `FedPACTrainer` fedavg_adamw | {f:.2f} | {', '.join(f'{t:.2f}' for t in federated)} |",
        "",
        f"Ratio FedPACTrainer / Trainer: **{f / p:.3f}** (target <= 1.10).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
