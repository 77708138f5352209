"""``dp_clip_schedule: adaptive``: clip norms that track a quantile of the clients' norms."""

from __future__ import annotations

import math

import pytest
import torch

from fedpac_hf import FedPACArguments, FedPACTrainer
from fedpac_hf.federated import ServerState, get_algorithm, simulate
from fedpac_hf.federated.local_step import LocalSteps
from fedpac_hf.federated.privacy import ClientDP
from fedpac_hf.federated.server import RoundAggregator
from fedpac_hf.federated.state import ClientUpdate
from fedpac_hf.flower.config import arguments_from_run_config
from fedpac_hf.flower.records import server_state_from_content, server_state_to_content
from fedpac_hf.rundir.checkpoint import load_federated_checkpoint
from fedpac_hf.rundir.reporting import summary_table

from .test_privacy import CLIENT_DP, _clients, _first_client_update, _loss, _model, _norm
from .trainer_fixtures import image_data, tiny_vit, vit_args


def _dp(z: float = 0.0, **adaptive) -> ClientDP:
    """Adaptive clipping of the delta and Theta (fedpac_soap), resolved for 100 clients at
    q = 0.1 (10 expected per round)."""
    dp = ClientDP.from_settings(
        "client",
        clip_norm=0.5,
        theta_clip_norm=2.0,
        noise_multiplier=z,
        share_theta=True,
        clip_schedule="adaptive",
        **adaptive,
    )
    return dp.resolve(num_clients=100, sample_rate=0.1, num_rounds=5)


def _round(dp: ClientDP, clipped: list[tuple[float, float]], round_index: int = 0, **state):
    """Finalize a round of zero updates whose clients report ``clipped`` (delta, Theta) flags."""
    shape = (200, 100)
    server = ServerState(params={"w": torch.zeros(shape)}, noise_seed=3, round=round_index, **state)
    aggregator = RoundAggregator(
        server, get_algorithm("fedpac_soap"), privacy=dp, expected_clients=10
    )
    for cid, (delta, theta) in enumerate(clipped):
        flags = {"dp_clipped_delta": delta, "dp_clipped_theta": theta}
        aggregator.add(ClientUpdate(cid, {"w": torch.zeros(shape)}, {}, 8, 1, flags))
    return aggregator.finalize(lr=0.1, local_steps=1)


def test_without_noise_the_bounds_move_towards_the_quantile_exactly():
    """All ten clients clipped: the estimate of the unclipped fraction is 0, so each bound grows
    by exp(eta gamma); none clipped: it shrinks by exp(-eta (1 - gamma)); at the quantile it stays.
    The round's bounds are its metrics, the next round's travel with the state."""
    dp = _dp(clip_norm_lr=0.3, clip_quantile=0.6)
    new, metrics = _round(dp, [(1.0, 1.0)] * 10)
    assert metrics["dp_clip_norm"] == 0.5 and metrics["dp_theta_clip_norm"] == 2.0
    assert new.dp_clip_norms == pytest.approx((0.5 * math.exp(0.18), 2.0 * math.exp(0.18)))
    grown = new.dp_clip_norms

    # the next round clips at the grown bounds: none clipped, the delta's shrinks back a little
    after, metrics = _round(dp, [(0.0, 1.0)] * 10, round_index=1, dp_clip_norms=grown)
    assert metrics["dp_clip_norm"] == pytest.approx(grown[0])
    assert after.dp_clip_norms == pytest.approx(
        (grown[0] * math.exp(-0.3 * 0.4), grown[1] * math.exp(0.18))
    )
    # six of ten unclipped is the 0.6 quantile: nothing moves
    steady, _ = _round(dp, [(0.0, 0.0)] * 6 + [(1.0, 1.0)] * 4, round_index=2, dp_clip_norms=grown)
    assert steady.dp_clip_norms == pytest.approx(grown)


