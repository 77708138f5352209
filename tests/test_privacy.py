"""Client-level differential privacy: clipping, noise, sampling, accounting, resume, bad settings."""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import dp_accounting
import pytest
import torch
from opacus.accountants import PRVAccountant
from torch.utils.data import DataLoader, TensorDataset

from fedpac_hf import FedPACArguments, FedPACTrainer
from fedpac_hf.federated import ServerState, get_algorithm, simulate
from fedpac_hf.federated.accounting import (
    MIN_ACCOUNTED_NOISE,
    discretization,
    epsilon_after,
    noise_for_epsilon,
    round_event,
)
from fedpac_hf.federated.batches import cycle_batches
from fedpac_hf.federated.client import client_update
from fedpac_hf.federated.local_step import ClientHooks, LocalSteps
from fedpac_hf.federated.privacy import ClientDP
from fedpac_hf.federated.privacy_clip import own_part, public_reference
from fedpac_hf.federated.privacy_noise import noise_generator, noised_round
from fedpac_hf.federated.privacy_notes import (
    describe_client_noise,
    describe_delta,
    describe_record_noise,
)
from fedpac_hf.federated.record_privacy import RecordDP, record_loader
from fedpac_hf.federated.sampling import poisson_sample_clients
from fedpac_hf.federated.server import RoundAggregator
from fedpac_hf.federated.state import ClientUpdate
from fedpac_hf.optim import curvature_retention, gnb_loss
from fedpac_hf.optim.repair import repair_curvature
from fedpac_hf.rundir.checkpoint import load_federated_checkpoint

from .trainer_fixtures import image_data, tiny_vit, trained_and_resumed, vit_args

#: Client-level DP settings of an aligning run, as ``FedPACArguments`` takes them.
CLIENT_DP = dict(
    algorithm="fedpac_soap",
    dp_mode="client",
    dp_clip_norm=1.0,
    dp_theta_clip_norm=1.0,
    dp_noise_multiplier=1.0,
)


def _clients(num: int = 20, per: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num * per, 6, generator=gen)
    y = (x @ torch.randn(6, 3, generator=gen)).argmax(1)
    return [[(x[i * per : (i + 1) * per], y[i * per : (i + 1) * per])] for i in range(num)]


def _loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _gnb(model, batch):
    return gnb_loss(model(batch[0]), generator=torch.Generator().manual_seed(0))


def _first_client_update(model, state, alg, steps, privacy=None):
    """One round of the first client of :func:`_clients` (with ``privacy``: what it sends)."""
    batches = cycle_batches(_clients()[0])
    hooks = ClientHooks(loss_fn=_loss, curvature_loss_fn=_gnb)  # Sophia's refreshes, seeded
    return client_update(model, state, alg, batches, steps, hooks, privacy=privacy)


def _norm(tensors) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors.values()))


# ------------------------------------------------------------------ clipping


@pytest.mark.parametrize("algorithm", ["fedpac_soap", "fedadamw", "fedavg_adamw"])
def test_clipping_bounds_what_leaves_a_client_delta_and_theta(algorithm):
    alg = get_algorithm(algorithm)
    model = _model()
    state = ServerState.from_model(model)
    steps = LocalSteps(lr=0.5, num_steps=4)  # a large step: the delta is far above the bound
    plain = _first_client_update(model, state, alg, steps)
    dp = ClientDP.from_settings(
        "client",
        clip_norm=0.05,
        theta_clip_norm=1e-4,
        noise_multiplier=1.0,
        share_theta=alg.align,
    )
    clipped = _first_client_update(model, state, alg, steps, privacy=dp)
    assert _norm(plain.delta) > 0.05 and plain.curvature
    assert _norm(clipped.delta) == pytest.approx(0.05, rel=1e-5)
    # the same direction, only shorter
    scale = _norm(clipped.delta) / _norm(plain.delta)
    for name, d in plain.delta.items():
        torch.testing.assert_close(clipped.delta[name], d * scale, rtol=1e-4, atol=1e-7)
    assert clipped.metrics["dp_clipped_delta"] == 1.0
    if alg.align:  # Theta travels: bounded too
        assert _norm(plain.curvature) > 1e-4
        assert _norm(clipped.curvature) == pytest.approx(1e-4, rel=1e-5)
        assert clipped.metrics["dp_clipped_theta"] == 1.0
    else:  # Theta never leaves the client
        assert clipped.curvature == {}
        assert clipped.metrics["dp_clipped_theta"] == 0.0


def test_an_update_within_the_bounds_leaves_unchanged():
    update = ClientUpdate(0, {"w": torch.tensor([0.3, 0.4])}, {"w.exp_avg_sq": torch.ones(2)}, 4, 1)
    dp = ClientDP.from_settings(
        "client", clip_norm=1.0, theta_clip_norm=2.0, noise_multiplier=0.0, share_theta=True
    )
    from fedpac_hf.federated.privacy_clip import clip_update

    out = clip_update(update, dp)
    assert torch.equal(out.delta["w"], update.delta["w"])
    assert torch.equal(out.curvature["w.exp_avg_sq"], update.curvature["w.exp_avg_sq"])
    assert out.metrics == {"dp_clipped_delta": 0.0, "dp_clipped_theta": 0.0}


# ------------------------------------------------------------------ noise


