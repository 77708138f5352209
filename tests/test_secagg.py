"""Secure aggregation (Flower's SecAgg+): FedPAC's round with only the clients' mean revealed.

The secure mean differs from the plain one by SecAgg+'s quantization: per
entry of tensor n at most one quantization step, ``b_n * 2**-21`` (values are
scaled into [-8, 8] by the public bound b_n and quantized to 2**22 levels with
stochastic rounding; the mean of S clients errs by less than one step), so a
tensor's error has Frobenius norm at most ``sqrt(numel) * b_n * 2**-21``. That
is the tolerance here. Theta is repaired (projected onto PSD / non-negative
values) after unmasking; the plain mean is valid, so the projection does not
move the result further from it.

A round-2 state is compared with the plain aggregate of the same round-2
updates from the secure run's round-1 state, not with an independent plain
run: SOAP's round-2 update of this tiny model moves by ~100% when its
round-1 state is perturbed by 1e-5 (near-degenerate eigenbases), so two runs
that differ by any rounding part ways after one round.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ConfigRecord  # noqa: E402
from flwr.common import parameters_to_ndarrays  # noqa: E402
from flwr.compat.common import recorddict_compat as compat  # noqa: E402

from fedpac_hf import FedPACTrainer  # noqa: E402
from fedpac_hf.federated import (  # noqa: E402
    ClientUpdate,
    RoundAggregator,
    ServerState,
    aggregate,
    get_algorithm,
)
from fedpac_hf.federated.secure_aggregation import (  # noqa: E402
    add_secure_mean,
    bounds_from_log_magnitudes,
    log_magnitudes,
    read_secure_metrics,
    scale_tensors,
    secagg_bounds,
    secure_metrics,
    unscale_tensors,
)
from fedpac_hf.federated.secure_epsilon import EPSILON_BINS, epsilon_histogram  # noqa: E402
from fedpac_hf.flower import FlowerServerRun, run_fedpac_simulation  # noqa: E402
from fedpac_hf.flower.secagg import CLIPPED, secure_reply  # noqa: E402

from .secagg_fixtures import (  # noqa: E402
    LOSS_ROUNDING,
    PRIVATE,
    Captured,
    assert_within_dp_rounding,
    assert_within_quantization,
    plain_round,
    plain_rounds,
    secagg_means,
    secure_run,
)
from .trainer_fixtures import (  # noqa: E402
    BACKEND,
    build_failing_trainer,
    build_model,
    build_trainer,
    flower_args,
    image_data,
    tiny_vit,
)


def test_secagg_scaling_and_flower_quantization_stay_within_one_step():
    """The bounds' arithmetic with Flower's own quantize/dequantize, on tensors of any scale."""
    gen = torch.Generator().manual_seed(0)
    clients = [
        {
            "stat": 1e3 * torch.rand(6, 6, generator=gen),  # a SOAP statistic >> 8
            "second_moment": 1e-8 * torch.rand(40, generator=gen),  # an AdamW v
            "delta": 1e-3 * torch.randn(5, 4, generator=gen),
        }
        for _ in range(3)
    ]
    names = list(clients[0])
    logs = np.mean([log_magnitudes(c, names) for c in clients], axis=0)
    bounds = bounds_from_log_magnitudes(logs, names)
    means = secagg_means([[t.numpy() for t in scale_tensors(c, bounds).values()] for c in clients])
    secure = unscale_tensors([torch.from_numpy(m) for m in means], bounds)
    plain = {n: sum(c[n].double() for c in clients) / len(clients) for n in names}
    assert_within_quantization(secure, plain, bounds, what="scaled")
    for name in names:  # relative to the tensor: about 8 * 2**-21 = 4e-6 at most
        rel = float((secure[name] - plain[name]).norm() / plain[name].norm())
        assert rel < 1e-4, (name, rel)


def test_secagg_simulation_matches_the_plain_aggregate(tmp_path):
    """SecAgg+ on Flower (3 clients, 2 per round, 2 rounds, SOAP's Theta) against plain rounds."""
    result, states = secure_run(tmp_path)
    assert [h["round"] for h in result.history] == [1.0, 2.0]
    for row in result.history:
        assert row["num_clients"] == 2 and row["num_dropped"] == 0
        assert "drift" not in row and "client_dispersion" not in row  # need single clients
        assert row["wire_bytes_up"] > 0 and math.isfinite(row["train_loss"])
        assert row["secagg_clipped"] == 0  # the bounds held every client's values
    assert result.server_state.round == 2

    args = flower_args(tmp_path / "plain")
    lrs = args.round_learning_rates()
    for round_index, start, plain, updates in plain_rounds(args, states):
        secure = states[round_index + 1]
        # the same clients and counts (summed securely, exact) and mean loss (within the rounding)
        (expected,) = updates.engine.history
        for key in ("num_clients", "num_examples", "skipped_steps", "hessian_refreshes"):
            assert result.history[round_index][key] == pytest.approx(expected[key]), key
        loss = result.history[round_index]["train_loss"]
        assert loss == pytest.approx(expected["train_loss"], rel=1e-5, abs=LOSS_ROUNDING)
        bounds = secagg_bounds(start, lrs[round_index], args.local_steps)
        if bounds is None:  # round 1: the calibration's bounds (its mean is quantized too)
            names = (list(start.params), sorted(updates[0].curvature))
            parts = ("delta", "curvature")
            bounds = tuple(
                bounds_from_log_magnitudes(
                    np.mean([log_magnitudes(getattr(u, p), n) for u in updates], axis=0), n
                )
                for p, n in zip(parts, names)
            )
            bounds = tuple({k: 1.01 * b for k, b in part.items()} for part in bounds)
        delta_bounds, theta_bounds = bounds
        what = f"round {round_index + 1}"
        unit = args.local_steps * lrs[round_index]
        assert_within_quantization(
            secure.params, plain.params, delta_bounds, slack=1e-7, what=what + " params"
        )
        assert_within_quantization(
            secure.direction,
            plain.direction,
            {n: b / unit for n, b in delta_bounds.items()},
            slack=1e-7,
            what=what + " direction",
        )
        assert_within_quantization(
            secure.curvature, plain.curvature, theta_bounds, slack=1e-7, what=what + " Theta"
        )
        # and the plain aggregate of the same updates is what the engine computed
        same, _ = aggregate(
            start,
            updates,
            updates.engine.algorithm,
            lr=lrs[round_index],
            local_steps=args.local_steps,
        )
        for name, tensor in plain.params.items():
            assert torch.equal(same.params[name], tensor), name


@pytest.mark.parametrize("privacy", [{}, PRIVATE], ids=["plain", "client_dp"])
def test_secagg_survives_a_client_that_drops_out(tmp_path, caplog, privacy):
    """Client 1 fails while SecAgg+ collects the masked vectors: the others' mean is recovered
    (under client-level DP too: the sum of fewer clipped updates, the same noise and epsilon)."""
    caplog.set_level(logging.WARNING, logger="flwr")
    settings = dict(num_rounds=1, clients_per_round=3, algorithm="fedavg", **privacy)
    result, _ = secure_run(tmp_path, build_failing_trainer, **settings)
    (row,) = result.history
    assert row["num_clients"] == 2 and row["num_dropped"] == 1
    assert ("epsilon" in row) == bool(privacy)
    dropped = [r.getMessage() for r in caplog.records if "dropping client 1" in r.getMessage()]
    assert dropped and "local data volume is not mounted" in dropped[0]

    args = flower_args(
        tmp_path / "plain", **settings, **({"dp_sampling": "fixed"} if privacy else {})
    )
    trainer = build_failing_trainer(args)
    trainer.setup_clients()
    initial = ServerState.from_model(build_model(args))
    updates = Captured()
    plain = plain_round(args, trainer, initial, updates)  # client 1 fails here too
    assert [u.client_id for u in updates] == [0, 2]
    if privacy:  # the same seeded noise on the sum of the same two clipped updates
        assert_within_dp_rounding(result.server_state.params, plain.params, PRIVATE["dp_clip_norm"])
        return
    names = list(initial.params)
    logs = np.mean([log_magnitudes(u.delta, names) for u in updates], axis=0)
    bounds = {n: 1.01 * b for n, b in bounds_from_log_magnitudes(logs, names).items()}
    assert_within_quantization(result.server_state.params, plain.params, bounds, slack=1e-7)


class SecondRoundFailure(FedPACTrainer):
    """A trainer whose client 1 fails in round 2 only (after round 1's calibration)."""

    def train_client(self, client_id, dataset, round_index, lr, state=None):
        if client_id == 1 and round_index == 1:
            raise OSError("client 1: the local disk filled up in round 2")
        return super().train_client(client_id, dataset, round_index, lr, state)


def build_second_round_failure(args, run_config=None):
    """:func:`build_trainer`'s model and data in a :class:`SecondRoundFailure`."""
    return SecondRoundFailure(model=tiny_vit(), args=args, train_dataset=image_data(n=120)["train"])


def test_secagg_dropout_in_a_later_round_with_num_examples_weights(tmp_path, caplog):
    """Round 2 (bounds from the state, one pass): client 1 drops out while SecAgg+ masks.

    With ``num_examples`` weighting each client scales its vector by n_i / max_weight
    before quantizing, so the error bound grows by S / sum_i (n_i / max_weight).
    """
    caplog.set_level(logging.WARNING, logger="flwr")
    settings = dict(
        clients_per_round=3,
        algorithm="fedavg",
        aggregation_weighting="num_examples",
        secagg_max_weight=100,
    )
    result, states = secure_run(tmp_path, build_second_round_failure, **settings)
    assert [(h["num_clients"], h["num_dropped"]) for h in result.history] == [(3, 0), (2, 1)]
    dropped = [r.getMessage() for r in caplog.records if "dropping client 1" in r.getMessage()]
    assert dropped and "local disk filled up in round 2" in dropped[0]

    args = flower_args(tmp_path / "plain", **settings)
    trainer = build_second_round_failure(args)
    trainer.setup_clients()
    lr = args.round_learning_rates()[1]
    updates = [trainer.train_client_by_id(c, 1, lr, states[1]) for c in (0, 2)]
    plain, _ = aggregate(
        states[1],
        updates,
        trainer.algorithm,
        lr=lr,
        local_steps=args.local_steps,
        weighting="num_examples",
    )
    assert result.history[1]["num_examples"] == sum(u.num_examples for u in updates)
    delta_bounds, _ = secagg_bounds(states[1], lr, args.local_steps)
    scale = len(updates) / sum(u.num_examples / 100 for u in updates)
    assert_within_quantization(
        result.server_state.params, plain.params, delta_bounds, scale=scale, slack=1e-7
    )


def test_secagg_reply_scales_by_the_bounds_and_counts_what_they_clip():
    """A client's FitRes: each tensor times 8 / b, then its loss over LOSS_SCALE and its counts
    (examples, skipped steps, Hessian refreshes) in units of SecAgg+'s grid (summed, not in the
    clear), how many values exceeded their bound and its record-level epsilon's histogram. Under
    num_examples weighting the counts and epsilon the server reads travel in the clear."""
    update = ClientUpdate(
        client_id=2,
        delta={"w": torch.tensor([0.5, -3.0]), "b": torch.tensor([1e-3])},
        curvature={"w.v": torch.tensor([2e-8, 4e-8])},
        num_examples=24,
        num_steps=3,
        metrics={
            "train_loss": 0.7,
            "skipped_steps": 2.0,
            "hessian_refreshes": 1.0,
            "dp_record_epsilon": 3.0,
            "dp_sample_rate": 8 / 24,  # would give the client's examples away
        },
    )
    secagg = ConfigRecord(
        {
            "stage": "aggregate",
            "weighting": "uniform",
            "max-weight": 1.0,
            "delta-names": ["w", "b"],
            "delta-bounds": [1.0, 1e-2],  # -3.0 is over its bound: clipped
            "theta-names": ["w.v"],
            "theta-bounds": [8e-8],
        }
    )
    fitres = compat.recorddict_to_fitres(secure_reply(update, secagg), False)
    arrays = parameters_to_ndarrays(fitres.parameters)
    np.testing.assert_allclose(arrays[0], [4.0, -24.0])
    np.testing.assert_allclose(arrays[1], [0.8], rtol=1e-6)
    np.testing.assert_allclose(arrays[2], [2.0, 4.0], rtol=1e-6)
    # the last array: loss, examples, skipped steps, refreshes, values clipped (-3.0 over 1.0),
    # then record-level DP's epsilon as a one-hot histogram
    last = [0.7 / 4, 24 * 2**-18, 2 * 2**-18, 2**-18, 2**-18]
    np.testing.assert_allclose(arrays[3][:5], last, rtol=1e-6)
    np.testing.assert_array_equal(arrays[3][5:], epsilon_histogram(3.0))
    assert len(arrays) == 4 and len(arrays[3]) == 5 + EPSILON_BINS
    assert fitres.num_examples == 1  # uniform weighting: SecAgg+ weighs every client 1
    hidden = {"train_loss", "num-examples", "skipped_steps", "hessian_refreshes"}
    assert not (hidden | {CLIPPED, "dp_sample_rate", "dp_record_epsilon"}) & set(fitres.metrics)
    # with num_examples weighting the counts travel with the weight, in the clear
    weighted = ConfigRecord({**secagg, "weighting": "num_examples", "max-weight": 100.0})
    fitres = compat.recorddict_to_fitres(secure_reply(update, weighted), False)
    assert parameters_to_ndarrays(fitres.parameters)[3].tolist() == [pytest.approx(0.7 / 4)]
    assert fitres.metrics["num-examples"] == 24 and fitres.metrics["skipped_steps"] == 2.0
    assert fitres.metrics["dp_record_epsilon"] == 3.0  # as clear as the examples it depends on
    assert fitres.metrics[CLIPPED] == 1 and "dp_sample_rate" not in fitres.metrics
    # three such clients: the server reads back the mean loss and the exact totals
    sums = [24 + 7 + 1_000_003, 2 + 0 + 5, 1 + 3 + 0, 1 + 0 + 0]
    mean = torch.tensor([(0.7 + 1.1 + 0.3) / 12, *(n * 2**-18 / 3 for n in sums)])
    summed = read_secure_metrics(mean, 3, private=False, counts=True)
    assert summed.train_loss == pytest.approx(0.7) and summed.clipped is None
    totals = dict(zip(("num_examples", "skipped_steps", "hessian_refreshes"), sums[:3]))
    assert summed.counts == {**totals, "secagg_clipped": 1}


def test_the_round_reports_the_same_counts_from_quantized_secure_sums_as_from_plain_ones():
    """Three clients' metrics through secure_metrics, Flower's own quantization and masking
    offset, read_secure_metrics and add_secure_mean: the round's examples, skipped steps and
    Hessian refreshes equal the plain round's exactly, its loss within the rounding."""
    alg = get_algorithm("fedpac_soap")
    state = ServerState(params={"w": torch.zeros(2)}, round=0)
    updates = [
        ClientUpdate(
            client_id=i,
            delta={"w": torch.tensor([0.01 * (i + 1), -0.02])},
            curvature={},
            num_examples=n,
            num_steps=5,
            metrics={"train_loss": loss, "skipped_steps": float(s), "hessian_refreshes": float(h)},
        )
        for i, (n, loss, s, h) in enumerate([(24, 0.7, 2, 1), (7, 1.1, 0, 3), (1013, 0.3, 5, 0)])
    ]
    _, plain = aggregate(state, updates, alg, lr=0.1, local_steps=5)
    vectors = [np.asarray(secure_metrics(u.metrics, False, u.num_examples)[0]) for u in updates]
    (mean,) = secagg_means([[v] for v in vectors])
    summed = read_secure_metrics(torch.from_numpy(mean), len(vectors), False, counts=True)
    secure = RoundAggregator(state, alg)
    delta = {"w": torch.stack([u.delta["w"] for u in updates]).mean(0)}
    clear = [(u.client_id, 0, secure_metrics(u.metrics, False, 0)[1]) for u in updates]
    assert all(not metrics for _, _, metrics in clear)  # nothing of theirs in the clear
    add_secure_mean(secure, delta, None, clear, summed)
    _, metrics = secure.finalize(lr=0.1, local_steps=5)
    for key in ("num_clients", "num_examples", "skipped_steps", "hessian_refreshes"):
        assert metrics[key] == plain[key], key
    assert (metrics["skipped_steps"], metrics["hessian_refreshes"]) == (7.0, 4.0)
    assert metrics["train_loss"] == pytest.approx(plain["train_loss"], abs=LOSS_ROUNDING)


@pytest.mark.parametrize(
    ("loss", "summed", "clipped"),
    [(0.5, 0.125, 0), (-3.0, -0.75, 0), (100.0, 8.0, 1), (-50.0, -8.0, 1), (math.nan, 8.0, 1)],
)
def test_a_loss_outside_secaggs_range_is_summed_at_its_end_and_counted(loss, summed, clipped):
    """SecAgg+ clips every value to [-8, 8]: a loss beyond 32 (or not finite) is summed at the
    nearest end, as the round's clipped values say, never as garbage in the sum."""
    metrics = {"train_loss": loss, "skipped_steps": 1.0}
    values, clear, flagged = secure_metrics(metrics, private=False)
    assert values == [summed] and flagged == clipped
    assert clear == {"skipped_steps": 1.0}
    assert read_secure_metrics(torch.tensor(values), 1, private=False).train_loss == 4 * summed


def test_counts_beyond_secaggs_range_are_summed_at_its_end_and_counted():
    """One grid step per unit: counts up to 2**21 - 1 fit in [-8, 8]; more are counted clipped."""
    most = {"train_loss": 1.0, "skipped_steps": 2.0**21 - 1}
    fits, _, none = secure_metrics(most, private=False, examples=2**21 - 1)
    over = {**most, "skipped_steps": 2.0**22, "train_loss": math.inf}
    beyond, _, eight = secure_metrics(over, False, examples=2**21 + 5, clipped=5)
    assert fits[1:3] == beyond[1:3] == [(2**21 - 1) * 2**-18] * 2
    assert fits[1] < 8.0 and (none, eight) == (0, 8)  # 5 tensor values, the loss, two counts
    assert (fits[-1], beyond[-1]) == (0.0, 8 * 2**-18)  # the total clipped is summed too


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"beta": "auto"}, "beta='auto'"),
        ({"transport_dtype": "bfloat16"}, "transport_dtype='bfloat16'"),
        (
            {
                "dp_mode": "client",
                "dp_clip_norm": 0.1,
                "dp_theta_clip_norm": 1.0,
                "dp_noise_multiplier": 1.0,
                "dp_sampling": "poisson",
                "secagg_num_shares": 3,
            },
            "secagg_num_shares=3 is a count",
        ),
        ({"clients_per_round": 1}, "clients_per_round=1"),
        ({"secagg_num_shares": 3, "secagg_reconstruction_threshold": 4}, "threshold=4"),
        ({"secagg_num_shares": 2.5}, "secagg_num_shares"),
        ({"aggregation_weighting": "num_examples"}, "secagg_max_weight"),
        ({"secagg_max_weight": 100}, "secagg_max_weight=100"),
        ({"secagg_headroom": 0.5}, "secagg_headroom"),
        ({"secagg_headroom": math.nan}, "secagg_headroom"),
    ],
    ids=[
        "beta-auto",
        "bfloat16",
        "client-dp-poisson-share-count",
        "one-client",
        "threshold",
        "shares",
        "weight",
        "weight-uniform",
        "headroom-below-1",
        "headroom-nan",
    ],  # fmt: skip
)
def test_secagg_bad_settings_are_refused_naming_the_setting(tmp_path, settings, named):
    with pytest.raises(ValueError, match="secure_aggregation|secagg") as info:
        flower_args(tmp_path, secure_aggregation=True, **settings)
    assert named in str(info.value)


