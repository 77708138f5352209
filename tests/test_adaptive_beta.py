"""beta="auto": the server's choice of the correction strength, and the drift from the start."""

from __future__ import annotations

import pytest
import torch

from fedpac_hf.federated import (
    AUTO_BETA_START,
    Algorithm,
    ClientHooks,
    ClientUpdate,
    LocalSteps,
    ServerState,
    aggregate,
    auto_beta,
    client_update,
    cycle_batches,
    get_algorithm,
    round_beta,
    simulate,
)
from fedpac_hf.rundir.checkpoint import load_federated_checkpoint, save_federated_checkpoint

from .test_federated import ce_loss, make_clients, make_model


@pytest.mark.parametrize("value", ["auto", "AUTO", " auto "])
def test_auto_is_accepted_in_any_case(value):
    assert Algorithm("x", "soap", beta=value).beta == "auto"
    assert get_algorithm("fedpac_soap", beta=value).adaptive_beta


def test_numbers_as_text_are_read_as_numbers():
    assert Algorithm("x", "soap", beta="0.25").beta == 0.25


@pytest.mark.parametrize("value", ["automatic", "", 1.0, 1, -0.5, float("nan"), [0.5], True])
def test_anything_else_is_refused_naming_the_accepted_values(value):
    with pytest.raises(ValueError, match=r'beta must be a number in \[0, 1\) or "auto"'):
        Algorithm("x", "soap", beta=value)


def test_fedpac_arguments_take_auto_and_refuse_the_rest(tmp_path):
    from fedpac_hf import FedPACArguments

    args = FedPACArguments(output_dir=str(tmp_path), beta="auto", report_to=[])
    assert args.build_algorithm().beta == "auto"
    assert FedPACArguments(output_dir=str(tmp_path), beta="0.3", report_to=[]).beta == 0.3
    with pytest.raises(ValueError, match=r'\[0, 1\) or "auto"'):
        FedPACArguments(output_dir=str(tmp_path), beta="strong", report_to=[])


def test_beta_max_is_checked():
    with pytest.raises(ValueError, match="beta_max"):
        Algorithm("x", "soap", beta="auto", beta_max=1.0)


def test_the_rule_is_the_variance_ratio_clipped():
    assert auto_beta(1.0, 3.0, 0.75) == pytest.approx(0.25)
    assert auto_beta(9.0, 1.0, 0.75) == 0.75
    assert auto_beta(0.0, 2.0, 0.75) == 0.0
    assert auto_beta(0.0, 0.0, 0.75) == AUTO_BETA_START  # nothing measured


def test_server_rule_sets_the_next_beta_from_dispersion_and_direction_change():
    lr, K = 0.1, 2
    old_direction = {"w": torch.tensor([1.0, 0.0])}
    old_theta = {"w.v": torch.tensor([2.0, 2.0])}
    state = ServerState(
        params={"w": torch.zeros(2)}, curvature=old_theta, direction=old_direction, round=2
    )
    d1, d2 = torch.tensor([-0.4, 0.0]), torch.tensor([0.0, -0.2])
    t1, t2 = torch.tensor([1.0, 3.0]), torch.tensor([4.0, 2.0])
    updates = [
        ClientUpdate(0, {"w": d1}, {"w.v": t1}, 5, K),
        ClientUpdate(1, {"w": d2}, {"w.v": t2}, 5, K),
    ]
    algorithm = get_algorithm("fedpac_soap", beta="auto")

    new, m = aggregate(state, updates, algorithm, lr=lr, local_steps=K)

    mean = (d1 + d2) / 2
    sigma2 = float(((d1 - mean).square().sum() + (d2 - mean).square().sum()) / 2) / (K * lr) ** 2
    tau2 = float((-mean / (K * lr) - old_direction["w"]).square().sum())
    assert m["client_dispersion"] == pytest.approx(sigma2)
    assert m["direction_change"] == pytest.approx(tau2)
    assert m["beta"] == AUTO_BETA_START  # what this round's clients used (no choice yet)
    assert new.beta == pytest.approx(min(sigma2 / (sigma2 + tau2), 0.75))
    start = old_theta["w.v"]
    drift0 = float(((t1 - start).square().sum() + (t2 - start).square().sum()) / 2)
    assert m["drift_from_start"] == pytest.approx(drift0)
    assert m["drift_from_start_relative"] == pytest.approx(drift0 / float(start.square().sum()))

    # the next round's clients use the chosen value; a fixed beta is never changed
    assert round_beta(algorithm, new) == new.beta
    fixed, mf = aggregate(state, updates, get_algorithm("fedpac_soap"), lr=lr, local_steps=K)
    assert fixed.beta is None and mf["beta"] == 0.5
    assert mf["client_dispersion"] == pytest.approx(sigma2)