def _resolved(share_theta: bool, z: float = 0.8, theta_share: float | None = None) -> ClientDP:
    dp = ClientDP.from_settings(
        "client",
        clip_norm=0.5,
        theta_clip_norm=2.0 if share_theta else None,
        noise_multiplier=z,
        share_theta=share_theta,
        theta_share=theta_share,
    )
    return dp.resolve(num_clients=100, sample_rate=0.1, num_rounds=5)


@pytest.mark.parametrize(
    ("share_theta", "theta_share", "k", "k_theta"),
    [(False, None, 1.0, 0.0), (True, None, 2**0.5, 2**0.5), (True, 0.2, 0.8**-0.5, 0.2**-0.5)],
)
def test_the_noise_measured_on_the_aggregate_matches_the_setting(
    share_theta, theta_share, k, k_theta
):
    """The mean delta of clients that sent zeros is the noise over q N: its std is z k C / (q N),
    with k = 1 / sqrt(1 - s) when Theta takes the share s of the mechanism (Theta's: z C_Theta
    / sqrt(s)); the accountant's epsilon is the same whatever s."""
    dp = _resolved(share_theta, theta_share=theta_share)
    assert dp.noise_multiplier == _resolved(share_theta).noise_multiplier
    alg = get_algorithm("fedpac_soap" if share_theta else "fedavg_adamw")
    params = {"w": torch.zeros(200, 100)}
    state = ServerState(params=params, noise_seed=11)
    aggregator = RoundAggregator(state, alg, privacy=dp, expected_clients=10)
    for cid in range(7):  # fewer than expected: the denominator stays q N = 10
        aggregator.add(ClientUpdate(cid, {"w": torch.zeros(200, 100)}, {}, 8, 1))
    new, metrics = aggregator.finalize(lr=1.0, local_steps=1)
    expected = 0.8 * k * 0.5 / 10
    assert new.params["w"].std().item() == pytest.approx(expected, rel=0.03)
    # the round reports the noise's L2 norm: here the whole update, over its 20,000 floats
    assert metrics["dp_noise_norm"] == pytest.approx(expected * 20_000**0.5, rel=1e-9)
    assert metrics["dp_noise_norm"] == pytest.approx(new.params["w"].norm().item(), rel=0.02)
    assert metrics["update_norm"] == pytest.approx(metrics["dp_noise_norm"], rel=0.02)
    assert abs(new.params["w"].mean().item()) < 3 * expected / 100
    assert new.noise_seed == 11  # the next round's noise comes from the same secret
    # Theta's sum gets std z k C_Theta, drawn from its own stream
    theta = {"w.L": torch.zeros(300, 300, dtype=torch.float64)}
    _, noised = noised_round(dp, {"w": torch.zeros(3, dtype=torch.float64)}, theta, None, 11, 0)
    if share_theta:
        assert noised["w.L"].std().item() == pytest.approx(0.8 * k_theta * 2.0, rel=0.02)
    else:
        assert torch.equal(noised["w.L"], theta["w.L"])  # not shared: nothing to noise


@pytest.mark.parametrize(("clients_per_round", "loud"), [(5, True), (50, False)])
def test_a_private_run_says_how_large_its_noise_is_before_round_one(
    caplog, clients_per_round, loud
):
    """The engine logs the resolved z and the noise on a round's mean delta in clip norms,
    z k sqrt(d) / (q N), when it is built; from one clip norm up as a warning."""
    from fedpac_hf.federated.engine import RoundEngine

    dp = ClientDP.from_settings("client", clip_norm=0.5, target_epsilon=4.0, share_theta=False)
    state = ServerState(params={"w": torch.zeros(40, 10), "b": torch.zeros(10)})
    with caplog.at_level("INFO", logger="fedpac_hf.federated.engine"):
        engine = RoundEngine(
            get_algorithm("fedavg_adamw"),
            state,
            num_clients=500,
            clients_per_round=clients_per_round,
            learning_rates=[0.1] * 10,
            local_steps=1,
            privacy=dp,
        )
    z = engine.privacy.noise_multiplier
    ratio = z * 410**0.5 / clients_per_round  # k = 1: Theta does not travel
    assert (ratio >= 1.0) == loud
    (record,) = [r for r in caplog.records if "client-level DP" in r.getMessage()]
    assert record.levelname == ("WARNING" if loud else "INFO")
    message = record.getMessage()
    assert f"noise multiplier {z:.4g}" in message and f"{ratio:.3g} x dp_clip_norm" in message
    assert ("clients_per_round" in message) == loud  # what to change


def test_theta_share_reaches_the_mechanism_and_the_run_identity_only_when_set(tmp_path):
    """dp_theta_share from the arguments (CLI, YAML, Flower run config) sizes the noise; unset,
    a run's identity is what it was before the setting existed (older runs still resume)."""
    common = dict(output_dir=str(tmp_path), **CLIENT_DP)
    plain, split = FedPACArguments(**common), FedPACArguments(**common, dp_theta_share=0.2)
    alg = get_algorithm("fedpac_soap")
    assert plain.client_privacy(alg).noise_scale == math.sqrt(2.0)
    assert split.client_privacy(alg).noise_scale == pytest.approx(0.8**-0.5)
    assert split.client_privacy(alg).theta_noise_scale == pytest.approx(0.2**-0.5)
    assert "dp_theta_share" not in plain.privacy_settings()
    assert split.privacy_settings()["dp_theta_share"] == 0.2


