"""Write ``docs/bad_inputs.md``: each bad input a user can give, and what it gets.

Every row is produced by actually running the mistake against the public API
or the ``fedpac-hf`` command line (tiny model, offline, a few seconds), so the
table shows the messages the code really prints. Run it after changing a
message::

    python docs/make_bad_inputs_table.py            # rewrite docs/bad_inputs.md
    python docs/make_bad_inputs_table.py --check    # exit 1 if the file is stale

``tests/test_bad_inputs_doc.py`` runs the same check.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import tempfile
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

DOC = Path(__file__).resolve().parent / "bad_inputs.md"
PLACEHOLDER = "<output_dir>"


@dataclass(frozen=True)
class Case:
    """One mistake: what the user did, through which door, and how to reproduce it."""

    mistake: str
    where: str
    run: Callable[[Path], object]


def _tiny_model():
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=4,
    )
    return ViTForImageClassification._from_config(config, attn_implementation="eager")


def _tiny_data(n: int = 64):
    import datasets
    import numpy as np

    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(n, 1, 8, 8)).astype("float32")
    labels = rng.integers(0, 4, n)
    return datasets.Dataset.from_dict({"pixel_values": pixels, "label": labels}).with_format(
        "torch"
    )


#: Client-level DP under SecAgg+, which the cases below combine with one setting it refuses.
_SECURE_CLIENT_DP = dict(
    secure_aggregation=True,
    algorithm="fedavg_adamw",
    dp_mode="client",
    dp_clip_norm=1.0,
    dp_noise_multiplier=1.0,
)


def _args(out: Path, **overrides):
    from fedpac_hf import FedPACArguments

    kwargs = dict(
        output_dir=str(out / "run"),
        num_rounds=1,
        num_clients=4,
        clients_per_round=2,
        local_steps=1,
        per_device_train_batch_size=8,
        report_to=[],
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return FedPACArguments(**kwargs)


def _train(out: Path, clients=None, resume=None, **overrides) -> None:
    from fedpac_hf import FedPACTrainer

    args = _args(out, **overrides)
    data = None if clients is not None else _tiny_data()
    trainer = FedPACTrainer(
        model=_tiny_model(), args=args, train_dataset=data, client_datasets=clients
    )
    trainer.train(resume_from_checkpoint=resume)


def torch_batch():
    """One batch of :func:`_simulate`'s clients: 3 features, 2 classes."""
    import torch

    return torch.randn(4, 3), torch.tensor([0, 1, 0, 1])


def _trainer_with_public_data(out: Path) -> None:
    from fedpac_hf import FedPACTrainer

    data = _tiny_data()
    FedPACTrainer(model=_tiny_model(), args=_args(out), train_dataset=data, curvature_dataset=data)


def _checkpointed(out: Path) -> Path:
    _train(out, save_strategy="steps", save_steps=1)
    return out / "run" / "checkpoint-round-1"


def _truncated_checkpoint(out: Path) -> None:
    from fedpac_hf.rundir.checkpoint import STATE_TENSORS

    path = _checkpointed(out) / STATE_TENSORS
    path.write_bytes(path.read_bytes()[:100])
    _train(out, resume=True)


def _cli(out: Path, yaml_text: str, *argv: str) -> None:
    from fedpac_hf.cli import main

    config = out / "run.yaml"
    config.write_text(yaml_text)
    main(["train", str(config), "--output_dir", str(out / "run"), *argv])


_TINY_CLI = (
    "dataset: digits\nmax_train_examples: 64\nmax_eval_examples: 16\npatch_size: 4\n"
    "hidden_size: 16\nnum_hidden_layers: 1\nnum_attention_heads: 2\nintermediate_size: 32\n"
    "num_clients: 4\nclients_per_round: 2\nnum_rounds: 1\nlocal_steps: 1\nreport_to: none\n"
)


def _simulate(out: Path, **overrides) -> None:
    import torch

    from fedpac_hf.federated import simulate

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    batch = torch_batch()
    kwargs = dict(
        model=model,
        client_loaders=[[batch], [batch]],
        algorithm="fedavg",
        num_rounds=1,
        clients_per_round=2,
        local_steps=1,
        loss_fn=lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]),
    )
    kwargs.update(overrides)
    simulate(**kwargs)


def _cli_config(out: Path, text: str | bytes, *argv: str) -> None:
    """``fedpac-hf train`` on a config file holding exactly ``text``."""
    from fedpac_hf.cli import main

    config = out / "run.yaml"
    if isinstance(text, bytes):
        config.write_bytes(text)
    else:
        config.write_text(text)
    main(["train", str(config), *argv])


def _finished_cli_run(out: Path) -> None:
    _cli(out, _TINY_CLI + "save_strategy: steps\nsave_steps: 1\n")


def _scores_csv(out: Path) -> Path:
    """A classification CSV whose label column holds continuous scores."""
    path = out / "scores.csv"
    rows = "".join(f"review {i} of a product,{(i * 37 % 100) / 20:.2f}\n" for i in range(40))
    path.write_text("text,label\n" + rows)
    return path


