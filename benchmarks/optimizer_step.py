"""Step time and peak memory of the client optimizers relative to ``torch.optim.AdamW``.

Two workloads, built from configs (no download):

- ``vit``: ``ViTForImageClassification`` (hidden 192, 4 layers, 3 heads, patch 4)
  on 32 px images, batch 32, every parameter trained.
- ``llama-lora``: ``LlamaForCausalLM`` (hidden 256, 2 layers, vocab 2000,
  eager attention), sequences of 128 tokens, batch 8, LoRA r=16 on
  ``q_proj, k_proj, v_proj, o_proj`` via peft (only adapters trained).

Timing: per workload, every optimizer gets its own copy of the model (same
initialisation, same batch); after ``warmup`` steps each, ``steps`` timed steps
of forward + backward + ``optimizer.step()`` + ``zero_grad`` are taken
round-robin, so that load from other processes hits all optimizers alike.
Memory: each (workload, optimizer) runs ``warmup + 10`` steps in its own
subprocess, which reports its peak (CPU: resident set size above the size
after building the model, sampled every millisecond).

Sophia refreshes its Hessian estimate when due (every 10 steps: one extra
forward/backward on self-sampled labels) and SOAP refreshes its eigenbases
every 10 steps; ``steps`` is a multiple of 10 so the mean step time amortises
both. ``soap-256`` is SOAP with ``max_precond_dim=256`` (sides longer than 256
are not rotated). Reported: mean and median step time, their
ratio to ``torch.optim.AdamW``, peak memory and the optimizer-state size.

Run: ``python benchmarks/optimizer_step.py`` (``--threads`` sets torch's CPU
threads, default 1).

``--soap-breakdown`` instead splits SOAP's step on the ViT workload into its
parts (rotations + Adam, statistics, refresh, ...), timed in place on the real
code path while SOAP and ``torch.optim.AdamW`` steps alternate, and prints each
part's milliseconds per step (refreshes amortised) next to the floating-point
work it needs, counted from the shapes. ``--muon-ns`` times Muon's
Newton-Schulz iteration on the ViT's matrices in float32 and in bfloat16
(``--steps`` repeats each) and counts its work.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

OPTIMIZERS = ["torch-adamw", "adamw", "sgd", "soap", "soap-256", "muon", "sophia"]
WORKLOADS = ["vit", "llama-lora"]
LEARNING_RATE = {"sgd": 1e-2, "sophia": 1e-4, "muon": 1e-3, "soap": 1e-4}


def build(workload: str, device: torch.device) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Return the model and one fixed batch (with labels) for a workload."""
    gen = torch.Generator().manual_seed(0)
    if workload == "vit":
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(
            image_size=32,
            patch_size=4,
            hidden_size=192,
            num_hidden_layers=4,
            num_attention_heads=3,
            intermediate_size=768,
            num_labels=10,
        )
        torch.manual_seed(0)
        model = ViTForImageClassification(config)
        batch = {
            "pixel_values": torch.randn(32, 3, 32, 32, generator=gen),
            "labels": torch.randint(0, 10, (32,), generator=gen),
        }
    elif workload == "llama-lora":
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=2000,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
            attn_implementation="eager",
        )
        torch.manual_seed(0)
        base = LlamaForCausalLM(config)
        lora = LoraConfig(
            r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        )
        model = get_peft_model(base, lora)
        ids = torch.randint(0, 2000, (8, 128), generator=gen)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    else:
        raise ValueError(f"unknown workload {workload!r}; valid: {WORKLOADS}")
    model.to(device).train()
    return model, {k: v.to(device) for k, v in batch.items()}


