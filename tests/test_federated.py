"""The federated core on small models: client rule, server rule, runner."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedpac_hf.federated import (
    Algorithm,
    ClientHooks,
    ClientUpdate,
    LocalSteps,
    ServerState,
    aggregate,
    client_update,
    cycle_batches,
    get_algorithm,
    list_algorithms,
    register_algorithm,
    resolve_clients_per_round,
    round_learning_rates,
    sample_clients,
    simulate,
    unregister_algorithm,
)


def make_model(seed: int = 0, d_in: int = 6, d_out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 8), nn.Tanh(), nn.Linear(8, d_out))


def ce_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def make_clients(
    num_clients: int, batches: int = 3, bs: int = 5, seed: int = 0, skew: bool = True
) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Label-skewed synthetic clients: client i mostly sees class i % 3."""
    g = torch.Generator().manual_seed(seed)
    clients = []
    for i in range(num_clients):
        data = []
        for _ in range(batches):
            x = torch.randn(bs, 6, generator=g)
            if skew:
                y = torch.full((bs,), i % 3)
                x = x + torch.nn.functional.one_hot(y, 6).float() * 2
            else:
                y = torch.randint(0, 3, (bs,), generator=g)
            data.append((x, y))
        clients.append(data)
    return clients


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------- registry


def test_registry_has_the_methods_of_the_paper_and_lists_names_on_error():
    names = set(list_algorithms())
    for required in [
        "fedavg",
        "fedavg_adamw",
        "fedcm",
        "fedadamw",
        "local_soap",
        "local_sophia",
        "local_muon",
        "fedpac_soap",
        "fedpac_sophia",
        "fedpac_muon",
        "fedpac_align",
        "fedpac_correct",
    ]:
        assert required in names
    with pytest.raises(ValueError, match="fedpac_soap"):
        get_algorithm("fedpac_shampoo")


def test_user_can_register_an_algorithm_and_override_fields():
    algo = register_algorithm(Algorithm("my_adamw_cm", "adamw", beta=0.2), overwrite=True)
    try:
        assert get_algorithm("my_adamw_cm") is algo
    finally:
        assert unregister_algorithm("my_adamw_cm") is algo
    assert "my_adamw_cm" not in list_algorithms()
    with pytest.raises(ValueError, match="no algorithm named"):
        unregister_algorithm("my_adamw_cm")
    assert get_algorithm("fedpac_soap", beta=0.3).beta == 0.3
    with pytest.raises(ValueError, match="already registered"):
        register_algorithm(Algorithm("fedavg", "sgd"))
    with pytest.raises(ValueError, match="unknown algorithm field"):
        get_algorithm("fedavg", momentum=0.9)


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5])
def test_beta_outside_range_is_refused(beta):
    with pytest.raises(ValueError, match="beta"):
        Algorithm("x", "sgd", beta=beta)


# ---------------------------------------------------------------- sampling


def test_sampling_is_deterministic_distinct_and_sized():
    a = sample_clients(100, 10, seed=3, round_index=7)
    assert a == sample_clients(100, 10, seed=3, round_index=7)
    assert len(set(a)) == 10 and all(0 <= i < 100 for i in a)
    assert a != sample_clients(100, 10, seed=3, round_index=8)
    assert sample_clients(5, 5, seed=0, round_index=0) == [0, 1, 2, 3, 4]


def test_participation_fractions_and_counts():
    assert resolve_clients_per_round(100, 0.1) == 10
    # 1 means one client however it is written: the command line types it as 1.0
    assert resolve_clients_per_round(100, 1.0) == resolve_clients_per_round(100, 1) == 1
    assert resolve_clients_per_round(100, 0.001) == 1
    assert resolve_clients_per_round(100, 7) == 7
    assert resolve_clients_per_round(100, 7.0) == 7
    with pytest.raises(ValueError, match="more than the 10 clients"):
        resolve_clients_per_round(10, 11)
    with pytest.raises(
        ValueError,
        match=r"clients_per_round must be a fraction in \(0, 1\) or a whole number of clients",
    ):
        resolve_clients_per_round(10, 0)
    with pytest.raises(
        ValueError,
        match=r"clients_per_round must be a fraction in \(0, 1\) or a whole number of clients",
    ):
        resolve_clients_per_round(10, 2.5)
    with pytest.raises(ValueError, match="fraction"):
        resolve_clients_per_round(10, -0.5)


