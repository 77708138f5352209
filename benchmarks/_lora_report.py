"""``benchmarks/LORA.md`` and its ``lora_*.png`` plots, from the JSONs of ``lora_benchmark.py``.

The report's text and tables: the goals, the ceilings, the Theta forms (with
the spectrum of ``lora_benchmark.py spectrum``), the methods under strong skew,
bfloat16 transport, the learning-rate selection and what the CPU budget cut.
It keeps the hand-written analysis between the ``<!-- analysis -->`` markers.
The grid it reads (forms, arms, splits, tuned rates, the default form) is
defined in ``lora_benchmark.py``; summaries, tables and plots come from
``_harness/``.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import numpy as np
from _harness.reporting import (
    ANALYSIS_END,
    ANALYSIS_START,
    Summary,
    best_baseline,
    chosen_cell,
    command_block,
    fmt,
    goals_table,
    kept_block,
    ordered,
    plot_curves,
    rounds_to,
    summarise,
    tuning_table,
)
from _harness.runs import BENCH, load_results, series, tune_score
from lora_benchmark import (
    BASELINES,
    DEFAULT_BUDGET,
    FIRST_ORDER,
    FORMS,
    LM_CONFIG,
    RATE_OF,
    SPLITS,
    THETA_BUDGET,
    TUNED_ON,
    VIT_CONFIG,
    Settings,
    algorithm_of,
    best_lr,
    default_form,
    form_of,
    plan,
)


def label(arm: str, default: str | None) -> str:
    """Table label of an arm: ``fedpac_soap [nys1 = default]`` and so on."""
    form = form_of(arm)
    if form is None:
        return arm
    extra = " + bf16" if arm.endswith("-bf16") else ""
    tag = f"{form} = default" if form == default else form
    if form in RATE_OF:
        tag += f", rate of {RATE_OF[form]}"
    return f"{algorithm_of(arm)} [{tag}]{extra}"


ARM_ORDER = [
    *BASELINES,
    "fedpac_muon",
    *(f"fedpac_soap-{f}" for f in FORMS),
    *(f"fedpac_soap-{f}-bf16" for f in FORMS),
]


def _value(x: float, metric: str) -> str:
    return fmt(x) if metric == "eval_accuracy" else f"{x:.2f}"


def _std(x: float, metric: str) -> str:
    if not np.isfinite(x):
        return "n/a"
    return fmt(x) if metric == "eval_accuracy" else f"{x:.2f}"


def kib(summ: Summary, key: str) -> float:
    """KiB of ``key`` (``bytes_up_delta``/``_theta``) one client sends per round: per seed
    the median over rounds, then the median over seeds."""
    per_seed = [np.median(series(r, key) / series(r, "num_clients")) for r in summ.runs]
    return float(np.median([float(v) / 1024 for v in per_seed]))


def method_table(
    lines: list[str], summ: dict[str, Summary], metric: str, default: str | None
) -> None:
    """Final/best value, rounds to the best baseline's final value, drift and bytes per arm."""
    acc = metric == "eval_accuracy"
    unit = "acc %" if acc else "perplexity"
    target = best_baseline(summ, BASELINES, higher=acc)
    tname, tval = target if target else ("-", float("nan"))
    lines.append(
        f"Target: the best baseline's mean final {unit} (**{tname}**, {_value(tval, metric)}); "
        "rounds to target: first round at which the seed-mean curve reaches it. Best: the "
        f"best round of each seed ({'max' if acc else 'min'} over rounds, on the test split: "
        "reported, never used to choose anything), averaged. Drift: `drift_relative`, mean "
        "over rounds and seeds. Bytes: what one client sends per round (KiB).\n"
    )
    lines.append(
        f"| method | lr | seeds | final {unit} (mean ± std) | best {unit} | rounds to target | "
        "drift (rel.) | Delta KiB | Theta KiB | Theta / Delta |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for arm in ordered(summ, ARM_ORDER):
        s = summ[arm]
        rt = rounds_to(s.curve, tval, higher_is_better=acc) if np.isfinite(tval) else None
        delta, theta = kib(s, "bytes_up_delta"), kib(s, "bytes_up_theta")
        ratio = theta / delta if delta else float("nan")
        lines.append(
            f"| {label(arm, default)} | {s.lr:g} | {s.seeds} | {_value(s.mean, metric)} ± "
            f"{_std(s.std, metric)} | {_value(float(np.mean(s.best)), metric)} | "
            f"{rt if rt is not None else 'never'} | {fmt(s.drift, 1, 3)} | "
            f"{delta:.1f} | {theta:.1f} | {ratio:.3f} |"
        )
    lines.append("")


COLORS = {
    "fedavg_adamw": "#1f77b4",
    "fedadamw": "#9467bd",
    "local_soap": "#d62728",
    "local_muon": "#2ca02c",
    "fedpac_muon": "#2ca02c",
    "fedpac_soap-full": "#000000",
    "fedpac_soap-diag": "#ff7f0e",
    "fedpac_soap-nys1": "#e41a1c",
    "fedpac_soap-sk1": "#8c564b",
    "fedpac_soap-sk2": "#e377c2",
    "fedpac_soap-sk4": "#17becf",
    "fedpac_soap-rank": "#7f7f7f",
}


def _style(arm: str) -> dict[str, Any]:
    if arm.endswith("-bf16"):
        return {"linestyle": "-.", "linewidth": 1.6}
    if arm.startswith("fedpac"):
        return {"linestyle": "-", "linewidth": 2.2}
    if arm.startswith("local"):
        return {"linestyle": "--", "linewidth": 1.4}
    return {"linestyle": ":", "linewidth": 1.8}


def plot_arms(
    summ: dict[str, Summary],
    title: str,
    path: Path,
    default: str | None,
    ceiling: Summary | None = None,
) -> None:
    """Seed-mean test curve per arm (and the centralised ceiling as a dashed line)."""
    scale = 100 if next(iter(summ.values())).metric == "eval_accuracy" else 1
    plot_curves(
        summ,
        ARM_ORDER,
        title,
        path,
        label=lambda arm: label(arm, default),
        color=lambda arm: COLORS.get(arm.removesuffix("-bf16")),
        style=_style,
        ceiling=None if ceiling is None else (ceiling.mean * scale, "centralised LoRA"),
    )


SPLIT_TITLES = {
    "vit-dir0.1": "ViT LoRA, Dirichlet alpha = 0.1 (strong label skew)",
    "vit-path1": "ViT LoRA, pathological: one class per client",
    "lm-speaker": "Llama LoRA on Shakespeare, natural per-speaker split",
}


def _finals(done: dict[str, dict], split: str, s: Settings) -> list[dict]:
    """Final runs of ``split`` at each arm's tuned rate (whatever seeds exist)."""
    return [
        r
        for r in done.values()
        if r["split"] == split
        and r["stage"] == "final"
        and r["seed"] < s.seeds
        and r["lr"] == best_lr(split, r["arm"], done)
    ]


def _tuning_table(lines: list[str], done: dict[str, dict], split: str) -> None:
    records = [r for r in done.values() if r["split"] == split and r["stage"] == "tune"]
    if not records:
        return
    acc = SPLITS[split][0] == "vit"
    by_arm: dict[str, dict[float, float]] = {}
    for r in records:
        by_arm.setdefault(r["arm"], {})[r["lr"]] = tune_score(r)
    rows = []
    for arm in ordered(by_arm, ARM_ORDER):
        cells = []
        for lr in sorted(by_arm[arm]):
            v = by_arm[arm][lr]
            if not np.isfinite(v):
                cells.append(f"{lr:g}: diverged")
            else:
                cells.append(f"{lr:g}: {fmt(v) if acc else f'{-v:.3f}'}")
        chosen = chosen_cell(best_lr(split, arm, done), sorted(by_arm[arm]))
        rows.append((label(arm, None), cells, chosen))
    tuning_table(lines, f"{split} ({'validation accuracy %' if acc else 'validation loss'})", rows)


def _goal_rows(
    summaries: dict[str, dict[str, Summary]], default: str | None, byte_rows: list[dict]
) -> list[tuple[str, str, bool]]:
    rows: list[tuple[str, str, bool]] = []
    for row in byte_rows:
        ratio = row["theta_bytes_per_client"] / row["delta_bytes_per_client"]
        rows.append(
            (
                f"Theta <= {THETA_BUDGET}x Delta by default: `{row['config']}`",
                f"{row['theta_bytes_per_client'] / 1024:.2f} / "
                f"{row['delta_bytes_per_client'] / 1024:.2f} KiB = {ratio:.3f}x",
                ratio <= THETA_BUDGET + 1e-9,
            )
        )
    if default is None:
        return rows
    d_arm = f"fedpac_soap-{default}"
    dir01 = summaries.get("vit-dir0.1", {})
    if d_arm in dir01 and "fedpac_soap-full" in dir01:
        diff = (dir01[d_arm].mean - dir01["fedpac_soap-full"].mean) * 100
        rows.append(
            (
                f"default [{default}] within 1 point of full (Dirichlet 0.1, final accuracy)",
                f"{diff:+.1f} points",
                diff >= -1.0,
            )
        )
    for split in ("vit-dir0.1", "vit-path1", "lm-speaker"):
        summ = summaries.get(split, {})
        if d_arm not in summ:
            continue
        acc = SPLITS[split][0] == "vit"
        mine = summ[d_arm].mean
        if "local_soap" in summ:
            if acc:
                diff = (mine - summ["local_soap"].mean) * 100
                rows.append(
                    (
                        f"{split}: default fedpac_soap >= 3 points above local_soap",
                        f"{diff:+.1f} points",
                        diff >= 3.0,
                    )
                )
            else:
                diff = mine - summ["local_soap"].mean
                rows.append(
                    (
                        f"{split}: default fedpac_soap below local_soap in perplexity",
                        f"{diff:+.2f} perplexity",
                        diff < 0,
                    )
                )
        first = [a for a in FIRST_ORDER if a in summ]
        if first:
            pick = max if acc else min
            best = pick(first, key=lambda a: summ[a].mean)
            diff = (mine - summ[best].mean) * (100 if acc else 1)
            rows.append(
                (
                    f"{split}: default fedpac_soap better than the best first-order method",
                    f"{diff:+.{1 if acc else 2}f} {'points' if acc else 'perplexity'} (vs {best})",
                    diff > 0 if acc else diff < 0,
                )
            )
    return rows


def report(s: Settings, out: Path) -> None:
    """Build LORA.md and its plots from the cached JSONs (a partial grid gives a partial report)."""
    done = load_results(s.results)
    default = default_form(done, s)
    byte_file = s.results / "bytes.json"
    byte_rows = json.loads(byte_file.read_text())["rows"] if byte_file.is_file() else []
    machines = sorted({r.get("machine", "?") for r in done.values()})
    lines: list[str] = []
    add = lines.append
    add("# LoRA-only federated fine-tuning with a second-order client\n")
    add(
        "Every number below is printed by `benchmarks/lora_benchmark.py report` from the JSON "
        f"files under `benchmarks/{s.results.name}/` (one per run: its settings, the exact "
        "`fedpac-hf train` command that reproduces it, per-round metrics), made by\n"
    )
    command_block(
        lines,
        [
            "python benchmarks/lora_benchmark.py run &   # two workers share the queue",
            "python benchmarks/lora_benchmark.py run &",
            "wait",
            "python benchmarks/lora_benchmark.py bytes    # one-round runs of the three LoRA configs",
            "python benchmarks/lora_benchmark.py report",
        ],
    )
    add(
        f"Machine: {'; '.join(machines)}; CPU only, one torch thread per run, two runs at a "
        "time, on a machine shared with other jobs (wall times are not comparable). Setting: "
        f"`{VIT_CONFIG}` (pretrained `base:vit-mnist5k-0to4` learns digits 5-9: LoRA r = 8 on "
        "q/v + a new 10-way head, 10 clients, 3 per round, K = 20, batch 32) for "
        f"{s.rounds} rounds; `{LM_CONFIG}` (pretrained `base:llama-shakespeare`, LoRA r = 8 "
        "on q/v only, 16 speakers = 16 clients, 4 per round, K = 20) for "
        f"{s.lm_rounds} rounds; cosine decay over rounds, clipping at 10. Final runs: seeds "
        f"0-{s.seeds - 1} (the seed sets the partition, the sampling and the head's "
        "initialisation).\n"
    )
    notes = kept_block(out)
    if notes:
        add(f"{ANALYSIS_START}\n{notes}\n{ANALYSIS_END}\n")

    summaries: dict[str, dict[str, Summary]] = {}
    for split in ("vit-central", "vit-head", "lm-central", *SPLIT_TITLES):
        metric = "eval_accuracy" if SPLITS[split][0] == "vit" else "eval_perplexity"
        records = _finals(done, split, s)
        if records:
            summaries[split] = summarise(records, metric)

    add("## Goals\n")
    goals_table(lines, _goal_rows(summaries, default, byte_rows))

    add("## 1. Ceilings: LoRA learns\n")
    add(
        "One client holding all the training rows (IID, every round), `fedavg_adamw`, same "
        "rounds, K and batch: the centralised LoRA run; for the ViT also a head-only run "
        "(`--lora_alpha 0` multiplies the adapters' output by 0, so only the new head "
        "learns). The causal LM's centralised run pools the 16 clients' speeches "
        "(`<pooled folder>`: the federated run's rows, see `pooled_lm_dataset`).\n"
    )
    add("| run | lr | seeds | final (mean ± std) | best | command (seed 0) |")
    add("|---|---:|---:|---:|---:|---|")
    names = {
        "vit-central": "ViT: centralised LoRA (acc %)",
        "vit-head": "ViT: centralised head only (acc %)",
        "lm-central": "Llama: centralised LoRA (perplexity)",
    }
    for split, name in names.items():
        summ = summaries.get(split, {}).get("fedavg_adamw")
        if summ is None:
            continue
        metric = "eval_accuracy" if split.startswith("vit") else "eval_perplexity"
        cmd = next(
            r["command"]
            for r in _finals(done, split, s)
            if r["seed"] == min(x["seed"] for x in _finals(done, split, s))
        )
        add(
            f"| {name} | {summ.lr:g} | {summ.seeds} | {_value(summ.mean, metric)} ± "
            f"{_std(summ.std, metric)} | {_value(float(np.mean(summ.best)), metric)} | "
            f"`{cmd}` |"
        )
    add("")

    dir01 = summaries.get("vit-dir0.1", {})
    forms = {a: v for a, v in dir01.items() if a.startswith("fedpac_soap") and "bf16" not in a}
    if forms:
        add("## 2. Which Theta travels for a LoRA factor (ViT, Dirichlet 0.1)\n")
        add(
            "A LoRA factor is d x r (d = 64, r = 8 here; the head is 10 x 64). SOAP's "
            "statistics: r x r on the rank side, d x d on the long side. Forms (the client "
            "always keeps and uses the full statistics; only what travels differs; `--curvature "
            "lora` keeps sides <= r in full):\n"
        )
        add("| form | what travels per factor | overrides |")
        add("|---|---|---|")
        for form, (what, over) in FORMS.items():
            add(f"| {form} | {what} | `{shlex.join(over)}` |")
        add("")
        add(
            f"Default rule: the best validation score (section 5) among the forms whose Theta "
            f"is at most {DEFAULT_BUDGET:g}x Delta. Chosen: **{default or 'not yet known'}**. "
            "`rate of X`: ran at form X's tuned rate (a CPU cut).\n"
        )
        method_table(lines, forms, "eval_accuracy", default)
        plot_arms(
            forms,
            "ViT LoRA, Dirichlet 0.1: forms of SOAP's Theta (mean over seeds)",
            BENCH / "lora_forms_dir01.png",
            default,
            summaries.get("vit-central", {}).get("fedavg_adamw"),
        )
        add("![accuracy vs round per form](lora_forms_dir01.png)\n")
    spectrum = s.results / "spectrum.json"
    if spectrum.is_file():
        data = json.loads(spectrum.read_text())
        add("### Why a sketch: the long-side statistics are nearly low-rank\n")
        add(
            "The global Theta of a `full` run (Dirichlet 0.1, seed 0, at rounds "
            f"{s.rounds // 2} and {s.rounds}), each long side (d = 64) rebuilt from each form "
            "as a client's warm start rebuilds it. Top-1 / top-4: share of the statistic's "
            "trace in its largest 1 / 4 eigenvalues. Error: ||L_hat - L||_F / ||L||_F. "
            "Capture: share of L's top-4 energy caught by L_hat's top-4 eigenvectors (the "
            "basis SOAP rotates into; 1 = as good as L's own). Means over the sides of each "
            f"kind. Command (then `lora_benchmark.py spectrum`): `{data['command']}`\n"
        )
        names = list(data["rows"][0]["error"])
        add(
            "| round | long side of | sides | top-1 | top-4 | "
            + " | ".join(f"error {n}" for n in names)
            + " | "
            + " | ".join(f"capture {n}" for n in names)
            + " |"
        )
        add("|---:|---|---:|---:|---:|" + "---:|" * (2 * len(names)))
        for row in data["rows"]:
            add(
                f"| {row['round']} | {row['sides']} | {row['count']} | {row['top1']:.2f} | "
                f"{row['top4']:.2f} | "
                + " | ".join(f"{row['error'][n]:.2f}" for n in names)
                + " | "
                + " | ".join(f"{row['capture4'][n]:.2f}" for n in names)
                + " |"
            )
        add("")

    add("## 3. Methods under strong skew\n")
    shown_arms = [*BASELINES, "fedpac_muon", "fedpac_soap-full"]
    if default is not None:
        shown_arms.append(f"fedpac_soap-{default}")
    for split, title in SPLIT_TITLES.items():
        summ = {a: v for a, v in summaries.get(split, {}).items() if a in shown_arms}
        if not summ:
            continue
        metric = "eval_accuracy" if SPLITS[split][0] == "vit" else "eval_perplexity"
        add(f"### {title}\n")
        if split in TUNED_ON:
            add(f"Learning rates: those tuned at {TUNED_ON[split]} (a CPU cut).\n")
        example = next(r for r in _finals(done, split, s) if r["arm"] in summ)
        add(f"Command of one run: `{example['command']}`\n")
        method_table(lines, summ, metric, default)
        png = f"lora_{split.replace('.', '').replace('-', '_')}.png"
        ceiling = summaries.get("vit-central" if metric == "eval_accuracy" else "lm-central", {})
        title = f"{title} (mean over seeds)"
        plot_arms(summ, title, BENCH / png, default, ceiling.get("fedavg_adamw"))
        add(f"![curves]({png})\n")

    bf = {a: v for a, v in dir01.items() if a.endswith("-bf16")}
    if bf and default is not None:
        add(
            "## 4. Delta and Theta in bfloat16 (`--transport_dtype bfloat16`), ViT, Dirichlet 0.1\n"
        )
        pair = {f"fedpac_soap-{default}": dir01[f"fedpac_soap-{default}"], **bf}
        method_table(lines, pair, "eval_accuracy", default)

    add("## 5. Learning-rate selection (validation split, never the test set)\n")
    add(
        "Tuning runs: seed 0, on 80 % of MNIST-5k's training split scored on the other 20 % "
        "(stratified) / on 90 % of every speaker's speeches scored on the other 10 %. Score: "
        "mean validation accuracy / loss over the last 3 rounds. A 3-point grid (factor ~3 "
        "apart), extended by one point when an edge wins; `*`: still at the edge.\n"
    )
    for split in ("vit-dir0.1", "vit-central", "vit-head", "lm-speaker", "lm-central"):
        _tuning_table(lines, done, split)

    todo, waiting = plan(done, s)
    add("## 6. What the CPU budget cut\n")
    shared = ", ".join(f"{a} at {b}'s rate" for a, b in RATE_OF.items())
    add(
        (f"Rate sharing: {shared}. " if shared else "")
        + "The pathological split runs at Dirichlet 0.1's rates. "
        + (
            ""
            if s.lm_tail
            else "The causal LM runs fedavg_adamw, local_soap and fedpac_soap (default form) "
            "only; its full form, fedadamw and the Muon methods are left out "
            "(`--lm-tail` adds them). "
        )
        + "Runs of the grid not done when this "
        f"report was made: {len(todo)} ready, {waiting} waiting for others"
        + (": " + ", ".join(f"`{r.key}`" for r in todo[:40]) if todo else "")
        + ".\n"
    )
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}")
