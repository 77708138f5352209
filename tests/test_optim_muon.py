"""Muon composite: exact agreement with torch.optim.Muon/AdamW, schedulers, state, Theta."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedpac_hf.optim import Muon, create_optimizer
from fedpac_hf.optim.muon import newton_schulz, ns_dtype_for


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 8)
        self.hidden = nn.Linear(8, 12)
        self.hidden2 = nn.Linear(12, 8)
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 10, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return self.lm_head(self.norm(self.hidden2(torch.tanh(self.hidden(h)))))


def _loss(model: nn.Module, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 10, (4, 6), generator=gen)
    return F.cross_entropy(model(ids).flatten(0, 1), ids.roll(1, 1).flatten())


def test_matches_torch_muon_and_adamw_exactly() -> None:
    model, twin = _Net(), _Net()
    opt = Muon(
        model.named_parameters(),
        lr=0.02,
        weight_decay=0.01,
        adjust_lr_fn=None,
        ns_dtype="bfloat16",  # torch's; "auto" iterates in float32 on a CPU
    )
    matrices = [p for n, p in twin.named_parameters() if n in {"hidden.weight", "hidden2.weight"}]
    others = [p for n, p in twin.named_parameters() if n not in {"hidden.weight", "hidden2.weight"}]
    ref_muon = torch.optim.Muon(matrices, lr=0.02, weight_decay=0.01)
    ref_adamw = torch.optim.AdamW(others, lr=0.02, weight_decay=0.01)
    assert {n for g in opt.param_groups if g["use_muon"] for n in g["param_names"]} == {
        "hidden.weight",
        "hidden2.weight",
    }
    for step in range(8):
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()
        ref_muon.zero_grad()
        ref_adamw.zero_grad()
        _loss(twin, step).backward()
        ref_muon.step()
        ref_adamw.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), name
    torch.testing.assert_close(
        opt.export_curvature()["hidden.weight.momentum"],
        ref_muon.state[twin.hidden.weight]["momentum_buffer"],
        rtol=0,
        atol=0,
    )


def test_scheduler_scales_both_parts_and_state_dict_round_trip() -> None:
    model = _Net()
    opt = create_optimizer("muon", model, lr=0.1, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    for step in range(3):
        _loss(model, step).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    assert all(g["lr"] == pytest.approx(0.1 * 0.5**3) for g in opt.param_groups)
    saved = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    restored = create_optimizer("muon", twin, lr=0.1, weight_decay=0.1)
    restored.load_state_dict(saved)
    for m, o in ((model, opt), (twin, restored)):
        _loss(m, 9).backward()
        o.step()
        o.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    assert copy.deepcopy(opt).export_curvature().keys() == opt.export_curvature().keys()


def test_warm_start_from_theta_reproduces_next_matrix_step() -> None:
    model = _Net()
    opt = create_optimizer("muon", model, lr=0.02)
    for step in range(4):
        _loss(model, step).backward()
        opt.step()
        opt.zero_grad()
    theta = opt.export_curvature()
    assert set(theta) == {"hidden.weight.momentum", "hidden2.weight.momentum"}
    twin = copy.deepcopy(model)
    warm = create_optimizer("muon", twin, lr=0.02)
    warm.import_curvature(theta)
    for m, o in ((model, opt), (twin, warm)):
        _loss(m, 11).backward()
        o.step()
    assert torch.equal(model.hidden.weight, twin.hidden.weight)
    assert torch.equal(model.hidden2.weight, twin.hidden2.weight)
    with pytest.raises(ValueError, match="hidden3.weight.momentum"):
        warm.import_curvature({**theta, "hidden3.weight.momentum": torch.zeros(2, 2)})


def test_bad_inputs() -> None:
    model = _Net()
    opt = Muon(model.named_parameters(), lr=0.02)
    _loss(model, 0).backward()
    model.hidden.weight.grad[0, 0] = float("nan")
    before = model.hidden.weight.detach().clone()
    with pytest.raises(FloatingPointError, match="hidden.weight"):
        opt.step()
    assert torch.equal(model.hidden.weight, before)
    assert opt.state == {} or all(len(s) == 0 for s in opt.state.values())
    with pytest.raises(ValueError, match="only 2-D"):
        Muon([{"params": [nn.Parameter(torch.zeros(3))], "use_muon": True}])


def test_newton_schulz_dtype_auto_is_float32_on_a_cpu_and_more_accurate() -> None:
    assert ns_dtype_for("auto", torch.device("cpu")) == torch.float32
    assert ns_dtype_for("auto", torch.device("cuda")) == torch.bfloat16
    assert ns_dtype_for("bfloat16", torch.device("cpu")) == torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    update = torch.randn(48, 16, generator=gen)
    coefficients = (3.4445, -4.7750, 2.0315)
    exact = newton_schulz(update.double(), coefficients, 5, 1e-7, torch.float64)
    errors = {
        dtype: (newton_schulz(update, coefficients, 5, 1e-7, dtype).double() - exact).abs().max()
        for dtype in (torch.float32, torch.bfloat16)
    }
    assert errors[torch.float32] < 1e-5 < errors[torch.bfloat16]
    before = update.clone()
    newton_schulz(update, coefficients, 5, 1e-7, torch.float32)
    assert torch.equal(update, before)  # the momentum it is given stays untouched

    model, twin = _Net(), _Net()
    runs = [
        Muon(m.named_parameters(), lr=0.02, ns_dtype=dtype)
        for m, dtype in ((model, "auto"), (twin, "float32"))
    ]
    for step in range(3):
        for m, opt in zip((model, twin), runs, strict=True):
            opt.zero_grad()
            _loss(m, step).backward()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="ns_dtype must be one of"):
        Muon(_Net().named_parameters(), ns_dtype="float16")
