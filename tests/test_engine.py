"""The round engine: one round loop for simulate, the trainer and Flower."""

from __future__ import annotations

import pytest
import torch

from fedpac_hf.federated import (
    ROUND_METRICS,
    ClientError,
    ClientHooks,
    LocalSteps,
    RoundEngine,
    RoundError,
    ServerState,
    client_update,
    cycle_batches,
    get_algorithm,
    round_learning_rates,
    sample_clients,
)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def loaders(num_clients: int = 4) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(1)
    return [
        [(torch.randn(6, 3, generator=g), torch.randint(0, 2, (6,), generator=g))]
        for _ in range(num_clients)
    ]


def ce_loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def make_engine(model, state=None, **overrides) -> RoundEngine:
    kwargs = dict(
        num_clients=4,
        clients_per_round=2,
        learning_rates=round_learning_rates(0.1, 3),
        local_steps=2,
        seed=5,
    )
    kwargs.update(overrides)
    algorithm = get_algorithm(kwargs.pop("algorithm", "fedpac_soap"))
    return RoundEngine(algorithm, state or ServerState.from_model(model), **kwargs)


def trainer_for(model, engine, data, fail=()):
    def train(client_id, plan):
        if client_id in fail:
            raise ClientError(f"client {client_id}: broken on purpose")
        return client_update(
            model,
            plan.state,
            engine.algorithm,
            cycle_batches(data[client_id]),
            LocalSteps(lr=plan.learning_rate, num_steps=engine.local_steps),
            ClientHooks(loss_fn=ce_loss),
            client_id=client_id,
        )

    return train


def test_a_round_samples_schedules_aggregates_and_names_its_metrics():
    model, data = make_model(), loaders()
    engine = make_engine(model)
    metrics = engine.run_round(trainer_for(model, engine, data))
    assert engine.state.round == 1 and engine.history == [metrics]
    assert set(metrics) <= set(ROUND_METRICS) and {"drift", "bytes_up", "round_time"} <= set(
        metrics
    )
    assert metrics["learning_rate"] == engine.learning_rates[0] == pytest.approx(0.1)
    assert metrics["num_clients"] == 2 and metrics["num_dropped"] == 0
    assert engine.sample(0) == sample_clients(4, 2, 5, 0)
    assert engine.state.curvature and engine.state.direction is not None


def test_a_round_split_in_plan_record_finish_equals_run_round():
    """The asynchronous path (Flower's) and the in-process path give the same state."""
    model_a, model_b, data = make_model(), make_model(), loaders()
    a, b = make_engine(model_a), make_engine(model_b)
    for _ in range(2):
        a.run_round(trainer_for(model_a, a, data))
        plan = b.plan_round()
        train = trainer_for(model_b, b, data)
        for client_id in reversed(plan.clients):  # replies arrive in any order
            plan.record(train(client_id, plan))
        b.finish_round(plan)
    for part in ("params", "curvature", "direction"):
        for name, tensor in getattr(a.state, part).items():
            torch.testing.assert_close(getattr(b.state, part)[name], tensor, rtol=1e-6, atol=1e-7)


def test_too_few_updates_raise_a_round_error_with_reasons_and_keep_the_state():
    model, data = make_model(), loaders()
    engine = make_engine(model, min_clients_per_round=2)
    before = {n: t.clone() for n, t in engine.state.params.items()}
    sampled = engine.sample(0)
    with pytest.raises(RoundError, match="only 1 of 2 client updates") as info:
        engine.run_round(trainer_for(model, engine, data, fail={sampled[0]}))
    assert f"client {sampled[0]}: ClientError: broken on purpose" in str(info.value)
    assert engine.state.round == 0 and engine.history == []
    for name, tensor in before.items():
        assert torch.equal(engine.state.params[name], tensor)


def test_a_failure_recorded_by_hand_counts_as_a_dropped_client():
    model, data = make_model(), loaders()
    engine = make_engine(model, clients_per_round=3)
    plan = engine.plan_round()
    train = trainer_for(model, engine, data)
    for client_id in plan.clients[1:]:
        plan.record(train(client_id, plan))
    plan.fail(plan.clients[0], "NoReply", "node 7 sent no reply in time")
    metrics = engine.finish_round(plan)
    assert metrics["num_clients"] == 2 and metrics["num_dropped"] == 1


