"""Small pretrained bases, built here from a seed and cached with ``save_pretrained``.

A LoRA-only federated run needs a *trained* base model, and the Hugging Face
Hub may be out of reach. These bases are trained centrally, offline, in about a
minute on one CPU thread, on data that no federated client holds, then cached
under ``$FEDPAC_HF_CACHE/bases/<name>`` (default ``~/.cache/fedpac_hf``).
Refer to one as ``model_name_or_path: base:<name>``; it is built on first use.

``vit-mnist5k-0to4``
    The small ViT of ``configs/vit_mnist5k.yaml`` (3 layers, width 64, 7 x 7
    patches) trained on the MNIST-5k training digits 0-4; federated clients
    then learn digits 5-9 with adapters and a new head.
``llama-shakespeare``
    A small Llama (2 layers, width 64) and its byte-level BPE tokenizer,
    trained on every Shakespeare play except :data:`CLIENT_PLAYS`, whose
    speakers are the federated clients.

Each folder also holds ``base_info.json``: how the base was made and its
held-out quality.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["BASES", "CLIENT_PLAYS", "base_path", "resolve_model_name"]

PREFIX = "base:"

CLIENT_PLAYS = ("HAMLET", "OTHELLO", "MACBETH", "MIDSUMMER_NIGHTS_DREAM", "JULIUS_CAESAR")
"""Plays kept out of the Llama base: the federated clients' data."""


@dataclass(frozen=True)
class BaseSpec:
    """How to build one base: a function writing it into a folder, and what it is."""

    build: Callable[[Path], dict[str, Any]]
    description: str


def _cache_root() -> Path:
    root = os.environ.get("FEDPAC_HF_CACHE") or Path.home() / ".cache" / "fedpac_hf"
    return Path(root) / "bases"


def _train(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], lr: float) -> None:
    """Plain AdamW over ``batches`` (the bases are small: no Trainer needed)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()


def _build_vit_digits(folder: Path) -> dict[str, Any]:
    from transformers import ViTConfig, ViTForImageClassification

    from fedpac_hf.data import load_mnist5k
    from fedpac_hf.run.data import vit_image_processor

    data = load_mnist5k(seed=0)

    def arrays(split: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keep = np.flatnonzero(np.asarray(split["label"]) < 5)
        rows = split.select(keep)
        pixels = np.stack([np.asarray(image, dtype=np.float32) for image in rows["image"]])
        x = torch.from_numpy((pixels / 255.0 - 0.5) / 0.5)[:, None]
        return x, torch.as_tensor(rows["label"])

    (x, y), (tx, ty) = arrays(data["train"]), arrays(data["test"])
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=28, patch_size=7, num_channels=1, hidden_size=64, num_hidden_layers=3,
        num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=5,
        id2label={i: str(i) for i in range(5)}, label2id={str(i): i for i in range(5)},
    )  # fmt: skip
    model = ViTForImageClassification._from_config(config, attn_implementation="eager")
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(10):  # epochs
        order = torch.randperm(len(y), generator=generator)
        batches += [
            {"pixel_values": x[ix], "labels": y[ix]} for ix in order.split(64) if len(ix) == 64
        ]
    _train(model, batches, lr=3e-3)
    with torch.no_grad():
        accuracy = float((model(pixel_values=tx).logits.argmax(-1) == ty).float().mean())
    model.save_pretrained(folder)
    vit_image_processor(
        do_resize=False,
        size={"height": 28, "width": 28},
        image_mean=[0.5],
        image_std=[0.5],
    ).save_pretrained(folder)
    return {
        "trained_on": "MNIST-5k training digits 0-4 (seed 0 split)",
        "steps": len(batches),
        "test_accuracy_digits_0to4": round(accuracy, 4),
    }


def _build_llama_shakespeare(folder: Path) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedpac_hf.data import load_shakespeare
    from fedpac_hf.run.data import train_bpe_tokenizer

    data = load_shakespeare(seed=0)
    train = [
        t for t, p in zip(data["train"]["text"], data["train"]["play"]) if p not in CLIENT_PLAYS
    ]
    test = [t for t, p in zip(data["test"]["text"], data["test"]["play"]) if p not in CLIENT_PLAYS]
    tokenizer = train_bpe_tokenizer(train, 512)

    def encode(texts: list[str]) -> torch.Tensor:
        ids = tokenizer(texts, truncation=True, max_length=64, padding="max_length")
        return torch.as_tensor(ids["input_ids"]), torch.as_tensor(ids["attention_mask"])

    (x, mask), (tx, tmask) = encode(train), encode(test[:500])
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM._from_config(config, attn_implementation="eager")
    generator = torch.Generator().manual_seed(0)
    batches = []
    for ix in torch.randperm(len(x), generator=generator).split(32)[:800]:
        labels = x[ix].masked_fill(mask[ix] == 0, -100)
        batches.append({"input_ids": x[ix], "attention_mask": mask[ix], "labels": labels})
    _train(model, batches, lr=3e-3)
    with torch.no_grad():
        loss = model(input_ids=tx, attention_mask=tmask, labels=tx.masked_fill(tmask == 0, -100))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {
        "trained_on": f"Shakespeare speeches of every play except {', '.join(CLIENT_PLAYS)}",
        "steps": len(batches),
        "held_out_perplexity": round(float(torch.exp(loss.loss)), 2),
    }


BASES: dict[str, BaseSpec] = {
    "vit-mnist5k-0to4": BaseSpec(
        _build_vit_digits, "small ViT trained on MNIST-5k digits 0-4 (clients learn 5-9)"
    ),
    "llama-shakespeare": BaseSpec(
        _build_llama_shakespeare,
        f"small Llama + BPE tokenizer trained on the plays other than {', '.join(CLIENT_PLAYS)}",
    ),
}


def base_path(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder of base ``name``, built (seeded, about a minute on a CPU) if not cached yet.

    Raises
    ------
    ValueError
        For an unknown name (the message lists the known ones).
    """
    if name not in BASES:
        raise ValueError(f"unknown pretrained base {name!r}; choose one of {sorted(BASES)}")
    folder = (Path(cache_dir) if cache_dir is not None else _cache_root()) / name
    if (folder / "base_info.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same weights on every machine
    try:
        print(f"building the pretrained base {name!r} once ({BASES[name].description})")
        info = BASES[name].build(tmp)
        info = {"name": name, "description": BASES[name].description, **info}
        (tmp / "base_info.json").write_text(json.dumps(info, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_model_name(model_name_or_path: str) -> str:
    """``base:<name>`` -> the cached folder of that base; anything else unchanged."""
    if model_name_or_path.startswith(PREFIX):
        return str(base_path(model_name_or_path[len(PREFIX) :]))
    return model_name_or_path