def test_the_noise_is_a_function_of_the_secret_seed_and_the_round():
    draw = lambda seed, r, part: torch.randn(5, generator=noise_generator(seed, r, part))  # noqa: E731
    assert torch.equal(draw(3, 1, "delta"), draw(3, 1, "delta"))
    assert not torch.equal(draw(3, 1, "delta"), draw(4, 1, "delta"))
    assert not torch.equal(draw(3, 1, "delta"), draw(3, 2, "delta"))
    assert not torch.equal(draw(3, 1, "delta"), draw(3, 1, "theta"))


def test_repair_makes_a_noised_theta_importable():
    gen = torch.Generator().manual_seed(0)
    noisy = torch.randn(6, 6, generator=gen)
    theta = {
        "a.L": noisy,
        "a.R": torch.tensor([1.0, -2.0]),
        "b.exp_avg_sq": torch.tensor([-1.0, 3.0]),
        "c.momentum": torch.tensor([-1.0, 3.0]),
        "a.L.sketch": torch.tensor([[-1.0]]),
    }
    fixed = repair_curvature(theta)
    assert torch.linalg.eigvalsh(fixed["a.L"].double()).min() > -1e-6
    torch.testing.assert_close(fixed["a.L"], fixed["a.L"].T)
    assert fixed["a.R"].tolist() == [1.0, 0.0]
    assert fixed["b.exp_avg_sq"].tolist() == [0.0, 3.0]
    assert fixed["c.momentum"].tolist() == [-1.0, 3.0]  # unconstrained entries stay
    assert fixed["a.L.sketch"].tolist() == [[-1.0]]
    psd = noisy @ noisy.T
    torch.testing.assert_close(repair_curvature({"x.L": psd})["x.L"], psd, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ sampling


def test_poisson_sampling_is_seeded_and_has_rate_q():
    rounds = [poisson_sample_clients(200, 0.1, 5, r) for r in range(300)]
    assert rounds[7] == poisson_sample_clients(200, 0.1, 5, 7)
    assert rounds[7] != poisson_sample_clients(200, 0.1, 6, 7)
    counts = [len(r) for r in rounds]
    assert sum(counts) / len(counts) == pytest.approx(20, rel=0.05)
    assert len(set(counts)) > 5  # the number of clients varies
    assert all(r == sorted(set(r)) for r in rounds)


# ------------------------------------------------------------------ accounting


def _pld_epsilon(q: float, z: float, count: int, delta: float) -> float:
    """Epsilon of ``count`` Poisson-sampled Gaussian events, composed by dp-accounting here."""
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), count
    )
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    accountant.compose(event)
    return accountant.get_epsilon(delta)


def _private_run(num_clients: int, clients_per_round: int, z: float, **settings: Any):
    """4 rounds of fedpac_soap (K = 2) under client-level DP at multiplier ``z``: the history."""
    return simulate(
        _model(),
        _clients(num=num_clients),
        "fedpac_soap",
        4,
        clients_per_round,
        2,
        _loss,
        lr=0.05,
        dp_mode="client",
        dp_clip_norm=0.1,
        dp_theta_clip_norm=1.0,
        dp_noise_multiplier=z,
        dp_noise_seed=0,
        preflight=False,
        **settings,
    )


def test_simulate_reports_the_accountants_epsilon_for_its_events():
    history = _private_run(20, 5, 1.1)
    q, delta = 5 / 20, 20**-1.1
    for r, metrics in enumerate(history, start=1):
        assert metrics["epsilon"] == pytest.approx(_pld_epsilon(q, 1.1, r, delta), rel=1e-9)
        assert metrics["dp_delta"] == pytest.approx(delta, rel=1e-12)  # the default, resolved
    assert history[1]["epsilon"] > history[0]["epsilon"]
    assert {"dp_clipped_delta", "dp_clipped_theta"} <= set(history[0])


@pytest.mark.parametrize(("z", "q", "rounds"), [(1.0, 0.2, 50), (0.8, 0.02, 300), (3.0, 0.02, 100)])
def test_epsilon_is_within_ten_percent_of_opacus_prv_accountant(z, q, rounds):
    delta = 1e-5
    prv = PRVAccountant()
    prv.history = [(z, q, rounds)]
    independent = prv.get_epsilon(delta)
    assert epsilon_after(rounds, z, q, delta) == pytest.approx(independent, rel=0.10)


@pytest.mark.parametrize("z", [0.1, 0.05])
def test_a_small_noise_multiplier_gets_the_fine_grids_epsilon(z):
    """Below MIN_NOISE_MULTIPLIER the accountant's grid widens as 1 / z^2 (its size, and the
    time of each round's epsilon, stay bounded); epsilon stays the 1e-3 grid's."""
    assert discretization(z) == pytest.approx(1e-3 * (0.3 / z) ** 2) and discretization(0.5) == 1e-3
    fine = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    fine.compose(round_event(z, 0.1, 20))
    assert epsilon_after(20, z, 0.1, 1e-3) == pytest.approx(fine.get_epsilon(1e-3), rel=1e-4)