def test_a_resumed_engine_continues_the_same_rounds():
    model, data = make_model(), loaders()
    full = make_engine(model)
    for _ in range(3):
        full.run_round(trainer_for(model, full, data))

    model = make_model()
    first = make_engine(model)
    first.run_round(trainer_for(model, first, data))
    resumed = make_engine(model, state=first.state, history=first.history)
    plan = resumed.plan_round()
    assert plan.round_index == 1 and plan.learning_rate == full.learning_rates[1]
    assert plan.clients == full.sample(1)
    for client_id in plan.clients:
        plan.record(trainer_for(model, resumed, data)(client_id, plan))
    resumed.finish_round(plan)
    resumed.run_round(trainer_for(model, resumed, data))
    assert resumed.finished and [h["round"] for h in resumed.history] == [1.0, 2.0, 3.0]
    for name, tensor in full.state.params.items():
        torch.testing.assert_close(resumed.state.params[name], tensor, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="all 3 rounds are done"):
        resumed.plan_round()


def test_a_stale_plan_is_refused():
    model, data = make_model(), loaders()
    engine = make_engine(model)
    stale = engine.plan_round()
    engine.run_round(trainer_for(model, engine, data))
    with pytest.raises(ValueError, match="round 1 is not the next round"):
        engine.finish_round(stale)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"learning_rates": []}, "one positive, finite local rate per round"),
        ({"learning_rates": [0.1, float("nan")]}, "one positive, finite local rate per round"),
        ({"local_steps": 0}, "local_steps must be a whole number >= 1"),
        ({"server_learning_rate": -1.0}, "server_learning_rate must be a number > 0"),
        ({"weighting": "by_size"}, "weighting must be one of"),
        ({"num_clients": 0}, "num_clients must be a whole number >= 1"),
        ({"clients_per_round": 5}, "more than the 4 clients"),
    ],
)
def test_impossible_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_engine(make_model(), **overrides)


def test_bytes_are_split_into_delta_and_theta_up_and_params_direction_theta_down():
    model, data = make_model(), loaders()
    engine = make_engine(model)
    first = engine.run_round(trainer_for(model, engine, data))
    second = engine.run_round(trainer_for(model, engine, data))
    for m in (first, second):
        assert m["bytes_up"] == m["bytes_up_delta"] + m["bytes_up_theta"]
        assert m["bytes_down"] == (
            m["bytes_down_params"] + m["bytes_down_direction"] + m["bytes_down_theta"]
        )
        assert m["bytes_up_delta"] == 2 * (3 * 2 + 2) * 4  # two clients' float32 deltas
        assert m["bytes_up_theta"] > 0
    # nothing to send down before the first aggregation; afterwards Theta and g_G go down
    assert first["bytes_down_theta"] == first["bytes_down_direction"] == 0
    assert second["bytes_down_theta"] > 0 and second["bytes_down_direction"] == 2 * 8 * 4

    model = make_model()
    fedavg = make_engine(model, algorithm="fedavg")
    m = fedavg.run_round(trainer_for(model, fedavg, data))
    assert m["bytes_up_theta"] == m["bytes_down_theta"] == 0  # SGD has no curvature


def run_three_rounds(algorithm: str, transport_dtype: str):
    model, data = make_model(), loaders()
    engine = make_engine(model, algorithm=algorithm, transport_dtype=transport_dtype)
    history = [engine.run_round(trainer_for(model, engine, data)) for _ in range(3)]
    return engine, history


def test_bfloat16_transport_halves_the_bytes_and_keeps_float32_master_weights():
    (_, full), (half_engine, half) = (
        run_three_rounds("fedpac_soap", dtype) for dtype in ("float32", "bfloat16")
    )
    for f, h in zip(full, half):
        for key in ("bytes_up_delta", "bytes_up_theta", "bytes_down_params", "bytes_down_theta"):
            assert h[key] * 2 == f[key], key
    assert all(t.dtype == torch.float32 for t in half_engine.state.params.values())
    assert all(t.dtype == torch.float32 for t in half_engine.state.curvature.values())


def test_bfloat16_transport_moves_the_model_almost_as_float32_does():
    start = {n: p.detach() for n, p in make_model().named_parameters()}
    (full, _), (half, _) = (
        run_three_rounds("fedavg_adamw", dtype) for dtype in ("float32", "bfloat16")
    )

    def norm(tensors):
        return float(sum(t.square().sum() for t in tensors) ** 0.5)

    moved = norm(full.state.params[n] - start[n] for n in start)
    apart = norm(half.state.params[n] - full.state.params[n] for n in start)
    assert 0 < apart < 0.01 * moved  # rounded transport: a different, nearby trajectory
