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
import os

import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ConfigRecord  # noqa: E402
from flwr.common import parameters_to_ndarrays  # noqa: E402
from flwr.common.secure_aggregation.quantization import dequantize, quantize  # noqa: E402
from flwr.compat.common import recorddict_compat as compat  # noqa: E402

from fedpac_hf import FedPACTrainer  # noqa: E402
from fedpac_hf.federated import ClientUpdate, ServerState, aggregate  # noqa: E402
from fedpac_hf.federated.secure_aggregation import (  # noqa: E402
    CLIPPING_RANGE,
    bounds_from_log_magnitudes,
    clipped_counts,
    log_magnitudes,
    scale_tensors,
    secagg_bounds,
    unscale_tensors,
)
from fedpac_hf.flower import run_fedpac_simulation  # noqa: E402
from fedpac_hf.flower.secagg import CLIPPED, secure_reply  # noqa: E402

from .trainer_fixtures import (  # noqa: E402
    BACKEND,
    build_failing_trainer,
    build_model,
    build_trainer,
    flower_args,
    image_data,
    tiny_vit,
)

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

STEP = 2.0**-21  # one quantization step over the bound: 2 C / 2**22 / C


def assert_within_quantization(secure, plain, bounds, scale=1.0, slack=0.0, what=""):
    """Each tensor's error is within ``scale * sqrt(numel) * b_n * 2**-21`` (+ float32 rounding)."""
    assert set(secure) == set(plain), what
    for name, reference in plain.items():
        error = float((secure[name].double() - reference.double()).norm())
        limit = scale * math.sqrt(reference.numel()) * bounds[name] * STEP
        limit += slack * float(reference.double().abs().max()) * math.sqrt(reference.numel())
        assert error <= limit, f"{what} {name}: error {error:.3g} over {limit:.3g}"


class Captured(list):
    """A round's client updates, and the engine that ran it."""

    engine = None


def plain_round(args, trainer, state, captured):
    """One plain round in process from ``state`` (the same clients as Flower's round)."""
    engine = args.round_engine(state, args.num_clients, algorithm=trainer.algorithm)
    captured.engine = engine

    def train(client, plan):
        update = trainer.train_client_by_id(
            client, plan.round_index, plan.learning_rate, plan.state
        )
        captured.append(update)
        return update

    engine.run_round(train)
    return engine.state


def secure_run(tmp_path, build=build_trainer, **settings):
    """A SecAgg+ simulation on 3 nodes (2 rounds, 2 clients per round unless ``settings`` say
    otherwise) of ``build``'s trainer, and its global state after each round."""
    states: dict[int, ServerState] = {}
    result = run_fedpac_simulation(
        build,
        flower_args(tmp_path / "secure", secure_aggregation=True, **settings),
        build_model=build_model,
        num_supernodes=3,
        backend_config=BACKEND,
        on_round_end=lambda r, state, metrics: states.__setitem__(r, copy.deepcopy(state)),
    )
    return result, states