def test_below_the_accounted_noise_epsilon_is_infinite_not_an_overflow():
    """Down to MIN_ACCOUNTED_NOISE epsilon is the accountant's (in the millions there); below,
    where the grid would overflow the accountant, it is reported as inf, as for clipping only."""
    just_above = epsilon_after(20, MIN_ACCOUNTED_NOISE, 0.1, 1e-5)
    assert 1e6 < just_above < math.inf
    assert epsilon_after(20, MIN_ACCOUNTED_NOISE * 0.99, 0.1, 1e-5) == math.inf
    assert epsilon_after(20, 6e-6, 0.1, 500**-1.1) == math.inf  # overflowed before


def test_the_noise_note_says_when_epsilon_is_logged_as_inf():
    messages = []
    for z in (MIN_ACCOUNTED_NOISE / 2, MIN_ACCOUNTED_NOISE):
        dp = ClientDP.from_settings("client", clip_norm=1.0, noise_multiplier=z)
        messages += _notes(describe_client_noise, dp.resolve(100, 0.1, 5), 50, 10.0, 0.1, 5)
    assert ["logged as inf" in m for m in messages] == [True, False]


def test_a_large_client_level_delta_draws_a_warning_naming_dp_delta(caplog):
    """Above 0.01 (the default below 66 clients) a small epsilon means little: at 10 clients'
    default, 2 rounds of q = 0.3 reach epsilon 0.001 with z = 2.1. The warning names dp_delta,
    and says when the delta is the default; 66 clients' default and an explicit 1e-5 pass."""
    assert noise_for_epsilon(0.001, 10**-1.1, 0.3, 2) == pytest.approx(2.1, abs=0.05)
    assert describe_delta(65**-1.1, True, 65, logging.getLogger("x")) is True
    assert describe_delta(66**-1.1, True, 66, logging.getLogger("x")) is False
    for settings, warned in (({}, True), ({"dp_delta": 1e-5}, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fedpac_hf"):
            _private_run(20, 5, 1.1, **settings)
        shown = [
            r.getMessage() for r in caplog.records if "privacy loss may exceed" in r.getMessage()
        ]
        assert len(shown) == warned
    (explicit,) = _notes(describe_delta, 0.05, False, 20)
    (default,) = _notes(describe_delta, 20**-1.1, True, 20)
    assert "delta 0.05 (dp_delta)" in explicit and "set dp_delta lower" in explicit
    assert "(num_clients ** -1.1, the default for 20 clients)" in default


def _notes(describe: Any, *args: Any) -> list[str]:
    """What ``describe(*args, log)`` logs, INFO and up (the notes of ``privacy_notes``)."""
    messages: list[str] = []
    log = logging.getLogger(f"test_privacy.{describe.__name__}")
    log.setLevel(logging.INFO)
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    log.addHandler(handler)
    try:
        describe(*args, log)
    finally:
        log.removeHandler(handler)
    return messages


def test_a_target_epsilon_gives_the_smallest_noise_that_meets_it():
    z = noise_for_epsilon(4.0, 1e-5, 0.05, 100)
    assert epsilon_after(100, z, 0.05, 1e-5) <= 4.0
    assert epsilon_after(100, z * 0.97, 0.05, 1e-5) > 4.0
    assert epsilon_after(3, 0.0, 0.05, 1e-5) == math.inf
    assert epsilon_after(0, 1.0, 0.05, 1e-5) == 0.0


# ------------------------------------------------------------------ DP off, DP at its limit


def test_dp_without_noise_and_with_bounds_never_reached_is_the_plain_run_bit_for_bit():
    """q = 1, z = 0, C huge: clipping scales by exactly 1, the noise is 0, the mean the same."""
    loaders = _clients(num=6)
    common = dict(lr=0.05, preflight=False)
    plain_model, private_model = _model(), _model()
    simulate(plain_model, loaders, "fedavg_adamw", 3, 6, 2, _loss, **common)
    simulate(
        private_model,
        loaders,
        "fedavg_adamw",
        3,
        6,
        2,
        _loss,
        **common,
        dp_mode="client",
        dp_clip_norm=1e9,
        dp_noise_multiplier=0.0,
        dp_delta=0.01,
    )
    for a, b in zip(plain_model.parameters(), private_model.parameters()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ resume


def test_a_resumed_private_run_adds_the_same_noise_and_continues_epsilon(tmp_path):
    data = image_data()
    dp = dict(dp_mode="client", dp_clip_norm=0.05, dp_theta_clip_norm=5.0, dp_noise_multiplier=1.0)
    first = FedPACTrainer(
        model=tiny_vit(),
        args=vit_args(tmp_path, num_rounds=3, save_strategy="steps", save_steps=1, **dp),
        train_dataset=data["train"],
    )
    first.train()
    ckpt = tmp_path / "run" / "checkpoint-round-1"
    state, meta = load_federated_checkpoint(ckpt)
    assert state.noise_seed is not None  # the secret seed drawn at the start, saved
    assert meta["history"][0]["epsilon"] == first.round_history[0]["epsilon"] > 0

    resumed = FedPACTrainer(
        model=tiny_vit(seed=123),
        args=vit_args(tmp_path, num_rounds=3, **dp),
        train_dataset=data["train"],
    )
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert [h["epsilon"] for h in resumed.round_history] == [
        h["epsilon"] for h in first.round_history
    ]
    for a, b in zip(resumed.model.parameters(), first.model.parameters()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ bad settings


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"dp_mode": "client", "dp_noise_multiplier": 1.0}, "needs dp_clip_norm"),
        ({"dp_mode": "client", "dp_clip_norm": -1.0, "dp_noise_multiplier": 1.0}, "dp_clip_norm"),
        (
            {"dp_mode": "client", "dp_clip_norm": 1.0, "dp_noise_multiplier": float("nan")},
            "dp_noise_multiplier",
        ),
        ({"dp_mode": "client", "dp_clip_norm": 1.0}, "exactly one of dp_noise_multiplier"),
        (
            {
                "dp_mode": "client",
                "dp_clip_norm": 1.0,
                "dp_noise_multiplier": 1.0,
                "dp_target_epsilon": 2.0,
            },
            "not both",
        ),
        ({"dp_mode": "client", "dp_clip_norm": 1.0, "dp_noise_multiplier": 1.0}, "dp_theta_clip"),
        (
            {
                "dp_mode": "client",
                "dp_clip_norm": 1.0,
                "dp_theta_clip_norm": 1.0,
                "dp_noise_multiplier": 1.0,
                "dp_theta_share": 1.0,
            },
            "dp_theta_share",
        ),
        ({"dp_mode": "secret"}, "dp_mode"),
        ({"dp_noise_multiplier": 1.0}, "set dp_mode: client"),
        ({"dp_theta_share": 0.3}, "set dp_mode: client"),
        (
            {
                "dp_mode": "client",
                "dp_clip_norm": 1.0,
                "dp_theta_clip_norm": 1.0,
                "dp_noise_multiplier": 1.0,
                "dp_clip_schedule": "cosine",
            },
            "dp_clip_schedule",
        ),
        ({"dp_clip_schedule": "learning_rate"}, "set dp_mode: client"),
    ],
)
def test_bad_privacy_settings_fail_when_read_naming_the_setting(tmp_path, settings, named):
    with pytest.raises(ValueError, match=named):
        FedPACArguments(output_dir=str(tmp_path), algorithm="fedpac_soap", **settings)


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"dp_delta": 0.2}, "dp_delta=0.2 is not below 1 / num_clients"),
        (
            {"dp_noise_multiplier": None, "dp_target_epsilon": 1e-3, "dp_delta": 1e-5},
            "dp_target_epsilon=0.001 is not reachable in 30 rounds",
        ),
        (
            {"weighting": "num_examples"},
            "aggregation_weighting \\(simulate's weighting\\): uniform",
        ),
        ({"transport_dtype": "bfloat16"}, "transport_dtype: float32"),
    ],
)
def test_settings_the_mechanism_cannot_cover_fail_before_round_one(settings, named):
    trained = []
    kwargs = {"dp_mode": "client", "dp_clip_norm": 1.0, "dp_noise_multiplier": 1.0, **settings}
    with pytest.raises(ValueError, match=named):
        simulate(
            _model(),
            _clients(num=10),
            "fedavg_adamw",
            30,
            5,
            1,
            _loss,
            preflight=False,
            callback=lambda *_: trained.append(1),
            **kwargs,
        )
    assert trained == []


