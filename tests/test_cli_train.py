"""`fedpac-hf train` and `fedpac-hf report`: YAML + overrides, errors, run directory."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
import sys

import pytest
import yaml

from fedpac_hf import FedPACArguments
from fedpac_hf.cli import main
from fedpac_hf.run import ModelDataArguments, parse_run_config

TINY_VIT = {
    "task": "image_classification",
    "dataset": "mnist5k",
    "max_train_examples": 400,
    "max_eval_examples": 100,
    "patch_size": 7,
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "algorithm": "fedpac_soap",
    "num_clients": 4,
    "clients_per_round": 2,
    "partitioner": "dirichlet",
    "dirichlet_alpha": 0.5,
    "num_rounds": 3,
    "local_steps": 2,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 100,
    "learning_rate": "1e-3",  # YAML 1.1 reads this as a string: must still become a float
    "report_to": "none",
    "disable_tqdm": True,
    "num_threads": 1,
}


def write_yaml(path, settings) -> str:
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def test_yaml_values_are_typed_and_overrides_win(tmp_path):
    config = write_yaml(tmp_path / "c.yaml", {**TINY_VIT, "output_dir": str(tmp_path / "r")})
    model_args, args = parse_run_config(config, ["--num_rounds", "7", "--lora_r", "4"])
    assert isinstance(model_args, ModelDataArguments)
    assert args.learning_rate == pytest.approx(1e-3) and isinstance(args.learning_rate, float)
    assert args.num_rounds == 7  # override
    assert args.local_steps == 2  # from YAML
    assert model_args.lora_r == 4 and model_args.hidden_size == 32
    assert args.build_algorithm().name == "fedpac_soap"


@pytest.mark.parametrize(
    ("settings", "overrides", "expected"),
    [
        ({"learning_rat": 0.1}, [], "'learning_rat' in .*c.yaml; did you mean 'learning_rate'"),
        ({"num_round": 3}, [], "did you mean 'num_rounds'"),
        ({}, ["--locl_steps", "3"], "'locl_steps' in the command-line options; did you mean"),
        ({"task": "image_clasification"}, [], "did you mean 'image_classification'"),
    ],
)
def test_unknown_settings_name_the_closest_field(tmp_path, settings, overrides, expected):
    config = write_yaml(tmp_path / "c.yaml", settings)
    with pytest.raises(ValueError, match=expected):
        parse_run_config(config, overrides)


def test_cli_reports_a_bad_key_in_one_line_with_status_2(tmp_path, capsys):
    config = write_yaml(tmp_path / "c.yaml", {"dirichlet_alpa": 0.1})
    with pytest.raises(SystemExit) as exit_info:
        main(["train", config])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "did you mean 'dirichlet_alpha'" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(tmp_path / "missing.yaml")])
    assert exit_info.value.code == 2


def test_train_writes_the_run_directory_and_report_redraws_it(tmp_path, capsys):
    from transformers import ViTForImageClassification

    run_dir = tmp_path / "run"
    config = write_yaml(tmp_path / "c.yaml", TINY_VIT)
    notices: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = notices.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        assert main(["train", config, "--num_rounds", "2", "--output_dir", str(run_dir)]) == 0
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    out = capsys.readouterr().out
    # one readable final line: the quality metric, the other scores in brackets, no timings
    (final,) = [line for line in out.splitlines() if line.startswith("final ")]
    assert re.fullmatch(r"final accuracy after 2 rounds: \d\.\d{4} \(loss \d+\.\d{4}\)", final)
    # no notice the user cannot act on (the image processor's missing-torchvision fallback)
    assert not [r.getMessage() for r in notices if "torchvision" in r.getMessage()]

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1.0, 2.0]  # the override won
    last = json.loads(lines[-1])
    for key in ("train_loss", "eval_accuracy", "drift_relative", "bytes_up", "bytes_down"):
        assert key in last
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 3
    for name in ("accuracy.png", "loss.png", "drift.png", "bytes.png", "partition.png"):
        assert (run_dir / name).stat().st_size > 5000, name
    summary = (run_dir / "summary.md").read_text()
    assert f"final eval_accuracy: {last['eval_accuracy']:.4f} (round 2)" in summary
    assert "DirichletPartitioner" in summary  # the partition statistics
    # what it ran on: one start, before round 1, at the config's num_threads
    (start,) = map(json.loads, (run_dir / "environment.jsonl").read_text().splitlines())
    assert start["start_round"] == 0 and start["torch_threads"] == 1
    assert f"| torch | {start['packages']['torch']} |" in summary

    model = ViTForImageClassification.from_pretrained(run_dir)
    assert model.config.num_labels == 10 and model.config.hidden_size == 32
    # config.yaml reruns the same run
    model_args, args = parse_run_config(run_dir / "config.yaml")
    assert args.num_rounds == 2 and args.learning_rate == pytest.approx(1e-3)
    assert model_args.hidden_size == 32 and args.output_dir == str(run_dir)

    for name in ("accuracy.png", "summary.md"):
        (run_dir / name).unlink()
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "accuracy.png").stat().st_size > 5000
    assert "final eval_accuracy" in (run_dir / "summary.md").read_text()
    assert "## Environment" in (run_dir / "summary.md").read_text()
    assert "final eval_accuracy" in capsys.readouterr().out


def test_the_final_line_counts_one_round_in_the_singular(tmp_path, capsys):
    from fedpac_hf.run.rundir import print_final

    print_final({"round": 1.0, "eval_accuracy": 0.5, "eval_loss": 1.25}, tmp_path)
    print_final({"round": 3.0, "eval_loss": 1.25}, tmp_path)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "final accuracy after 1 round: 0.5000 (loss 1.2500)"
    assert lines[2] == "final loss after 3 rounds: 1.2500"


def test_report_on_a_folder_without_a_run_fails_cleanly(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "metrics.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("budget", ["1.0", "0.25"])
def test_the_cli_sends_the_theta_the_budget_allows(tmp_path, capsys, budget):
    """`fedpac-hf train` sizes Theta with the function every entry point uses."""
    from fedpac_hf.federated.theta_budget import soap_theta_floats, theta_options
    from fedpac_hf.run import build_task, parse_run_config

    settings = {**TINY_VIT, "lora_r": 4, "num_rounds": 1, "theta_budget": budget}
    config = write_yaml(tmp_path / "c.yaml", settings)
    run_dir = tmp_path / "run"
    assert main(["train", config, "--output_dir", str(run_dir)]) == 0
    (row,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    model_args, args = parse_run_config(config, ["--output_dir", str(tmp_path / "again")])
    model = build_task(model_args, args).model
    options = theta_options(model, "soap", "auto", float(budget))
    shapes = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
    floats = soap_theta_floats(shapes, options)
    assert row["bytes_up_theta"] == 4 * floats * row["num_clients"]  # float32, every client
    assert row["bytes_up_theta"] <= float(budget) * row["bytes_up_delta"]


def refused(tmp_path, capsys, settings) -> str:
    """Run ``fedpac-hf train`` with ``settings``: the one-line error (exit 2, nothing written)."""
    out = tmp_path / "run"
    config = write_yaml(tmp_path / "c.yaml", {**TINY_VIT, **settings, "output_dir": str(out)})
    with pytest.raises(SystemExit) as exit_info:
        main(["train", config])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert not out.exists()
    return err


def test_any_setup_failure_is_one_line_with_status_2_and_writes_nothing(tmp_path, capsys):
    # not one of our checks: the Trainer's RuntimeError for a missing integration
    err = refused(tmp_path, capsys, {"report_to": "wandb"})
    assert "building the model, the data and the trainer" in err and "pip install wandb" in err


# model and LoRA settings handed to transformers / PEFT: (settings, the words of the refusal)
MODEL_MISTAKES = [
    ({"num_attention_heads": 0}, "num_attention_heads must be a whole number >= 1, got 0"),
    ({"hidden_size": 30, "num_attention_heads": 4}, "hidden_size=30 must be a multiple of"),
    (
        {
            "task": "causal_lm",
            "dataset": "shakespeare",
            "hidden_size": 30,
            "num_attention_heads": 2,
        },
        "must be even",
    ),
    ({"image_size": 4}, "patch_size=7 is larger than image_size=4"),
    ({"patch_size": 40}, "patch_size=40 is larger than the 28-pixel images"),
    ({"lora_r": 4, "lora_dropout": 1.0}, "lora_dropout must be a number in [0, 1), got 1.0"),
    ({"lora_r": 4, "lora_alpha": -8}, "lora_alpha must be a number > 0"),
    ({"lora_r": 5000}, "lora_r=5000 is larger than the narrowest layer it adapts"),
]


@pytest.mark.parametrize(("settings", "words"), MODEL_MISTAKES)
def test_model_and_lora_settings_are_checked_against_their_table(tmp_path, capsys, settings, words):
    assert words in refused(tmp_path, capsys, settings)
    if "lora_r=5000" not in words and "28-pixel" not in words:  # known before building
        with pytest.raises(ValueError, match=re.escape(words)):
            ModelDataArguments(
                **{
                    k: v
                    for k, v in {**TINY_VIT, **settings}.items()
                    if k in {f.name for f in dataclasses.fields(ModelDataArguments)}
                }
            )


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_file_no_run_wrote_is_never_replaced(tmp_path, capsys, overwrite):
    out = tmp_path / "run"
    out.mkdir()
    mine = {
        "config.yaml": "my own notes\n",
        "README.md": "# my project\n",
        "environment.jsonl": "{}\n",
        "notes.txt": "x",
    }
    for name, text in mine.items():
        (out / name).write_text(text)
    config = write_yaml(tmp_path / "c.yaml", {**TINY_VIT, "output_dir": str(out)})
    argv = ["train", config] + (["--overwrite_output_dir", "true"] if overwrite else [])
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    # one line, besides the package's log (preflight ran before the directory was claimed)
    (err,) = [line for line in lines if not line.startswith("[fedpac_hf.")]
    assert "README.md, config.yaml, environment.jsonl" in err, err
    assert "notes.txt" not in err  # a name no run writes is no collision
    assert {p.name: p.read_text() for p in out.iterdir()} == mine  # untouched, no lock left


def test_a_previous_runs_own_files_are_still_replaced_on_request(tmp_path, capsys):
    out = tmp_path / "run"
    settings = {**TINY_VIT, "num_rounds": 1, "output_dir": str(out)}
    main(["train", write_yaml(tmp_path / "c.yaml", settings)])
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()
    # its own files: replaced on request, as before
    main(["train", str(tmp_path / "c.yaml"), "--overwrite_output_dir", "true"])
    assert "final accuracy after 1 round" in capsys.readouterr().out


# Trainer settings the Trainer would take or read another way: (settings, words)
TRAINER_MISTAKES = [
    ({"per_device_eval_batch_size": 0}, "per_device_eval_batch_size must be a whole number >= 1"),
    ({"eval_strategy": "steps", "eval_steps": 0}, "eval_steps must be a fraction in (0, 1)"),
    ({"save_strategy": "steps", "save_steps": -1}, "save_steps must be a fraction in (0, 1)"),
    ({"seed": -1}, "seed must be a whole number >= 0, got -1"),
    ({"dataloader_num_workers": -1}, "dataloader_num_workers must be a whole number >= 0"),
    ({"save_total_limit": -3}, "save_total_limit must be a whole number >= 1 or null"),
    (
        {"lr_scheduler_type": "cosine_with_restarts", "lr_scheduler_kwargs": {"num_cycles": -1}},
        "lr_scheduler_kwargs['num_cycles'] of 'cosine_with_restarts' must be a whole number >= 1",
    ),
]


@pytest.mark.parametrize(("settings", "words"), TRAINER_MISTAKES)
def test_trainer_settings_are_checked_against_the_rules(tmp_path, capsys, settings, words):
    assert words in refused(tmp_path, capsys, settings)


def test_lists_and_capitals_are_read_the_way_a_user_writes_them(tmp_path):
    settings = {
        **TINY_VIT,
        "lora_r": 2,
        "lora_target_modules": ["q_proj", "v_proj"],  # a YAML list, not comma text
        "algorithm": "FEDPAC_SOAP",
        "partitioner": "Dirichlet",
        "output_dir": str(tmp_path / "r"),
    }
    model_args, args = parse_run_config(write_yaml(tmp_path / "c.yaml", settings), [])
    assert model_args.lora_targets() == ["q_proj", "v_proj"]
    assert args.build_algorithm().name == "fedpac_soap" and args.partitioner == "dirichlet"


@pytest.mark.parametrize("log_level", [None, "warning"])
def test_train_shows_the_packages_log_at_the_runs_log_level(tmp_path, capsys, log_level):
    """`fedpac-hf train` prints the package's log lines: INFO by default (log_level passive),
    only warnings with --log_level warning."""
    noisy = {"dp_mode": "client", "dp_clip_norm": 1.0, "dp_theta_clip_norm": 1.0}
    settings = {**TINY_VIT, "num_rounds": 1, **noisy, "dp_noise_multiplier": 1.0}
    argv = ["train", write_yaml(tmp_path / "c.yaml", settings), "--output_dir", str(tmp_path / "r")]
    assert main(argv + (["--log_level", log_level] if log_level else [])) == 0
    err = capsys.readouterr().err
    # the noise here is tens of clip norms: a warning whatever the level
    assert "[fedpac_hf.federated.engine] WARNING: client-level DP: noise multiplier 1" in err
    info = "[fedpac_hf.trainer.preflight] INFO: preflight passed"
    assert (info in err) == (log_level is None)
    assert len(logging.getLogger("fedpac_hf").handlers) == 1  # one console handler, not one per run


def test_the_packages_lines_show_once_when_the_root_logger_has_a_handler(tmp_path, capsys):
    """Opacus configures the root logger when it is imported (``logging.basicConfig``):
    a program's lines must still show once, in the package's format, not twice."""
    from fedpac_hf.trainer.logs import show_package_log

    root = logging.getLogger()
    basic = logging.StreamHandler(sys.stderr)  # what basicConfig adds: capsys's stderr
    basic.setFormatter(logging.Formatter("%(asctime)s:%(levelname)s:%(message)s"))
    root.addHandler(basic)
    try:
        show_package_log(FedPACArguments(output_dir=str(tmp_path), log_level="warning"))
        logging.getLogger("fedpac_hf.federated.engine").warning("the noise is large")
        logging.getLogger("elsewhere").warning("not ours")
    finally:
        root.removeHandler(basic)
    lines = capsys.readouterr().err.splitlines()
    assert [line for line in lines if "the noise is large" in line] == [
        "[fedpac_hf.federated.engine] WARNING: the noise is large"
    ]
    assert any(line.endswith(":WARNING:not ours") for line in lines)  # the root's own lines


def test_the_packages_log_goes_to_one_place_at_a_time(tmp_path):
    """A Flower app hands the package's lines to Flower's console handler; a later
    `fedpac-hf train` in the same process moves them back to stderr, never to both."""
    from fedpac_hf.trainer.logs import show_package_log

    args = FedPACArguments(output_dir=str(tmp_path), log_level="warning")
    package = logging.getLogger("fedpac_hf")
    elsewhere = logging.StreamHandler(io.StringIO())
    assert show_package_log(args, elsewhere) == logging.WARNING
    assert package.handlers == [elsewhere]
    logging.getLogger("fedpac_hf.trainer.preflight").warning("seen there")
    assert elsewhere.stream.getvalue() == "seen there\n"
    show_package_log(args)
    show_package_log(args)
    (stderr,) = package.handlers
    assert stderr is not elsewhere and isinstance(stderr, logging.StreamHandler)