def make_optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` for the baseline, ``create_optimizer`` for the rest."""
    from fedpac_hf.optim import create_optimizer

    lr = LEARNING_RATE.get(name, 1e-4)
    if name == "torch-adamw":
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    if name == "soap-256":  # one-sided on sides > 256 (the communication lever of FEDPAC.md)
        return create_optimizer("soap", model, lr=lr, weight_decay=0.01, max_precond_dim=256)
    return create_optimizer(name, model, lr=lr, weight_decay=0.01)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by tensors in the optimizer state."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


class _Runner:
    """One model copy with its optimizer, stepping on a fixed batch."""

    def __init__(self, workload: str, name: str, device: torch.device) -> None:
        self.name = name
        self.device = device
        self.model, self.batch = build(workload, device)
        self.optimizer = make_optimizer(name, self.model)
        self.inputs = {k: v for k, v in self.batch.items() if k != "labels"}
        self.generator = torch.Generator(device=device).manual_seed(0)
        self.times: list[float] = []

    def step(self) -> None:
        """Forward + backward + step (+ the Sophia refresh when due) + zero_grad."""
        from fedpac_hf.optim import hessian_refresh_due, sophia_refresh

        if hessian_refresh_due(self.optimizer):
            sophia_refresh(
                self.optimizer,
                lambda: self.model(**self.inputs).logits,
                attention_mask=self.batch.get("attention_mask"),
                generator=self.generator,
            )
        self.model(**self.batch).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed_step(self) -> None:
        """``step`` with wall-clock timing (synchronised on CUDA)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - start)


def time_workload(
    workload: str, names: list[str], warmup: int, steps: int
) -> dict[str, dict[str, float]]:
    """Time every optimizer on one workload, interleaving their steps round-robin so
    that load from other processes on the machine hits all of them alike."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runners = [_Runner(workload, name, device) for name in names]
    for _ in range(warmup):
        for runner in runners:
            runner.step()
    for r in range(steps):
        order = runners[r % len(runners) :] + runners[: r % len(runners)]
        for runner in order:
            runner.timed_step()
    return {
        runner.name: {
            "mean_s": statistics.fmean(runner.times),
            "median_s": statistics.median(runner.times),
            "state_mib": state_bytes(runner.optimizer) / 2**20,
            "trainable": sum(p.numel() for p in runner.model.parameters() if p.requires_grad),
        }
        for runner in runners
    }


def _rss_mib() -> float:
    """Current resident set size of this process (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_memory(workload: str, name: str, warmup: int) -> dict[str, Any]:
    """Peak training memory of ``warmup + 10`` steps of one optimizer, in its own process.

    CUDA: ``max_memory_allocated``. CPU: the peak resident set size sampled every
    millisecond during the steps, minus the size after building the model (so it
    counts activations, gradients, optimizer state and temporaries).
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runner = _Runner(workload, name, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup + 10):
            runner.step()
        return {"peak_mib": torch.cuda.max_memory_allocated() / 2**20, "device": "cuda"}
    base = _rss_mib()
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_mib())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(warmup + 10):
        runner.step()
    done.set()
    sampler.join()
    return {"peak_mib": max(peak, _rss_mib()) - base, "device": "cpu"}


def soap_flops(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Floating-point work of SOAP's parts per step, counted from the shapes.

    Rotating (or contracting for a statistic) side ``i`` of length ``d`` of a
    tensor with ``N`` elements is a product of ``2 d N`` flops: per step two
    rotations in and two out (``rotate``) and one statistic per rotated side
    (``statistics``, counted as the full product ``G G^T``; for sides of 512 or
    more SOAP computes two thirds of it). Per refresh (every
    ``precondition_frequency`` steps): ``2 d^3`` for the power step ``GG Q``,
    about ``(8/3) d^3`` for a Householder QR with the explicit ``Q``, and two
    rotations of the first moment (``carry``).
    """
    from fedpac_hf.optim._soap_state import preconditioner_layout

    work: dict[str, float] = defaultdict(float)
    for group in optimizer.param_groups:
        freq = group["precondition_frequency"]
        for p in group["params"]:
            view, rotated = preconditioner_layout(
                p.shape, group["max_precond_dim"], group["merge_dims"], group["precondition_1d"]
            )
            n = math.prod(view)
            for d, on in zip(view, rotated, strict=True):
                if on:
                    work["rotate"] += 2 * 2 * d * n
                    work["statistics"] += 2 * d * n
                    work["refresh"] += (2 * d**3 + 8 / 3 * d**3) / freq
                    work["carry"] += 2 * 2 * d * n / freq
    return dict(work)


def soap_breakdown(warmup: int, steps: int) -> None:
    """Print SOAP's step on the ViT workload split into its parts (ms per step).

    The parts are timed by wrapping SOAP's own methods and kernels (the same
    code path, about a microsecond per call added); SOAP steps alternate with
    ``torch.optim.AdamW`` steps on a copy of the model, as in the main table.
    """
    from fedpac_hf.optim import soap as soap_module

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    spent: dict[str, float] = defaultdict(float)

    def timed(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                spent[label] += time.perf_counter() - start

        return wrapper

    cls = soap_module.SOAP
    patches = {
        (cls, "_check_gradients"): "gradient checks",
        (cls, "_adam_in_eigenbasis"): "rotations + Adam (rotated parameters)",
        (cls, "_accumulate"): "statistics GG^T",
        (cls, "_refresh"): "refresh",
        (soap_module, "refresh_bases_"): "refresh: power step + QR + sort",
        (soap_module, "foreach_adam_step_"): "Adam, parameters not rotated (foreach)",
    }
    originals = {key: inspect.getattr_static(*key) for key in patches}
    for (owner, name), label in patches.items():
        raw = originals[owner, name]
        if isinstance(raw, staticmethod):
            setattr(owner, name, staticmethod(timed(label, raw.__func__)))
        else:
            setattr(owner, name, timed(label, raw))
    try:
        soap = _Runner("vit", "soap", device)
        adamw = _Runner("vit", "torch-adamw", device)
        for _ in range(warmup):
            soap.step()
            adamw.step()
        spent.clear()
        totals: dict[str, float] = defaultdict(float)
        for r in range(steps):
            for runner in (soap, adamw) if r % 2 == 0 else (adamw, soap):
                sync()
                start = time.perf_counter()
                runner.model(**runner.batch).loss.backward()
                sync()
                middle = time.perf_counter()
                runner.optimizer.step()
                sync()
                totals[f"{runner.name} fwd+bwd"] += middle - start
                totals[f"{runner.name} step"] += time.perf_counter() - middle
                runner.optimizer.zero_grad(set_to_none=True)
    finally:
        for (owner, name), fn in originals.items():
            setattr(owner, name, fn)

    ms = defaultdict(float, {k: v / steps * 1e3 for k, v in {**spent, **totals}.items()})
    if steps + warmup < 10:  # SOAP's default precondition_frequency
        print(f"note: {steps + warmup} steps in all, so no eigenbasis refresh was timed")
    flops = soap_flops(soap.optimizer)
    with FlopCounterMode(display=False) as counter:
        adamw.model(**adamw.batch).loss.backward()
    adamw.optimizer.zero_grad(set_to_none=True)
    forward_backward_flops = counter.get_total_flops()
    refresh_qr = ms["refresh: power step + QR + sort"]
    rows = [
        (
            "rotations + Adam (rotated parameters)",
            ms["rotations + Adam (rotated parameters)"],
            flops["rotate"],
        ),
        ("statistics GG^T", ms["statistics GG^T"], flops["statistics"]),
        ("refresh: power step + QR + sort (amortised)", refresh_qr, flops["refresh"]),
        ("refresh: carry first moment (amortised)", ms["refresh"] - refresh_qr, flops["carry"]),
        (
            "Adam, parameters not rotated (foreach)",
            ms["Adam, parameters not rotated (foreach)"],
            None,
        ),
        ("gradient checks", ms["gradient checks"], None),
    ]
    rest = ms["soap step"] - sum(r[1] for r in rows)
    rows.append(("rest (weight decay, loop, casts)", rest, None))
    print(
        f"device: {device.type}, torch threads: {torch.get_num_threads()}, warm-up {warmup} steps, "
        f"{steps} steps of SOAP and torch.optim.AdamW alternating; ViT workload; "
        "ms per step, refreshes amortised\n"
    )
    print("| part of SOAP's step | ms / step | GFLOP / step | GFLOP/s |")
    print("|---|---:|---:|---:|")
    for label, t, f in rows:
        rate = f"{f / 1e9 / (t / 1e3):.0f}" if f and t else ""
        work = f"{f / 1e9:.2f}" if f else ""
        print(f"| {label} | {t:.1f} | {work} | {rate} |")
    print(f"| **SOAP step (mean)** | **{ms['soap step']:.1f}** | | |")
    print(f"| torch.optim.AdamW step (mean) | {ms['torch-adamw step']:.1f} | | |")
    print(
        f"| forward + backward (mean; SOAP's model / AdamW's model) "
        f"| {ms['soap fwd+bwd']:.1f} / {ms['torch-adamw fwd+bwd']:.1f} | | |"
    )
    ratio = (ms["soap fwd+bwd"] + ms["soap step"]) / (
        ms["torch-adamw fwd+bwd"] + ms["torch-adamw step"]
    )
    print(f"\nSOAP / AdamW, forward + backward + step (mean): {ratio:.2f}")
    soap_total = sum(flops.values())
    print(
        f"forward + backward: {forward_backward_flops / 1e9:.2f} GFLOP (torch FlopCounterMode); "
        f"SOAP's products: {soap_total / 1e9:.2f} GFLOP per step "
        f"({soap_total / forward_backward_flops:.2f} x forward + backward)"
    )


def muon_newton_schulz(repeats: int) -> None:
    """Print the work of Muon's Newton-Schulz iteration on the ViT workload and the
    time of one iteration per matrix shape, in float32 and in bfloat16."""
    from fedpac_hf.optim.muon import newton_schulz

    runner = _Runner("vit", "muon", torch.device("cpu"))
    shapes: dict[tuple[int, int], int] = defaultdict(int)
    for group in runner.optimizer.param_groups:
        if group["use_muon"]:
            for param in group["params"]:
                shapes[tuple(param.shape)] += 1
    group = next(g for g in runner.optimizer.param_groups if g["use_muon"])
    steps, coefficients = group["ns_steps"], group["ns_coefficients"]
    with FlopCounterMode(display=False) as counter:
        runner.model(**runner.batch).loss.backward()
    print(
        f"ViT workload, {steps} Newton-Schulz steps per matrix and optimizer step; ms: one "
        "call for one matrix (the last row: all of them, one optimizer step)\n"
    )
    print("| matrix | count | GFLOP per step | float32 (ms) | bfloat16 (ms) |")
    print("|---|---:|---:|---:|---:|")
    total = {"flop": 0.0, torch.float32: 0.0, torch.bfloat16: 0.0}
    gen = torch.Generator().manual_seed(0)
    for (rows, cols), count in sorted(shapes.items()):
        short, long = min(rows, cols), max(rows, cols)
        flop = count * steps * (4 * short * short * long + 2 * short**3)
        update = torch.randn(rows, cols, generator=gen)
        ms = {}
        for dtype in (torch.float32, torch.bfloat16):
            newton_schulz(update, coefficients, steps, 1e-7, dtype)  # warm-up
            start = time.perf_counter()
            for _ in range(repeats):
                newton_schulz(update, coefficients, steps, 1e-7, dtype)
            ms[dtype] = (time.perf_counter() - start) / repeats * 1e3
            total[dtype] += count * ms[dtype]
        total["flop"] += flop
        print(
            f"| {rows} x {cols} | {count} | {flop / 1e9:.2f} "
            f"| {ms[torch.float32]:.1f} | {ms[torch.bfloat16]:.1f} |"
        )
    print(
        f"| **all** | {sum(shapes.values())} | {total['flop'] / 1e9:.2f} "
        f"| {total[torch.float32]:.1f} | {total[torch.bfloat16]:.1f} |\n"
    )
    print(
        f"forward + backward: {counter.get_total_flops() / 1e9:.2f} GFLOP; Newton-Schulz: "
        f"{total['flop'] / counter.get_total_flops():.2f} x forward + backward"
    )


def main() -> None:
    """Time all optimizers per workload, measure peak memory in subprocesses, print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=WORKLOADS, choices=WORKLOADS)
    parser.add_argument("--optimizers", nargs="+", default=OPTIMIZERS, choices=OPTIMIZERS)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (use a multiple of 10)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--soap-breakdown",
        action="store_true",
        help="split SOAP's step on the ViT workload into its parts instead of the table",
    )
    parser.add_argument(
        "--muon-ns",
        action="store_true",
        help="time Muon's Newton-Schulz iteration per matrix shape, float32 vs bfloat16",
    )
    parser.add_argument(
        "--memory-worker", nargs=2, metavar=("WORKLOAD", "OPTIMIZER"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.soap_breakdown:
        soap_breakdown(args.warmup, args.steps)
        return
    if args.muon_ns:
        muon_newton_schulz(max(args.steps, 1))
        return
    if args.memory_worker:
        print(json.dumps(peak_memory(*args.memory_worker, args.warmup)))
        return
    names = ["torch-adamw"] + [n for n in args.optimizers if n != "torch-adamw"]

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for workload in args.workloads:
        rows[workload] = time_workload(workload, names, args.warmup, args.steps)
        for name in names:
            cmd = [sys.executable, __file__, "--memory-worker", workload, name]
            cmd += ["--warmup", str(args.warmup), "--threads", str(args.threads)]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            rows[workload][name].update(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"# done {workload}", file=sys.stderr)

    device = next(iter(next(iter(rows.values())).values()))["device"]
    print(
        f"device: {device}, torch threads: {args.threads}, warm-up {args.warmup} steps, "
        f"{args.steps} timed steps per optimizer, interleaved round-robin\n"
    )
    print(
        "| workload | optimizer | mean step (ms) | x AdamW (mean) | median step (ms) "
        "| x AdamW (median) | peak mem (MiB) | x AdamW (mem) | optimizer state (MiB) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for workload, table in rows.items():
        base = table["torch-adamw"]
        for name, r in table.items():
            print(
                f"| {workload} ({r['trainable'] / 1e6:.2f}M trainable) | {name} "
                f"| {r['mean_s'] * 1e3:.1f} | {r['mean_s'] / base['mean_s']:.2f} "
                f"| {r['median_s'] * 1e3:.1f} | {r['median_s'] / base['median_s']:.2f} "
                f"| {r['peak_mib']:.0f} | {r['peak_mib'] / base['peak_mib']:.2f} "
                f"| {r['state_mib']:.2f} |"
            )


if __name__ == "__main__":
    main()