def _command(out: Path, *argv: str) -> None:
    from fedpac_hf.cli import main

    main(list(argv))


def _run_config(**settings) -> None:
    from fedpac_hf.flower import arguments_from_run_config

    arguments_from_run_config(settings, app_settings=("dataset",))


def _flower_resume(out: Path, **overrides) -> None:
    """A Flower ServerApp resuming a round-1 checkpoint of the ServerApp with ``overrides``."""
    from fedpac_hf.flower import FlowerServerRun

    first = FlowerServerRun(_args(out, save_strategy="steps", save_steps=1), _tiny_model())
    first.engine.history.append({"round": 1.0})
    first.engine.state.round = 1
    first.save_checkpoint()
    args = _args(out, resume_from_checkpoint="true", **overrides)
    FlowerServerRun(args, _tiny_model()).resume(args.resume_from_checkpoint)


def _flower_timeout(out: Path) -> None:
    from fedpac_hf.flower.config import flower_setting

    flower_setting({"node-wait-timeout": 0}, "node-wait-timeout")


def _algorithm(optimizer: str, **options) -> None:
    from fedpac_hf.federated.algorithms import Algorithm

    Algorithm("mine", optimizer, optimizer_kwargs=options)


def _empty_client(out: Path) -> None:
    data = _tiny_data()
    _train(out, clients=[data.select(range(32)), data.select([])])


