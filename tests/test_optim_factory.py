"""create_optimizer: registry, parameter groups, errors, and the federated flow for every name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedpac_hf.optim import OPTIMIZERS, CurvatureOptimizer, create_optimizer, sophia_refresh


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 8)
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(ids)).mean(1)
        return self.head(torch.relu(self.proj(h)) + self.frozen(h))


def _decay_by_name(opt: torch.optim.Optimizer) -> dict[str, float]:
    return {n: g["weight_decay"] for g in opt.param_groups for n in g["param_names"]}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_groups_exclude_frozen_and_exempt_norms_and_biases(name: str) -> None:
    model = _Block()
    opt = create_optimizer(name, model, lr=1e-3, weight_decay=0.1)
    assert isinstance(opt, CurvatureOptimizer)
    decay = _decay_by_name(opt)
    assert not any(n.startswith("frozen") for n in decay)
    assert decay == {
        "embed.weight": 0.1,
        "proj.weight": 0.1,
        "head.weight": 0.1,
        "norm.weight": 0.0,
        "norm.bias": 0.0,
        "proj.bias": 0.0,
        "head.bias": 0.0,
    }
    assert all(g["lr"] == 1e-3 for g in opt.param_groups)


def test_muon_groups_keep_embeddings_and_heads_on_adamw() -> None:
    opt = create_optimizer("muon", _Block(), lr=1e-3)
    muon = {n for g in opt.param_groups if g["use_muon"] for n in g["param_names"]}
    assert muon == {"proj.weight"}


def test_named_parameters_input_and_unknown_names() -> None:
    model = _Block()
    opt = create_optimizer("adamw", model.named_parameters(), lr=1e-3, weight_decay=0.1)
    assert _decay_by_name(opt)["norm.weight"] == 0.0
    assert _decay_by_name(opt)["proj.weight"] == 0.1
    with pytest.raises(ValueError, match=r"'adam'.*\['adamw', 'muon', 'sgd', 'soap', 'sophia'\]"):
        create_optimizer("adam", model, lr=1e-3)
    with pytest.raises(ValueError, match=r"'bogus'.*not an option of SOAP.*max_precond_dim"):
        create_optimizer("soap", model, lr=1e-3, bogus=1, colour=2)
    with pytest.raises(ValueError, match="'bogus'"):
        create_optimizer("adamw", model, lr=1e-3, bogus=1)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        create_optimizer("sgd", frozen, lr=1e-3)


def test_lora_model_optimizes_only_adapters() -> None:
    peft = pytest.importorskip("peft")
    base = nn.Sequential()
    base.add_module("q_proj", nn.Linear(8, 8))
    base.add_module("out", nn.Linear(8, 2))
    config = peft.LoraConfig(r=2, target_modules=["q_proj"])
    model = peft.get_peft_model(base, config)
    opt = create_optimizer("soap", model, lr=1e-3, max_precond_dim=4)
    names = [n for g in opt.param_groups for n in g["param_names"]]
    assert names and all("lora_" in n for n in names)
    theta_keys = set(opt.export_curvature())
    # lora_A is 2x8 (only the 2-side rotated), lora_B is 8x2 (only the 2-side rotated).
    assert theta_keys == {
        next(n for n in names if "lora_A" in n) + ".L",
        next(n for n in names if "lora_B" in n) + ".R",
    }


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_federated_flow_average_and_warm_start(name: str) -> None:
    """Two clients: K local steps, export, key-wise weighted mean, warm start, step."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 12, (16, 5), generator=gen)
    labels = torch.randint(0, 3, (16,), generator=gen)
    thetas = []
    for client in range(2):
        torch.manual_seed(0)
        model = _Block()
        opt = create_optimizer(name, model, lr=1e-2)
        for k in range(4):
            batch = slice(client * 8 + k, client * 8 + k + 4)
            if hasattr(opt, "update_hessian") and opt.hessian_update_due():
                sophia_refresh(opt, lambda m=model, b=batch: m(ids[b]), generator=gen)
            F.cross_entropy(model(ids[batch]), labels[batch]).backward()
            opt.step()
            opt.zero_grad()
        thetas.append(opt.export_curvature())
    assert set(thetas[0]) == set(thetas[1])
    average = {k: 0.25 * thetas[0][k] + 0.75 * thetas[1][k] for k in thetas[0]}
    torch.manual_seed(0)
    model = _Block()
    opt = create_optimizer(name, model, lr=1e-2)
    opt.import_curvature(average)
    before = model.proj.weight.detach().clone()
    if hasattr(opt, "update_hessian"):
        sophia_refresh(opt, lambda: model(ids[:4]), generator=gen)
    F.cross_entropy(model(ids[:4]), labels[:4]).backward()
    opt.step()
    assert not torch.equal(model.proj.weight, before)
    exported = opt.export_curvature()
    assert set(exported) == set(average)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in exported.values())
