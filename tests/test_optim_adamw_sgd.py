"""AdamW (Theta = second moment) and SGD (empty Theta)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedpac_hf.optim import SGD, AdamW
from fedpac_hf.optim.adamw import warm_start_step


def _steps(model: nn.Module, opt: torch.optim.Optimizer, n: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(8, 4, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        F.mse_loss(model(x), x[:, :2]).backward()
        opt.step()


def test_adamw_matches_torch_and_exports_bias_corrected_second_moment() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 2).double()
    twin = copy.deepcopy(model)
    ours = AdamW(model.named_parameters(), lr=1e-2, betas=(0.9, 0.99))
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2, betas=(0.9, 0.99))
    _steps(model, ours, 5)
    _steps(twin, ref, 5)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    theta = ours.export_curvature()
    assert set(theta) == {"weight.exp_avg_sq", "bias.exp_avg_sq"}
    expected = ref.state[twin.weight]["exp_avg_sq"] / (1 - 0.99**5)
    torch.testing.assert_close(theta["weight.exp_avg_sq"], expected.float())


def test_adamw_warm_start_next_step_closed_form() -> None:
    torch.manual_seed(1)
    w = nn.Parameter(torch.randn(3, 2, dtype=torch.float64))
    v_hat = torch.rand(3, 2) + 0.1
    lr, (b1, b2), eps, wd = 0.1, (0.9, 0.999), 1e-8, 0.01
    opt = AdamW([("w", w)], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    opt.import_curvature({"w.exp_avg_sq": v_hat})
    g = torch.randn(3, 2, dtype=torch.float64)
    w.grad = g.clone()
    w0 = w.detach().clone()
    opt.step()
    s = warm_start_step(b2) + 1
    m = (1 - b1) * g / (1 - b1**s)
    v = (b2 * v_hat.double() + (1 - b2) * g.square()) / (1 - b2**s)
    expected = w0 * (1 - lr * wd) - lr * m / (v.sqrt() + eps)
    torch.testing.assert_close(w.detach(), expected, atol=1e-12, rtol=0)
    assert torch.equal(opt.state[w]["exp_avg"], (1 - b1) * g)
    with pytest.raises(ValueError, match="missing keys"):
        opt.import_curvature({})


def test_sgd_has_empty_theta_and_refuses_other_theta() -> None:
    model = nn.Linear(4, 2).double()
    opt = SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    _steps(model, opt, 2)
    assert opt.export_curvature() == {}
    opt.import_curvature({})
    with pytest.raises(ValueError, match="unexpected keys \\['weight.L'\\]"):
        opt.import_curvature({"weight.L": torch.zeros(2, 2)})


@pytest.mark.parametrize("cls", [SGD, AdamW])
def test_non_finite_gradient_raises_and_leaves_state(cls: type) -> None:
    model = nn.Linear(4, 2)
    opt = cls(model.named_parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    weights = model.weight.detach().clone()
    model.weight.grad[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="weight"):
        opt.step()
    assert torch.equal(model.weight, weights)
    for key, state in before["state"].items():
        for name, value in state.items():
            live = opt.state[list(model.parameters())[key]][name]
            assert torch.equal(live, value)


def test_step_hooks_run_once() -> None:
    model = nn.Linear(2, 1)
    calls = []
    torch.optim.AdamW(model.parameters())  # make sure torch's own step is hooked too
    opt = AdamW(model.named_parameters(), lr=0.1)
    opt.register_step_pre_hook(lambda *_: calls.append(1))
    model(torch.randn(1, 2)).sum().backward()
    opt.step()
    assert calls == [1]
