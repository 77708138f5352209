"""Models, synthetic data and timed loops for ``benchmarks/gpu_check.py``.

Everything is built from configs with random weights and synthetic tensors
(no Hub, no ``datasets``), at the GPU shapes or, with ``smoke=True``, at tiny
shapes that run on a CPU in seconds.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Shapes:
    """The sizes of every measurement (GPU or smoke)."""

    image_size: int
    patch: int
    width: int
    depth: int
    heads: int
    labels: int
    clients: int
    local_steps: int
    batch: int
    vitb_image: int
    vitb_patch: int
    vitb_width: int
    vitb_depth: int
    vitb_heads: int
    vitb_batch: int
    llama_hidden: int
    llama_layers: int
    llama_heads: int
    llama_kv_heads: int
    llama_intermediate: int
    llama_vocab: int
    llama_batch: int
    llama_length: int
    step_warmup: int
    step_timed: int
    sync_steps: tuple[int, int]


GPU = Shapes(
    image_size=32, patch=4, width=192, depth=12, heads=3, labels=100,
    clients=10, local_steps=50, batch=50,
    vitb_image=224, vitb_patch=16, vitb_width=768, vitb_depth=12, vitb_heads=12, vitb_batch=32,
    llama_hidden=2048, llama_layers=16, llama_heads=32, llama_kv_heads=8,
    llama_intermediate=8192, llama_vocab=128256, llama_batch=4, llama_length=512,
    step_warmup=2, step_timed=10, sync_steps=(5, 15),
)  # fmt: skip
"""The paper's ViT-Tiny protocol (10 clients x K = 50, batch 50), ViT-B/16 and Llama-3.2-1B."""

SMOKE = Shapes(
    image_size=16, patch=8, width=16, depth=1, heads=2, labels=10,
    clients=2, local_steps=2, batch=4,
    vitb_image=16, vitb_patch=8, vitb_width=16, vitb_depth=1, vitb_heads=2, vitb_batch=2,
    llama_hidden=32, llama_layers=1, llama_heads=2, llama_kv_heads=1,
    llama_intermediate=64, llama_vocab=64, llama_batch=2, llama_length=8,
    step_warmup=1, step_timed=1, sync_steps=(1, 2),
)  # fmt: skip
"""Tiny shapes for ``--smoke`` on a CPU (same code path)."""


class SyntheticImages(torch.utils.data.Dataset):
    """Random images with random labels, as ``{"pixel_values", "labels"}`` rows."""

    def __init__(self, n: int, image_size: int, num_labels: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.pixels = torch.randn(n, 3, image_size, image_size, generator=gen)
        self.labels = torch.randint(0, num_labels, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


def vit(
    image_size: int,
    patch: int,
    width: int,
    depth: int,
    heads: int,
    labels: int,
    seed: int = 0,
    device: torch.device | None = None,
) -> torch.nn.Module:
    """A randomly initialised ``ViTForImageClassification`` (MLP 4 x width), built on
    ``device`` (default: the CPU)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=image_size,
        patch_size=patch,
        num_channels=3,
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=4 * width,
        num_labels=labels,
    )
    with device or torch.device("cpu"):
        return ViTForImageClassification(config)


def vit_tiny(shapes: Shapes, seed: int = 0) -> torch.nn.Module:
    """The paper's ViT-Tiny at 32 px (patch 4, width 192, depth 12, 3 heads, 100 classes)."""
    s = shapes
    return vit(s.image_size, s.patch, s.width, s.depth, s.heads, s.labels, seed)


def client_sets(shapes: Shapes, per_client: int) -> list[SyntheticImages]:
    """One synthetic training set per client."""
    return [
        SyntheticImages(per_client, shapes.image_size, shapes.labels, seed=c)
        for c in range(shapes.clients)
    ]


def lora_llama(shapes: Shapes, device: torch.device) -> torch.nn.Module:
    """A randomly initialised Llama (1B shape on the GPU) in bf16 with LoRA r = 16
    adapters on ``q_proj, k_proj, v_proj, o_proj`` (the adapters in float32)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    s = shapes
    config = LlamaConfig(
        vocab_size=s.llama_vocab,
        hidden_size=s.llama_hidden,
        intermediate_size=s.llama_intermediate,
        num_hidden_layers=s.llama_layers,
        num_attention_heads=s.llama_heads,
        num_key_value_heads=s.llama_kv_heads,
        max_position_embeddings=max(2048, s.llama_length),
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with device:
        base = LlamaForCausalLM(config).to(torch.bfloat16)
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    return get_peft_model(base, lora).to(device)


def synchronize(device: torch.device) -> None:
    """Wait for the device (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for ``"bf16"``/``"fp16"``, nothing for ``"fp32"``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def make_optimizer(name: str, model: torch.nn.Module, lr: float = 1e-4) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` for ``"torch-adamw"``; the package's optimizers as the
    federated client runs them (no per-step finiteness check) for the others;
    ``"soap-1024"`` is SOAP with ``max_precond_dim=1024``, ``"soap-tf32"`` SOAP with
    ``rotation_precision="high"`` (its rotations on TF32 tensor cores)."""
    from fedpac_hf.optim import create_optimizer

    if name == "torch-adamw":
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    variants = {"soap-1024": {"max_precond_dim": 1024}, "soap-tf32": {"rotation_precision": "high"}}
    if name in variants:
        optimizer = create_optimizer("soap", model, lr=lr, weight_decay=0.01, **variants[name])
    else:
        optimizer = create_optimizer(name, model, lr=lr, weight_decay=0.01)
    optimizer.check_finite_grads = False
    return optimizer


@dataclass
class StepTiming:
    """Mean and median step time (s) and peak device memory (MiB, CUDA only)."""

    mean_s: float
    median_s: float
    peak_mib: float | None
    steps: int
    trainable: int


def time_steps(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer_name: str,
    precision: str,
    warmup: int,
    timed: int,
    stop: Callable[[], bool],
) -> StepTiming:
    """Time forward + backward + ``step`` + ``zero_grad`` (+ Sophia's refresh when due).

    Each timed step is bracketed by device syncs; ``stop()`` ends the timed
    loop early (a global time budget). Peak memory counts from the model's
    creation (``reset_peak_memory_stats`` is the caller's).
    """
    from fedpac_hf.optim import hessian_refresh_due, sophia_refresh

    device = next(model.parameters()).device
    optimizer = make_optimizer(optimizer_name, model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    generator = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        if hessian_refresh_due(optimizer):
            with autocast(device, precision):
                sophia_refresh(
                    optimizer,
                    lambda: model(**inputs).logits,
                    attention_mask=batch.get("attention_mask"),
                    generator=generator,
                )
        with autocast(device, precision):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    for _ in range(warmup):
        step()
    times: list[float] = []
    for _ in range(timed):
        if stop():
            break
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    if not times:
        raise TimeoutError("the time budget ran out before a timed step")
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return StepTiming(
        mean_s=statistics.fmean(times),
        median_s=statistics.median(times),
        peak_mib=peak,
        steps=len(times),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )


@contextlib.contextmanager
def fresh_device_memory(device: torch.device) -> Iterator[None]:
    """Empty the allocator's cache and reset the peak counter before, and after, a block."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
