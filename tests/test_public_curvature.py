"""Theta from public data at the server (``public_curvature``): the clients send none."""

from __future__ import annotations

import json

import pytest
import torch

from fedpac_hf.cli import main
from fedpac_hf.config.arguments import FedPACArguments
from fedpac_hf.federated import ServerState, get_algorithm, simulate
from fedpac_hf.federated.batches import cycle_batches
from fedpac_hf.federated.client import client_update
from fedpac_hf.federated.local_step import ClientHooks, LocalSteps
from fedpac_hf.federated.theta_budget import theta_options
from fedpac_hf.trainer.fedpac_trainer import FedPACTrainer

from .test_cli_train import TINY_VIT, refused, write_yaml
from .test_privacy import _clients, _loss, _model
from .trainer_fixtures import flower_args, image_data, tiny_vit

#: The server's public data: drawn apart from every client's.
PUBLIC = _clients(num=1, per=24, seed=5)[0]


def _run(**settings):
    """Two rounds of fedpac_soap (full Theta) on six clients; the states and metrics."""
    states = []
    history = simulate(
        _model(),
        _clients(num=6, per=12),
        "fedpac_soap",
        num_rounds=2,
        clients_per_round=3,
        local_steps=3,
        loss_fn=_loss,
        lr=0.05,
        curvature="full",
        callback=lambda state, metrics: states.append(state),
        **settings,
    )
    return states, history


def _public_theta(state: ServerState, lr: float, public=PUBLIC) -> dict[str, torch.Tensor]:
    """The client rule on ``public`` from ``state``, run the plain way: its Theta."""
    model = _model()
    form = theta_options(model, "soap", "full", None, {}, align=True)
    update = client_update(
        model,
        state,
        get_algorithm("fedpac_soap", optimizer_kwargs=form),
        cycle_batches(public),
        LocalSteps(lr=lr, num_steps=3),
        ClientHooks(loss_fn=_loss),
    )
    return update.curvature


def test_public_curvature_needs_an_algorithm_that_aligns():
    with pytest.raises(ValueError, match="public_curvature needs an algorithm that aligns"):
        get_algorithm("fedpac_correct_soap", public_curvature=True)
    with pytest.raises(ValueError, match="'fedavg_adamw' does not"):
        simulate(_model(), _clients(num=2), "fedavg_adamw", 1, 2, 1, _loss, curvature_loader=PUBLIC)


def test_the_global_theta_is_the_servers_own_on_the_public_data():
    states, history = _run(curvature_loader=PUBLIC)
    plain_states, plain_history = _run()
    for metrics in history:
        assert metrics["bytes_up_theta"] == 0 and metrics["public_train_loss"] > 0
        assert "drift" not in metrics  # no client sent Theta
    assert all(m["bytes_up_theta"] > 0 for m in plain_history)
    assert history[1]["bytes_down_theta"] == plain_history[1]["bytes_down_theta"] > 0
    # round 1: every client starts without Theta, so the parameters are the plain run's ...
    for name, value in plain_states[0].params.items():
        torch.testing.assert_close(states[0].params[name], value, rtol=0, atol=0)
    # ... and the next Theta is the public data's, not the clients' mean
    initial = ServerState.from_model(_model())
    expected = _public_theta(initial, history[0]["learning_rate"])
    assert set(states[0].curvature) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(states[0].curvature[name], value)
        assert not torch.allclose(plain_states[0].curvature[name], value, rtol=1e-3, atol=0)
    # round 2 warm-starts from it: the parameters leave the plain run's
    moved = [
        not torch.allclose(states[1].params[n], p, rtol=1e-4)
        for n, p in plain_states[1].params.items()
    ]
    assert any(moved)
    expected = _public_theta(states[0], history[1]["learning_rate"])
    for name, value in expected.items():
        torch.testing.assert_close(states[1].curvature[name], value)


def test_the_server_averages_its_runs_on_the_public_data():
    batches = [b for client in _clients(num=6, per=8, seed=5) for b in client]
    states, history = _run(curvature_loader=batches, public_curvature_clients=2)
    initial = ServerState.from_model(_model())
    lr = history[0]["learning_rate"]
    # 3 local steps each: the first run reads batches 0-2, the second 3-5
    runs = [_public_theta(initial, lr, batches[:3]), _public_theta(initial, lr, batches[3:])]
    for name, value in states[0].curvature.items():
        mean = (runs[0][name].double() + runs[1][name].double()) / 2
        torch.testing.assert_close(value, mean.float())
        assert not torch.allclose(value, runs[0][name], rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match="public_curvature_clients must be a whole number >= 1"):
        _run(curvature_loader=batches, public_curvature_clients=0)