def test_cosine_schedule_decays_and_stays_positive():
    rates = round_learning_rates(0.1, 10)
    assert rates[0] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert rates[-1] > 0
    assert round_learning_rates(0.1, 10, "constant")[5] == 0.1
    with pytest.raises(ValueError, match="lr_scheduler_type 'step'.*cosine"):
        round_learning_rates(0.1, 10, "step")


def test_warmup_counts_rounds_and_never_starts_at_zero():
    rates = round_learning_rates(0.1, 10, "linear", warmup_rounds=4)
    assert rates[0] == pytest.approx(0.025)  # the first positive warm-up rate, not 0
    assert rates[1:5] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert all(a > b for a, b in zip(rates[4:], rates[5:]))


# ---------------------------------------------------------------- server rule


def test_server_rule_matches_a_hand_computation():
    state = ServerState(params={"w": torch.tensor([1.0, 2.0])})
    u1 = ClientUpdate(0, {"w": torch.tensor([0.5, -1.0])}, {"w.v": torch.tensor([1.0, 1.0])}, 10, 4)
    u2 = ClientUpdate(1, {"w": torch.tensor([-0.1, 0.3])}, {"w.v": torch.tensor([3.0, 5.0])}, 30, 4)
    algo = get_algorithm("fedadamw")
    lr, K, eta_g = 0.1, 4, 0.5

    new, m = aggregate(state, [u1, u2], algo, lr=lr, local_steps=K, server_lr=eta_g)
    delta = (torch.tensor([0.5, -1.0]) + torch.tensor([-0.1, 0.3])) / 2
    torch.testing.assert_close(new.params["w"], torch.tensor([1.0, 2.0]) + eta_g * delta)
    torch.testing.assert_close(new.direction["w"], -delta / (K * lr))
    theta = torch.tensor([2.0, 3.0])
    torch.testing.assert_close(new.curvature["w.v"], theta)
    drift = (
        (torch.tensor([1.0, 1.0]) - theta).square().sum()
        + (torch.tensor([3.0, 5.0]) - theta).square().sum()
    ) / 2
    assert m["drift"] == pytest.approx(float(drift))
    assert m["drift_relative"] == pytest.approx(float(drift / theta.square().sum()))
    assert new.round == 1
    # up: 2 deltas + 2 Thetas of 2 float32 each; down: params (+ no Theta/direction yet)
    assert m["bytes_up"] == 2 * (8 + 8)
    assert m["bytes_down"] == 2 * 8

    # weighting by examples: 10 and 30
    new_n, _ = aggregate(
        state, [u1, u2], algo, lr=lr, local_steps=K, server_lr=1.0, weighting="num_examples"
    )
    delta_n = (10 * torch.tensor([0.5, -1.0]) + 30 * torch.tensor([-0.1, 0.3])) / 40
    torch.testing.assert_close(new_n.params["w"], torch.tensor([1.0, 2.0]) + delta_n)
    torch.testing.assert_close(
        new_n.curvature["w.v"], (10 * torch.tensor([1.0, 1.0]) + 30 * torch.tensor([3.0, 5.0])) / 40
    )


def test_every_client_update_counts():
    """The reference code kept only the first client's update under some worker counts."""
    state = ServerState(params={"w": torch.zeros(3)})
    updates = [ClientUpdate(i, {"w": torch.full((3,), float(i))}, {}, 1, 1) for i in range(5)]
    new, m = aggregate(state, updates, get_algorithm("fedavg"), lr=1.0, local_steps=1)
    torch.testing.assert_close(new.params["w"], torch.full((3,), 2.0))
    assert m["num_clients"] == 5
    assert "drift" not in m  # SGD has no curvature


def test_downlink_counts_theta_and_direction_only_when_used():
    state = ServerState(
        params={"w": torch.zeros(4)},
        curvature={"w.v": torch.zeros(4)},
        direction={"w": torch.zeros(4)},
    )
    u = ClientUpdate(0, {"w": torch.zeros(4)}, {"w.v": torch.ones(4)}, 1, 1)
    _, m_pac = aggregate(state, [u], get_algorithm("fedadamw"), lr=1.0, local_steps=1)
    _, m_local = aggregate(state, [u], get_algorithm("fedavg_adamw"), lr=1.0, local_steps=1)
    assert m_pac["bytes_down"] == 3 * 16 and m_pac["bytes_up"] == 2 * 16
    assert m_local["bytes_down"] == 16 and m_local["bytes_up"] == 16