def plain_rounds(args, states):
    """Each round of a 2-round secure run again, in process, from the same start:
    ``(round_index, start, plain state, its updates)``. One torch thread, as the
    simulation's worker (the same eigendecompositions)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = build_trainer(args)
        trainer.setup_clients()
        initial = ServerState.from_model(build_model(args))
        for round_index, start in enumerate([initial, states[1]]):
            updates = Captured()
            yield round_index, start, plain_round(args, trainer, start, updates), updates
    finally:
        torch.set_num_threads(threads)


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
    quantized = [
        quantize([t.numpy() for t in scale_tensors(c, bounds).values()], CLIPPING_RANGE, 2**22)
        for c in clients
    ]
    total = [sum(q[i].astype(np.int64) for q in quantized) for i in range(len(names))]
    offset = (len(clients) - 1) * CLIPPING_RANGE  # as SecAggPlusWorkflow's unmask stage
    means = [(d - offset) / len(clients) for d in dequantize(total, CLIPPING_RANGE, 2**22)]
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
        # what travels in the clear: the same clients, examples and losses
        (expected,) = updates.engine.history
        for key in ("num_clients", "num_examples", "train_loss"):
            assert result.history[round_index][key] == pytest.approx(expected[key]), key
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


#: Client-level DP with a fixed noise seed: the same noise in the secure and the plain rounds.
PRIVATE = dict(
    dp_mode="client", dp_clip_norm=0.05, dp_theta_clip_norm=5.0, dp_noise_multiplier=0.7,
    dp_noise_seed=3,
)  # fmt: skip


def assert_within_dp_rounding(secure, plain, bound, scale=1.0, what=""):
    """Under client-level DP a secure part differs from the plain one by SecAgg+'s rounding and
    the clients' shrink that keeps it inside the clip norm ``bound`` (:func:`within_rounding`):
    each at most ``sqrt(d) * bound * 2**-21`` over the part's ``d`` values, so the mean by
    at most twice that (times ``scale``), plus float32 rounding."""
    values = sum(t.numel() for t in plain.values())
    rounding = 2 * math.sqrt(values) * bound * STEP * scale
    floats = 1e-7 * math.sqrt(values) * max(float(t.abs().max()) for t in plain.values())
    error = math.sqrt(
        sum(float((secure[n].double() - plain[n].double()).square().sum()) for n in plain)
    )
    assert error <= rounding + floats, f"{what}: error {error:.3g} over {rounding:.3g}"


#: Client-level DP with clip norms that adapt (their counts' noise leaves the sums z_v 0.72).
ADAPTIVE = dict(
    PRIVATE, dp_clip_schedule="adaptive", dp_clip_norm_lr=0.5, dp_clipped_count_std=2.0
)  # fmt: skip


@pytest.mark.parametrize("privacy", [PRIVATE, ADAPTIVE], ids=["constant", "adaptive"])
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
        for key in ("num_clients", "train_loss", "dp_clipped_delta", "dp_noise_norm"):
            assert row[key] == pytest.approx(expected[key]), key
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
    """A client's FitRes: each tensor times 8 / b, and how many values exceeded their bound."""
    update = ClientUpdate(
        client_id=2,
        delta={"w": torch.tensor([0.5, -3.0]), "b": torch.tensor([1e-3])},
        curvature={"w.v": torch.tensor([2e-8, 4e-8])},
        num_examples=24,
        num_steps=3,
        metrics={"train_loss": 0.7},
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
    assert fitres.num_examples == 1  # uniform weighting: SecAgg+ weighs every client 1
    assert fitres.metrics[CLIPPED] == 1 and fitres.metrics["num-examples"] == 24
    assert fitres.metrics["train_loss"] == pytest.approx(0.7)


def test_under_client_dp_the_clip_flags_are_summed_not_sent_in_the_clear():
    """The reply's last array is the client's two clip flags; its clear metrics lack them, in
    the calibration pass too. The server reads the counts back from the secure mean."""
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
    for stage in (
        ConfigRecord({**common, **secagg}),
        ConfigRecord({**common, "stage": "calibrate", "names-only": True}),
    ):
        fitres = compat.recorddict_to_fitres(secure_reply(update, stage), False)
        assert not set(fitres.metrics) & {"dp_clipped_delta", "dp_clipped_theta"}
        assert fitres.metrics["train_loss"] == pytest.approx(0.5)
    arrays = parameters_to_ndarrays(fitres.parameters)
    assert len(arrays) == 2  # calibration: one log-magnitude per tensor of each part
    fitres = compat.recorddict_to_fitres(
        secure_reply(update, ConfigRecord({**common, **secagg})), False
    )
    arrays = parameters_to_ndarrays(fitres.parameters)
    assert len(arrays) == 3 and arrays[-1].tolist() == [1.0, 0.0]
    # the counts from a mean of flags over three clients; a weighted mean is refused
    assert clipped_counts(torch.tensor([2 / 3, 1 / 3]), 3) == [2.0, 1.0]
    with pytest.raises(ValueError, match="not a count"):
        clipped_counts(torch.tensor([0.5, 0.0]), 3)


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
            },
            "dp_sampling='poisson'",
        ),
        ({"clients_per_round": 1}, "clients_per_round=1"),
        ({"secagg_num_shares": 3, "secagg_reconstruction_threshold": 4}, "threshold=4"),
        ({"secagg_num_shares": 2.5}, "secagg_num_shares"),
        ({"aggregation_weighting": "num_examples"}, "secagg_max_weight"),
        ({"secagg_max_weight": 100}, "secagg_max_weight=100"),
    ],
    ids=[
        "beta-auto",
        "bfloat16",
        "client-dp-poisson",
        "one-client",
        "threshold",
        "shares",
        "weight",
        "weight-uniform",
    ],  # fmt: skip
)
def test_secagg_bad_settings_are_refused_naming_the_setting(tmp_path, settings, named):
    with pytest.raises(ValueError, match="secure_aggregation|secagg") as info:
        flower_args(tmp_path, secure_aggregation=True, **settings)
    assert named in str(info.value)


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
    assert settings == {"num_shares": 1.0, "reconstruction_threshold": 0.67, "max_weight": 1.0}


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