def test_beta_auto_is_refused_under_dp():
    with pytest.raises(ValueError, match="set a fixed beta"):
        simulate(
            _model(),
            _clients(num=10),
            get_algorithm("fedpac_soap", beta="auto"),
            2,
            5,
            1,
            _loss,
            preflight=False,
            dp_mode="client",
            dp_clip_norm=1.0,
            dp_theta_clip_norm=1.0,
            dp_noise_multiplier=1.0,
        )


# ------------------------------------------------------------------ record-level DP


def _examples(n: int = 12, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    return x, (x @ torch.randn(6, 3, generator=gen)).argmax(1)


def _record_client(dp: RecordDP, n: int, batch: int, steps: int = 1):
    return dp.for_client(
        client_id=0,
        round_index=0,
        num_examples=n,
        batch_size=batch,
        local_steps=steps,
        num_rounds=1,
    )


def _record_round(model, poisson, client, *, lr=1.0, steps=1, algorithm="fedavg", loss=_loss):
    """One client round of ``model`` under record-level DP on ``poisson``'s batches."""
    return client_update(
        model,
        ServerState.from_model(model),
        get_algorithm(algorithm),
        cycle_batches(poisson),
        LocalSteps(lr=lr, num_steps=steps),
        ClientHooks(loss_fn=loss),
        privacy=client,
    )


def test_record_dp_steps_on_the_mean_of_clipped_per_example_gradients():
    """q = 1 (the batch is every example), z = 0: SGD's step is -lr * mean_i clip_C(g_i)."""
    x, y = _examples()
    model = _model()
    state = ServerState.from_model(model)
    dp = RecordDP.from_settings(clip_norm=0.01, noise_multiplier=0.0, noise_seed=0)
    client = _record_client(dp, n=12, batch=12)
    assert client.sample_rate == 1.0
    loader = DataLoader(TensorDataset(x, y), batch_size=12)
    _, poisson = record_loader(dp, loader, 0, 0, 1, 1)
    update = _record_round(model, poisson, client)
    expected = {n: torch.zeros_like(t) for n, t in state.params.items()}
    for i in range(12):  # every example's gradient, clipped to 0.01, by hand
        reference = _model()
        loss = _loss(reference, (x[i : i + 1], y[i : i + 1]))
        grads = dict(zip(state.params, torch.autograd.grad(loss, list(reference.parameters()))))
        scale = min(1.0, 0.01 / _norm(grads))
        for name, g in grads.items():
            expected[name] -= g * scale / 12
    for name, d in update.delta.items():
        torch.testing.assert_close(d, expected[name], rtol=1e-4, atol=1e-7)
    assert _norm(update.delta) <= 0.01 * (1 + 1e-5)
    assert update.metrics["dp_record_epsilon"] == math.inf  # no noise: no privacy


def test_a_record_dp_round_does_not_warn_about_opacus_hooks_on_a_frozen_input():
    """Opacus's per-example hooks fire on the first layer's output gradients (its input needs
    none, as a frozen base's first LoRA layer): torch's warning about that is not the user's
    business, while every other warning of the round still shows."""
    x, y = _examples()
    dp = RecordDP.from_settings(clip_norm=1.0, noise_multiplier=1.0, noise_seed=0)
    client = _record_client(dp, n=12, batch=4, steps=2)
    _, poisson = record_loader(dp, DataLoader(TensorDataset(x, y), batch_size=4), 0, 0, 2, 1)

    def loss_that_warns(model, batch):
        warnings.warn("the round's own warning", UserWarning, stacklevel=2)
        return _loss(model, batch)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _record_round(_model(), poisson, client, lr=0.1, steps=2, loss=loss_that_warns)
    messages = [str(w.message) for w in caught]
    assert "the round's own warning" in messages
    assert not [m for m in messages if "backward hook" in m], messages


def test_record_dp_noise_has_std_z_c_over_the_batch_and_theta_sees_only_it():
    """A huge model slice, examples with tiny gradients: the step is the noise, std z C / B."""
    torch.manual_seed(0)
    model = torch.nn.Linear(400, 50)
    x, y = torch.zeros(8, 400), torch.zeros(8, dtype=torch.long)  # inputs 0: weight grads 0
    dp = RecordDP.from_settings(clip_norm=0.5, noise_multiplier=2.0, noise_seed=3)
    client = _record_client(dp, n=8, batch=8)
    _, poisson = record_loader(dp, DataLoader(TensorDataset(x, y), batch_size=8), 0, 0, 1, 1)
    update = _record_round(model, poisson, client, algorithm="fedadamw")
    # after one step AdamW's (bias-corrected) second moment is g^2 of the gradient it
    # stepped on: the privatized one, here the noise alone on the weight
    seen = update.curvature["weight.exp_avg_sq"]
    assert seen.mean().sqrt().item() == pytest.approx(2.0 * 0.5 / 8, rel=0.03)


def test_empty_poisson_batches_still_add_the_noise():
    x, y = _examples(n=40)
    dp = RecordDP.from_settings(clip_norm=1.0, noise_multiplier=1.0, noise_seed=0)
    loader = DataLoader(TensorDataset(x, y), batch_size=1)  # q = 1/40: most batches are empty
    client, poisson = record_loader(dp, loader, 0, 0, 6, 1)
    assert any(len(b) == 0 for b in poisson)
    update = _record_round(_model(), poisson, client, lr=0.1, steps=6)
    assert _norm(update.delta) > 0 and all(torch.isfinite(d).all() for d in update.delta.values())


def test_record_epsilon_is_the_worst_clients_over_every_round():
    sizes = [30, 12, 45]
    x, y = _examples(n=sum(sizes))
    bounds = [0, 30, 42, 87]
    loaders = [
        DataLoader(TensorDataset(x[a:b], y[a:b]), batch_size=4) for a, b in zip(bounds, bounds[1:])
    ]
    history = simulate(
        _model(),
        loaders,
        "fedpac_soap",
        3,
        3,
        2,
        _loss,
        lr=0.05,
        preflight=False,
        dp_mode="record",
        dp_clip_norm=1.0,
        dp_noise_multiplier=1.2,
        dp_noise_seed=0,
    )
    q = 4 / 12  # the smallest client's rate
    for r, metrics in enumerate(history, start=1):  # K = 2 steps a round, every round
        assert metrics["epsilon"] == pytest.approx(_pld_epsilon(q, 1.2, 2 * r, 1e-5), rel=1e-9)


@pytest.mark.parametrize(("z", "loud"), [(1.2, True), (0.05, False)])
def test_a_record_dp_run_says_how_large_its_noise_is_before_round_one(caplog, z, loud):
    """simulate logs DP-SGD's z and the noise on a step's mean clipped gradient in clip norms,
    z sqrt(d) / B, before round 1; from one clip norm up as a warning naming the batch size."""
    x, y = _examples(n=24)
    loaders = [DataLoader(TensorDataset(x[i::2], y[i::2]), batch_size=4) for i in range(2)]
    model = _model()
    floats = sum(p.numel() for p in model.parameters())
    common = dict(lr=0.05, preflight=False, dp_mode="record", dp_clip_norm=1.0, dp_noise_seed=0)
    with caplog.at_level("INFO", logger="fedpac_hf.federated.simulation"):
        simulate(model, loaders, "fedpac_soap", 1, 2, 1, _loss, dp_noise_multiplier=z, **common)
    (record,) = [r for r in caplog.records if "record-level DP" in r.getMessage()]
    ratio = z * floats**0.5 / 4
    assert (ratio >= 1.0) == loud and record.levelname == ("WARNING" if loud else "INFO")
    message = record.getMessage()
    assert f"noise multiplier {z:.4g}" in message and f"{ratio:.3g} x dp_clip_norm" in message
    assert ("per_device_train_batch_size" in message) == loud


def test_the_trainer_says_how_large_its_record_noise_is(tmp_path, caplog):
    model = tiny_vit()
    floats = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dp = dict(dp_mode="record", dp_clip_norm=1.0, dp_noise_multiplier=1.0, dp_noise_seed=5)
    args = vit_args(tmp_path, num_rounds=1, **dp)
    trainer = FedPACTrainer(model=model, args=args, train_dataset=image_data()["train"])
    with caplog.at_level("INFO", logger="fedpac_hf.trainer.client_steps"):
        trainer.train()
    (record,) = [r for r in caplog.records if "record-level DP" in r.getMessage()]
    ratio = floats**0.5 / args.per_device_train_batch_size
    assert f"{ratio:.3g} x dp_clip_norm" in record.getMessage()


def test_the_record_noise_note_gives_the_range_of_the_clients_noise():
    """With a target epsilon each client has its own z: the note names the smallest and the
    largest (the clients with the largest and the smallest sampling rate)."""
    dp = RecordDP.from_settings(clip_norm=1.0, target_epsilon=3.0)
    clients = [(20, 4), (200, 4), (90, 4)]
    zs = [dp.client_noise(dp.sample_rate(4, n), 5, 10) for n in (20, 200)]
    (message,) = _notes(describe_record_noise, dp, 100, clients, 5, 10)
    assert f"noise multiplier {min(zs):.4g} to {max(zs):.4g} over the clients" in message
    assert f"up to {max(zs) * 10 / 4:.3g} x dp_clip_norm" in message  # sqrt(100) / B
    (same,) = _notes(describe_record_noise, dp, 100, [(90, 4), (90, 4)], 5, 10)
    z = dp.client_noise(dp.sample_rate(4, 90), 5, 10)
    assert f"noise multiplier {z:.4g} for every client (epsilon 3" in same  # not "z to z"


def test_a_target_epsilon_gives_each_client_its_own_noise():
    dp = RecordDP.from_settings(clip_norm=1.0, target_epsilon=3.0)
    small = dp.for_client(
        client_id=0, round_index=9, num_examples=20, batch_size=4, local_steps=5, num_rounds=10
    )
    large = dp.for_client(
        client_id=1, round_index=9, num_examples=200, batch_size=4, local_steps=5, num_rounds=10
    )
    assert small.noise_multiplier > large.noise_multiplier
    assert small.epsilon <= 3.0 and large.epsilon <= 3.0  # after the last round
    assert small.epsilon == pytest.approx(3.0, rel=0.02)


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"algorithm": "fedpac_sophia"}, "cannot cover Sophia"),
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps: 1"),
        ({"dp_theta_clip_norm": 1.0}, "dp_theta_clip_norm is for dp_mode: client"),
        ({"dp_theta_share": 0.3}, "dp_theta_share is for dp_mode: client"),
        ({"dp_clip_schedule": "learning_rate"}, "dp_clip_schedule is for dp_mode: client"),
    ],
)
def test_record_dp_refuses_settings_it_cannot_cover(tmp_path, settings, named):
    record = {"dp_mode": "record", "dp_clip_norm": 1.0, "dp_noise_multiplier": 1.0}
    with pytest.raises(ValueError, match=named):
        FedPACArguments(output_dir=str(tmp_path), **record, **settings)