# ---------------------------------------------------------------- client rule


def test_client_step_is_scaled_base_step_plus_correction():
    """One SGD step: theta' = theta - (1 - beta) lr g - beta lr g_G."""
    model = make_model()
    state = ServerState.from_model(model)
    g_dir = {n: torch.randn_like(p) for n, p in state.params.items()}
    state.direction = g_dir
    batch = make_clients(1, batches=1)[0][0]
    # reference gradient at the global point
    ref = make_model()
    ce_loss(ref, batch).backward()
    grads = {n: p.grad.clone() for n, p in ref.named_parameters()}

    beta, lr = 0.3, 0.2
    algo = Algorithm("t", "sgd", beta=beta)
    up = client_update(
        model, state, algo, cycle_batches([batch]), LocalSteps(lr, 1), ClientHooks(ce_loss)
    )
    for n in state.params:
        expected = -(1 - beta) * lr * grads[n] - beta * lr * g_dir[n]
        torch.testing.assert_close(up.delta[n], expected, rtol=1e-5, atol=1e-6)
    assert up.num_examples == 5 and up.num_steps == 1 and math.isfinite(up.metrics["train_loss"])


def test_fedavg_sgd_one_step_equals_centralised_sgd_on_the_union():
    clients = make_clients(4, batches=1, bs=5, seed=1, skew=False)
    clients[0] = [(clients[0][0][0][:2], clients[0][0][1][:2])]  # unequal sizes
    model = make_model()
    simulate(
        model,
        clients,
        "fedavg",
        num_rounds=1,
        clients_per_round=4,
        local_steps=1,
        loss_fn=ce_loss,
        lr=0.5,
        lr_schedule="constant",
        weighting="num_examples",
    )
    central = make_model()
    x = torch.cat([c[0][0] for c in clients])
    y = torch.cat([c[0][1] for c in clients])
    opt = torch.optim.SGD(central.parameters(), lr=0.5)
    ce_loss(central, (x, y)).backward()
    opt.step()
    for (n, p), (_, q) in zip(model.named_parameters(), central.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_beta_zero_without_alignment_equals_the_naive_local_method():
    clients = make_clients(4)
    runs = {}
    for algo in [get_algorithm("fedpac_soap", beta=0.0, align=False), get_algorithm("local_soap")]:
        model = make_model()
        simulate(
            model,
            clients,
            algo,
            num_rounds=3,
            clients_per_round=2,
            local_steps=3,
            loss_fn=ce_loss,
            lr=0.01,
        )
        runs[algo.name] = params_of(model)
    for n, p in runs["fedpac_soap"].items():
        assert torch.equal(p, runs["local_soap"][n]), n


def test_correction_and_alignment_change_the_trajectory():
    clients = make_clients(4)
    finals = {}
    for name in ["local_soap", "fedpac_soap", "fedpac_align_soap", "fedpac_correct_soap"]:
        model = make_model()
        simulate(
            model,
            clients,
            name,
            num_rounds=3,
            clients_per_round=4,
            local_steps=3,
            loss_fn=ce_loss,
            lr=0.01,
        )
        finals[name] = torch.cat([p.flatten() for p in params_of(model).values()])
    names = list(finals)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.allclose(finals[a], finals[b]), (a, b)


def test_drift_is_zero_when_all_clients_are_identical_and_positive_otherwise():
    same = make_clients(1)[0]
    history = simulate(
        make_model(),
        [same] * 3,
        "fedadamw",
        num_rounds=2,
        clients_per_round=3,
        local_steps=2,
        loss_fn=ce_loss,
        lr=0.01,
    )
    assert all(h["drift"] == pytest.approx(0.0, abs=1e-12) for h in history)
    history = simulate(
        make_model(),
        make_clients(3),
        "fedadamw",
        num_rounds=2,
        clients_per_round=3,
        local_steps=2,
        loss_fn=ce_loss,
        lr=0.01,
    )
    assert all(h["drift"] > 1e-8 and 0 < h["drift_relative"] for h in history)


def test_only_trainable_parameters_travel_and_frozen_ones_stay_bit_identical():
    model = make_model()
    frozen = model[0].weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    state = ServerState.from_model(model)
    assert "0.weight" not in state.params
    up = client_update(
        model,
        state,
        get_algorithm("fedpac_soap"),
        cycle_batches(make_clients(1)[0]),
        LocalSteps(lr=0.01, num_steps=3),
        ClientHooks(loss_fn=ce_loss),
    )
    assert "0.weight" not in up.delta
    assert not any(k.startswith("0.weight") for k in up.curvature)
    assert torch.equal(frozen, before)


def test_simulate_logs_metrics_and_lowers_the_loss():
    clients = make_clients(6, batches=4)
    x = torch.cat([b[0] for c in clients for b in c])
    y = torch.cat([b[1] for c in clients for b in c])
    model = make_model()

    def evaluate(m):
        with torch.no_grad():
            return {"eval_loss": float(ce_loss(m, (x, y)))}

    start = evaluate(model)["eval_loss"]
    history = simulate(
        model,
        clients,
        "fedpac_soap",
        num_rounds=6,
        clients_per_round=0.5,
        local_steps=4,
        loss_fn=ce_loss,
        eval_fn=evaluate,
        lr=0.01,
    )
    assert len(history) == 6
    for key in [
        "round",
        "learning_rate",
        "train_loss",
        "eval_loss",
        "drift",
        "drift_relative",
        "bytes_up",
        "bytes_down",
        "round_time",
        "num_clients",
    ]:
        assert key in history[-1]
    assert history[-1]["num_clients"] == 3
    assert history[-1]["eval_loss"] < start


def test_a_failing_client_is_dropped_and_too_few_survivors_stop_the_run(caplog):
    clients = make_clients(3)
    bad = [(torch.full_like(x, float("nan")), y) for x, y in clients[1]]
    history = simulate(
        make_model(),
        [clients[0], bad, clients[2]],
        "fedavg",
        num_rounds=1,
        clients_per_round=3,
        local_steps=2,
        loss_fn=ce_loss,
        lr=0.1,
    )
    assert history[0]["num_clients"] == 2
    assert "dropping client 1" in caplog.text
    with pytest.raises(RuntimeError, match="min_clients_per_round"):
        simulate(
            make_model(),
            [clients[0], bad, clients[2]],
            "fedavg",
            num_rounds=1,
            clients_per_round=3,
            local_steps=2,
            loss_fn=ce_loss,
            lr=0.1,
            min_clients_per_round=3,
        )


def test_bad_runner_arguments_are_refused():
    clients = make_clients(2)
    with pytest.raises(ValueError, match="local_steps"):
        simulate(make_model(), clients, "fedavg", 1, 2, 0, ce_loss)
    with pytest.raises(ValueError, match="more than the 2 clients"):
        simulate(make_model(), clients, "fedavg", 1, 3, 1, ce_loss)
    with pytest.raises(ValueError, match="unknown algorithm"):
        simulate(make_model(), clients, "fedprox", 1, 2, 1, ce_loss)


def label_skewed_problem(seed: int, num_classes: int = 10, dim: int = 20, num_clients: int = 20):
    """Anisotropic Gaussian classes; every client holds 2 classes (pathological skew)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=g)
    scale = torch.logspace(-1, 1, dim)  # ill-conditioned features: curvature matters
    xs, ys = [], []
    for c in range(num_classes):
        x = (means[c] + torch.randn(160, dim, generator=g)) * scale
        xs.append(x)
        ys.append(torch.full((160,), c))
    x, y = torch.cat(xs), torch.cat(ys)
    clients = []
    for i in range(num_clients):
        idx = torch.cat([torch.nonzero(y == c).flatten() for c in (2 * i % 10, (2 * i + 1) % 10)])
        idx = idx[torch.randperm(len(idx), generator=g)][:40]
        clients.append([(x[idx[j : j + 10]], y[idx[j : j + 10]]) for j in range(0, 40, 10)])
    return x, y, clients


def test_fedpac_soap_beats_naive_local_soap_on_label_skew():
    """Alignment + correction reach a lower global loss than plain averaging of SOAP steps."""
    for seed in range(3):
        x, y, clients = label_skewed_problem(seed)
        final = {}
        for name in ["local_soap", "fedpac_soap"]:
            torch.manual_seed(seed)
            model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 10))
            history = simulate(
                model,
                clients,
                name,
                num_rounds=15,
                clients_per_round=5,
                local_steps=20,
                loss_fn=ce_loss,
                eval_fn=lambda m, x=x, y=y: float(ce_loss(m, (x, y))),
                seed=seed,
                lr=0.03,
            )
            final[name] = history[-1]["eval"]
        assert final["fedpac_soap"] < 0.75 * final["local_soap"], (seed, final)
