"""``dp_clip_schedule: learning_rate``: the delta's clip norm, and its noise, follow the round's rate."""

from __future__ import annotations

import math

import pytest
import torch

from fedpac_hf import FedPACArguments
from fedpac_hf.federated import ServerState, get_algorithm, round_learning_rates, simulate
from fedpac_hf.federated.local_step import LocalSteps
from fedpac_hf.federated.privacy import ClientDP
from fedpac_hf.federated.server import RoundAggregator
from fedpac_hf.federated.state import ClientUpdate
from fedpac_hf.flower.config import arguments_from_run_config

from .test_privacy import CLIENT_DP, _clients, _first_client_update, _loss, _model, _norm


def _dp(schedule: str | None, **extra) -> ClientDP:
    return ClientDP.from_settings(
        "client",
        clip_norm=0.05,
        theta_clip_norm=1e-4,
        noise_multiplier=0.8,
        share_theta=True,
        clip_schedule=schedule,
        learning_rate=1.0,
        **extra,
    )


@pytest.mark.parametrize(("schedule", "bound"), [(None, 0.05), ("learning_rate", 0.05 * 0.25)])
def test_a_client_clips_its_delta_to_the_bound_of_the_rounds_rate(schedule, bound):
    """At a quarter of the peak rate the delta's bound is a quarter of dp_clip_norm; Theta's
    bound does not move (curvature statistics do not scale with the rate)."""
    alg = get_algorithm("fedpac_soap")
    model = _model()
    state = ServerState.from_model(model)
    steps = LocalSteps(lr=0.25, num_steps=4)  # far above both bounds
    sent = _first_client_update(model, state, alg, steps, privacy=_dp(schedule))
    assert _norm(sent.delta) == pytest.approx(bound, rel=1e-5)
    assert _norm(sent.curvature) == pytest.approx(1e-4, rel=1e-5)


@pytest.mark.parametrize(("schedule", "factor"), [("constant", 1.0), ("learning_rate", 0.25)])
def test_the_servers_noise_follows_the_rounds_rate(schedule, factor):
    """The mean of zero updates is the noise over q N: std z k C_t / (q N), C_t = C lr / peak."""
    dp = _dp(schedule).resolve(num_clients=100, sample_rate=0.1, num_rounds=5)
    state = ServerState(params={"w": torch.zeros(200, 100)}, noise_seed=3)
    aggregator = RoundAggregator(
        state, get_algorithm("fedpac_soap"), privacy=dp, expected_clients=10
    )
    for cid in range(10):
        aggregator.add(ClientUpdate(cid, {"w": torch.zeros(200, 100)}, {}, 8, 1))
    new, _ = aggregator.finalize(lr=0.25, local_steps=1)
    expected = 0.8 * math.sqrt(2.0) * 0.05 * factor / 10
    assert new.params["w"].std().item() == pytest.approx(expected, rel=0.03)


def _noisy_run(schedule: str | None) -> list[dict[str, float]]:
    """Four cosine rounds with noise far above what the clients send: each round's update
    is the noise, of L2 norm about z C_t sqrt(d) / (q N)."""
    return simulate(
        _model(),
        _clients(num=20),
        "fedavg_adamw",
        4,
        5,
        2,
        _loss,
        lr=0.05,
        dp_mode="client",
        dp_clip_norm=1e-3,
        dp_noise_multiplier=50.0,
        dp_clip_schedule=schedule,
        dp_noise_seed=0,
        preflight=False,
    )


def test_under_simulate_each_rounds_noise_shrinks_with_its_rate_and_epsilon_is_unchanged():
    scheduled, constant = _noisy_run("learning_rate"), _noisy_run(None)
    rates = round_learning_rates(0.05, 4, "cosine")
    d = sum(p.numel() for p in _model().parameters())
    for r, (metrics, plain) in enumerate(zip(scheduled, constant)):
        noise = 50.0 * 1e-3 * math.sqrt(d) / 5
        assert plain["update_norm"] == pytest.approx(noise, rel=0.3)
        assert metrics["update_norm"] == pytest.approx(noise * rates[r] / 0.05, rel=0.3)
        assert metrics["epsilon"] == plain["epsilon"]  # the same mechanism, accounted the same
    assert scheduled[-1]["update_norm"] < 0.3 * constant[-1]["update_norm"]


def test_the_setting_reaches_the_clients_settings_and_the_run_identity_only_when_set(tmp_path):
    common = dict(output_dir=str(tmp_path), learning_rate=0.3, **CLIENT_DP)
    plain = FedPACArguments(**common)
    scheduled = FedPACArguments(**common, dp_clip_schedule="learning_rate")
    alg = get_algorithm("fedpac_soap")
    assert plain.client_privacy(alg).clip_lr is None
    dp = scheduled.client_privacy(alg)
    assert dp.clip_lr == 0.3
    assert dp.at_rate(0.15).clip_norm == pytest.approx(0.5)
    assert dp.at_rate(0.15).at_rate(0.15).clip_norm == pytest.approx(0.5)  # one scaling only
    assert "dp_clip_schedule" not in plain.privacy_settings()
    assert scheduled.privacy_settings()["dp_clip_schedule"] == "learning_rate"
    # a Flower run config names it with dashes
    flower = {k.replace("_", "-"): v for k, v in common.items() if k != "output_dir"}
    from_flower = arguments_from_run_config({**flower, "dp-clip-schedule": "learning_rate"})
    assert from_flower.client_privacy(alg).clip_lr == 0.3


def test_a_learning_rate_schedule_without_a_positive_peak_is_refused():
    with pytest.raises(ValueError, match="dp_clip_schedule: learning_rate"):
        ClientDP.from_settings(
            "client",
            clip_norm=1.0,
            noise_multiplier=1.0,
            clip_schedule="learning_rate",
            learning_rate=None,
        )