def test_record_dp_refuses_models_and_loaders_it_cannot_cover():
    x, y = _examples()
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3)
    )
    with pytest.raises(ValueError, match="Opacus cannot compute per-example gradients"):
        simulate(
            model,
            [DataLoader(TensorDataset(x, y), batch_size=4)],
            "fedavg",
            1,
            1,
            1,
            _loss,
            preflight=False,
            dp_mode="record",
            dp_clip_norm=1.0,
            dp_noise_multiplier=1.0,
        )
    with pytest.raises(ValueError, match="needs each client's loader to be a torch DataLoader"):
        simulate(
            _model(),
            [[(x, y)]],
            "fedavg",
            1,
            1,
            1,
            _loss,
            preflight=False,
            dp_mode="record",
            dp_clip_norm=1.0,
            dp_noise_multiplier=1.0,
        )


def test_a_resumed_record_dp_run_continues_exactly(tmp_path):
    dp = dict(dp_mode="record", dp_clip_norm=1.0, dp_noise_multiplier=1.0, dp_noise_seed=5)
    first, resumed = trained_and_resumed(tmp_path, 2, **dp)
    assert [h["epsilon"] for h in resumed.round_history] == [
        h["epsilon"] for h in first.round_history
    ]
    assert first.round_history[1]["epsilon"] > first.round_history[0]["epsilon"]
    for a, b in zip(resumed.model.parameters(), first.model.parameters()):
        assert torch.equal(a, b)


