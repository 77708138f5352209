"""FedPAC on Flower's simulation engine matches FedPACTrainer in process."""

from __future__ import annotations

import json
import logging
import os
import re
import sys

import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")

import torch  # noqa: E402
from flwr.common.logger import console_handler  # noqa: E402
from transformers import default_data_collator  # noqa: E402

from fedpac_hf.federated import RoundError, simulate  # noqa: E402
from fedpac_hf.flower import run_fedpac_simulation  # noqa: E402
from fedpac_hf.rundir.environment import read_starts  # noqa: E402
from fedpac_hf.trainer.fedpac_trainer import FedPACTrainer  # noqa: E402

from .trainer_fixtures import (
    BACKEND,
    build_evaluator,
    build_failing_trainer,
    build_lora_model,
    build_model,
    build_trainer,
    flower_args,
    image_data,
    one_example_per_client,
    one_lora_example_per_client,
    tiny_lora_vit,  # noqa: E402
    tiny_vit,
)

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


#: Client-level DP with a fixed noise seed: the same noise in both shells.
PRIVATE = {
    "dp_mode": "client",
    "dp_clip_norm": 0.05,
    "dp_theta_clip_norm": 5.0,
    "dp_noise_multiplier": 0.7,
    "dp_noise_seed": 3,
}


#: Client-level DP whose clip norms adapt (the bounds travel with the global state).
ADAPTIVE = {**PRIVATE, "dp_clip_schedule": "adaptive", "dp_clipped_count_std": 2.0}


#: Record-level DP (DP-SGD in the clients) with fixed noise seeds.
RECORD = {"dp_mode": "record", "dp_clip_norm": 1.0, "dp_noise_multiplier": 1.0, "dp_noise_seed": 3}


@pytest.mark.parametrize(
    "privacy",
    [{}, PRIVATE, ADAPTIVE, RECORD],
    ids=["plain", "client_dp", "client_dp_adaptive", "record_dp"],
)
def test_simulation_matches_the_in_process_trainer(tmp_path, privacy):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = build_trainer(
            flower_args(tmp_path / "in_process", eval_strategy="steps", eval_steps=1, **privacy)
        )
        reference.train()
    finally:
        torch.set_num_threads(threads)

    result = run_fedpac_simulation(
        build_trainer,
        flower_args(tmp_path / "flower", eval_strategy="steps", eval_steps=1, **privacy),
        build_model=build_model,
        build_evaluator=build_evaluator,
        num_supernodes=3,
        backend_config=BACKEND,
    )

    assert [h["round"] for h in result.history] == [1.0, 2.0]
    client_dp = privacy.get("dp_mode") == "client"
    for flower_round, trainer_round in zip(result.history, reference.round_history):
        # Poisson-sampled under client DP: as many clients as the trainer's, whatever that is
        assert (
            flower_round["num_clients"]
            == trainer_round["num_clients"]
            == (trainer_round["num_clients"] if client_dp else 2)
        )
        assert flower_round.get("epsilon") == trainer_round.get("epsilon")
        assert ("epsilon" in flower_round) == bool(privacy)
        for key in ("train_loss", "drift", "drift_relative", "bytes_up", "bytes_down"):
            assert flower_round[key] == pytest.approx(trainer_round[key], rel=1e-5, abs=1e-8), key
        assert flower_round["wire_bytes_up"] >= flower_round["bytes_up"] > 0
        # what client-level DP would clip: measured by the server wherever it is not on
        for key in ("delta_norm_median", "theta_norm_median"):
            assert (key in flower_round) == (key in trainer_round) == (not client_dp)
            if key in trainer_round:
                assert flower_round[key] == pytest.approx(trainer_round[key], rel=1e-5), key
        assert flower_round["eval_loss"] == pytest.approx(trainer_round["eval_loss"], rel=1e-5)
        # the round's clip norm: the same in both shells, moved by the server when adaptive
        assert flower_round.get("dp_clip_norm") == trainer_round.get("dp_clip_norm")
    if privacy is ADAPTIVE:
        bounds = [h["dp_clip_norm"] for h in reference.round_history]
        assert bounds[0] == ADAPTIVE["dp_clip_norm"] != bounds[1]
    state, ref = result.server_state, reference.server_state
    assert state.round == ref.round == 2
    for part in ("params", "curvature", "direction"):
        mine, theirs = getattr(state, part), getattr(ref, part)
        assert mine is not None and set(mine) == set(theirs), part
        for name in theirs:
            torch.testing.assert_close(mine[name], theirs[name], rtol=1e-5, atol=1e-6)
    assert result.checkpoint is not None and (result.checkpoint / "model.safetensors").is_file()
    # the server wrote the run's metrics as it went, so `fedpac-hf report` can draw them
    rows = (tmp_path / "flower" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["round"] for row in rows] == [1.0, 2.0]
    assert [s["start_round"] for s in read_starts(tmp_path / "flower")] == [0]  # what it ran on


