"""The ``bytes`` and ``spectrum`` measurements of ``lora_benchmark.py``.

``measure_bytes``: what one client sends per round with each LoRA config's
defaults (``lora_results/bytes.json``, the first goal rows of LORA.md).
``theta_spectrum``: how well each compact Theta form rebuilds the global
long-side statistics of a ``full`` run (``lora_results/spectrum.json``, the
"Why a sketch" table). The report that reads both is ``_lora_report.py``.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
from _harness.runs import BENCH, CACHE, load_results, offline, show_output_dir, train_once
from lora_benchmark import FORMS, KEYS, LORA_RANK, RESULTS, VIT_CONFIG, Settings, best_lr

BYTES_CONFIGS = (
    "configs/vit_lora_mnist5k.yaml",
    "configs/causal_lm_shakespeare.yaml",
    "configs/sequence_classification_shakespeare.yaml",
)


def measure_bytes() -> None:
    """What one client sends per round with each LoRA config's defaults (one-round runs).

    Writes ``lora_results/bytes.json``: per config, the command and Delta's
    and Theta's bytes per client (the round's ``bytes_up_*`` over the clients).
    """
    offline()
    rows = []
    for config in BYTES_CONFIGS:
        run_dir = CACHE / "runs" / f"bytes_{Path(config).stem}"
        shutil.rmtree(run_dir, ignore_errors=True)
        over = ["--num_rounds", "1", "--output_dir", str(run_dir)]
        record = train_once(config, over, run_dir, KEYS)
        show_output_dir(record, f"runs/bytes_{Path(config).stem}")
        row = record["history"][0]
        clients = row["num_clients"]
        rows.append(
            {
                "config": config,
                "command": record["command"],
                "delta_bytes_per_client": row["bytes_up_delta"] / clients,
                "theta_bytes_per_client": row["bytes_up_theta"] / clients,
            }
        )
        print(rows[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bytes.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")


def theta_spectrum(s: Settings) -> None:
    """How well each compact form rebuilds the global long-side statistics of a LoRA run.

    Trains ``fedpac_soap [full]`` at its tuned rate (Dirichlet 0.1, seed 0,
    checkpoints at rounds 10 and 20), reads the global Theta of each
    checkpoint and, for every long side (d = 64: the LoRA factors' and the
    head's input side), measures the share of the trace in the top 1 / 4
    eigenvalues, and for each form the relative error of the rebuilt matrix
    ||L_hat - L||_F / ||L||_F and the share of L's top-4 energy that the
    top-4 eigenvectors of L_hat capture (1 = the full statistic's own basis).
    Writes ``lora_results/spectrum.json``.
    """
    import torch
    from safetensors.torch import load_file

    from fedpac_hf.optim._theta_forms import expand, sketch
    from fedpac_hf.run import parse_run_config, run_training

    done = load_results(s.results)
    lr = best_lr("vit-dir0.1", "fedpac_soap-full", done)
    if lr is None:
        raise SystemExit("fedpac_soap [full] is not tuned yet: run the grid first")
    run_dir = CACHE / "runs" / "spectrum"
    shutil.rmtree(run_dir, ignore_errors=True)
    over = [
        *FORMS["full"][1], "--learning_rate", f"{lr:g}", "--num_rounds", str(s.rounds),
        "--save_strategy", "steps", "--save_steps", str(s.rounds // 2),
        "--num_threads", "1", "--output_dir",
    ]  # fmt: skip
    run_training(*parse_run_config(BENCH.parent / VIT_CONFIG, [*over, str(run_dir)]))
    forms = {
        "diag": lambda m: expand(torch.diagonal(m), None),
        "nys1": lambda m: expand(None, sketch(m, 1)),
        "sk1": lambda m: expand(torch.diagonal(m), sketch(m, 1)),
        "sk2": lambda m: expand(torch.diagonal(m), sketch(m, 2)),
        "sk4": lambda m: expand(torch.diagonal(m), sketch(m, 4)),
    }
    rows = []
    for ckpt in sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1])):
        tensors = load_file(str(ckpt / "fedpac_state.safetensors"))
        stats = {
            k.removeprefix("curvature::"): v.double()
            for k, v in tensors.items()
            if k.startswith("curvature::") and v.ndim == 2 and v.shape[0] > LORA_RANK
        }
        for kind in ("lora_A", "lora_B", "classifier"):
            mats = [m for k, m in stats.items() if kind in k]
            top1, top4, err, cap = [], [], {f: [] for f in forms}, {f: [] for f in forms}
            for m in mats:
                ev = torch.linalg.eigvalsh(m).flip(0).clamp(min=0)
                top1.append(float(ev[0] / ev.sum()))
                top4.append(float(ev[:4].sum() / ev.sum()))
                for f, build in forms.items():
                    rebuilt = build(m).double()
                    err[f].append(float(torch.linalg.norm(rebuilt - m) / torch.linalg.norm(m)))
                    vecs = torch.linalg.eigh(rebuilt).eigenvectors[:, -4:]
                    cap[f].append(float(torch.trace(vecs.T @ m @ vecs) / ev[:4].sum()))
            rows.append(
                {
                    "round": int(ckpt.name.rsplit("-", 1)[1]),
                    "sides": kind,
                    "count": len(mats),
                    "top1": float(np.mean(top1)),
                    "top4": float(np.mean(top4)),
                    "error": {f: float(np.mean(v)) for f, v in err.items()},
                    "capture4": {f: float(np.mean(v)) for f, v in cap.items()},
                }
            )
            print(rows[-1], flush=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    shown = [*over, "runs/spectrum"]
    out = {
        "command": "fedpac-hf train " + shlex.join([VIT_CONFIG, *shown]),
        "rows": rows,
    }
    (s.results / "spectrum.json").write_text(json.dumps(out, indent=1) + "\n")