def test_clients_clip_only_what_their_data_adds_to_the_public_correction_and_theta():
    """A global direction far above the clip norm: the correction it brings is public, so the
    client sends (and clips) its delta minus K beta lr g_G, and its Theta minus the global one."""
    model = _model()
    alg = get_algorithm("fedpac_soap")  # beta 0.5, aligns and corrects
    first = _first_client_update(
        model, ServerState.from_model(model), alg, LocalSteps(lr=0.01, num_steps=3)
    )
    state = ServerState(
        params=ServerState.from_model(model).params,
        curvature={n: t.clone() for n, t in first.curvature.items()},
        direction={n: torch.full_like(t, 50.0) for n, t in first.delta.items()},
        round=1,
    )
    dp = ClientDP.from_settings(
        "client", clip_norm=1.0, theta_clip_norm=1e6, noise_multiplier=1.0, share_theta=True
    )
    steps = LocalSteps(lr=0.01, num_steps=3)
    plain = _first_client_update(model, state, alg, steps)
    sent = _first_client_update(model, state, alg, steps, privacy=dp)
    correction = {n: -3 * 0.5 * 0.01 * d for n, d in state.direction.items()}
    assert _norm(plain.delta) > 10 * _norm({n: plain.delta[n] - correction[n] for n in plain.delta})
    own = {n: plain.delta[n] - correction[n] for n in plain.delta}
    assert _norm(own) < 1.0 and sent.metrics["dp_clipped_delta"] == 0.0
    for name, d in own.items():
        torch.testing.assert_close(sent.delta[name], d, rtol=1e-5, atol=1e-6)
    kept = curvature_retention("soap", {}, 3)  # shampoo_beta**3: what 3 steps leave of it
    for name, t in plain.curvature.items():  # Theta minus what is left of the imported Theta
        torch.testing.assert_close(sent.curvature[name], t - kept * state.curvature[name])
    # own_part (what a benchmark measures to pick clip norms) is exactly what was sent
    own_delta, own_theta = own_part(plain, public_reference(state, alg, 0.01, 3))
    for name, d in own_delta.items():
        torch.testing.assert_close(sent.delta[name], d)
    for name, t in own_theta.items():
        torch.testing.assert_close(sent.curvature[name], t)