CASES = [
    Case("unknown algorithm", "`FedPACArguments`", lambda o: _args(o, algorithm="fedprox")),
    Case(
        "unknown optimizer",
        "`FedPACArguments`",
        lambda o: _args(o, client_optimizer="adam"),
    ),
    Case(
        "optimizer option it does not take",
        "`FedPACArguments`",
        lambda o: _args(o, client_optimizer_kwargs={"precondition_freq": 10}),
    ),
    Case(
        "optimizer options that are not JSON",
        "`FedPACArguments`",
        lambda o: _args(o, client_optimizer_kwargs="{precondition_frequency: 10"),
    ),
    Case("beta outside [0, 1]", "`FedPACArguments`", lambda o: _args(o, beta=1.5)),
    Case("beta = 1 (no local step left)", "`FedPACArguments`", lambda o: _args(o, beta=1.0)),
    Case(
        "beta neither a number nor auto",
        "`fedpac-hf train`",
        lambda o: _cli(o, _TINY_CLI, "--beta", "strong"),
    ),
    Case("zero local steps", "`FedPACArguments`", lambda o: _args(o, local_steps=0)),
    Case("zero local steps", "`simulate`", lambda o: _simulate(o, local_steps=0)),
    Case("learning rate 0", "`FedPACArguments`", lambda o: _args(o, learning_rate=0.0)),
    Case(
        "clients per round neither a fraction nor a count",
        "`FedPACArguments`",
        lambda o: _args(o, clients_per_round=2.5),
    ),
    Case(
        "more clients per round than clients",
        "`FedPACTrainer.train`",
        lambda o: _train(o, clients_per_round=5),
    ),
    Case(
        "more clients per round than clients",
        "`simulate`",
        lambda o: _simulate(o, clients_per_round=3),
    ),
    Case(
        "min_clients_per_round above clients per round",
        "`FedPACTrainer.train`",
        lambda o: _train(o, min_clients_per_round=3),
    ),
    Case("unknown partitioner", "`FedPACArguments`", lambda o: _args(o, partitioner="random")),
    Case(
        "Dirichlet alpha <= 0",
        "`FedPACArguments`",
        lambda o: _args(o, dirichlet_alpha=0.0),
    ),
    Case("a client with no example", "`FedPACTrainer.train`", _empty_client),
    Case(
        "a client with no example",
        "`simulate`",
        lambda o: _simulate(o, client_loaders=[[], []]),
    ),
    Case(
        "label column that is missing",
        "`FedPACTrainer.train`",
        lambda o: _train(o, partition_label_column="labels"),
    ),
    Case(
        "label column that is missing",
        "`fedpac-hf train`",
        lambda o: _cli(o, _TINY_CLI, "--label_column", "digit"),
    ),
    Case(
        "YAML key that is not a field",
        "`fedpac-hf train`",
        lambda o: _cli(o, _TINY_CLI + "dirichlet_alpa: 0.1\n"),
    ),
    Case(
        "option that is not a field",
        "`fedpac-hf train`",
        lambda o: _cli(o, _TINY_CLI, "--locl_steps", "3"),
    ),
    Case(
        "value of the wrong type",
        "`fedpac-hf train`",
        lambda o: _cli(o, _TINY_CLI, "--num_rounds", "three"),
    ),
    Case(
        "task that does not exist",
        "`fedpac-hf train`",
        lambda o: _cli(o, _TINY_CLI + "task: image_clasification\n"),
    ),
    Case(
        "model size out of range",
        "`fedpac-hf train`",
        lambda o: _cli(o, _TINY_CLI, "--num_attention_heads", "0"),
    ),
    Case(
        "hidden size not a multiple of the heads",
        "`fedpac-hf train`",
        lambda o: _cli(o, _TINY_CLI, "--hidden_size", "18", "--num_attention_heads", "4"),
    ),
    Case(
        "LoRA rank above the layers it adapts",
        "`fedpac-hf train`",
        lambda o: _cli(o, _TINY_CLI, "--lora_r", "5000"),
    ),
    Case(
        "optimizer option out of its range",
        "`fedpac-hf train`",
        lambda o: _cli(
            o,
            _TINY_CLI,
            "--algorithm",
            "fedpac_muon",
            "--client_optimizer_kwargs",
            '{"momentum": 2.0}',
        ),
    ),
    Case(
        "optimizer option out of its range",
        "`Algorithm` (`simulate`)",
        lambda o: _algorithm("muon", momentum=2.0),
    ),
    Case(
        "eval_steps 0 (Trainer would read it as unset)",
        "`fedpac-hf train`",
        lambda o: _cli(o, _TINY_CLI, "--eval_strategy", "steps", "--eval_steps", "0"),
    ),
    Case(
        "scheduler option out of its range",
        "`fedpac-hf train`",
        lambda o: _cli(
            o,
            _TINY_CLI,
            "--lr_scheduler_type",
            "cosine_with_restarts",
            "--lr_scheduler_kwargs",
            '{"num_cycles": -1}',
        ),
    ),
    Case(
        "a number of rounds no schedule is built for",
        "`fedpac-hf train`",
        lambda o: _cli(o, _TINY_CLI, "--num_rounds", "1000000000"),
    ),
    Case(
        "logging integration that is not installed",
        "`fedpac-hf train`",
        lambda o: _cli(o, _TINY_CLI, "--report_to", "wandb"),
    ),
    Case(
        "config file that does not exist",
        "`fedpac-hf train`",
        lambda o: __import__("fedpac_hf.cli").cli.main(["train", str(o / "missing.yaml")]),
    ),
    Case(
        "learning rate so large every client diverges",
        "`FedPACTrainer.train`",
        lambda o: _train(o, learning_rate=1e30, algorithm="fedavg", local_steps=3),
    ),
    Case(
        "resume with no checkpoint in output_dir",
        "`FedPACTrainer.train`",
        lambda o: _train(o, resume=True),
    ),
    Case(
        "resume with another algorithm",
        "`FedPACTrainer.train`",
        lambda o: (_checkpointed(o), _train(o, resume=True, algorithm="local_soap")),
    ),
    Case(
        "resume with another partition",
        "`FedPACTrainer.train`",
        lambda o: (_checkpointed(o), _train(o, resume=True, dirichlet_alpha=5.0)),
    ),
    Case(
        "resume with another partition",
        "`fedpac-hf train`",
        lambda o: (
            _finished_cli_run(o),
            _cli(o, _TINY_CLI, "--dirichlet_alpha", "100", "--resume_from_checkpoint", "true"),
        ),
    ),
    Case(
        "resume with other training data",
        "`fedpac-hf train`",
        lambda o: (
            _finished_cli_run(o),
            _cli(o, _TINY_CLI, "--max_train_examples", "60", "--resume_from_checkpoint", "true"),
        ),
    ),
    Case(
        "a replaced setting (eval_every_rounds)",
        "`fedpac-hf train`",
        lambda o: _cli(o, _TINY_CLI + "eval_every_rounds: 1\n"),
    ),
    Case(
        "resume from a truncated checkpoint",
        "`FedPACTrainer.train`",
        _truncated_checkpoint,
    ),
    Case(
        "evaluation per epoch (a round is a step)",
        "`FedPACArguments`",
        lambda o: _args(o, eval_strategy="epoch"),
    ),
    Case(
        "max_grad_norm < 0 (it used to mean 'no clipping')",
        "`fedpac-hf train`",
        lambda o: _cli(o, _TINY_CLI, "--max_grad_norm", "-1"),
    ),
    Case(
        "max_grad_norm nan",
        "`fedpac-hf train`",
        lambda o: _cli(o, _TINY_CLI, "--max_grad_norm", "nan"),
    ),
    Case("server learning rate < 0", "`simulate`", lambda o: _simulate(o, server_lr=-1.0)),
    Case(
        "warm-up longer than the run (warm-up counts rounds)",
        "`fedpac-hf train`",
        lambda o: _cli(o, _TINY_CLI, "--warmup_steps", "1000", "--num_rounds", "2"),
    ),
    Case(
        "continuous float labels in a classification CSV",
        "`fedpac-hf train`",
        lambda o: _cli(
            o,
            _TINY_CLI.replace("dataset: digits", f"dataset: {_scores_csv(o)}")
            + "task: sequence_classification\n",
        ),
    ),
    Case(
        "LoRA settings with lora_r 0 (full fine-tuning)",
        "`fedpac-hf train`",
        lambda o: _cli(o, _TINY_CLI, "--lora_target_modules", "query"),
    ),
    Case(
        "LoRA targets that match no layer",
        "`fedpac-hf train`",
        lambda o: _cli(o, _TINY_CLI, "--lora_r", "4", "--lora_target_modules", "qkv"),
    ),
    Case("an empty config file", "`fedpac-hf train`", lambda o: _cli_config(o, "")),
    Case(
        "a config that is not valid YAML",
        "`fedpac-hf train`",
        lambda o: _cli_config(o, "num_rounds: 3\nlocal_steps: [2\n"),
    ),
    Case(
        "a binary file as config", "`fedpac-hf train`", lambda o: _cli_config(o, b"\x89PNG\x00\xff")
    ),
    Case(
        "a list for a number",
        "`fedpac-hf train`",
        lambda o: _cli(o, _TINY_CLI + "num_rounds: [1, 2]\n"),
    ),
    Case(
        "a fraction for a count",
        "`fedpac-hf train`",
        lambda o: _cli(o, _TINY_CLI.replace("num_rounds: 1", "num_rounds: 1.7")),
    ),
    Case(
        "a mapping for a name",
        "`fedpac-hf train`",
        lambda o: _cli(o, _TINY_CLI + "algorithm: {name: fedavg}\n"),
    ),
    Case(
        "mistyped optimizer option",
        "`fedpac-hf train`",
        lambda o: _cli(o, _TINY_CLI, "--client_optimizer_kwargs", '{"precondition_freq": 3}'),
    ),
    Case(
        "optimizer option of the wrong type",
        "`fedpac-hf train`",
        lambda o: _cli(
            o, _TINY_CLI, "--client_optimizer_kwargs", '{"precondition_frequency": "x"}'
        ),
    ),
    Case(
        "output_dir holding a file no run wrote (a README.md of the user's)",
        "`fedpac-hf train`",
        lambda o: (
            (o / "run").mkdir(),
            (o / "run" / "README.md").write_text("# notes\n"),
            _cli(o, _TINY_CLI, "--overwrite_output_dir", "true"),
        ),
    ),
    Case(
        "output_dir that is a file",
        "`fedpac-hf train`",
        lambda o: (
            _scores_csv(o),
            _cli_config(o, _TINY_CLI, "--output_dir", str(o / "scores.csv")),
        ),
    ),
    Case(
        "output_dir inside a file",
        "`fedpac-hf train`",
        lambda o: (
            _scores_csv(o),
            _cli_config(o, _TINY_CLI, "--output_dir", str(o / "scores.csv" / "run")),
        ),
    ),
    Case(
        "output_dir holding a finished run (no resume, no overwrite)",
        "`fedpac-hf train`",
        lambda o: (_finished_cli_run(o), _cli(o, _TINY_CLI)),
    ),
    Case(
        "model folder that does not exist",
        "`fedpac-hf train`",
        lambda o: _cli(o, _TINY_CLI, "--model_name_or_path", str(o / "no_model")),
    ),
    Case(
        "model folder that is empty",
        "`fedpac-hf train`",
        lambda o: (
            (o / "empty").mkdir(),
            _cli(o, _TINY_CLI, "--model_name_or_path", str(o / "empty")),
        ),
    ),
    Case(
        "model folder that holds no model",
        "`fedpac-hf train`",
        lambda o: (
            (o / "notes").mkdir(),
            (o / "notes" / "readme.txt").write_text("not a model"),
            _cli(o, _TINY_CLI, "--model_name_or_path", str(o / "notes")),
        ),
    ),
    Case(
        "a dataset file without a row",
        "`fedpac-hf train`",
        lambda o: (
            (o / "empty.csv").write_text("text,label\n"),
            _cli(o, _TINY_CLI, "--dataset", str(o / "empty.csv")),
        ),
    ),
    Case(
        "label column that holds images",
        "`fedpac-hf train`",
        lambda o: _cli(o, _TINY_CLI, "--label_column", "image"),
    ),
    Case(
        "resume a round-2 checkpoint with num_rounds 1",
        "`fedpac-hf train`",
        lambda o: (
            _cli(o, _TINY_CLI + "save_strategy: steps\nsave_steps: 1\n", "--num_rounds", "2"),
            _cli(o, _TINY_CLI, "--resume_from_checkpoint", "true"),
        ),
    ),
    Case(
        "loss function returning a tuple",
        "`simulate`",
        lambda o: _simulate(o, loss_fn=lambda m, b: (m(b[0]).sum(), 0)),
    ),
    Case("num_rounds 1.5", "`simulate`", lambda o: _simulate(o, num_rounds=1.5)),
    Case(
        "a misspelt run-config key", "Flower run config", lambda o: _run_config(**{"num-round": 3})
    ),
    Case(
        "a fraction for a count", "Flower run config", lambda o: _run_config(**{"local-steps": 2.5})
    ),
    Case(
        "resume with another algorithm",
        "Flower ServerApp",
        lambda o: _flower_resume(o, algorithm="local_soap"),
    ),
    Case(
        "resume with another partition",
        "Flower ServerApp",
        lambda o: _flower_resume(o, dirichlet_alpha=5.0),
    ),
    Case("a timeout of 0 seconds", "Flower run config", _flower_timeout),
    Case(
        "text that is not a boolean",
        "`FedPACArguments`",
        lambda o: _args(o, align="maybe"),
    ),
    Case(
        "a file where the run directory should be",
        "`fedpac-hf report`",
        lambda o: (_scores_csv(o), _command(o, "report", str(o / "scores.csv"))),
    ),
    Case(
        "a negative number of table rows",
        "`fedpac-hf partition`",
        lambda o: _command(
            o,
            "partition",
            "--dataset",
            "digits",
            "--partitioner",
            "iid",
            "--num-clients",
            "4",
            "--max-clients-shown",
            "-1",
        ),
    ),
    Case(
        "Dirichlet alpha nan",
        "`fedpac-hf partition`",
        lambda o: _command(
            o,
            "partition",
            "--dataset",
            "digits",
            "--partitioner",
            "dirichlet",
            "--num-clients",
            "4",
            "--alpha",
            "nan",
        ),  # fmt: skip
    ),
    Case("unknown curvature form", "`FedPACArguments`", lambda o: _args(o, curvature="small")),
    Case(
        "LoRA-sized curvature for a model without adapters",
        "`fedpac-hf train`",
        lambda o: _cli(o, _TINY_CLI, "--curvature", "lora"),
    ),
    Case(
        "public curvature with an algorithm that does not align",
        "`simulate`",
        lambda o: _simulate(o, curvature_loader=[torch_batch()]),
    ),
    Case(
        "public_curvature_clients 0",
        "`FedPACArguments`",
        lambda o: _args(o, public_curvature=True, public_curvature_clients=0),
    ),
    Case(
        "public curvature without public data",
        "`fedpac-hf train`",
        lambda o: _cli(o, _TINY_CLI, "--public_curvature", "true"),
    ),
    Case(
        "public data without public_curvature",
        "`FedPACTrainer`",
        lambda o: _trainer_with_public_data(o),
    ),
    Case(
        "public curvature data for a text task",
        "`fedpac-hf train`",
        lambda o: _cli(
            o, "task: causal_lm\ndataset: shakespeare\n", "--public_curvature_dataset", "digits"
        ),
    ),
    Case(
        "unknown transport dtype",
        "`FedPACArguments`",
        lambda o: _args(o, transport_dtype="float8"),
    ),
    Case(
        "unknown pretrained base",
        "`fedpac-hf train`",
        lambda o: _cli(o, _TINY_CLI, "--model_name_or_path", "base:vit-huge"),
    ),
    Case(
        "DP noise without a clip norm",
        "`FedPACArguments`",
        lambda o: _args(o, dp_mode="client", dp_noise_multiplier=1.0),
    ),
    Case(
        "DP clip norm nan",
        "`fedpac-hf train`",
        lambda o: _cli(
            o, _TINY_CLI + "dp_mode: client\ndp_clip_norm: .nan\ndp_noise_multiplier: 1\n"
        ),
    ),
    Case(
        "DP with an aligning algorithm but no Theta clip norm",
        "`FedPACArguments`",
        lambda o: _args(o, dp_mode="client", dp_clip_norm=0.1, dp_noise_multiplier=1.0),
    ),
    Case(
        "DP Theta share outside (0, 1)",
        "`fedpac-hf train`",
        lambda o: _cli(o, _TINY_CLI, *_DP_CLI, "--dp_theta_share", "1"),
    ),
    Case(
        "DP projection without SOAP curvature to project on",
        "`fedpac-hf train`",
        lambda o: _cli(
            o, _TINY_CLI, *_DP_CLI, "--algorithm", "fedadamw", "--dp_projection_rank", "4"
        ),
    ),
    Case(
        "DP clip schedule that is not a choice",
        "`fedpac-hf train`",
        lambda o: _cli(o, _TINY_CLI, *_DP_CLI, "--dp_clip_schedule", "cosine"),
    ),
    Case(
        "DP clip schedule with record-level DP",
        "`FedPACArguments`",
        lambda o: _args(
            o,
            dp_mode="record",
            dp_clip_norm=1.0,
            dp_noise_multiplier=1.0,
            dp_clip_schedule="learning_rate",
        ),
    ),
    Case(
        "DP adaptive-clipping setting without the adaptive schedule",
        "`fedpac-hf train`",
        lambda o: _cli(o, _TINY_CLI, *_DP_CLI, "--dp_clip_quantile", "0.9"),
    ),
    Case(
        "DP count noise too small for adaptive clipping",
        "`FedPACTrainer.train`",
        lambda o: _train(o, **_DP, dp_clip_schedule="adaptive", dp_clipped_count_std=0.01),
    ),
    Case(
        "DP delta not below 1 / num_clients",
        "`FedPACTrainer.train`",
        lambda o: _train(o, **_DP, dp_delta=0.3),
    ),
    Case(
        "DP target epsilon not reachable in the rounds",
        "`FedPACTrainer.train`",
        lambda o: _train(
            o, **{**_DP, "dp_noise_multiplier": None}, dp_target_epsilon=1e-4, dp_delta=1e-6
        ),
    ),
    Case(
        "DP with num_examples weighting",
        "`simulate`",
        lambda o: _simulate(
            o,
            weighting="num_examples",
            dp_mode="client",
            dp_clip_norm=1.0,
            dp_noise_multiplier=1.0,
            dp_delta=0.1,
        ),
    ),
    Case(
        "record-level DP with Sophia",
        "`FedPACArguments`",
        lambda o: _args(
            o,
            algorithm="fedpac_sophia",
            dp_mode="record",
            dp_clip_norm=1.0,
            dp_noise_multiplier=1.0,
        ),
    ),
    Case(
        "record-level DP on a layer Opacus cannot cover",
        "`simulate`",
        lambda o: _simulate(
            o,
            model=_batchnorm_model(),
            client_loaders=_tensor_loaders(),
            dp_mode="record",
            dp_clip_norm=1.0,
            dp_noise_multiplier=1.0,
        ),
    ),
    Case(
        "secure aggregation with beta auto",
        "`FedPACArguments`",
        lambda o: _args(o, secure_aggregation=True, beta="auto"),
    ),
    Case(
        "secure aggregation with one client per round",
        "`FedPACArguments`",
        lambda o: _args(o, secure_aggregation=True, clients_per_round=1),
    ),
    Case(
        "secure aggregation with a threshold above the shares",
        "`FedPACArguments`",
        lambda o: _args(o, secure_aggregation=True, secagg_reconstruction_threshold=5),
    ),
    Case(
        "secure aggregation with Poisson sampling and a count of shares",
        "`FedPACArguments`",
        lambda o: _args(o, **_SECURE_CLIENT_DP, dp_sampling="poisson", secagg_num_shares=3),
    ),
    Case(
        "secure aggregation with a weight bound but uniform weights",
        "`FedPACArguments`",
        lambda o: _args(o, secure_aggregation=True, secagg_max_weight=100),
    ),
    Case(
        "dp_sampling with record-level DP",
        "`FedPACArguments`",
        lambda o: _args(
            o, dp_mode="record", dp_clip_norm=1.0, dp_noise_multiplier=1.0, dp_sampling="fixed"
        ),
    ),
    Case(
        "secure aggregation outside Flower",
        "`FedPACTrainer.train`",
        lambda o: _train(o, secure_aggregation=True),
    ),
    Case(
        "DP setting without dp_mode",
        "Flower run config",
        lambda o: _run_config(**{"dp-clip-norm": 0.1}),
    ),
]


