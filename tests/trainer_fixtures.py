"""Tiny models and data for the trainer tests (built from configs, offline)."""

from __future__ import annotations

import datasets
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig, ViTForImageClassification

NUM_LABELS = 4


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
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


def accuracy(pred) -> dict[str, float]:
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
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


def tiny_lora_llama(seed: int = 0):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        tiny_llama(seed),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )


def text_clients(num_clients: int = 4, per_client: int = 24, length: int = 16, seed: int = 0):
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
