"""``benchmarks/gpu_check.py --smoke``: the GPU check's code path on tiny shapes, on the CPU.

It runs as the GPU machine would run it: from the working tree, without
``datasets``, ``evaluate``, ``mlxtend`` or ``pyarrow`` (the script makes them
unimportable), offline. Its host-sync table must show what ``client_update`` promises through
the whole ``FedPACTrainer`` path: nothing per step without a gradient scaler,
one per step with one (fp16).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_without_datasets_and_reports_every_section(tmp_path):
    out = tmp_path / "GPU.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/gpu_check.py",
            "--smoke",
            "--simulate-missing",
            "datasets",
            "evaluate",
            "mlxtend",
            "pyarrow",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["errors"] == [], report["errors"]
    sections = {title[:3]: rows for title, rows in report["sections"].items()}
    assert set(sections) == {"(a)", "(b)", "(c)"}
    assert len(sections["(a)"]) == 8  # Trainer + 3 algorithms, bf16 and fp32
    assert {r["optimizer"] for r in sections["(b)"]} >= {"torch-adamw", "soap", "muon", "sophia"}
    syncs = {(r["algorithm"], r["precision"]): r["per step (counter)"] for r in sections["(c)"]}
    for algorithm in ("fedpac_soap", "fedpac_sophia"):
        assert syncs[(algorithm, "bf16")] == 0.0
        assert syncs[(algorithm, "fp16")] == 1.0  # the GradScaler's decision
    text = out.read_text()
    assert text.startswith("# GPU check (smoke run on tiny shapes)") and "Device:" in text