def test_secagg_headroom_reaches_the_strategys_bounds(tmp_path):
    """``secagg_headroom`` (default 8) is the strategy's: the docs' example app clips at 8 and
    not at 16 (``tests/test_flower_readme.py``)."""
    for headroom in (None, 16.0):
        settings = {} if headroom is None else {"secagg_headroom": headroom}
        args = flower_args(tmp_path, secure_aggregation=True, **settings)
        strategy = FlowerServerRun(args, build_model(args)).strategy
        assert strategy.headroom == (headroom or 8.0)


def test_secagg_is_refused_outside_flower(tmp_path):
    trainer = build_trainer(flower_args(tmp_path, secure_aggregation=True))
    with pytest.raises(ValueError, match="secure_aggregation=true needs Flower's SecAgg"):
        trainer.train()
    assert not (tmp_path / "checkpoint-round-1").exists()


def test_secagg_allows_record_level_dp(tmp_path):
    args = flower_args(
        tmp_path, secure_aggregation=True, dp_mode="record", dp_clip_norm=1.0,
        dp_noise_multiplier=1.0,
    )  # fmt: skip
    settings = args.secure_aggregation_settings(args.build_algorithm())
    expected = {"num_shares": 1.0, "reconstruction_threshold": 0.67, "max_weight": 1.0}
    assert settings == {**expected, "headroom": 8.0}


