"""Size of FedPAC's SOAP curvature state Theta for LoRA, two-sided vs one-sided.

Counts the bytes of ``SOAP.export_curvature()`` (what a client uploads beside
its delta, and the server sends back) for LoRA adapters, with SOAP's default
``max_precond_dim=10000`` (both sides of every factor preconditioned, so a
``4096 x 16`` factor B carries a ``4096 x 4096`` statistic) and with
``max_precond_dim=32`` (only the rank-side ``16 x 16`` statistic). Workloads:

* ``llama-7b-shape``: LoRA r = 16 on ``q_proj`` and ``v_proj`` of a
  Llama-7B-shaped layer (hidden 4096); one layer is exported and multiplied
  by the 32 layers (all layers are identical, so this is exact).
* ``small-llama (config)``: the LoRA model of ``configs/causal_lm_shakespeare.yaml``
  built through :func:`fedpac_hf.run.build_task` (adapters plus the trained
  embeddings and head of the config-built model).

Writes ``benchmarks/results/theta_bytes.json``, which
``benchmarks/statistical_efficiency.py report`` turns into a table::

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/fedpac_theta_bytes.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fedpac_hf.federated.state import tensor_bytes
from fedpac_hf.optim import create_optimizer

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "theta_bytes.json"
DIMS = (10000, 32)


def theta_bytes(named: list[tuple[str, torch.Tensor]], max_precond_dim: int) -> int:
    """Bytes of the exported SOAP Theta for these trainable parameters."""
    optimizer = create_optimizer("soap", named, lr=1e-3, max_precond_dim=max_precond_dim)
    return tensor_bytes(optimizer.export_curvature())


def llama7b_layer(rank: int = 16, hidden: int = 4096) -> list[tuple[str, torch.Tensor]]:
    """LoRA factors of q_proj and v_proj in one Llama-7B-shaped layer."""
    named = []
    for module in ("q_proj", "v_proj"):
        named.append((f"{module}.lora_A", torch.nn.Parameter(torch.zeros(rank, hidden))))
        named.append((f"{module}.lora_B", torch.nn.Parameter(torch.zeros(hidden, rank))))
    return named


def small_llama(modules_to_save: str | None) -> list[tuple[str, torch.Tensor]]:
    """Trainable parameters of the config's small Llama + LoRA."""
    from fedpac_hf.run import build_task, parse_run_config

    overrides = ["--output_dir", "/tmp/fedpac_theta_bytes"]
    if modules_to_save is not None:
        overrides += ["--lora_modules_to_save", modules_to_save]
    margs, args = parse_run_config(ROOT / "configs" / "causal_lm_shakespeare.yaml", overrides)
    model = build_task(margs, args).model
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def main() -> None:
    rows: list[dict[str, Any]] = []
    layers = 32
    named = llama7b_layer()
    adapter = sum(p.numel() for _, p in named) * 4
    for dim in DIMS:
        rows.append(
            {
                "model": "Llama-7B shape, LoRA r=16 on q,v (32 layers)",
                "lora_params": layers * sum(p.numel() for _, p in named),
                "adapter_bytes": layers * adapter,
                "max_precond_dim": dim,
                "theta_bytes": layers * theta_bytes(named, dim),
            }
        )
    for label, save in (
        ("small Llama of the config, adapters only (r=8 on q,v)", ""),
        ("small Llama of the config, adapters + embeddings/head (as benchmarked)", None),
    ):
        named = small_llama(save)
        size = sum(p.numel() for _, p in named)
        for dim in DIMS:
            rows.append(
                {
                    "model": label,
                    "lora_params": size,
                    "adapter_bytes": size * 4,
                    "max_precond_dim": dim,
                    "theta_bytes": theta_bytes(named, dim),
                }
            )
    data = {
        "command": "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/fedpac_theta_bytes.py",
        "description": (
            "Bytes of `SOAP.export_curvature()` (float32), i.e. the Theta each client uploads "
            "per round beside its delta and the server broadcasts back. 'adapter MiB' is the "
            "float32 size of the trainable parameters (the delta). With max_precond_dim=10000 "
            "both sides of every factor are preconditioned (B: 4096 x 16 carries a 4096 x 4096 "
            "statistic); with 32 only sides of length <= 32 are (the rank side of the "
            "adapters; the small model's 64-wide embeddings/head are then not preconditioned "
            "on either side and export nothing)."
        ),
        "rows": rows,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    for row in rows:
        print(
            f"{row['model']:75s} dim {row['max_precond_dim']:>5}: theta "
            f"{row['theta_bytes'] / 2**20:9.2f} MiB, adapter {row['adapter_bytes'] / 2**20:7.2f} MiB"
        )


if __name__ == "__main__":
    main()
