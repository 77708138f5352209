"""beta="auto" against fixed correction strengths (issue #15), at CPU scale.

Arms: ``fedpac_soap`` with beta 0.25, 0.5, 0.75 and ``auto``, and ``local_soap``
(no alignment, no correction), each at one learning rate chosen on a
validation split for fixed beta = 0.5 and reused for every beta (the rule gets
no tuning of its own); ``local_soap`` at its own tuned rate. Splits: the
benchmark ViT on MNIST-5k at Dirichlet 0.5, Dirichlet 0.1 and two classes per
client (the splits of RESULTS.md, 20 rounds x K = 20), and the LoRA ViT of
LORA.md at Dirichlet 0.1 (default curvature form). Seeds 0-2. Runs go through
:func:`fedpac_hf.run.run_training` (the code path of ``fedpac-hf train``) and
are cached one JSON per run under ``benchmarks/beta_results/``; ``report``
writes its section into ``benchmarks/RESULTS.md`` (kept when
``statistical_efficiency.py report`` rebuilds the rest) and
``benchmarks/beta_auto.png``.

Usage (from the repository root)::

    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1
    python benchmarks/adaptive_beta.py run &   # two workers share the queue
    python benchmarks/adaptive_beta.py run &
    wait
    python benchmarks/adaptive_beta.py report
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness.reporting import kept_block, write_section  # noqa: E402
from _harness.runs import (  # noqa: E402  (the shared benchmark machinery)
    BENCH,
    CACHE,
    KEPT_KEYS,
    load_results,
    run_queue,
    series,
    show_output_dir,
    train_once,
)
from statistical_efficiency import VIT_SPLITS  # noqa: E402  (the splits of RESULTS.md)

RESULTS = BENCH / "beta_results"
# the hand-written reading of the tables (kept when the section is rebuilt)
NOTES_START, NOTES_END = "<!-- beta-analysis -->", "<!-- /beta-analysis -->"
KEYS = (*KEPT_KEYS, "beta", "client_dispersion", "direction_change", "drift_from_start_relative")
VIT_CONFIG = "configs/vit_mnist5k.yaml"
LORA_CONFIG = "configs/vit_lora_mnist5k.yaml"

# split -> (config, overrides, rounds, learning rate of fedpac_soap, of local_soap).
# The rates are the validation-split choices of RESULTS.md (ViT, tuned at Dirichlet 0.1
# for fedpac_soap at beta 0.5, reused on the other splits as there) and of LORA.md
# (the default Theta form's and local_soap's rates at Dirichlet 0.1).
SPLITS: dict[str, tuple[str, list[str], float, float]] = {
    "dir0.5": (VIT_CONFIG, VIT_SPLITS["dir0.5"] + ["--local_steps", "20"], 3e-3, 1e-2),
    "dir0.1": (VIT_CONFIG, VIT_SPLITS["dir0.1"] + ["--local_steps", "20"], 3e-3, 1e-2),
    "path2": (VIT_CONFIG, VIT_SPLITS["path2"] + ["--local_steps", "20"], 3e-3, 1e-2),
    "lora-dir0.1": (
        LORA_CONFIG,
        ["--partitioner", "dirichlet", "--dirichlet_alpha", "0.1"],
        1e-2,
        1e-2,
    ),
}
ROUNDS = 20
ARMS: dict[str, list[str]] = {
    "beta=0.25": ["--algorithm", "fedpac_soap", "--beta", "0.25"],
    "beta=0.5": ["--algorithm", "fedpac_soap", "--beta", "0.5"],
    "beta=0.75": ["--algorithm", "fedpac_soap", "--beta", "0.75"],
    "beta=auto": ["--algorithm", "fedpac_soap", "--beta", "auto"],
    "local_soap": ["--algorithm", "local_soap"],
}
FIXED = ["beta=0.25", "beta=0.5", "beta=0.75"]


def key_of(split: str, arm: str, seed: int) -> str:
    return f"{split}_{arm.replace('=', '')}_s{seed}"


def overrides_of(split: str, arm: str, seed: int, run_dir: Path) -> list[str]:
    """The ``fedpac-hf train`` overrides of one run (the config file comes first)."""
    _, split_over, lr_fedpac, lr_local = SPLITS[split]
    lr = lr_local if arm == "local_soap" else lr_fedpac
    over = [*ARMS[arm], "--learning_rate", f"{lr:g}", "--seed", str(seed), *split_over]
    return over + ["--num_rounds", str(ROUNDS), "--num_threads", "1", "--output_dir", str(run_dir)]


def run_one(split: str, arm: str, seed: int) -> dict[str, Any]:
    """Train one run and return its JSON record."""
    key = key_of(split, arm, seed)
    run_dir = CACHE / "runs" / key
    config = SPLITS[split][0]
    record = train_once(config, overrides_of(split, arm, seed, run_dir), run_dir, KEYS)
    show_output_dir(record, f"runs/{key}")
    return {"split": split, "arm": arm, "seed": seed, "suite": "vit", **record}


def work(seeds: int, deadline: float) -> None:
    """Worker loop: every (seed, split, arm) not cached yet, seed-major."""
    runs = [(s, split, arm) for s in range(seeds) for split in SPLITS for arm in ARMS]

    def plan(done: dict[str, dict]) -> tuple[list[tuple[str, Any]], int]:
        todo = [(key_of(sp, a, s), (sp, a, s)) for s, sp, a in runs if key_of(sp, a, s) not in done]
        return todo, 0

    run_queue(plan, lambda key, spec: run_one(*spec), RESULTS, deadline)


# ------------------------------------------------------------------ report


def _final(record: dict[str, Any]) -> float:
    return 100.0 * float(series(record, "eval_accuracy")[-1])


def _median_of(records: list[dict[str, Any]], key: str, skip: int = 0) -> float:
    """Median over rounds (from ``skip`` on) and seeds: robust to the early rounds, whose
    small global Theta makes relative drifts large."""
    values = [series(r, key)[skip:] for r in records if key in r["history"][-1]]
    return float(np.nanmedian(np.concatenate(values))) if values else float("nan")


def _num(x: float, digits: int = 3) -> str:
    return "" if not np.isfinite(x) else f"{x:.{digits}g}"


def report(seeds: int) -> None:
    """Tables, goals and the beta/drift figure into RESULTS.md's adaptive-beta section."""
    done = load_results(RESULTS)
    lines: list[str] = []
    add = lines.append
    add('## `beta="auto"` against fixed correction strengths\n')
    add("Made by\n\n```")
    add("export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1")
    add("python benchmarks/adaptive_beta.py run &   # two workers share the queue")
    add("python benchmarks/adaptive_beta.py run &\nwait")
    add("python benchmarks/adaptive_beta.py report\n```\n")
    add(
        f"Machine: 2-core x86_64 CPU, one torch thread per run, two at a time. {ROUNDS} rounds "
        "of K = 20; `fedpac_soap` at every beta runs at the rate chosen on the validation "
        "split for beta = 0.5 (the rule gets no tuning of its own), `local_soap` at its own. "
        "Final: accuracy after the last round, mean ± std over seeds. beta (auto): the mean "
        "of the values the server chose (rounds 3 on). Drift from start: each client's Theta "
        "against the global Theta the round started from, relative, median over rounds 2 on "
        "and seeds. "
        "Commands: `benchmarks/beta_results/*.json`.\n"
    )
    notes = kept_block(BENCH / "RESULTS.md", NOTES_START, NOTES_END)
    if notes:
        add(f"{NOTES_START}\n{notes}\n{NOTES_END}\n")
    means: dict[str, dict[str, float]] = {}
    for split, (config, _, lr_f, lr_l) in SPLITS.items():
        add(f"### {split} (`{config}`, fedpac_soap lr {lr_f:g}, local_soap lr {lr_l:g})\n")
        add(
            "| arm | seeds | final acc % | best acc % | beta (auto: mean, range) | drift from start (rel.) |"
        )
        add("|---|---:|---:|---:|---:|---:|")
        means[split] = {}
        for arm in ARMS:
            records = [done[k] for s in range(seeds) if (k := key_of(split, arm, s)) in done]
            if not records:
                continue
            finals = [_final(r) for r in records]
            best = np.mean([100 * np.max(series(r, "eval_accuracy")) for r in records])
            means[split][arm] = float(np.mean(finals))
            betas = (
                np.concatenate([series(r, "beta")[2:] for r in records])
                if arm == "beta=auto"
                else None
            )
            beta_text = (
                f"{betas.mean():.2f} ({betas.min():.2f}-{betas.max():.2f})"
                if betas is not None and betas.size
                else ARMS[arm][-1]
                if arm.startswith("beta")
                else "0"
            )
            add(
                f"| {arm} | {len(records)} | {np.mean(finals):.1f} ± {np.std(finals):.1f} | "
                f"{best:.1f} | {beta_text} | "
                f"{_num(_median_of(records, 'drift_from_start_relative', 1))} |"
            )
        add("")
    add("### Goals\n")
    add("| split | auto - best fixed (points) | auto - local_soap | auto beats every fixed beta |")
    add("|---|---:|---:|---|")
    for split, m in means.items():
        if "beta=auto" not in m or not all(a in m for a in FIXED):
            continue
        best_fixed = max(m[a] for a in FIXED)
        local = m["beta=auto"] - m["local_soap"] if "local_soap" in m else float("nan")
        add(
            f"| {split} | {m['beta=auto'] - best_fixed:+.1f} | {local:+.1f} | "
            f"{'yes' if m['beta=auto'] > best_fixed else 'no'} |"
        )
    add("")
    _plot(done, seeds)
    add("![beta chosen by the server, and drift](beta_auto.png)\n")
    write_section(BENCH / "RESULTS.md", "adaptive-beta", "\n".join(lines))
    print("wrote the adaptive-beta section of benchmarks/RESULTS.md")