def test_the_counts_noise_has_the_set_std_and_the_sums_get_the_rest_of_the_mechanism():
    """Over 300 rounds the released unclipped fraction scatters with std sigma_b / (q N) around
    the true one; the sums' noise has multiplier z_v with z^-2 = z_v^-2 + m (2 sigma_b)^-2
    (here 21 % above z: the counts take a third of the mechanism)."""
    z, sigma, eta = 0.8, 1.0, 0.2
    dp = _dp(z, clipped_count_std=sigma, clip_norm_lr=eta)
    released = []
    for r in range(300):
        new, _ = _round(dp, [(0.0, 0.0)] * 5 + [(1.0, 1.0)] * 5, round_index=r)
        for bound, before in zip(new.dp_clip_norms, (0.5, 2.0)):
            released.append(-math.log(bound / before) / eta + 0.5)  # b_hat - gamma + gamma
    spread = torch.tensor(released, dtype=torch.float64)
    assert spread.mean().item() == pytest.approx(0.5, abs=0.02)
    assert spread.std().item() == pytest.approx(sigma / 10, rel=0.1)

    new, _ = _round(dp, [(0.0, 0.0)] * 10)
    z_v = (z**-2 - 2 / (2 * sigma) ** 2) ** -0.5
    assert z_v > 1.2 * z
    expected = z_v * math.sqrt(2.0) * 0.5 / 10  # z_v k C / (q N)
    assert new.params["w"].std().item() == pytest.approx(expected, rel=0.03)


def test_a_client_clips_at_the_bounds_of_the_global_state():
    alg = get_algorithm("fedpac_soap")
    model = _model()
    dp = _dp(0.0)
    state = ServerState.from_model(model)
    moved = ServerState(params=state.params, dp_clip_norms=(1e-3, 2e-4))
    steps = LocalSteps(lr=0.25, num_steps=4)
    first = _first_client_update(_model(), state, alg, steps, privacy=dp)
    later = _first_client_update(_model(), moved, alg, steps, privacy=dp)
    assert _norm(later.delta) == pytest.approx(1e-3, rel=1e-5)
    assert _norm(later.curvature) == pytest.approx(2e-4, rel=1e-5)
    assert _norm(first.delta) > 1e-3  # round 1: the settings' bounds (0.5, 2.0)


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_the_released_sums_and_counts_compose_to_the_accounted_mechanism(sampling):
    """A round as the server releases it (the sums at multiplier z_v, the m noised counts at
    sigma_b, inside the round's sampling) given to dp-accounting's Renyi-DP accountant has the
    epsilon of one Gaussian at z, the events the run accounts. In the accountant's units
    (noise std over the sensitivity between neighbouring federations): with Poisson sampling
    (add or remove a client) the sums move by C, each count by 1/2; with fixed-size samples
    (replace a client) the sums by 2 C, each count by 1."""
    import dp_accounting as dpa

    from fedpac_hf.federated.accounting import epsilon_after

    z, num_clients, q, rounds, delta = 1.5, 500, 0.1, 20, 1e-5
    dp = _dp(z, clipped_count_std=2.0)
    z_v, m, sigma = dp.sums_noise_multiplier, dp.adapted_parts, dp.adaptive.count_std
    assert m == 2 and z_v > 1.05 * z
    if sampling == "poisson":
        relation = dpa.privacy_accountant.NeighboringRelation.ADD_OR_REMOVE_ONE
        released = [dpa.GaussianDpEvent(z_v), dpa.GaussianDpEvent(2 * sigma / math.sqrt(m))]
        one = dpa.PoissonSampledDpEvent(q, dpa.ComposedDpEvent(released))
        accounted = dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z))
    else:
        relation = dpa.privacy_accountant.NeighboringRelation.REPLACE_ONE
        released = [dpa.GaussianDpEvent(z_v / 2), dpa.GaussianDpEvent(sigma / math.sqrt(m))]
        sample = (num_clients, int(q * num_clients))
        one = dpa.SampledWithoutReplacementDpEvent(*sample, dpa.ComposedDpEvent(released))
        accounted = dpa.SampledWithoutReplacementDpEvent(*sample, dpa.GaussianDpEvent(z / 2))

    def epsilon(event):
        accountant = dpa.rdp.RdpAccountant(neighboring_relation=relation)
        return accountant.compose(dpa.SelfComposedDpEvent(event, rounds)).get_epsilon(delta)

    assert epsilon(one) == pytest.approx(epsilon(accounted), rel=1e-9)
    if sampling == "fixed":  # the run's own accountant for fixed-size samples
        run = epsilon_after(rounds, z, q, delta, num_clients)
        assert epsilon(one) == pytest.approx(run, rel=1e-9)


