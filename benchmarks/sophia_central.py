"""Sophia centrally on the benchmark ViT: does it train as well as AdamW, and at which rho?

One process, one model, no federation: the small ViT of ``configs/vit_mnist5k.yaml``
trained from scratch on MNIST-5k for ``--steps`` steps (batch 32, cosine decay to
0, gradient clipping at 10), AdamW over a learning-rate grid and Sophia-G over a
learning-rate x rho grid (Hessian refresh every ``--interval`` steps). Every
configuration is scored on a *validation* split carved from the training rows
(20 %, stratified, seed 0); the best of each optimizer is then trained on the full
training split with ``--seeds`` seeds and scored on the test split. Beside
accuracy, the table shows Sophia's "win rate": the fraction of coordinates whose
step is *not* clipped (``|m| < rho * h``), which the Sophia paper keeps between
10 % and 50 %.

Usage (writes ``benchmarks/SOPHIA.md``)::

    OMP_NUM_THREADS=1 python benchmarks/sophia_central.py
    OMP_NUM_THREADS=1 python benchmarks/sophia_central.py --quick   # smoke test
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def load_data(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """MNIST-5k as tensors: ``fit``/``validation`` (80/20 of train) and ``train``/``test``."""
    from fedpac_hf.data import load_mnist5k

    data = load_mnist5k(seed=seed)

    def tensors(split) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = np.stack([np.asarray(image, dtype=np.float32) for image in split["image"]])
        return torch.from_numpy((pixels / 255.0 - 0.5) / 0.5)[:, None], torch.as_tensor(
            split["label"]
        )

    parts = data["train"].train_test_split(test_size=0.2, seed=0, stratify_by_column="label")
    return {
        "fit": tensors(parts["train"]),
        "validation": tensors(parts["test"]),
        "train": tensors(data["train"]),
        "test": tensors(data["test"]),
    }


def make_model(seed: int) -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=28, patch_size=7, num_channels=1, hidden_size=64, num_hidden_layers=3,
        num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=10,
    )  # fmt: skip
    return ViTForImageClassification._from_config(config, attn_implementation="eager")


def win_rate(optimizer: torch.optim.Optimizer) -> float:
    """Fraction of coordinates whose Sophia step was not clipped (``|m| < rho h``, both
    bias-corrected when the optimizer corrects them), from the optimizer state."""
    unclipped = total = 0
    for group in optimizer.param_groups:
        beta1 = group["betas"][0]
        correct = group.get("bias_correction", False)
        weight = group.get("hessian_weight", 0.0) if correct else 1.0
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "exp_avg" not in state:
                continue
            m = state["exp_avg"].abs()
            if correct and state["step"] > 0:
                m = m / (1.0 - beta1 ** state["step"])
            h = state["hessian"] / (weight if weight > 0 else 1.0)
            unclipped += int((m < (group["rho"] * h).clamp(min=group["eps"])).sum())
            total += m.numel()
    return unclipped / total if total else float("nan")


# label -> (optimizer, options beyond lr/rho/interval): the package's Sophia with its
# defaults, and the reference rule (no bias correction, the paper's beta1)
VARIANTS: dict[str, tuple[str, dict]] = {
    "adamw": ("adamw", {}),
    "sophia": ("sophia", {}),
    "sophia-reference": ("sophia", {"bias_correction": False, "betas": (0.965, 0.99)}),
}


def train(
    label: str, lr: float, rho: float | None, fit, evaluate, steps: int, interval: int, seed: int
) -> tuple[float, float, float]:
    """Train one configuration; return (accuracy, mean win rate, seconds)."""
    from fedpac_hf.optim import create_optimizer, gnb_loss

    model = make_model(seed)
    name, extra = VARIANTS[label]
    options = {"weight_decay": 0.0, **extra}
    if name == "sophia":
        options.update(rho=rho, hessian_update_interval=interval)
    optimizer = create_optimizer(name, model, lr=lr, **options)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps))
    )
    x, y = fit
    generator = torch.Generator().manual_seed(seed)
    sampler = torch.Generator().manual_seed(seed + 1)
    wins = []
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        ix = torch.randint(0, len(y), (32,), generator=generator)
        if getattr(optimizer, "hessian_update_due", lambda: False)():
            optimizer.zero_grad(set_to_none=True)
            result = gnb_loss(model(pixel_values=x[ix]).logits, generator=sampler)
            result.loss.backward()
            optimizer.update_hessian(result.num_samples)
        optimizer.zero_grad(set_to_none=True)
        model(pixel_values=x[ix], labels=y[ix]).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        schedule.step()
        if name == "sophia":
            wins.append(win_rate(optimizer))
    seconds = time.perf_counter() - start
    model.eval()
    tx, ty = evaluate
    with torch.no_grad():
        accuracy = float((model(pixel_values=tx).logits.argmax(-1) == ty).float().mean())
    return accuracy, float(np.mean(wins)) if wins else float("nan"), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(HERE / "SOPHIA.md"))
    ns = parser.parse_args()
    torch.set_num_threads(1)
    if ns.quick:
        ns.steps, ns.seeds = 20, 1
    adamw_grid = [3e-4, 1e-3, 3e-3, 1e-2]
    sophia_lrs = [3e-4, 1e-3, 3e-3]
    rhos = [0.3, 2.0, 15.0, 100.0]
    if ns.quick:
        adamw_grid, sophia_lrs, rhos = [3e-3], [1e-3], [15.0]
    data = load_data()
    rows = []
    configs = [("adamw", lr, None) for lr in adamw_grid] + [
        (label, lr, rho)
        for label in ("sophia", "sophia-reference")
        for lr in sophia_lrs
        for rho in rhos
    ]
    for label, lr, rho in configs:
        acc, win, sec = train(
            label, lr, rho, data["fit"], data["validation"], ns.steps, ns.interval, 0
        )
        rows.append((label, lr, rho, acc, win, sec))
        print(f"{label} lr {lr:g} rho {rho}: validation {acc:.4f}, win {win:.3f}", flush=True)
    finals = {}
    for label in VARIANTS:
        _, lr, rho, *_rest = max((r for r in rows if r[0] == label), key=lambda r: r[3])
        scores = [
            train(label, lr, rho, data["train"], data["test"], ns.steps, ns.interval, seed)
            for seed in range(ns.seeds)
        ]
        finals[label] = (lr, rho, [s[0] for s in scores], [s[1] for s in scores])
        print(f"{label} test: {[round(s[0], 4) for s in scores]}", flush=True)
    write_report(ns, rows, finals)


def write_report(ns: argparse.Namespace, rows: list, finals: dict) -> None:
    """``SOPHIA.md``: the validation grid and the test accuracy of each optimizer's best."""
    command = "OMP_NUM_THREADS=1 python benchmarks/sophia_central.py" + (
        " --quick" if ns.quick else ""
    )
    lines = [
        "# Sophia centrally on the benchmark ViT",
        "",
        f"Command: `{command}` (machine: {platform.machine()} CPU, "
        f"{os.cpu_count()} cores shared with other jobs, one torch thread).",
        "",
        f"Small ViT of `configs/vit_mnist5k.yaml` from scratch, {ns.steps} steps of batch 32, "
        f"cosine decay, clipping at 10, no weight decay; Sophia refreshes its Hessian every "
        f"{ns.interval} steps. Grid scored on a validation split (20 % of MNIST-5k's training "
        "rows); the best of each optimizer retrained on the whole training split and scored on "
        "the test split. Win rate: fraction of coordinates whose step is not clipped. "
        "`sophia`: the package's Sophia with its defaults (bias-corrected m and h, "
        "betas (0.9, 0.99)); `sophia-reference`: the published rule (no bias correction, "
        "betas (0.965, 0.99)), as `bias_correction=False, betas=(0.965, 0.99)`.",
        "",
        "## Validation grid (seed 0)",
        "",
        "| optimizer | lr | rho | validation accuracy | win rate |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, lr, rho, acc, win, _ in rows:
        rho_text = "" if rho is None else f"{rho:g}"
        win_text = "" if math.isnan(win) else f"{win:.3f}"
        lines.append(f"| {name} | {lr:g} | {rho_text} | {acc:.4f} | {win_text} |")
    lines += [
        "",
        f"## Test accuracy of the best configuration ({ns.seeds} seeds)",
        "",
        "| optimizer | lr | rho | test accuracy (mean +- std) | win rate |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, (lr, rho, accs, wins) in finals.items():
        rho_text = "" if rho is None else f"{rho:g}"
        win = float(np.nanmean(wins)) if name != "adamw" else float("nan")
        lines.append(
            f"| {name} | {lr:g} | {rho_text} | {100 * np.mean(accs):.1f} +- "
            f"{100 * np.std(accs):.1f} | {'' if math.isnan(win) else f'{win:.3f}'} |"
        )
    Path(ns.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {ns.out}")


if __name__ == "__main__":
    main()