@pytest.mark.slow  # a SecAgg+ simulation (~30 s)
def test_secagg_with_public_curvature_sums_only_the_deltas(tmp_path):
    """With Theta from the server's public data, SecAgg+ clients send no Theta and the global
    Theta is the server's own, exactly."""
    public = image_data(n=48, seed=3)["train"]
    settings = dict(secure_aggregation=True, public_curvature=True, public_curvature_clients=2)

    def server_runs(args, run_config):
        data = image_data(n=120)
        trainer = FedPACTrainer(
            model=tiny_vit(), args=args, train_dataset=data["train"], curvature_dataset=public
        )
        return trainer.train_public

    states: dict[int, ServerState] = {}
    result = run_fedpac_simulation(
        build_trainer,
        flower_args(tmp_path / "secure", **settings),
        build_model=build_model,
        build_public_curvature=server_runs,
        num_supernodes=3,
        backend_config=BACKEND,
        on_round_end=lambda r, state, metrics: states.__setitem__(r, copy.deepcopy(state)),
    )
    assert [row["bytes_up_theta"] for row in result.history] == [0.0, 0.0]
    assert all(row["secagg_clipped"] == 0 for row in result.history)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the simulation's worker: the same eigendecompositions
    try:
        args = flower_args(tmp_path / "plain", public_curvature=True, public_curvature_clients=2)
        trainer = FedPACTrainer(
            model=tiny_vit(),
            args=args,
            train_dataset=image_data(n=120)["train"],
            curvature_dataset=public,
        )
        initial = ServerState.from_model(build_model(args))
        lr = args.round_learning_rates()[0]
        rows = trainer.public_rows()
        runs = [trainer.train_client(i, rows, 0, lr, initial, public=True) for i in (-1, -2)]
    finally:
        torch.set_num_threads(threads)
    for name, value in states[1].curvature.items():
        mean = (runs[0].curvature[name].double() + runs[1].curvature[name].double()) / 2
        torch.testing.assert_close(value, mean.float())