def _run(schedule: str | None, z: float, rounds: int = 30, sampling: str | None = None):
    """fedavg with SGD clients at a rate too small to change the model much: their delta
    norms spread (more than an Adam-like step's) and stay where they are over the rounds."""
    return simulate(
        _model(),
        _clients(num=40),
        "fedavg",
        rounds,
        0.5,
        2,
        _loss,
        lr=1e-4,
        lr_schedule="constant",
        dp_mode="client",
        dp_clip_norm=1e-7,  # far below every client's norm
        dp_noise_multiplier=z,
        dp_clip_schedule=schedule,
        dp_clip_norm_lr=1.0 if schedule == "adaptive" else None,
        dp_noise_seed=1,
        dp_sampling=sampling,
        preflight=False,
    )


@pytest.mark.parametrize("sampling", [None, "fixed"])
def test_under_simulate_the_bound_climbs_to_the_median_and_epsilon_is_unchanged(sampling):
    adaptive, constant = _run("adaptive", 0.0, sampling=sampling), _run(None, 0.0)
    if sampling == "fixed":  # 20 of the 40 clients every round
        assert {h["num_clients"] for h in adaptive} == {20.0}
    assert all(h["dp_clipped_delta"] == 1.0 for h in constant)
    bounds = [h["dp_clip_norm"] for h in adaptive]
    assert bounds[0] == 1e-7 and bounds[12] > 100 * bounds[0]  # climbs while all are clipped
    late = adaptive[-10:]
    clipped = sum(h["dp_clipped_delta"] for h in late) / len(late)
    assert 0.3 < clipped < 0.7  # it then stays around the median: about half are clipped
    assert max(bounds[-10:]) < 2 * min(bounds[-10:])
    noisy = _run("adaptive", 1.0, rounds=3, sampling=sampling)
    plain = _run(None, 1.0, rounds=3, sampling=sampling)
    assert [h["epsilon"] for h in noisy] == [h["epsilon"] for h in plain]  # the same events


def test_the_settings_reach_the_clients_the_run_identity_and_a_flower_run_config(tmp_path):
    common = dict(output_dir=str(tmp_path), **CLIENT_DP)
    plain = FedPACArguments(**common)
    adaptive = FedPACArguments(
        **common, dp_clip_schedule="adaptive", dp_clip_quantile=0.7, dp_clip_norm_lr=0.1
    )
    alg = get_algorithm("fedpac_soap")
    assert plain.client_privacy(alg).adaptive is None
    rule = adaptive.client_privacy(alg).adaptive
    assert (rule.quantile, rule.norm_lr, rule.count_std) == (0.7, 0.1, None)
    assert "dp_clip_quantile" not in plain.privacy_settings()
    assert adaptive.privacy_settings()["dp_clip_quantile"] == 0.7
    flower = {k.replace("_", "-"): v for k, v in common.items() if k != "output_dir"}
    from_flower = arguments_from_run_config(
        {**flower, "dp-clip-schedule": "adaptive", "dp-clipped-count-std": 4.0}
    )
    assert from_flower.client_privacy(alg).adaptive.count_std == 4.0
    # resolved: the count noise defaults to the expected clients over 20
    resolved = adaptive.client_privacy(alg).resolve(1000, 0.1, 10)
    assert resolved.adaptive.count_std == pytest.approx(5.0)


