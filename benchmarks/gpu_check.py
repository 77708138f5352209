"""One prepared GPU check of fedpac_hf: round times, optimizer steps, host syncs.

Written for one GPU and a short session (under 8 minutes on an H100; every
measurement is guarded, the run has a global time budget, and the report is
rewritten after each measurement, so whatever finishes is kept):

(c) host syncs per client step and per client: ``FedPACTrainer.train_client``
    on the ViT-Tiny shape with K = 5 and K = 15, for AdamW, SOAP, Sophia and
    Muon clients, in bf16 and fp16 (a GradScaler per client), counted by
    ``torch.cuda.set_sync_debug_mode("warn")`` and by
    ``fedpac_hf.trainer.host_syncs.HostSyncCounter`` (which also says where they are);
(a) the paper's ViT-Tiny (32 px, patch 4, width 192, depth 12, 3 heads, 100
    classes) on synthetic data, 10 clients x K = 50, batch 50: seconds per round
    and client steps per second of ``FedPACTrainer`` with ``fedavg_adamw``,
    ``local_soap`` and ``fedpac_soap`` (2 rounds; the second is the steady one),
    and plain ``transformers.Trainer`` on the same 500 steps, in bf16 and fp32;
(b) step time and peak memory against ``torch.optim.AdamW`` of SOAP, Muon and
    Sophia at ViT-B/16 shapes in bf16, and of LoRA r = 16 adapters on a
    randomly initialised Llama-3.2-1B-shaped model (bf16 base); SOAP also with
    ``rotation_precision="high"`` (``soap-tf32``: its rotations on TF32 tensor
    cores, the statistics and refreshes in full float32).

Needs torch, transformers, accelerate and peft; not ``datasets``, ``pyarrow``,
``evaluate`` or the network (synthetic tensors, models from configs). Run from the
repository root::

    PYTHONPATH=. python benchmarks/gpu_check.py --out benchmarks/GPU.md
    PYTHONPATH=. python benchmarks/gpu_check.py --smoke      # tiny shapes on a CPU
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]  # the working tree's fedpac_hf, then gpu_workloads

SYNC_ALGORITHMS = ("fedavg_adamw", "fedpac_soap", "fedpac_sophia", "fedpac_muon")
ROUND_ALGORITHMS = ("fedavg_adamw", "local_soap", "fedpac_soap")
STEP_OPTIMIZERS = {
    "vit-b16": ("torch-adamw", "adamw", "soap", "soap-tf32", "muon", "sophia"),
    "llama-1b-lora": ("torch-adamw", "adamw", "soap", "soap-tf32", "soap-1024", "muon", "sophia"),
}


class Budget:
    """Seconds left of the run's time budget."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def expired(self) -> bool:
        return self.left() <= 0


class Report:
    """The results so far, rewritten to Markdown (and JSON) after every measurement."""

    def __init__(self, out: Path, header: list[str]) -> None:
        self.out = out
        self.header = header
        self.sections: dict[str, list[dict[str, Any]]] = {}
        self.errors: list[str] = []

    def add(self, section: str, row: dict[str, Any]) -> None:
        self.sections.setdefault(section, []).append(row)
        self.write()

    def error(self, what: str, error: BaseException) -> None:
        last = traceback.format_exception_only(type(error), error)[-1].strip()
        self.errors.append(f"{what}: {last}")
        print(f"[gpu_check] {what} failed: {last}", flush=True)
        self.write()

    def write(self) -> None:
        lines = list(self.header)
        for title, rows in self.sections.items():
            columns = list(dict.fromkeys(k for row in rows for k in row))
            lines += ["", f"## {title}", "", "| " + " | ".join(columns) + " |"]
            lines.append("|" + "|".join("---" for _ in columns) + "|")
            lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
        if self.errors:
            lines += ["", "## Errors and skipped measurements", ""]
            lines += [f"- {e}" for e in self.errors]
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text("\n".join(lines) + "\n")
        data = {"header": self.header, "sections": self.sections, "errors": self.errors}
        self.out.with_suffix(".json").write_text(json.dumps(data, indent=1))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def guarded(report: Report, budget: Budget, what: str, fn: Callable[[], None]) -> None:
    """Run one measurement; record its error (or that the budget ran out) and go on."""
    if budget.expired():
        report.errors.append(f"{what}: skipped, the time budget ran out")
        report.write()
        return
    start = time.monotonic()
    print(f"[gpu_check] {what} ({budget.left():.0f} s left)", flush=True)
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - one failed measurement must not end the run
        report.error(what, error)
    print(f"[gpu_check] {what}: {time.monotonic() - start:.1f} s", flush=True)


def environment(args: argparse.Namespace, device: Any) -> list[str]:
    """The report's header: command, machine, versions, commit."""
    import accelerate
    import torch
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = "not installed"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return [
        "# GPU check" + (" (smoke run on tiny shapes)" if args.smoke else ""),
        "",
        f"Command: `PYTHONPATH=. python benchmarks/gpu_check.py {' '.join(sys.argv[1:])}`"
        + (f" at commit `{commit}`" if commit else ""),
        f"Device: {name} ({device}); CUDA {torch.version.cuda}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, accelerate {accelerate.__version__}, "
        f"peft {peft_version}, Python {platform.python_version()}.",
        f"Started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; time budget {args.budget:.0f} s.",
    ]