def _batchnorm_model():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)
    )


def _tensor_loaders():
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.randn(8, 3), torch.tensor([0, 1] * 4))
    return [DataLoader(data, batch_size=4), DataLoader(data, batch_size=4)]


_DP = dict(dp_mode="client", dp_clip_norm=0.1, dp_theta_clip_norm=1.0, dp_noise_multiplier=1.0)
_DP_CLI = [arg for name, value in _DP.items() for arg in (f"--{name}", str(value))]


# The classes of mistakes, in the order the document lists them: a title, the
# mechanism that refuses every case of the class, and the mistakes that belong to it.
CLASSES: list[tuple[str, str, tuple[str, ...]]] = [
    (
        "Reading a setting",
        "One parser per setting type (`fedpac_hf.config.validation`) reads YAML, "
        "command-line options, Python values and Flower's run config the same way; an "
        "unknown key gets the closest field's name. `fedpac-hf train` prints these before "
        "building anything.",
        (
            "YAML key that is not a field",
            "option that is not a field",
            "value of the wrong type",
            "task that does not exist",
            "config file that does not exist",
            "an empty config file",
            "a config that is not valid YAML",
            "a binary file as config",
            "a list for a number",
            "a fraction for a count",
            "a mapping for a name",
            "text that is not a boolean",
            "num_rounds 1.5",
            "a misspelt run-config key",
            "a replaced setting (eval_every_rounds)",
            "optimizer options that are not JSON",
        ),
    ),
    (
        "The project's own settings",
        "`FedPACArguments` checks every setting against its table of rules "
        "(`fedpac_hf.config.checks.RULES`), then every combination, when it is made (so "
        "`fedpac-hf train`, `FedPACTrainer` and the Flower apps refuse the same values in "
        "the same words); `simulate` reads its settings on entry against its own table "
        "(`fedpac_hf.federated.simulation.SETTINGS`), written with the same rules.",
        (
            "unknown algorithm",
            "unknown optimizer",
            "beta outside [0, 1]",
            "beta = 1 (no local step left)",
            "beta neither a number nor auto",
            "zero local steps",
            "learning rate 0",
            "clients per round neither a fraction nor a count",
            "more clients per round than clients",
            "min_clients_per_round above clients per round",
            "unknown partitioner",
            "Dirichlet alpha <= 0",
            "Dirichlet alpha nan",
            "evaluation per epoch (a round is a step)",
            "max_grad_norm < 0 (it used to mean 'no clipping')",
            "max_grad_norm nan",
            "server learning rate < 0",
            "warm-up longer than the run (warm-up counts rounds)",
            "unknown curvature form",
            "LoRA-sized curvature for a model without adapters",
            "public curvature with an algorithm that does not align",
            "public_curvature_clients 0",
            "unknown transport dtype",
            "a timeout of 0 seconds",
            "eval_steps 0 (Trainer would read it as unset)",
            "a negative number of table rows",
        ),
    ),
    (
        "Values handed to other libraries",
        "What reaches the optimizers, transformers and PEFT is checked against one table "
        "of rules before anything is built: every option of every client optimizer "
        "(`fedpac_hf.optim.options.OPTIONS`, used by the optimizers' constructors, "
        "`create_optimizer`, `Algorithm` and `FedPACArguments`), the model, LoRA and data "
        "sizes of `fedpac-hf train` (`MODEL_SETTINGS`, `SIZE_COMBINATIONS`), the LoRA rank "
        "against the layers it adapts, and the learning-rate schedule's options in its "
        "closed form for every round.",
        (
            "optimizer option it does not take",
            "mistyped optimizer option",
            "optimizer option of the wrong type",
            "optimizer option out of its range",
            "scheduler option out of its range",
            "model size out of range",
            "hidden size not a multiple of the heads",
            "LoRA rank above the layers it adapts",
            "LoRA settings with lora_r 0 (full fine-tuning)",
            "LoRA targets that match no layer",
            "unknown pretrained base",
            "model folder that does not exist",
            "model folder that is empty",
            "model folder that holds no model",
        ),
    ),
    (
        "Differential privacy and secure aggregation",
        "The `dp_*` settings are checked with the others when the arguments are made "
        "(`fedpac_hf.federated.privacy.ClientDP.from_settings`: each value, then the "
        "combinations); what depends on the federation (delta against the number of "
        "clients, the noise a target epsilon needs in the planned rounds, the round "
        "settings the mechanism covers) when the round engine is built, before round 1; "
        "with `dp_mode: record`, what DP-SGD cannot cover (Sophia, accumulation, fp16) when "
        "the arguments are made and the model's layers against Opacus before round 1 "
        "(docs/privacy.md). `secure_aggregation` is checked against the round settings "
        "SecAgg+ cannot cover when the arguments are made, and refused outside Flower "
        "(docs/secure_aggregation.md).",
        (
            "DP noise without a clip norm",
            "DP clip norm nan",
            "DP with an aligning algorithm but no Theta clip norm",
            "DP Theta share outside (0, 1)",
            "DP projection without SOAP curvature to project on",
            "DP clip schedule that is not a choice",
            "DP clip schedule with record-level DP",
            "DP adaptive-clipping setting without the adaptive schedule",
            "DP count noise too small for adaptive clipping",
            "DP delta not below 1 / num_clients",
            "DP target epsilon not reachable in the rounds",
            "DP with num_examples weighting",
            "record-level DP with Sophia",
            "record-level DP on a layer Opacus cannot cover",
            "dp_sampling with record-level DP",
            "DP setting without dp_mode",
            "secure aggregation with beta auto",
            "secure aggregation with one client per round",
            "secure aggregation with a threshold above the shares",
            "secure aggregation with Poisson sampling and a count of shares",
            "secure aggregation with a weight bound but uniform weights",
            "secure aggregation outside Flower",
        ),
    ),
    (
        "Up-front work",
        "Nothing is computed for every round before round 1 beyond a documented bound "
        "(`MAX_ROUNDS`, one million rounds): a larger count is refused at once.",
        ("a number of rounds no schedule is built for",),
    ),
    (
        "Data",
        "The data is checked when the task is built and again by the preflight: the columns, "
        "at least two classes, no empty label or text cell, labels within the model's "
        "outputs, no client without an example.",
        (
            "a client with no example",
            "public curvature without public data",
            "public data without public_curvature",
            "public curvature data for a text task",
            "label column that is missing",
            "continuous float labels in a classification CSV",
            "label column that holds images",
            "a dataset file without a row",
        ),
    ),
    (
        "Preflight, divergence and errors that recur",
        "Before round 1 and before anything is written, `fedpac-hf train`, "
        "`FedPACTrainer.train`, `simulate` and each Flower ClientApp run a *preflight* "
        "(`preflight: true`, the default): the labels against the model's head, then one "
        "client step, one aggregation, one warm-started step and one evaluation on the real "
        "model, all put back, so the run trains exactly as without it. The Flower ServerApp, "
        "which holds no training data, runs the same stages on the global model with a "
        "synthetic loss, its central evaluation once on the initial weights (it must be "
        "finite) and, with `public_curvature`, its runs on the public data for round 1 "
        "(their Theta must be finite). What fails there "
        "raises `PreflightError` (a `ValueError`) naming the stage. During the rounds, a "
        "client that fails again exactly as the last time it was sampled (not a non-finite "
        "loss, not a lost node) stops the run with `RoundError` instead of being dropped "
        "round after round. A client whose loss ends more than 100x above its first local "
        "step's diverged (dropped like a non-finite one), and an evaluation of the global "
        "model that is not finite stops the run with `RoundError`.",
        ("learning rate so large every client diverges", "loss function returning a tuple"),
    ),
    (
        "The run directory and resuming",
        "A run claims its output directory only after the settings, the build and the "
        "preflight passed; a directory holding another run is refused unless resumed or "
        "overwritten; a directory no run has claimed that holds a file a run would write "
        "(`RUN_OUTPUTS`: config.yaml, README.md, model files, ...) is refused whatever the "
        "settings, so a run never replaces a file it did not write; a resume must match the recorded algorithm, partition, data and "
        "training settings, and a checkpoint is verified before it is read.",
        (
            "resume with no checkpoint in output_dir",
            "resume with another algorithm",
            "resume with another partition",
            "resume with other training data",
            "resume from a truncated checkpoint",
            "output_dir holding a file no run wrote (a README.md of the user's)",
            "output_dir that is a file",
            "output_dir inside a file",
            "output_dir holding a finished run (no resume, no overwrite)",
            "resume a round-2 checkpoint with num_rounds 1",
            "a file where the run directory should be",
        ),
    ),
    (
        "Everything else before round 1",
        "`fedpac-hf train` turns any other failure while reading the settings or building "
        "the model, the data and the trainer into one line naming the stage and the original "
        "error (exit status 2, nothing written); a programming error after that keeps its "
        "traceback.",
        ("logging integration that is not installed",),
    ),
]