def test_a_client_with_auto_steps_exactly_as_with_the_servers_value_fixed():
    data = make_clients(1)[0]
    model = make_model()
    state = ServerState.from_model(model)
    state.direction = {n: torch.full_like(p, 0.1) for n, p in state.params.items()}
    auto_state = ServerState(state.params, None, state.direction, round=3, beta=0.3)
    runs = []
    for algorithm, start in ((get_algorithm("fedpac_soap", beta="auto"), auto_state),
                             (get_algorithm("fedpac_soap", beta=0.3), state)):  # fmt: skip
        runs.append(
            client_update(
                make_model(),
                start,
                algorithm,
                cycle_batches(data),
                LocalSteps(lr=0.05, num_steps=3),
                ClientHooks(loss_fn=ce_loss),
            )  # fmt: skip
        )
    for name in runs[0].delta:
        torch.testing.assert_close(runs[0].delta[name], runs[1].delta[name], rtol=0, atol=0)


def _run(clients, algorithm="fedpac_soap", rounds=4):
    return simulate(
        make_model(),
        clients,
        get_algorithm(algorithm, beta="auto"),
        num_rounds=rounds,
        clients_per_round=len(clients),
        local_steps=3,
        loss_fn=ce_loss,
        lr=0.05,
    )


def test_identical_clients_get_no_correction_and_disagreeing_ones_get_some():
    same = make_clients(1)[0]
    history = _run([same] * 3)
    assert [h["beta"] for h in history[:2]] == [AUTO_BETA_START] * 2
    assert all(h["client_dispersion"] == pytest.approx(0.0, abs=1e-10) for h in history)
    assert all(h["beta"] == pytest.approx(0.0, abs=1e-8) for h in history[2:])

    history = _run(make_clients(3))
    assert all(h["client_dispersion"] > 0 for h in history)
    assert all(0.0 < h["beta"] <= 0.75 for h in history[2:])
    assert "direction_change" not in history[0] and "direction_change" in history[1]
    assert "drift_from_start" not in history[0] and history[1]["drift_from_start"] > 0


def test_the_chosen_beta_is_checkpointed(tmp_path):
    state = ServerState(params={"w": torch.zeros(2)}, round=3, beta=0.42)
    save_federated_checkpoint(tmp_path / "ckpt", state, {"history": []})
    loaded, _ = load_federated_checkpoint(tmp_path / "ckpt")
    assert loaded.beta == 0.42
    save_federated_checkpoint(tmp_path / "fixed", ServerState(params={"w": torch.zeros(2)}), {})
    assert load_federated_checkpoint(tmp_path / "fixed")[0].beta is None


def test_the_chosen_beta_travels_to_flower_clients():
    pytest.importorskip("flwr")
    from fedpac_hf.flower.records import server_state_from_content, server_state_to_content

    state = ServerState(params={"w": torch.zeros(2)}, direction={"w": torch.ones(2)}, beta=0.3)
    algorithm = get_algorithm("fedpac_soap", beta="auto")
    content = server_state_to_content(state, algorithm, server_round=4, lr=0.1, partition_id=0)
    received = server_state_from_content(content)
    assert received.beta == pytest.approx(0.3)
    assert round_beta(algorithm, received) == pytest.approx(0.3)


def test_the_cli_runs_auto_logs_and_plots_beta_and_refuses_a_bad_value(tmp_path, capsys):
    import json

    from fedpac_hf.cli import main

    from .test_cli_train import TINY_VIT, write_yaml

    run_dir = tmp_path / "run"
    config = write_yaml(tmp_path / "c.yaml", {**TINY_VIT, "beta": "auto"})
    assert main(["train", config, "--num_rounds", "4", "--output_dir", str(run_dir)]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["beta"] for r in rows[:2]] == [AUTO_BETA_START] * 2
    assert all(0.0 <= r["beta"] <= 0.75 for r in rows)
    assert all("drift_from_start_relative" in r for r in rows[1:])
    assert (run_dir / "drift.png").stat().st_size > 5000
    summary = (run_dir / "summary.md").read_text()
    assert "drift from start (rel.)" in summary and "| beta |" in summary
    assert "beta: auto" in (run_dir / "config.yaml").read_text()

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", config, "--beta", "1.5", "--output_dir", str(tmp_path / "bad")])
    assert exit_info.value.code == 2
    assert '[0, 1) or "auto"' in capsys.readouterr().err