def fedpac_args(output_dir: str, algorithm: str, precision: str, shapes: Any, rounds: int):
    """``FedPACArguments`` for the round measurements (every client every round)."""
    import torch

    from fedpac_hf import FedPACArguments

    return FedPACArguments(
        output_dir=output_dir,
        algorithm=algorithm,
        num_rounds=rounds,
        clients_per_round=shapes.clients,
        local_steps=shapes.local_steps,
        per_device_train_batch_size=shapes.batch,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        max_grad_norm=10.0,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        partitioner="iid",
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        seed=0,
    )


def measure_syncs(report: Report, shapes: Any, device: Any, algorithm: str, precision: str) -> None:
    """(c): host syncs of one client at two K (5 and 15), warm-started from a first client."""
    import torch
    from gpu_workloads import SyntheticImages, vit_tiny

    from fedpac_hf import FedPACTrainer
    from fedpac_hf.federated import ServerState
    from fedpac_hf.optim import next_global_curvature
    from fedpac_hf.trainer.host_syncs import HostSyncCounter

    data = SyntheticImages(shapes.batch * 4, shapes.image_size, shapes.labels, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        args = fedpac_args(tmp, algorithm, precision, shapes, rounds=1)
        trainer = FedPACTrainer(model=vit_tiny(shapes), args=args, client_datasets=[data])
        trainer.model.to(args.device)
        start = ServerState.from_model(trainer.model)
        first = trainer.train_client(0, data, 0, 1e-3, start)
        delta = {n: d.cpu() for n, d in first.delta.items()}
        # the global Theta the server would send down after this client (compact forms
        # turn into the server's basis)
        theta = next_global_curvature(None, {n: t.cpu() for n, t in first.curvature.items()})
        theta = {n: t.float() for n, t in theta.items()} or None
        warm = ServerState(start.params, theta, delta, round=1)
        counts = {}
        for steps in shapes.sync_steps:
            trainer.args.local_steps = steps
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    with HostSyncCounter("cuda" if device.type == "cuda" else None) as counter:
                        trainer.train_client(0, data, 1, 1e-3, warm)
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                finally:
                    if device.type == "cuda":
                        torch.cuda.set_sync_debug_mode("default")
            debug = sum("synchroniz" in str(w.message) for w in caught)
            counts[steps] = (debug if device.type == "cuda" else None, counter)
    short, long = shapes.sync_steps
    (debug_short, c_short), (debug_long, c_long) = counts[short], counts[long]
    per_step = (len(c_long.events) - len(c_short.events)) / (long - short)
    where = "; ".join(f"{_short_path(k)} x{v}" for k, v in c_long.summary().items())
    debug = None if debug_short is None else (debug_long - debug_short) / (long - short)
    report.add(
        "(c) Host syncs of one client (FedPACTrainer.train_client, ViT-Tiny shape)",
        {
            "algorithm": algorithm,
            "precision": precision,
            f"sync-debug warnings K={short} / K={long}": (
                None if debug is None else f"{debug_short} / {debug_long}"
            ),
            "per step (sync debug)": debug,
            f"counter K={short} / K={long}": f"{len(c_short.events)} / {len(c_long.events)}",
            "per step (counter)": per_step,
            "per client besides steps (counter)": len(c_short.events) - short * per_step,
            f"where (counter, K={long})": where[:600],
        },
    )


def _short_path(location: str) -> str:
    """A location relative to the repository or to site-packages."""
    location = location.replace(str(ROOT) + "/", "")
    return location.split("site-packages/")[-1] if "site-packages/" in location else location


def measure_rounds(report: Report, shapes: Any, device: Any, method: str, precision: str) -> None:
    """(a): seconds per round and client steps per second (second round), or plain Trainer."""
    from gpu_workloads import client_sets, vit_tiny

    from fedpac_hf import FedPACTrainer

    steps = shapes.clients * shapes.local_steps
    sets = client_sets(shapes, per_client=shapes.batch * 20)
    with tempfile.TemporaryDirectory() as tmp:
        if method == "Trainer":
            from torch.utils.data import ConcatDataset
            from transformers import Trainer, TrainingArguments

            targs = TrainingArguments(
                output_dir=tmp,
                max_steps=steps,
                per_device_train_batch_size=shapes.batch,
                learning_rate=1e-3,
                lr_scheduler_type="constant",
                max_grad_norm=10.0,
                optim="adamw_torch",
                bf16=precision == "bf16",
                report_to=[],
                disable_tqdm=True,
                save_strategy="no",
                logging_strategy="no",
                use_cpu=device.type != "cuda",
                seed=0,
            )
            trainer = Trainer(model=vit_tiny(shapes), args=targs, train_dataset=ConcatDataset(sets))
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
            rounds = [seconds]
        else:
            args = fedpac_args(tmp, method, precision, shapes, rounds=2)
            trainer = FedPACTrainer(model=vit_tiny(shapes), args=args, client_datasets=sets)
            trainer.train()
            rounds = [h["round_time"] for h in trainer.round_history]
    report.add(
        f"(a) ViT-Tiny, {shapes.clients} clients x K = {shapes.local_steps}, batch {shapes.batch}",
        {
            "method": method if method == "Trainer" else f"FedPACTrainer {method}",
            "precision": precision,
            "round 1 (s)": rounds[0] if method != "Trainer" else None,
            "round 2 (s)": rounds[-1] if method != "Trainer" else None,
            f"Trainer {steps} steps (s)": rounds[0] if method == "Trainer" else None,
            "client steps / s": steps / rounds[-1],
        },
    )


def measure_steps(report: Report, shapes: Any, device: Any, workload: str, budget: Budget) -> None:
    """(b): every optimizer's step time and peak memory on one workload, in bf16."""
    import torch
    from gpu_workloads import fresh_device_memory, lora_llama, time_steps, vit

    s = shapes
    gen = torch.Generator().manual_seed(0)
    baseline: float | None = None
    for name in STEP_OPTIMIZERS[workload]:
        if budget.expired():
            report.errors.append(f"(b) {workload} {name}: skipped, the time budget ran out")
            continue
        try:
            with fresh_device_memory(device):
                if workload == "vit-b16":
                    model = vit(
                        s.vitb_image,
                        s.vitb_patch,
                        s.vitb_width,
                        s.vitb_depth,
                        s.vitb_heads,
                        1000,
                        device=device,
                    )
                    batch = {
                        "pixel_values": torch.randn(s.vitb_batch, 3, s.vitb_image, s.vitb_image, generator=gen),
                        "labels": torch.randint(0, 1000, (s.vitb_batch,), generator=gen),
                    }  # fmt: skip
                else:
                    model = lora_llama(s, device)
                    ids = torch.randint(
                        0, s.llama_vocab, (s.llama_batch, s.llama_length), generator=gen
                    )
                    batch = {
                        "input_ids": ids,
                        "attention_mask": torch.ones_like(ids),
                        "labels": ids,
                    }
                batch = {k: v.to(device) for k, v in batch.items()}
                timing = time_steps(
                    model, batch, name, "bf16", s.step_warmup, s.step_timed, budget.expired
                )
                del model
        except Exception as error:  # noqa: BLE001
            report.error(f"(b) {workload} {name}", error)
            continue
        if name == "torch-adamw":
            baseline = timing.mean_s
        report.add(
            "(b) Step time and peak memory against torch.optim.AdamW (bf16 autocast)",
            {
                "workload": f"{workload} ({timing.trainable / 1e6:.2f}M trainable)",
                "optimizer": name,
                "mean step (ms)": 1e3 * timing.mean_s,
                "median step (ms)": 1e3 * timing.median_s,
                "x AdamW (mean)": timing.mean_s / baseline if baseline else None,
                "peak memory (MiB)": timing.peak_mib,
                "timed steps": timing.steps,
            },
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="report (default benchmarks/GPU.md)")
    parser.add_argument(
        "--budget", type=float, default=390.0, help="seconds; no measurement starts after them"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, runs on a CPU")
    parser.add_argument(
        "--simulate-missing",
        nargs="*",
        default=[],
        metavar="PACKAGE",
        help="behave as if these packages were not installed (the CPU test of the GPU machine)",
    )
    args = parser.parse_args(argv)
    for package in args.simulate_missing:
        sys.modules[package] = None  # type: ignore[assignment]
    import torch
    from gpu_workloads import GPU, SMOKE

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("no CUDA device: use --smoke to run the tiny shapes on the CPU")
    shapes = SMOKE if args.smoke else GPU
    out = args.out or (Path(tempfile.mkdtemp()) / "GPU_smoke.md" if args.smoke else HERE / "GPU.md")
    budget = Budget(args.budget)
    report = Report(out, environment(args, device))
    report.write()
    print(f"[gpu_check] writing {out}", flush=True)
    plan: list[tuple[str, Callable[[], None]]] = []
    for algorithm in SYNC_ALGORITHMS:
        for precision in ("bf16", "fp16"):
            measure = functools.partial(measure_syncs, report, shapes, device, algorithm, precision)
            plan.append((f"(c) syncs {algorithm} {precision}", measure))
    rounds = {
        precision: [
            (
                f"(a) {method} {precision}",
                functools.partial(measure_rounds, report, shapes, device, method, precision),
            )
            for method in ("Trainer", *ROUND_ALGORITHMS)
        ]
        for precision in ("bf16", "fp32")
    }
    plan += rounds["bf16"]
    for workload in STEP_OPTIMIZERS:
        measure = functools.partial(measure_steps, report, shapes, device, workload, budget)
        plan.append((f"(b) {workload}", measure))
    plan += rounds["fp32"]
    for what, measure in plan:
        guarded(report, budget, what, measure)
    report.header.append(f"Finished in {args.budget - budget.left():.0f} s.")
    report.write()
    print(out.read_text())


if __name__ == "__main__":
    main()