def test_a_failing_client_is_dropped_and_the_round_completes(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="flwr")
    args = flower_args(tmp_path, num_rounds=1, clients_per_round=3, algorithm="fedavg")
    result = run_fedpac_simulation(
        build_failing_trainer,
        args,
        build_model=build_model,
        num_supernodes=3,
        backend_config=BACKEND,
    )
    (history,) = result.history
    assert history["num_clients"] == 2 and history["num_dropped"] == 1
    dropped = [r.getMessage() for r in caplog.records if "dropping client 1" in r.getMessage()]
    assert dropped and "local data volume is not mounted" in dropped[0]


def test_the_server_app_shows_the_packages_log_in_flowers_console(tmp_path, capsys, monkeypatch):
    """The package's INFO lines (here the engine's client-level DP note) reach Flower's console
    handler, in Flower's format, at the run's log_level; before, Flower showed none of them."""
    monkeypatch.setattr(console_handler, "stream", sys.stderr)  # capsys's, as Flower redirects
    clip_only = {"dp_mode": "client", "dp_clip_norm": 1.0, "dp_noise_multiplier": 0.0}
    for log_level, shown in (("passive", True), ("warning", False)):
        args = flower_args(
            tmp_path / log_level, num_rounds=1, algorithm="fedavg", log_level=log_level, **clip_only
        )
        run_fedpac_simulation(
            build_trainer, args, build_model=build_model, num_supernodes=3, backend_config=BACKEND
        )
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "client-level DP: clipping only" in line]
        assert len(lines) == shown, err[-3000:]
        assert all(re.match(r"(\x1b\[\d+m)?INFO\b", line) for line in lines), lines


def test_too_few_surviving_clients_fail_the_round(tmp_path):
    args = flower_args(
        tmp_path, num_rounds=1, clients_per_round=3, min_clients_per_round=3, algorithm="fedavg"
    )
    with pytest.raises(RoundError, match="min_clients_per_round=3") as info:
        run_fedpac_simulation(
            build_failing_trainer,
            args,
            build_model=build_model,
            num_supernodes=3,
            backend_config=BACKEND,
        )
    # the core's failure path: the dropped client's reason is in the error
    assert "client 1: ClientAppError" in str(info.value)
    assert "local data volume is not mounted" in str(info.value)
    assert not (tmp_path / "run" / "checkpoint-round-1").exists()  # nothing saved for the round


