"""Flower records and configuration of the FedPAC apps (no simulation engine needed)."""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402

from fedpac_hf.federated import ClientUpdate, ServerState, get_algorithm  # noqa: E402
from fedpac_hf.flower import (  # noqa: E402
    FedPACStrategy,
    arguments_from_run_config,
    client_update_from_content,
    client_update_to_content,
    server_state_from_content,
    server_state_to_content,
)
from fedpac_hf.flower.records import with_partition  # noqa: E402


def state() -> ServerState:
    g = torch.Generator().manual_seed(0)
    return ServerState(
        params={"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)},
        curvature={"w::L": torch.rand(3, 3, generator=g)},
        direction={"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)},
        round=2,
    )


def test_downlink_round_trip_is_exact_and_sends_only_what_the_algorithm_uses():
    s = state()
    content = server_state_to_content(
        s, get_algorithm("fedpac_soap"), server_round=3, lr=0.01, partition_id=5
    )
    back = server_state_from_content(content)
    for part in ("params", "curvature", "direction"):
        for name, t in getattr(s, part).items():
            assert torch.equal(getattr(back, part)[name], t)
    config = content.config_records["config"]
    assert (config["round-index"], config["lr"], config["partition-id"]) == (2, 0.01, 5)
    assert with_partition(content, 7).config_records["config"]["partition-id"] == 7

    plain = server_state_to_content(
        s, get_algorithm("local_soap"), server_round=3, lr=0.01, partition_id=0
    )
    back = server_state_from_content(plain)
    assert back.curvature is None and back.direction is None
    assert set(plain.array_records) == {"params"}


def test_uplink_round_trip_and_a_reply_for_another_client_is_refused():
    update = ClientUpdate(
        client_id=4,
        delta={"w": torch.randn(3, 4)},
        curvature={"w::L": torch.rand(3, 3)},
        num_examples=48,
        num_steps=3,
        metrics={"train_loss": 1.25},
    )
    content = client_update_to_content(update)
    back = client_update_from_content(content, 4)
    assert torch.equal(back.delta["w"], update.delta["w"])
    assert torch.equal(back.curvature["w::L"], update.curvature["w::L"])
    assert (back.num_examples, back.num_steps, back.metrics) == (48, 3, {"train_loss": 1.25})
    with pytest.raises(ValueError, match="computed for client 4"):
        client_update_from_content(content, 3)


def test_run_config_keys_become_arguments(tmp_path):
    args = arguments_from_run_config(
        {
            "num-rounds": 4,
            "algorithm": "fedpac_muon",
            "client-optimizer-kwargs": '{"momentum": 0.9}',
            "dataset": "mnist5k",  # the app's own key, left to the app
            "output-dir": str(tmp_path),
        },
        app_settings=("dataset",),
    )
    assert args.num_rounds == 4 and args.build_algorithm().optimizer == "muon"
    assert args.client_optimizer_kwargs == {"momentum": 0.9}
    with pytest.raises(ValueError, match="beta"):
        arguments_from_run_config({"beta": 2.0, "output-dir": str(tmp_path)})


def test_bfloat16_transport_round_trips_exactly_in_half_the_bytes():
    s = state()
    half = s.cast(torch.bfloat16)
    content = server_state_to_content(
        half, get_algorithm("fedpac_soap"), server_round=1, lr=0.01, partition_id=0
    )
    full = server_state_to_content(
        s, get_algorithm("fedpac_soap"), server_round=1, lr=0.01, partition_id=0
    )
    assert content.config_records["config"]["transport-dtype"] == "bfloat16"
    back = server_state_from_content(content)
    for part in ("params", "curvature", "direction"):
        for name, t in getattr(half, part).items():
            assert getattr(back, part)[name].dtype == torch.bfloat16
            assert torch.equal(getattr(back, part)[name], t)

    def payload(message):
        return sum(a.numpy().nbytes for r in message.array_records.values() for a in r.values())

    assert 2 * payload(content) == payload(full)


def test_strategy_runs_the_round_engine_and_refuses_impossible_minimums():
    from fedpac_hf.federated import RoundEngine, ServerState, sample_clients

    def engine(**overrides):
        kwargs = dict(
            num_clients=10, clients_per_round=0.3, learning_rates=[0.1, 0.05], local_steps=2, seed=3
        )
        kwargs.update(overrides)
        state = ServerState(params={"w": torch.zeros(2)})
        return RoundEngine(get_algorithm(kwargs.pop("algorithm", "fedpac_soap")), state, **kwargs)

    strategy = FedPACStrategy(engine())
    assert strategy.engine.sample(1) == sample_clients(10, 3, 3, 1)
    assert strategy.num_clients == 10 and strategy.server_state.round == 0
    with pytest.raises(
        ValueError, match="min_clients_per_round must lie in \\[1, clients per round = 3\\], got 4"
    ):
        engine(algorithm="fedavg", clients_per_round=3, min_clients_per_round=4)


def test_a_record_dp_client_app_describes_its_noise_when_it_builds_its_trainer(
    tmp_path, capsys, monkeypatch
):
    """A ClientApp's first message builds its trainer; under record-level DP it logs the noise
    on each local step (z sqrt(d) / B clip norms) there, before any round's work, and the line
    shows in Flower's console (where Flower shows its own), not only to logging's handlers."""
    from flwr.common import Context, RecordDict
    from flwr.common.logger import console_handler

    from fedpac_hf.flower.clientapp import _TRAINERS, FedPACClient

    from .trainer_fixtures import build_trainer, flower_args

    monkeypatch.setattr(console_handler, "stream", sys.stderr)  # capsys's, as Flower redirects
    # noise below one clip norm: an INFO line, which Flower's console did not show before
    dp = {"dp_mode": "record", "dp_clip_norm": 1.0, "dp_noise_multiplier": 0.02}
    args = flower_args(tmp_path, preflight=False, **dp)
    client = FedPACClient(build_trainer, arguments=args)
    context = Context(
        run_id=7, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={}
    )
    try:
        trainer, _ = client.trainer_for(context)
    finally:
        _TRAINERS.clear()  # the process-wide cache: no trainer left for other tests
    floats = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    ratio = 0.02 * floats**0.5 / trainer.args.per_device_train_batch_size
    (shown,) = [line for line in capsys.readouterr().err.splitlines() if "record-level DP" in line]
    assert f"{ratio:.3g} x dp_clip_norm" in shown and "INFO" in shown
