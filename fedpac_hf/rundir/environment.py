"""What a run ran on: ``environment.jsonl``, one line per start of training.

The same settings can print different numbers on another machine: torch picks
its CPU float kernels by the processor (AVX2 or AVX-512), the number of threads
changes the order of sums, and package versions change defaults. So every start
of training that writes a run directory (``fedpac-hf train``, the Flower
ServerApp) appends what it ran on, and ``summary.md`` shows it: a user can tell
a change of machine from a change of code.

A resumed run appends its own line; lines of starts at or after the round it
resumes from are dropped first, as ``metrics.jsonl`` drops the rounds after the
checkpoint, so the file describes the starts that made the rounds it keeps.
The environment is not part of the run's identity: a run may resume on
another machine, and the file then says so.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any

__all__ = [
    "ENVIRONMENT_FILE",
    "PACKAGES",
    "environment",
    "environment_lines",
    "read_starts",
    "record_start",
]

ENVIRONMENT_FILE = "environment.jsonl"
#: The distributions whose versions a start records (those installed).
PACKAGES = (
    "fedpac_hf",
    "torch",
    "transformers",
    "accelerate",
    "peft",
    "datasets",
    "flwr",
    "opacus",
    "dp-accounting",
    "numpy",
)
#: What a start records besides its round and time, in the order summary.md shows it.
_SHOWN = (
    "cpu",
    "cpu_count",
    "torch_cpu_capability",
    "torch_threads",
    "accelerators",
    "processes",
    "python",
    "platform",
)


def environment() -> dict[str, Any]:
    """What this process runs on: CPU, torch's CPU kernels and threads, accelerators,
    processes, Python, the platform and :data:`PACKAGES`' versions."""
    import torch

    devices = []
    if torch.cuda.is_available():
        devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "accelerators": devices,
        "processes": int(os.environ.get("WORLD_SIZE", "1")),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
    }


def _cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux, else the platform's)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_starts(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The starts recorded in ``run_dir`` (none without the file)."""
    path = Path(run_dir) / ENVIRONMENT_FILE
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def record_start(run_dir: str | os.PathLike[str], start_round: int) -> dict[str, Any]:
    """Append this start (the rounds done before it, the time, :func:`environment`) to
    ``run_dir``'s :data:`ENVIRONMENT_FILE`, after dropping the starts at or after
    ``start_round`` (their rounds were dropped with the resume). Returns the line."""
    kept = [s for s in read_starts(run_dir) if int(s.get("start_round", 0)) < start_round]
    line = {
        "start_round": int(start_round),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **environment(),
    }
    path = Path(run_dir) / ENVIRONMENT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(start) + "\n" for start in [*kept, line])
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
    return line


def environment_lines(run_dir: str | os.PathLike[str]) -> list[str]:
    """summary.md's ``Environment`` section (none without a recorded start): the first
    start's environment, then each later start's round and what it changed."""
    starts = read_starts(run_dir)
    if not starts:
        return []
    first = starts[0]
    lines = ["## Environment", "", "| | value |", "| --- | --- |"]
    lines += [f"| {key} | {_shown(first.get(key))} |" for key in _SHOWN if key in first]
    packages = first.get("packages", {})
    lines += [f"| {name} | {version} |" for name, version in packages.items()]
    lines.append("")
    for start in starts[1:]:
        changed = [
            f"{key} {_shown(first.get(key))} -> {_shown(start.get(key))}"
            for key in _SHOWN
            if start.get(key) != first.get(key)
        ]
        changed += [
            f"{name} {packages.get(name, '-')} -> {version}"
            for name, version in start.get("packages", {}).items()
            if packages.get(name) != version
        ]
        what = "; ".join(changed) if changed else "the same environment"
        lines.append(f"- resumed after round {start.get('start_round')}: {what}")
    if len(starts) > 1:
        lines.append("")
    return lines


def _shown(value: Any) -> str:
    """A recorded value as summary.md shows it (a list joined, none as ``-``)."""
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return "-" if value is None else str(value)
