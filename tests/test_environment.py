"""environment.jsonl: what each start of training ran on, and summary.md's Environment."""

from __future__ import annotations

import importlib.metadata
import json

import torch

from fedpac_hf.rundir.environment import (
    ENVIRONMENT_FILE,
    environment,
    environment_lines,
    read_starts,
    record_start,
)
from fedpac_hf.rundir.reporting import write_summary


def test_the_environment_is_this_processs(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    found = environment()
    assert found["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert found["torch_threads"] == torch.get_num_threads()
    assert found["processes"] == 3
    assert found["packages"]["torch"] == importlib.metadata.version("torch")
    assert found["packages"]["fedpac_hf"] == importlib.metadata.version("fedpac_hf")
    assert found["accelerators"] == [
        torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
    ]
    assert found["cpu"]


def test_a_resume_drops_the_starts_whose_rounds_it_dropped(tmp_path):
    assert read_starts(tmp_path) == []
    for start in (0, 5):
        record_start(tmp_path, start)
    assert [s["start_round"] for s in read_starts(tmp_path)] == [0, 5]
    record_start(tmp_path, 3)  # resumed from an earlier checkpoint: round 5's start is gone
    assert [s["start_round"] for s in read_starts(tmp_path)] == [0, 3]
    record_start(tmp_path, 0)  # started over
    (only,) = read_starts(tmp_path)
    assert only["start_round"] == 0
    lines = (tmp_path / ENVIRONMENT_FILE).read_text().splitlines()
    assert json.loads(lines[0]) == only and not list(tmp_path.glob("*.partial"))


def test_the_summary_shows_the_environment_and_what_a_resume_changed(tmp_path):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        record_start(tmp_path, 0)
        torch.set_num_threads(2)
        record_start(tmp_path, 4)
        torch.set_num_threads(1)
        record_start(tmp_path, 7)
    finally:
        torch.set_num_threads(threads)
    lines = environment_lines(tmp_path)
    assert lines[0] == "## Environment"
    assert "| torch_threads | 1 |" in lines
    assert f"| torch | {torch.__version__} |" in lines
    assert "- resumed after round 4: torch_threads 1 -> 2" in lines
    assert "- resumed after round 7: the same environment" in lines
    summary = write_summary(tmp_path, records=[{"round": 1.0, "eval_accuracy": 0.5}])
    assert "\n".join(lines) in summary.read_text()


def test_a_run_directory_without_the_file_has_no_environment_section(tmp_path):
    summary = write_summary(tmp_path, records=[{"round": 1.0, "eval_accuracy": 0.5}])
    assert "## Environment" not in summary.read_text()