@pytest.mark.parametrize(
    ("make_model", "make_trainer", "server_model"),
    [
        (tiny_vit, one_example_per_client, build_model),
        (tiny_lora_vit, one_lora_example_per_client, build_lora_model),
    ],
    ids=["full-model", "lora"],
)
def test_simulate_the_trainer_and_flower_give_identical_global_parameters(
    tmp_path, make_model, make_trainer, server_model
):
    """One small run through each shell of the round engine ends in the same state.

    The same model gets the same form of Theta (``curvature: auto``, ``theta_budget``
    1.0) whichever shell builds its client options: the same options, the same
    global Theta entries, the same parameters.
    """
    args = flower_args(
        tmp_path / "trainer", num_clients=4, clients_per_round=2, num_rounds=2, local_steps=2
    )
    trainer = make_trainer(args)
    trainer.train()

    model = make_model()
    loaders = [
        torch.utils.data.DataLoader(
            trainer.client_dataset(i), batch_size=1, collate_fn=default_data_collator
        )
        for i in range(4)
    ]
    states = []
    simulate(
        model,
        loaders,
        args.algorithm,
        num_rounds=2,
        clients_per_round=2,
        local_steps=2,
        loss_fn=lambda m, batch: m(**batch).loss,
        seed=args.seed,
        lr=args.learning_rate,
        max_grad_norm=args.max_grad_norm,
        callback=lambda state, metrics: states.append(state),
    )

    result = run_fedpac_simulation(
        make_trainer,
        flower_args(
            tmp_path / "flower", num_clients=4, clients_per_round=2, num_rounds=2, local_steps=2
        ),
        build_model=server_model,
        num_supernodes=4,
        backend_config=BACKEND,
    )
    options = trainer.algorithm.optimizer_kwargs
    lora = make_model is tiny_lora_vit  # adapters: budget 1.0's basis form; else full Theta
    assert (options.get("theta_compact") == "basis") == lora
    assert result.algorithm.optimizer_kwargs == options
    shapes = {n: tuple(t.shape) for n, t in trainer.server_state.curvature.items()}
    assert any(n.endswith(".basis") for n in shapes) == lora
    for state in (states[-1], result.server_state):
        assert {n: tuple(t.shape) for n, t in state.curvature.items()} == shapes
    simulated = {n: p.detach() for n, p in model.named_parameters()}
    for name, reference in trainer.server_state.params.items():
        assert torch.equal(simulated[name], reference), name
        assert torch.equal(result.server_state.params[name], reference), name


def _public_rows():
    """The server's public data: banded images drawn apart from the clients'."""
    return image_data(n=48, seed=3)["train"]


def build_public_trainer(args, run_config=None):
    """The clients' trainer with the public rows: the server's ``train_public``."""
    data = image_data(n=120)
    return FedPACTrainer(
        model=tiny_vit(), args=args, train_dataset=data["train"], curvature_dataset=_public_rows()
    )


@pytest.mark.slow  # a Flower simulation (~25 s); the in-process shells are tested by default
def test_public_curvature_on_flower_matches_the_in_process_trainer(tmp_path):
    """The server's Theta from its public data, the same in both shells; clients send none."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Flower worker: SOAP's eigenbases depend on the threads
    try:
        reference = build_public_trainer(
            flower_args(tmp_path / "in_process", public_curvature=True)
        )
        reference.train()
    finally:
        torch.set_num_threads(threads)
    result = run_fedpac_simulation(
        build_trainer,  # the nodes hold no public data
        flower_args(tmp_path / "flower", public_curvature=True),
        build_model=build_model,
        build_public_curvature=lambda args, config: build_public_trainer(args).train_public,
        num_supernodes=3,
        backend_config=BACKEND,
    )
    for flower_round, trainer_round in zip(result.history, reference.round_history, strict=True):
        assert flower_round["bytes_up_theta"] == trainer_round["bytes_up_theta"] == 0
        for key in ("train_loss", "public_train_loss"):
            assert flower_round[key] == pytest.approx(trainer_round[key], rel=1e-5), key
    state, ref = result.server_state, reference.server_state
    for name in ref.curvature:
        torch.testing.assert_close(state.curvature[name], ref.curvature[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="make_server_app's build_public_curvature"):
        run_fedpac_simulation(
            build_trainer,
            flower_args(tmp_path / "none", public_curvature=True),
            build_model=build_model,
            num_supernodes=3,
            backend_config=BACKEND,
        )