def class_of(case: Case) -> str:
    """The title of the class ``case`` belongs to (every case has one)."""
    for title, _, mistakes in CLASSES:
        if case.mistake in mistakes:
            return title
    raise KeyError(f"{case.mistake!r} belongs to no class of CLASSES: add it to one")


def run_case(case: Case) -> tuple[str, str]:
    """Run one mistake; return (what it raised or the exit status, its one-line message)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        stderr = io.StringIO()
        logging.disable(logging.WARNING)
        try:
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                case.run(out)
        except SystemExit as exit_:
            lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
            outcome = f"exit status {exit_.code}"
            message = lines[-1] if lines else ""
        except Exception as error:  # noqa: BLE001 - the table shows whatever comes out
            outcome = f"`{type(error).__name__}`"
            message = " ".join(str(error).split())
        else:
            outcome, message = "no error", ""
        finally:
            logging.disable(logging.NOTSET)
        message = message.replace(str(out.resolve()), PLACEHOLDER).replace(str(out), PLACEHOLDER)
    if outcome in ("`ModuleNotFoundError`", "`ImportError`") or "No module named" in message:
        # a broken install, not the user's mistake: never write it into the table
        raise RuntimeError(f"{case.mistake} ({case.where}): {message}; reinstall the package")
    return outcome, message


def render(rows: list[tuple[Case, str, str]]) -> str:
    """The markdown document for ``rows`` of (case, outcome, message), class by class."""
    lines = [
        "# Bad inputs and what they get",
        "",
        "Mistakes fall into the classes below; each class is refused by one mechanism, the",
        "same from every entry point (`fedpac-hf train`, `FedPACArguments` and",
        "`FedPACTrainer`, `simulate`, the Flower apps). Each row is a mistake tried against",
        "the public API or the command line, with the error it really raises (generated by",
        "`python docs/make_bad_inputs_table.py`; the test suite fails when this file is",
        "stale). `fedpac-hf` prints the same message in one line and exits with status 2",
        f"(a failed round: status 1). `{PLACEHOLDER}` stands for the run's directory.",
        "",
    ]
    for title, mechanism, _ in CLASSES:
        lines += [f"## {title}", "", *textwrap.wrap(mechanism, 88), ""]
        lines += ["| mistake | where | raises | message |", "| --- | --- | --- | --- |"]
        for case, outcome, message in rows:
            if class_of(case) == title:
                cell = message.replace("|", "\\|")
                lines.append(f"| {case.mistake} | {case.where} | {outcome} | {cell} |")
        lines.append("")
    return "\n".join(lines)


def collect() -> list[tuple[Case, str, str]]:
    """Run every case in :data:`CASES`."""
    return [(case, *run_case(case)) for case in CASES]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the doc is stale")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    text = render(collect())
    if args.check:
        if not DOC.is_file() or DOC.read_text(encoding="utf-8") != text:
            print(f"{DOC} is stale: run python docs/make_bad_inputs_table.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC} ({len(CASES)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