def test_under_client_dp_the_delta_gets_the_whole_mechanism():
    private = dict(dp_mode="client", dp_clip_norm=0.5, dp_noise_multiplier=1.0, dp_noise_seed=1)
    args = FedPACArguments(output_dir="unused", report_to=[], **private, dp_theta_clip_norm=1.0)
    shared = args.client_privacy(args.build_algorithm())
    args.public_curvature = True
    alone = args.client_privacy(args.build_algorithm())
    assert shared.share_theta and not alone.share_theta
    assert alone.noise_stds() == (1.0 * 0.5, 0.0)  # no share of it spent on Theta
    assert shared.noise_stds()[0] == pytest.approx(0.5 * 2**0.5)
    # no dp_theta_clip_norm needed; Theta is the public data's exactly: no noise on it
    states, history = _run(curvature_loader=PUBLIC, **private)
    assert all(m["bytes_up_theta"] == 0 and m["dp_clipped_theta"] == 0 for m in history)
    initial = ServerState.from_model(_model())
    for name, value in _public_theta(initial, history[0]["learning_rate"]).items():
        torch.testing.assert_close(states[0].curvature[name], value)


def _trainer(tmp_path, **settings):
    data = image_data(n=120)
    return FedPACTrainer(
        model=tiny_vit(),
        args=flower_args(tmp_path / "run", **settings),
        train_dataset=data["train"],
        eval_dataset=data["test"],
        curvature_dataset=image_data(n=48, seed=3)["train"] if settings else None,
    )


def test_the_trainer_takes_theta_from_its_curvature_dataset(tmp_path):
    trainer = _trainer(tmp_path, public_curvature=True, public_curvature_clients=2, num_rounds=1)
    initial = ServerState.from_model(trainer.model)
    initial = ServerState({n: t.detach().clone() for n, t in initial.params.items()})
    trainer.train()
    (metrics,) = trainer.round_history
    assert metrics["bytes_up_theta"] == 0 and metrics["public_train_loss"] > 0
    # the next Theta: the mean of two runs of the client rule on the public rows, no DP,
    # each in its own order (client ids -1, -2)
    rows = trainer.public_rows()
    lr = metrics["learning_rate"]
    runs = [trainer.train_client(i, rows, 0, lr, initial, public=True) for i in (-1, -2)]
    state = trainer.server_state
    assert state is not None and runs[0].curvature
    assert set(state.curvature) == set(runs[0].curvature)
    for name, value in state.curvature.items():
        mean = (runs[0].curvature[name].double() + runs[1].curvature[name].double()) / 2
        torch.testing.assert_close(value, mean.float().cpu())
    apart = [
        not torch.allclose(runs[0].curvature[n], t, rtol=1e-3, atol=0)
        for n, t in runs[1].curvature.items()
    ]
    assert any(apart)  # the two runs read the public rows in different orders


def test_the_trainer_refuses_public_curvature_without_public_data(tmp_path):
    data = image_data(n=120)
    args = flower_args(tmp_path / "run", public_curvature=True)
    trainer = FedPACTrainer(model=tiny_vit(), args=args, train_dataset=data["train"])
    with pytest.raises(ValueError, match=r"curvature_dataset=\.\.\.\) \(the CLI: public_curv"):
        trainer.train()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    with pytest.raises(ValueError, match="set public_curvature=True with it"):
        FedPACTrainer(
            model=tiny_vit(),
            args=flower_args(tmp_path / "run"),
            train_dataset=data["train"],
            curvature_dataset=data["test"],
        )


def test_the_cli_trains_on_public_digits(tmp_path, capsys):
    """`fedpac-hf train ... --public_curvature_dataset digits`: sklearn's 8x8 digits, resized."""
    run_dir = tmp_path / "run"
    config = write_yaml(tmp_path / "c.yaml", {**TINY_VIT, "label_values": "5,6,7,8,9"})
    command = ["train", config, "--num_rounds", "2", "--public_curvature_dataset", "digits"]
    # client-level DP without dp_theta_clip_norm: no Theta leaves a client
    command += ["--dp_mode", "client", "--dp_clip_norm", "1", "--dp_noise_multiplier", "0.5"]
    assert main([*command, "--output_dir", str(run_dir)]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["bytes_up_theta"] for row in rows] == [0.0, 0.0]
    assert all(row["epsilon"] > 0 and row["dp_clipped_theta"] == 0 for row in rows)
    assert all(row["public_train_loss"] > 0 for row in rows) and rows[1]["bytes_down_theta"] > 0
    assert "public_curvature: true" in (run_dir / "config.yaml").read_text()
    assert "| public_curvature_dataset | digits |" in (run_dir / "summary.md").read_text()
    capsys.readouterr()
    (tmp_path / "refused").mkdir()
    err = refused(tmp_path / "refused", capsys, {"public_curvature": True})
    assert "public_curvature needs public data: set public_curvature_dataset" in err
    err = refused(
        tmp_path / "refused",
        capsys,
        {"task": "causal_lm", "dataset": "shakespeare", "public_curvature_dataset": "digits"},
    )
    assert "public_curvature_dataset is read for task image_classification only" in err


def test_the_preflight_runs_the_server_on_its_public_data():
    from fedpac_hf.federated.preflight import PreflightError

    wrong = [(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))]  # 5 features, not 6
    with pytest.raises(PreflightError, match="one step of the server on the public curvature"):
        _run(curvature_loader=wrong)
