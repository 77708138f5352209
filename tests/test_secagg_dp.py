"""Secure aggregation under DP: SecAgg+'s sums against the plain private rounds.

Under client-level DP the bounds are the round's clip norms and each client shrinks its parts
by SecAgg+'s rounding margin, so a secure round differs from the plain private round from the
same start, the same seeded noise included, by at most twice the rounding
(:func:`~tests.secagg_fixtures.assert_within_dp_rounding`). Under record-level DP the round's
epsilon comes from the clients' summed epsilon histograms.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")

import torch  # noqa: E402
from flwr.app import ConfigRecord  # noqa: E402
from flwr.common import parameters_to_ndarrays  # noqa: E402
from flwr.compat.common import recorddict_compat as compat  # noqa: E402

from fedpac_hf.federated import ClientUpdate, ServerState, get_algorithm  # noqa: E402
from fedpac_hf.federated.privacy import ClientDP  # noqa: E402
from fedpac_hf.federated.privacy_noise import CLIENT_NOISED  # noqa: E402
from fedpac_hf.federated.secure_aggregation import (  # noqa: E402
    clipped_counts,
    read_secure_metrics,
)
from fedpac_hf.federated.secure_epsilon import bin_edge, epsilon_bin  # noqa: E402
from fedpac_hf.federated.server import RoundAggregator  # noqa: E402
from fedpac_hf.flower.secagg import secure_reply  # noqa: E402

from .secagg_fixtures import (  # noqa: E402
    LOSS_ROUNDING,
    PRIVATE,
    assert_within_dp_rounding,
    plain_rounds,
    secure_run,
)
from .trainer_fixtures import flower_args  # noqa: E402

#: Client-level DP with clip norms that adapt (their counts' noise leaves the sums z_v 0.72).
ADAPTIVE = dict(
    PRIVATE, dp_clip_schedule="adaptive", dp_clip_norm_lr=0.5, dp_clipped_count_std=2.0
)  # fmt: skip


@pytest.mark.parametrize(
    "privacy",
    [
        pytest.param(PRIVATE, id="constant"),
        pytest.param(ADAPTIVE, id="adaptive", marks=pytest.mark.slow),  # ~16 s more
    ],
)
def test_secagg_with_client_dp_matches_the_plain_private_rounds(tmp_path, privacy):
    """SecAgg+ under client-level DP: fixed-size samples, the clip norms as bounds (nothing
    clipped by SecAgg+), the accountant's epsilon for fixed-size sampling, and each round's
    state the plain private round's from the same start, the same seeded noise included.

    They differ by SecAgg+'s rounding and the clients' shrink (:func:`assert_within_dp_rounding`).
    With adaptive clip norms the clients' clip flags are summed securely: the counts, and so
    the next round's bounds, are the plain round's exactly."""
    from fedpac_hf.federated.accounting import epsilon_after

    result, states = secure_run(tmp_path, **privacy)
    for r, row in enumerate(result.history, start=1):
        assert row["num_clients"] == 2 and row["secagg_clipped"] == 0
        assert row["epsilon"] == pytest.approx(epsilon_after(r, 0.7, 2 / 3, 3**-1.1, 3))

    args = flower_args(tmp_path / "plain", dp_sampling="fixed", **privacy)
    lrs = args.round_learning_rates()
    for round_index, _, plain, updates in plain_rounds(args, states):
        secure, row = states[round_index + 1], result.history[round_index]
        (expected,) = updates.engine.history
        for key in ("num_clients", "dp_clipped_delta", "dp_noise_norm"):
            assert row[key] == pytest.approx(expected[key]), key
        assert row["train_loss"] == pytest.approx(expected["train_loss"], abs=LOSS_ROUNDING)
        assert secure.dp_clip_norms == plain.dp_clip_norms  # None unless they adapt
        unit = args.local_steps * lrs[round_index]
        delta_bound, theta_bound = row["dp_clip_norm"], row["dp_theta_clip_norm"]
        for part, bound, scale in (
            ("params", delta_bound, 1.0),
            ("direction", delta_bound, 1.0 / unit),
            ("curvature", theta_bound, 1.0),
        ):
            mine, theirs = getattr(secure, part), getattr(plain, part)
            assert_within_dp_rounding(mine, theirs, bound, scale, f"round {round_index + 1} {part}")
    bounds = [(row["dp_clip_norm"], row["dp_theta_clip_norm"]) for row in result.history]
    if privacy is ADAPTIVE:  # the bounds moved: round 2 clipped at round 1's released counts
        assert bounds[1] != bounds[0] and bounds[1] == pytest.approx(states[1].dp_clip_norms)
    else:
        assert bounds == [(0.05, 5.0)] * 2


def test_secagg_with_poisson_samples_lets_a_lone_client_add_the_noise(tmp_path):
    """Under client-level DP with Poisson sampling (seed 8 draws clients 0 and 1, then client 1
    alone): round 1 goes through SecAgg+ and is the plain private round's up to its rounding;
    round 2's only client adds the round's noise itself and the server adds none, so the secure
    state differs from the plain round (the same clipped update, the server's noise) by two
    independent draws: std sqrt(2) sigma / (q N) per parameter. Epsilon is Poisson sampling's.
    The lone client keeps its train_loss to itself: round 2 reports none (NaN)."""
    from fedpac_hf.federated.accounting import epsilon_after

    privacy = dict(PRIVATE, dp_sampling="poisson", seed=8)
    result, states = secure_run(tmp_path, **privacy)
    assert [row["num_clients"] for row in result.history] == [2, 1]
    losses = [row["train_loss"] for row in result.history]
    assert math.isfinite(losses[0]) and math.isnan(losses[1])
    for r, row in enumerate(result.history, start=1):
        assert row["epsilon"] == pytest.approx(epsilon_after(r, 0.7, 2 / 3, 3**-1.1))
        assert row["secagg_clipped"] == 0

    args = flower_args(tmp_path / "plain", **privacy)
    (_, _, plain, _), (_, _, alone, updates) = plain_rounds(args, states)
    assert_within_dp_rounding(states[1].params, plain.params, 0.05, what="round 1 params")
    assert [u.client_id for u in updates] == [1]
    sigma = args.client_privacy(args.build_algorithm()).noise_multiplier * 0.05 * math.sqrt(2)
    moved = torch.cat([(states[2].params[n] - alone.params[n]).flatten() for n in alone.params])
    expected = math.sqrt(2) * sigma / 2  # two draws of z k C, over q N = 2
    assert float(moved.double().std()) == pytest.approx(expected, rel=0.05)
    assert float(moved.double().mean()) == pytest.approx(
        0.0, abs=4 * expected / moved.numel() ** 0.5
    )


def test_the_server_leaves_the_noise_to_a_lone_client_only_when_asked_and_done():
    """The server adds no noise only when it asked the round's one client to, and that client
    says it did (:data:`CLIENT_NOISED`); otherwise it adds the round's noise itself."""
    dp = ClientDP.from_settings("client", clip_norm=1.0, noise_multiplier=1.0)
    dp = dp.resolve(num_clients=10, sample_rate=0.2, num_rounds=3)
    state = ServerState(params={"w": torch.zeros(50, 40)}, noise_seed=5)

    def finalize(asked, metrics, clients=1):
        aggregator = RoundAggregator(state, get_algorithm("fedavg"), privacy=dp, expected_clients=2)
        aggregator.client_noised = asked
        for client in range(clients):
            delta = {"w": torch.full((50, 40), 0.01)}
            aggregator.add(ClientUpdate(client, delta, {}, 8, 1, dict(metrics)))
        return aggregator.finalize(lr=0.1, local_steps=1)[0].params["w"]

    said = {CLIENT_NOISED: 1.0}
    assert torch.allclose(finalize(True, said), torch.full((50, 40), 0.005))  # sum / (q N)
    noised = finalize(False, {})
    assert float((noised - 0.005).std()) == pytest.approx(0.5, rel=0.05)  # z C / (q N)
    assert torch.equal(finalize(True, {}), noised)  # asked, not done: the server adds it
    assert torch.equal(finalize(False, said), noised)  # done, not asked: ignored
    assert torch.equal(finalize(True, said, clients=2), finalize(False, {}, clients=2))


def test_under_client_dp_the_loss_and_clip_flags_are_summed_not_sent_in_the_clear():
    """The reply's last array is the client's loss over LOSS_SCALE, its counts and its two
    clip flags; its clear metrics lack them, in the calibration pass too. The server reads the
    mean loss, the total counts and the clip counts back from the secure mean."""
    update = ClientUpdate(
        client_id=0,
        delta={"w": torch.tensor([0.03, -0.04])},
        curvature={"w.v": torch.tensor([1.0, 2.0])},
        num_examples=8,
        num_steps=2,
        metrics={"train_loss": 0.5, "dp_clipped_delta": 1.0, "dp_clipped_theta": 0.0},
    )
    common = {"weighting": "uniform", "max-weight": 1.0, "delta-names": ["w"]}
    secagg = {
        "stage": "aggregate",
        "delta-bounds": [0.05],
        "theta-names": ["w.v"],
        "theta-bounds": [5.0],
        "dp-clip-norms": [0.05, 5.0],
    }
    calibrate = {"stage": "calibrate", "names-only": True}
    replies = {
        stage["stage"]: compat.recorddict_to_fitres(
            secure_reply(update, ConfigRecord({**common, **stage})), False
        )
        for stage in (secagg, calibrate)
    }
    for fitres in replies.values():
        hidden = {"dp_clipped_delta", "dp_clipped_theta", "train_loss", "num-examples"}
        assert not set(fitres.metrics) & hidden
    # calibration: one log-magnitude per tensor of each part; aggregation: then the flags
    assert len(parameters_to_ndarrays(replies["calibrate"].parameters)) == 2
    arrays = parameters_to_ndarrays(replies["aggregate"].parameters)
    assert len(arrays) == 3 and arrays[-1].tolist() == [0.125, 8 * 2**-18, 0, 0, 0, 1.0, 0.0]
    mean = torch.tensor([0.2, 10 * 2**-18, 2**-18 / 3, 0.0, 0.0, 2 / 3, 1 / 3])
    summed = read_secure_metrics(mean, 3, private=True, counts=True)
    counts = {"num_examples": 30, "skipped_steps": 1, "hessian_refreshes": 0, "secagg_clipped": 0}
    assert summed == (pytest.approx(0.8), counts, [2.0, 1.0], None)
    # the counts from a mean of flags over three clients; a weighted mean is refused
    assert clipped_counts(torch.tensor([2 / 3, 1 / 3]), 3) == [2.0, 1.0]
    with pytest.raises(ValueError, match="not a count"):
        clipped_counts(torch.tensor([0.5, 0.0]), 3)


@pytest.mark.slow  # a SecAgg+ simulation and its two rounds again in process (~40 s each)
@pytest.mark.parametrize(
    "noise", [{"dp_noise_multiplier": 1.0}, {"dp_target_epsilon": 6.0}], ids=["z", "target"]
)
def test_secagg_with_record_dp_logs_the_bin_edge_of_the_largest_epsilon(tmp_path, noise):
    """Record-level DP under SecAgg+ (uniform weighting): no client's epsilon travels in the
    clear, and each round's epsilon is the bin edge of the largest any client of the plain
    rounds reported so far, at most 2**(1/16) above it. With a target epsilon, which no client
    exceeds, the edge is capped at it: 6, not the edge 6.17 above the last round's."""
    record = {"dp_mode": "record", "dp_clip_norm": 1.0, "dp_noise_seed": 3, **noise}
    result, states = secure_run(tmp_path, **record)
    largest, cap = 0.0, noise.get("dp_target_epsilon", math.inf)
    for round_index, _, _, updates in plain_rounds(
        flower_args(tmp_path / "plain", **record), states
    ):
        largest = max([largest, *(u.metrics["dp_record_epsilon"] for u in updates)])
        epsilon = result.history[round_index]["epsilon"]
        assert epsilon == min(bin_edge(epsilon_bin(largest)), cap)
        assert largest <= epsilon < largest * 2 ** (1 / 16)
    assert len({row["epsilon"] for row in result.history}) == 2  # it grows with the rounds
    if "dp_target_epsilon" in noise:
        assert bin_edge(epsilon_bin(largest)) > 6.0 == result.history[-1]["epsilon"]