@pytest.mark.parametrize("algorithm", ["fedpac_soap", "fedadamw", "fedpac_sophia", "fedpac_muon"])
def test_the_theta_a_client_sends_holds_nothing_of_the_global_theta(algorithm):
    """Steps too small to move the model (so the gradients are the same): clients that
    imported the global Theta or five times it send the same Theta, whatever share of it
    the optimizer's moving averages keep after K steps."""
    model = _model()
    alg = get_algorithm(algorithm)
    first = _first_client_update(
        model, ServerState.from_model(model), alg, LocalSteps(lr=0.01, num_steps=3)
    )
    dp = ClientDP.from_settings(
        "client", clip_norm=1e6, theta_clip_norm=1e6, noise_multiplier=1.0, share_theta=True
    )
    sent = []
    for scale in (1.0, 5.0):
        state = ServerState(
            params=ServerState.from_model(model).params,
            curvature={n: t * scale for n, t in first.curvature.items()},
            round=1,
        )
        update = _first_client_update(model, state, alg, LocalSteps(lr=1e-12, num_steps=4), dp)
        assert update.metrics["dp_clipped_theta"] == 0.0
        sent.append(update.curvature)
    assert set(sent[0]) == set(first.curvature) and _norm(sent[0]) > 0
    difference = {n: sent[1][n] - sent[0][n] for n in sent[0]}
    assert _norm(difference) < 1e-5 * _norm(first.curvature)


@pytest.mark.parametrize("algorithm", ["fedadamw", "fedpac_soap"])
def test_dp_at_its_limit_adds_the_public_reference_back_exactly(algorithm):
    """q = 1, z = 0, bounds never reached: an aligning and correcting method under DP is the
    plain run, up to the rounding of the reference subtracted and added back.

    fedadamw's parameters match. SOAP's do not, and need not: the output layer's statistic
    ``L`` is exactly singular (softmax gradients sum to 0 over the classes), so the rounding
    of Theta's PSD repair turns its arbitrary null eigenvector and SOAP steps along it,
    which adds the same constant to every logit. The function (logits centred over the
    classes, the loss) is the plain run's.
    """
    loaders = _clients(num=6)
    common = {"lr": 0.05, "preflight": False}
    plain_model, private_model = _model(), _model()
    plain = simulate(plain_model, loaders, algorithm, 4, 6, 2, _loss, **common)
    private = simulate(
        private_model,
        loaders,
        algorithm,
        4,
        6,
        2,
        _loss,
        **common,
        dp_mode="client",
        dp_clip_norm=1e9,
        dp_theta_clip_norm=1e9,
        dp_noise_multiplier=0.0,
        dp_delta=0.01,
    )
    inputs = torch.cat([batches[0][0] for batches in loaders])
    with torch.no_grad():
        logits = [model(inputs) for model in (plain_model, private_model)]
    centred = [out - out.mean(dim=1, keepdim=True) for out in logits]
    torch.testing.assert_close(centred[1], centred[0], rtol=0, atol=1e-5)
    assert private[-1]["train_loss"] == pytest.approx(plain[-1]["train_loss"], rel=1e-5)
    if algorithm == "fedadamw":
        for a, b in zip(plain_model.parameters(), private_model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
