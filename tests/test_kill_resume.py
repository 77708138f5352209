"""A `fedpac-hf train` run killed with SIGKILL mid-round resumes to the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from fedpac_hf.cli import main
from fedpac_hf.rundir.checkpoint import latest_checkpoint

from .test_cli_train import TINY_VIT

ROOT = Path(__file__).resolve().parent.parent
NUM_ROUNDS = 6


def write_config(path: Path, output_dir: Path) -> Path:
    settings = {
        **TINY_VIT,
        "num_rounds": NUM_ROUNDS,
        "local_steps": 12,
        "save_strategy": "steps",
        "save_steps": 1,
        "output_dir": str(output_dir),
    }
    path.write_text(yaml.safe_dump(settings))
    return path


def test_a_run_killed_mid_round_resumes_to_the_uninterrupted_parameters(tmp_path):
    killed_dir, full_dir = tmp_path / "killed", tmp_path / "full"
    config = write_config(tmp_path / "killed.yaml", killed_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "fedpac_hf.cli", "train", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not (killed_dir / "checkpoint-round-2").is_dir():
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint-round-2 after 120 s"
            time.sleep(0.005)
        time.sleep(0.05)  # into round 3 (or 4)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    last = latest_checkpoint(killed_dir)
    assert last is not None and 2 <= int(last.name.rsplit("-", 1)[1]) < NUM_ROUNDS
    assert not (killed_dir / "model.safetensors").exists()  # it did not finish

    # the same command, resumed from the latest complete checkpoint
    assert main(["train", str(config), "--resume_from_checkpoint", "true"]) == 0
    write_config(tmp_path / "full.yaml", full_dir)
    assert main(["train", str(tmp_path / "full.yaml")]) == 0

    resumed, full = (
        load_file(killed_dir / "model.safetensors"),
        load_file(full_dir / "model.safetensors"),
    )
    assert set(resumed) == set(full)
    for name in full:
        assert torch.equal(resumed[name], full[name]), name
    rounds = [line for line in (killed_dir / "metrics.jsonl").read_text().splitlines() if line]
    assert len(rounds) == NUM_ROUNDS  # the rows of the lost round were not kept twice
    # two starts, the second after the checkpoint it resumed from, both in the summary
    starts = [
        json.loads(line) for line in (killed_dir / "environment.jsonl").read_text().splitlines()
    ]
    done = int(last.name.rsplit("-", 1)[1])
    assert [s["start_round"] for s in starts] == [0, done]
    assert f"- resumed after round {done}: " in (killed_dir / "summary.md").read_text()
