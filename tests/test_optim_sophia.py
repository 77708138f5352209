"""Sophia-G: GNB Hessian estimate vs the exact Gauss-Newton diagonal, refresh API, Theta."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedpac_hf.optim import Sophia, gnb_loss, hessian_refresh_due, sophia_refresh


def test_gnb_estimate_approaches_exact_gauss_newton_diagonal() -> None:
    torch.manual_seed(0)
    n, d, c = 256, 5, 4
    x = torch.randn(n, d)
    model = nn.Linear(d, c, bias=False)
    with torch.no_grad():
        model.weight.mul_(3.0)  # confident, uneven class probabilities
    opt = Sophia(model.named_parameters(), betas=(0.9, 0.995), hessian_update_interval=1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2000):
        sophia_refresh(opt, lambda: model(x), generator=gen)
    estimate = opt.export_curvature()["weight.hessian"]

    with torch.no_grad():
        p = torch.softmax(model(x), dim=-1)  # [n, c]
        exact = (p * (1 - p)).T @ x.square() / n  # GN diag for W[c, j]
    # EMA over ~400 effective refreshes: about 7% noise per entry.
    assert (estimate - exact).norm() / exact.norm() < 0.12
    torch.testing.assert_close(estimate, exact, rtol=0.3, atol=0.0)
    assert model.weight.grad is None  # the refresh leaves no gradient behind


def test_gnb_loss_masks_counts_and_reproducibility() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    attention = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    labels = torch.full((2, 5), 3)
    labels[1, 0] = -100
    result = gnb_loss(
        logits,
        labels=labels,
        attention_mask=attention,
        generator=torch.Generator().manual_seed(5),
    )
    assert result.num_samples == 7
    result.loss.backward()
    assert torch.all(logits.grad[0, 3:] == 0) and torch.all(logits.grad[1, 0] == 0)
    assert logits.grad[1, 1:].abs().sum() > 0
    again = gnb_loss(
        logits, labels=labels, attention_mask=attention, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(again.loss, result.loss)
    losses = {
        float(gnb_loss(logits, generator=torch.Generator().manual_seed(s)).loss.detach())
        for s in range(6)
    }
    assert len(losses) > 1
    assert gnb_loss(logits[:, 0]).num_samples == 2  # [B, C] logits
    with pytest.raises(ValueError, match="masked out"):
        gnb_loss(logits, attention_mask=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        gnb_loss(logits, attention_mask=torch.ones(2, 4))


@pytest.mark.parametrize("bias_correction", [True, False])
def test_clipped_update_closed_form(bias_correction) -> None:
    torch.manual_seed(2)
    w = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    h = torch.rand(4, 3) * 50.0
    h[0] = 0.0  # no curvature -> the step saturates at lr * sign(m)
    lr, (b1, b2), rho, wd, eps = 0.05, (0.9, 0.99), 0.04, 0.1, 1e-12
    opt = Sophia(
        [("w", w)], lr=lr, betas=(b1, b2), rho=rho, weight_decay=wd, eps=eps,
        bias_correction=bias_correction,
    )  # fmt: skip
    opt.import_curvature({"w.hessian": h})  # a complete estimate: no correction of h
    g = torch.randn(4, 3, dtype=torch.float64)
    w.grad = g.clone()
    w0 = w.detach().clone()
    with pytest.warns(RuntimeWarning, match="refresh was due"):  # h imported, no refresh
        opt.step()
    m = g if bias_correction else (1 - b1) * g  # m / (1 - b1^1) with correction
    ratio = (m / torch.clamp(rho * h.double(), min=eps)).clamp(-1, 1)
    assert bool((ratio[1:].abs() < 1).any())  # not every step saturates
    torch.testing.assert_close(w.detach(), w0 * (1 - lr * wd) - lr * ratio, atol=1e-12, rtol=0)
    torch.testing.assert_close(
        (w0 * (1 - lr * wd) - w.detach())[0].abs(), torch.full((3,), lr, dtype=torch.float64)
    )


@pytest.mark.parametrize("bias_correction", [True, False])
def test_bias_correction_divides_h_by_the_weight_of_its_refreshes(bias_correction) -> None:
    torch.manual_seed(3)
    model = nn.Linear(5, 3)
    b2 = 0.99
    opt = Sophia(
        model.named_parameters(), betas=(0.9, b2), hessian_update_interval=1,
        bias_correction=bias_correction,
    )  # fmt: skip
    x = torch.randn(8, 5)
    gen = torch.Generator().manual_seed(0)
    estimates = []
    for _ in range(3):  # three refreshes, each N g_hat^2 of a fresh sampled-label gradient
        opt.zero_grad()
        result = gnb_loss(model(x), generator=gen)
        result.loss.backward()
        estimates.append(8 * model.weight.grad.detach().square())
        opt.update_hessian(result.num_samples)
    ema = torch.zeros(3, 5)
    for e in estimates:
        ema = b2 * ema + (1 - b2) * e
    theta = opt.export_curvature()["weight.hessian"]
    weight = 1 - b2**3
    expected = ema / weight if bias_correction else ema
    torch.testing.assert_close(theta, expected, rtol=1e-5, atol=0)


def test_refresh_cadence_and_missing_refresh_warning() -> None:
    model = nn.Linear(3, 2)
    opt = Sophia(model.named_parameters(), lr=1e-2, hessian_update_interval=3)
    x = torch.randn(6, 3)
    due = []
    for _ in range(7):
        due.append(opt.hessian_update_due())
        assert hessian_refresh_due(opt) == due[-1]
        if due[-1]:
            sophia_refresh(opt, lambda: model(x))
            assert not opt.hessian_update_due()
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert due == [True, False, False, True, False, False, True]
    assert not hessian_refresh_due(torch.optim.SGD(model.parameters(), lr=0.1))
    assert float(opt.export_curvature()["weight.hessian"].sum()) > 0

    fresh = Sophia(model.named_parameters(), lr=1e-2)
    model(x).square().mean().backward()
    with pytest.warns(RuntimeWarning, match="refresh was due"):
        fresh.step()


@pytest.mark.parametrize("bias_correction", [True, False])
def test_warm_start_reproduces_next_step_with_reset_moment(bias_correction) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    options = {"lr": 1e-2, "hessian_update_interval": 2, "bias_correction": bias_correction}
    opt = Sophia(model.named_parameters(), **options)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        if opt.hessian_update_due():
            sophia_refresh(opt, lambda: model(x), generator=gen)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    theta = opt.export_curvature()
    twin = copy.deepcopy(model)
    warm = Sophia(twin.named_parameters(), **options)
    warm.import_curvature(theta)
    assert warm.hessian_update_due()  # the cadence restarts with the warm start
    opt.reset_basis_moments()
    for m, o in ((model, opt), (twin, warm)):
        F.cross_entropy(m(x), y).backward()
        # the warm optimizer skips its due refresh on purpose: same h on both sides
        with pytest.warns(RuntimeWarning) if o is warm else contextlib.nullcontext():
            o.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="non-negative"):
        warm.import_curvature({k: -v - 1 for k, v in theta.items()})
    with pytest.raises(ValueError, match="unexpected keys"):
        warm.import_curvature({**theta, "extra.hessian": torch.zeros(1)})


def test_bf16_state_stays_float32_and_bad_gradients_are_refused() -> None:
    model = nn.Linear(4, 3).to(torch.bfloat16)
    opt = Sophia(model.named_parameters(), lr=1e-2)
    x = torch.randn(8, 4, dtype=torch.bfloat16)
    sophia_refresh(opt, lambda: model(x))
    model(x).float().square().mean().backward()
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    again = Sophia(model.named_parameters(), lr=1e-2)
    again.load_state_dict(saved)
    for key in ("hessian", "exp_avg"):
        assert again.state[model.weight][key].dtype == torch.float32
        assert torch.equal(again.state[model.weight][key], opt.state[model.weight][key])
    assert again.param_groups[0]["step"] == 1

    h_before = opt.state[model.weight]["hessian"].clone()
    opt.zero_grad()
    model(x).float().sum().backward()
    model.weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="weight"):
        opt.update_hessian(batch_size=8)
    with pytest.raises(FloatingPointError, match="weight"):
        opt.step()
    assert torch.equal(opt.state[model.weight]["hessian"], h_before)
    with pytest.raises(ValueError, match="batch_size"):
        opt.update_hessian(batch_size=0)


def test_a_round_counts_its_hessian_refreshes() -> None:
    from fedpac_hf.federated import get_algorithm, simulate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    gen = torch.Generator().manual_seed(1)
    clients = [
        [(torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen))]
        for _ in range(3)
    ]
    algorithm = get_algorithm(
        "local_sophia", optimizer_kwargs={"hessian_update_interval": 2, "weight_decay": 0.0}
    )
    history = simulate(
        model, clients, algorithm, num_rounds=2, clients_per_round=3, local_steps=5,
        loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]), lr=1e-2,
        curvature_loss_fn=lambda m, b: gnb_loss(m(b[0]), generator=torch.Generator()),
    )  # fmt: skip
    # each client refreshes before its steps 0, 2 and 4
    assert [h["hessian_refreshes"] for h in history] == [9.0, 9.0]
