"""What client-level DP would clip, measured in runs without DP: the norms to choose clip norms from."""

from __future__ import annotations

import dataclasses
import statistics

import pytest
import torch

from fedpac_hf.federated import ServerState, get_algorithm, simulate
from fedpac_hf.federated.batches import cycle_batches
from fedpac_hf.federated.client import client_update
from fedpac_hf.federated.local_step import ClientHooks, LocalSteps
from fedpac_hf.federated.privacy import ClientDP
from fedpac_hf.federated.privacy_clip import own_norms, own_part, public_reference
from fedpac_hf.federated.secure_aggregation import add_secure_mean
from fedpac_hf.federated.server import RoundAggregator, aggregate
from fedpac_hf.rundir.reporting import write_summary

from .test_privacy import _clients, _loss, _model


def _norm(tensors) -> float:
    """The global L2 norm, the plain way (float64 per entry, summed on the host)."""
    return sum(float(t.double().square().sum()) for t in tensors.values()) ** 0.5


def _second_round(algorithm):
    """A round-2 state (a global direction and Theta) and the round's client updates."""
    alg = get_algorithm(algorithm)
    model = _model()
    hooks = ClientHooks(loss_fn=_loss)
    steps = LocalSteps(lr=0.05, num_steps=4)
    state = ServerState.from_model(model)
    first = [
        client_update(model, state, alg, cycle_batches(c), steps, hooks, client_id=i)
        for i, c in enumerate(_clients(num=6, per=12))
    ]
    state, _ = aggregate(state, first, alg, lr=steps.lr, local_steps=steps.num_steps)
    assert state.direction is not None and (state.curvature or not alg.align)
    updates = [
        client_update(model, state, alg, cycle_batches(c), steps, hooks, client_id=i)
        for i, c in enumerate(_clients(num=6, per=12, seed=1))
    ]
    return alg, state, steps, updates


@pytest.mark.parametrize("algorithm", ["fedpac_soap", "fedadamw", "fedavg_adamw"])
def test_a_round_reports_the_median_norm_of_what_dp_would_clip(algorithm):
    alg, state, steps, updates = _second_round(algorithm)
    reference = public_reference(state, alg, steps.lr, steps.num_steps)
    own = [own_part(u, reference) for u in updates]
    deltas = [_norm(d) for d, _ in own]
    thetas = [_norm(t) for _, t in own]
    # with the correction, the delta holds public steps along g_G: its own norm differs
    differs = [abs(a - _norm(u.delta)) > 1e-6 for a, u in zip(deltas, updates)]
    assert all(differs) if alg.correction else not any(differs)
    aggregator = RoundAggregator(state, alg, lr=steps.lr)
    for update in updates:
        aggregator.add(update)
    _, metrics = aggregator.finalize(lr=steps.lr, local_steps=steps.num_steps)
    # the server subtracts the public part in float64, own_part in float32: rounding apart
    assert metrics["delta_norm_median"] == pytest.approx(statistics.median(deltas), rel=1e-7)
    if alg.align:  # Theta travels: its norm is what dp_theta_clip_norm bounds
        assert metrics["theta_norm_median"] == pytest.approx(statistics.median(thetas), rel=1e-7)
        assert thetas[0] != pytest.approx(_norm(updates[0].curvature), rel=1e-3)
    else:
        assert "theta_norm_median" not in metrics


def test_own_norms_match_own_part_and_leave_out_what_is_public():
    alg, state, steps, updates = _second_round("fedpac_soap")
    reference = public_reference(state, alg, steps.lr, steps.num_steps)
    for update in updates:
        delta, theta = own_part(update, reference)
        norms = own_norms(update.delta, update.curvature, reference).tolist()
        assert norms == pytest.approx([_norm(delta), _norm(theta)], rel=1e-9)
    plain = own_norms(updates[0].delta, {}, (None, None)).tolist()
    assert plain == pytest.approx([_norm(updates[0].delta), 0.0], rel=1e-9)


def test_no_norms_under_dp_or_secure_aggregation_or_without_the_rate():
    alg, state, steps, updates = _second_round("fedpac_soap")
    dp = ClientDP.from_settings(
        "client", clip_norm=1.0, theta_clip_norm=1.0, noise_multiplier=0.0, share_theta=True
    )
    seeded = dataclasses.replace(state, noise_seed=0)  # the server's secret under DP
    private = RoundAggregator(seeded, alg, lr=steps.lr, privacy=dp, expected_clients=6)
    unknown = RoundAggregator(state, alg)  # no rate at the start of the round
    for update in updates:
        private.add(update)
        unknown.add(update)
    secure = RoundAggregator(state, alg, lr=steps.lr)
    mean = {n: torch.stack([u.delta[n] for u in updates]).mean(0) for n in updates[0].delta}
    curv = {n: torch.stack([u.curvature[n] for u in updates]).mean(0) for n in updates[0].curvature}
    add_secure_mean(secure, mean, curv, [(u.client_id, u.num_examples, u.metrics) for u in updates])
    for aggregator in (private, unknown, secure):
        _, metrics = aggregator.finalize(lr=steps.lr, local_steps=steps.num_steps)
        assert not {"delta_norm_median", "theta_norm_median"} & set(metrics)


def test_simulate_logs_the_norms_and_the_summary_names_the_settings(tmp_path):
    common = dict(lr=0.05, preflight=False)
    plain = simulate(_model(), _clients(num=6, per=12), "fedpac_soap", 3, 3, 2, _loss, **common)
    assert all(h["delta_norm_median"] > 0 and h["theta_norm_median"] > 0 for h in plain)
    private, noised = (
        simulate(
            _model(),
            _clients(num=6, per=12),
            "fedpac_soap",
            2,
            3,
            2,
            _loss,
            **common,
            dp_mode="client",
            dp_clip_norm=1.0,
            dp_theta_clip_norm=1.0,
            dp_noise_multiplier=z,
            dp_delta=0.01,
        )
        for z in (0.0, 1.0)
    )
    assert not any("delta_norm_median" in h for h in private)
    summary = write_summary(tmp_path, plain).read_text(encoding="utf-8")
    delta = statistics.median(h["delta_norm_median"] for h in plain)
    theta = statistics.median(h["theta_norm_median"] for h in plain)
    assert f"delta {delta:.4g} (`dp_clip_norm`)" in summary
    assert f"Theta {theta:.4g} (`dp_theta_clip_norm`)" in summary
    assert "dp_clip_norm" not in write_summary(tmp_path, private).read_text(encoding="utf-8")
    assert all(h["dp_noise_norm"] == 0.0 for h in private)  # clipping only: no noise
    assert "dp_noise_norm" not in write_summary(tmp_path, private).read_text(encoding="utf-8")
    noise = statistics.median(h["dp_noise_norm"] for h in noised)
    update = statistics.median(h["update_norm"] for h in noised)
    summary = write_summary(tmp_path, noised).read_text(encoding="utf-8")
    assert noise > 0 and f"noise on a round's mean delta {noise:.3g} (`dp_noise_norm`)" in summary
    assert f"against a mean update of {update:.3g} (`update_norm`" in summary
