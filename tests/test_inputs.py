"""Inputs are read one way from every door, checked before anything is written, and a
run directory has one owner. (Every refused input and its message: docs/bad_inputs.md.)"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fedpac_hf import FedPACArguments, FedPACTrainer
from fedpac_hf.cli import main
from fedpac_hf.federated import resolve_clients_per_round, simulate
from fedpac_hf.flower import arguments_from_run_config
from fedpac_hf.run import parse_run_config
from fedpac_hf.rundir.output_dir import claim_output_dir

from .trainer_fixtures import image_data, tiny_vit

ROOT = Path(__file__).resolve().parent.parent
TINY_CLI = {
    "dataset": "digits",
    "max_train_examples": 64,
    "max_eval_examples": 16,
    "patch_size": 4,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "num_clients": 4,
    "clients_per_round": 2,
    "num_rounds": 1,
    "local_steps": 1,
    "report_to": "none",
    "disable_tqdm": True,
    "num_threads": 1,
}


def write_config(path: Path, **settings) -> str:
    path.write_text(yaml.safe_dump({**TINY_CLI, **settings}))
    return str(path)


@pytest.mark.parametrize(
    ("value", "expected", "sampled_of_10"),
    [("1", 1, 1), ("1.0", 1, 1), ("3", 3, 3), ("0.5", 0.5, 5)],
)
def test_clients_per_round_1_means_one_client_from_every_door(
    tmp_path, value, expected, sampled_of_10
):
    config = write_config(tmp_path / "c.yaml")
    _, cli = parse_run_config(config, ["--clients_per_round", value])
    _, from_yaml = parse_run_config({**TINY_CLI, "clients_per_round": float(value)})
    python = FedPACArguments(output_dir=str(tmp_path), clients_per_round=float(value))
    flower = arguments_from_run_config({"clients-per-round": float(value)})
    for args in (cli, from_yaml, python, flower):
        assert args.clients_per_round == expected
    assert resolve_clients_per_round(10, cli.clients_per_round) == sampled_of_10


def test_text_booleans_and_numbers_are_read_like_the_command_line(tmp_path):
    args = FedPACArguments(
        output_dir=str(tmp_path), align="false", learning_rate="3e-3", local_steps="4"
    )
    assert args.align is False and args.learning_rate == 3e-3 and args.local_steps == 4
    assert args.build_algorithm().align is False
    model_args, args = parse_run_config({**TINY_CLI, "num_rounds": "2", "lora_r": 4.0})
    assert args.num_rounds == 2 and model_args.lora_r == 4
    assert arguments_from_run_config({"align": "no", "beta": "0.25"}).build_algorithm().beta == 0.25


def test_flower_run_config_keeps_the_apps_own_keys_and_refuses_typos():
    args = arguments_from_run_config({"dataset": "mnist5k", "num-rounds": 3}, ("dataset",))
    assert args.num_rounds == 3
    with pytest.raises(ValueError, match="unknown run-config key 'dataset'"):
        arguments_from_run_config({"dataset": "mnist5k"})
    with pytest.raises(ValueError, match="did you mean 'local-steps'"):
        arguments_from_run_config({"local_step": 3}, ("dataset",))


def test_a_refused_start_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "c.yaml", output_dir=str(run_dir), save_strategy="steps", save_steps=1
    )
    assert main(["train", config]) == 0
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert {"config.yaml", "partition.txt", "metrics.jsonl"} <= set(before)
    for argv in (
        ["--algorithm", "local_soap", "--resume_from_checkpoint", "true"],  # another algorithm
        ["--num_clients", "500", "--resume_from_checkpoint", "true"],  # more clients than rows
        [],  # a new run over the finished one, without resume or overwrite
    ):
        with pytest.raises(SystemExit) as exit_:
            main(["train", config, *argv])
        assert exit_.value.code == 2
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert after == before  # config.yaml, partition files and metrics untouched
    assert "holds another run (checkpoint-round-1, metrics.jsonl)" in capsys.readouterr().err


def test_overwrite_output_dir_replaces_the_old_run_so_resume_cannot_pick_it_up(tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "c.yaml",
        output_dir=str(run_dir),
        save_strategy="steps",
        save_steps=1,
        num_rounds=2,
    )
    assert main(["train", config]) == 0
    assert (run_dir / "checkpoint-round-2").is_dir()
    assert main(["train", config, "--overwrite_output_dir", "true", "--num_rounds", "1"]) == 0
    assert sorted(p.name for p in run_dir.glob("checkpoint-round-*")) == ["checkpoint-round-1"]
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1  # the old run's rows are gone, not interleaved


HOLD = """
import sys, time
from fedpac_hf.rundir.output_dir import claim_output_dir
claim_output_dir(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_a_busy_output_dir_is_refused_until_the_first_ends(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        data = image_data(n=64)
        args = FedPACArguments(
            output_dir=str(run_dir),
            num_rounds=1,
            num_clients=2,
            clients_per_round=2,
            local_steps=1,
            report_to=[],
            disable_tqdm=True,
        )
        trainer = FedPACTrainer(model=tiny_vit(), args=args, train_dataset=data["train"])
        with pytest.raises(ValueError, match=rf"in use by another run \(process {holder.pid}\)"):
            trainer.train()
    finally:
        holder.kill()  # SIGKILL: the operating system releases the lock
        holder.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            claim_output_dir(run_dir).release()
            break
        except ValueError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    trainer.train()
    assert trainer.round_history[-1]["round"] == 1.0


def test_a_bug_in_the_loss_function_stops_the_run_once_instead_of_dropping_clients(caplog):
    model = torch.nn.Linear(3, 2)
    batch = (torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))

    def loss_fn(m, b):
        return m(b[0]).softmax().mean()  # softmax() without dim: a TypeError in user code

    with caplog.at_level(logging.ERROR), pytest.raises(TypeError, match="softmax"):
        simulate(model, [[batch], [batch]], "fedavg", 1, 2, 1, loss_fn)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "bug in the training code" in errors[0].getMessage()
    assert "dropping" not in caplog.text


def test_local_soap_with_one_local_step_trains():
    """A cold SOAP client takes a real step, so K = 1 moves the model (it used not to)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    batch = (torch.randn(8, 3), torch.tensor([0, 1] * 4))
    history = simulate(
        model,
        [[batch], [batch]],
        "local_soap",
        num_rounds=2,
        clients_per_round=2,
        local_steps=1,
        loss_fn=lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]),
        lr=0.05,
    )
    assert all(h["update_norm"] > 0 for h in history)


def test_the_schedule_is_checked_for_every_round_when_the_settings_are_read(tmp_path):
    from fedpac_hf import FedPACArguments
    from fedpac_hf.federated import round_learning_rates
    from fedpac_hf.federated.schedule import MAX_ROUNDS

    def args(**settings):
        return FedPACArguments(output_dir=str(tmp_path), report_to=[], **settings)

    with pytest.raises(ValueError, match="gives round 6 of 30 the learning rate 0"):
        args(num_rounds=30, lr_scheduler_kwargs={"num_cycles": 3.0})
    with pytest.raises(ValueError, match="refuses lr_scheduler_kwargs=\\{'num_cyclez': 3\\}"):
        args(num_rounds=30, lr_scheduler_kwargs={"num_cyclez": 3})
    with pytest.raises(ValueError, match=f"num_rounds must be in \\[1, {MAX_ROUNDS}\\]"):
        args(num_rounds=10**9)
    rates = round_learning_rates(1e-3, MAX_ROUNDS, "cosine", warmup_rounds=10)
    assert len(rates) == MAX_ROUNDS and min(rates) > 0 and rates[10] == 1e-3
    with pytest.raises(ValueError, match=r"lr_scheduler_kwargs\['num_cycles'\] of "
                       r"'cosine_with_restarts' must be a whole number >= 1, got -1"):  # fmt: skip
        args(lr_scheduler_type="cosine_with_restarts", lr_scheduler_kwargs={"num_cycles": -1})


def test_the_scheduler_options_table_names_real_options():
    import inspect

    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION

    from fedpac_hf.federated.schedule import SCHEDULER_OPTIONS

    functions = {getattr(k, "value", k): f for k, f in TYPE_TO_SCHEDULER_FUNCTION.items()}
    for name, rules in SCHEDULER_OPTIONS.items():
        assert set(rules) <= set(inspect.signature(functions[name]).parameters), name


def test_every_door_reads_yaml_words_and_python_values_alike(tmp_path):
    from fedpac_hf import FedPACArguments
    from fedpac_hf.federated import get_algorithm

    def args(**settings):
        return FedPACArguments(output_dir=str(tmp_path), report_to=[], **settings)

    assert args(save_strategy=False).save_strategy.value == "no"  # YAML `save_strategy: no`
    with pytest.raises(ValueError, match="eval_strategy must be one of \\['no', 'steps'"):
        args(eval_strategy=True)
    for word, read in (
        ("yes", "true"),
        (1, "true"),
        ("off", None),
        (0, None),
        ("ckpt/x", "ckpt/x"),
    ):
        assert args(resume_from_checkpoint=word).resume_from_checkpoint == read
    with pytest.raises(ValueError, match="algorithm must be a registered name or an Algorithm"):
        get_algorithm({"name": "fedpac_soap"})
    with pytest.raises(ValueError, match="seed must be a whole number >= 0, got 1.5"):
        simulate(torch.nn.Linear(2, 2), [[(torch.ones(1, 2), torch.ones(1, 2))]], "fedavg",
                 1, 1, 1, lambda m, b: m(b[0]).sum(), seed=1.5)  # fmt: skip


def test_dirty_data_is_refused_with_a_count_naming_the_column():
    import datasets

    from fedpac_hf.run.data import encode_labels, tokenize

    def data(labels, texts=None):
        texts = texts or [f"row {i}" for i in range(len(labels))]
        return datasets.Dataset.from_dict({"text": texts, "topic": labels})

    clean = data(["a", "b", "a"])
    with pytest.raises(ValueError, match="'topic' has 2 training row\\(s\\) without a label"):
        encode_labels(data(["a", "", None]), clean, "topic")
    with pytest.raises(ValueError, match="'topic' has 1 test row"):
        encode_labels(clean, data(["a", "  "]), "topic")
    with pytest.raises(ValueError, match="holds one class in the training data \\(\\['a'\\]\\)"):
        encode_labels(data(["a", "a"]), clean, "topic")
    train, _, names = encode_labels(clean, clean, "topic")
    assert names == ["a", "b"] and train["label"] == [0, 1, 0]

    class Tokenizer:
        def __call__(self, texts, **kwargs):
            return {"input_ids": [[len(t)] for t in texts]}

    with pytest.raises(ValueError, match="text_column='text' has 1 row\\(s\\) without text"):
        tokenize(data(["a", "b"], ["fine", ""]), Tokenizer(), "text", 8, [])
    assert tokenize(clean, Tokenizer(), "text", 8, [])["input_ids"] == [[5], [5], [5]]


@pytest.mark.parametrize(
    ("setting", "value", "words"),
    [
        ("num_rounds", 1.5, "num_rounds must be a whole number >= 1, got 1.5"),
        ("local_steps", True, "local_steps must be a whole number >= 1, got True"),
        ("min_clients_per_round", 0, "min_clients_per_round must be a whole number >= 1"),
        ("lr", float("nan"), "lr must be a number > 0, got nan"),
        ("weighting", "examples", "weighting must be one of ['uniform', 'num_examples']"),
        ("transport_dtype", "float16", "transport_dtype must be one of"),
        ("theta_budget", 0, "theta_budget must be a number > 0 or null, got 0"),
        ("preflight", "no", "preflight must be true or false, got 'no'"),
    ],
)
def test_simulate_reads_its_settings_with_the_table_every_door_uses(setting, value, words):
    from fedpac_hf.federated.simulation import SETTINGS

    assert setting in SETTINGS
    arguments = {"num_rounds": 1, "clients_per_round": 1, "local_steps": 1, setting: value}
    with pytest.raises(ValueError, match=re.escape(words)):
        simulate(torch.nn.Linear(2, 2), [[(torch.ones(1, 2), torch.ones(1, 2))]], "fedavg",
                 loss_fn=lambda m, b: m(b[0]).sum(), **arguments)  # fmt: skip


def test_simulate_reads_whole_numbers_written_as_floats_as_whole():
    model = torch.nn.Linear(2, 2)
    rows = simulate(model, [[(torch.ones(1, 2), torch.ones(1, 2))]], "fedavg", 2.0, 1, 1.0,
                    lambda m, b: m(b[0]).sum(), seed=3.0)  # fmt: skip
    assert [row["round"] for row in rows] == [1, 2]


def test_algorithms_are_checked_as_they_are_made_and_registered():
    from fedpac_hf.federated.algorithms import Algorithm, register_algorithm

    with pytest.raises(ValueError, match=r"align \(algorithm 'mine'\) must be true or false"):
        Algorithm("mine", "soap", align="yes")
    with pytest.raises(ValueError, match="name must be a non-empty text"):
        Algorithm("", "soap")
    with pytest.raises(ValueError, match="register_algorithm takes an Algorithm.*got dict"):
        register_algorithm({"name": "mine", "optimizer": "soap"})


# One mistake, one message, whatever the door: (run config / CLI settings, words)
SAME_EVERYWHERE = [
    ({"local_steps": 0}, "local_steps must be a whole number >= 1, got 0"),
    (
        {"algorithm": "fedpac_muon", "client_optimizer_kwargs": {"momentum": 2.0}},
        "['momentum'] of optimizer 'muon' must be a number in [0, 1), got 2.0",
    ),
    (
        {"clients_per_round": 0, "num_clients": 4},
        "clients_per_round must be a fraction in (0, 1) or a whole number of clients >= 1, got 0",
    ),
]


@pytest.mark.parametrize(("settings", "words"), SAME_EVERYWHERE)
def test_one_mistake_gets_one_message_through_every_door(tmp_path, capsys, settings, words):
    import json

    from fedpac_hf.cli import main
    from fedpac_hf.config.arguments import FedPACArguments
    from fedpac_hf.federated.algorithms import Algorithm

    def flower() -> None:
        pytest.importorskip("flwr")
        from fedpac_hf.flower.config import arguments_from_run_config

        run_config = {
            k.replace("_", "-"): json.dumps(v) if isinstance(v, dict) else v
            for k, v in settings.items()
        }
        arguments_from_run_config({**run_config, "output-dir": str(tmp_path / "f")})

    def python() -> None:
        FedPACArguments(output_dir=str(tmp_path / "p"), report_to=[], **settings)

    def direct() -> None:  # simulate / Algorithm, with their own names for the same settings
        kwargs = settings.get("client_optimizer_kwargs")
        if kwargs is not None:
            Algorithm("mine", "muon", optimizer_kwargs=kwargs)
        simulate(torch.nn.Linear(2, 2), [[(torch.ones(1, 2), torch.ones(1, 2))]] * 4, "fedavg",
                 num_rounds=1, clients_per_round=settings.get("clients_per_round", 1),
                 local_steps=settings.get("local_steps", 1),
                 loss_fn=lambda m, b: m(b[0]).sum())  # fmt: skip

    for door in (flower, python, direct):
        with pytest.raises(ValueError, match=re.escape(words)):
            door()
    options = [f"--{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in settings.items()]
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"dataset": "digits", "report_to": "none"}))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(config), "--output_dir", str(tmp_path / "cli"), *options])
    assert exit_info.value.code == 2 and words in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("f", "p", "cli"))


def test_simulate_names_eval_fn_and_client_loaders_when_they_are_of_the_wrong_kind():
    data = [[(torch.ones(1, 2), torch.ones(1, 2))]] * 2
    loss = lambda m, b: m(b[0]).sum()  # noqa: E731
    model = torch.nn.Linear(2, 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(
        TypeError, match="eval_fn must return a number or a dict of metrics, got str"
    ):
        simulate(model, data, "fedavg", 1, 1, 1, loss, eval_fn=lambda m: "good")
    # found by the preflight: nothing trained
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="client_loaders must be a list .* got generator"):
        simulate(model, (d for d in data), "fedavg", 1, 1, 1, loss)
    rows = simulate(model, data, "fedavg", 1, 1, 1, loss, eval_fn=lambda m: torch.tensor(0.5))
    assert rows[-1]["eval"] == 0.5