def _plot(done: dict[str, dict], seeds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for split in SPLITS:
        records = [done[k] for s in range(seeds) if (k := key_of(split, "beta=auto", s)) in done]
        if not records:
            continue
        beta = np.mean([series(r, "beta") for r in records], axis=0)
        axes[0].plot(np.arange(1, len(beta) + 1), beta, marker="o", markersize=3, label=split)
        for arm, style in (("beta=auto", "-"), ("local_soap", ":")):
            recs = [done[k] for s in range(seeds) if (k := key_of(split, arm, s)) in done]
            curves = [series(r, "drift_from_start_relative")[1:] for r in recs]  # round 2 on
            curves = [c for c in curves if c.size]
            if curves:
                n = min(c.size for c in curves)
                drift = np.mean([c[:n] for c in curves], axis=0)
                axes[1].plot(np.arange(2, n + 2), drift, style, label=f"{split} {arm}")
    axes[0].set(title="beta chosen by the server (mean over seeds)", xlabel="round", ylabel="beta")
    axes[0].set_ylim(0, 1)
    axes[1].set(title="drift from the round's starting Theta", xlabel="round", ylabel="relative")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(BENCH / "beta_auto.png", dpi=110)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("run", "report"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--hours", type=float, default=3.0, help="stop starting runs after this")
    ns = parser.parse_args(argv)
    if ns.command == "run":
        work(ns.seeds, time.time() + 3600 * ns.hours)
    else:
        report(ns.seeds)


if __name__ == "__main__":
    main()