def test_the_bounds_travel_to_flower_clients():
    def sent(state: ServerState) -> ServerState:
        round_ = dict(server_round=2, lr=0.1, partition_id=0)
        content = server_state_to_content(state, get_algorithm("fedavg_adamw"), **round_)
        return server_state_from_content(content)

    params = {"w": torch.ones(2)}
    assert sent(ServerState(params, dp_clip_norms=(0.25, None))).dp_clip_norms == (0.25, None)
    assert sent(ServerState(params, dp_clip_norms=(0.25, 3.0))).dp_clip_norms == (0.25, 3.0)
    assert sent(ServerState(params)).dp_clip_norms is None


def test_a_resumed_adaptive_run_continues_the_bounds_exactly(tmp_path):
    data = image_data()
    dp = dict(
        dp_mode="client",
        dp_clip_norm=0.01,
        dp_theta_clip_norm=0.5,
        dp_noise_multiplier=1.0,
        dp_clip_schedule="adaptive",
        dp_clipped_count_std=2.0,
    )
    first = FedPACTrainer(
        model=tiny_vit(),
        args=vit_args(tmp_path, num_rounds=3, save_strategy="steps", save_steps=1, **dp),
        train_dataset=data["train"],
    )
    first.train()
    bounds = [h["dp_clip_norm"] for h in first.round_history]
    assert bounds[0] == 0.01 and bounds[1] != bounds[0]
    header = summary_table(first.round_history).splitlines()[0]
    assert "| clip norm |" in header  # summary.md's per-round table shows the bounds
    ckpt = tmp_path / "run" / "checkpoint-round-1"
    state, _ = load_federated_checkpoint(ckpt)
    assert state.dp_clip_norms == (bounds[1], first.round_history[1]["dp_theta_clip_norm"])

    resumed = FedPACTrainer(
        model=tiny_vit(seed=123),
        args=vit_args(tmp_path, num_rounds=3, **dp),
        train_dataset=data["train"],
    )
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert [h["dp_clip_norm"] for h in resumed.round_history] == bounds
    assert resumed.server_state.dp_clip_norms == first.server_state.dp_clip_norms
    for a, b in zip(resumed.model.parameters(), first.model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"dp_clip_quantile": 0.5}, "dp_clip_quantile set without adaptive clipping"),
        (
            {"dp_clip_schedule": "learning_rate", "dp_clip_norm_lr": 0.1},
            "dp_clip_norm_lr set without adaptive clipping",
        ),
        ({"dp_clip_schedule": "adaptive", "dp_clip_quantile": 1.0}, "dp_clip_quantile"),
        ({"dp_clip_schedule": "adaptive", "dp_clip_norm_lr": 0.0}, "dp_clip_norm_lr"),
        (
            {"dp_clip_schedule": "adaptive", "dp_clipped_count_std": float("nan")},
            "dp_clipped_count_std",
        ),
        (  # record-level DP takes no clip schedule
            {"dp_mode": "record", "dp_clipped_count_std": 2.0},
            "dp_clipped_count_std set without adaptive clipping",
        ),
    ],
)
def test_bad_adaptive_settings_fail_when_read_naming_the_setting(tmp_path, settings, named):
    base = {"dp_mode": "client", "dp_clip_norm": 1.0, "dp_noise_multiplier": 1.0}
    with pytest.raises(ValueError, match=named):
        FedPACArguments(output_dir=str(tmp_path), **{**CLIENT_DP, **base, **settings})


def test_too_little_count_noise_fails_before_round_one_naming_the_setting():
    trained = []
    with pytest.raises(ValueError, match="dp_clipped_count_std=0.2 is too small"):
        simulate(
            _model(),
            _clients(num=10),
            "fedavg_adamw",
            3,
            5,
            1,
            _loss,
            dp_mode="client",
            dp_clip_norm=1.0,
            dp_noise_multiplier=1.0,
            dp_clip_schedule="adaptive",
            dp_clipped_count_std=0.2,
            callback=lambda *_: trained.append(1),
        )
    assert trained == []
