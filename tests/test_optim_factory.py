"""create_optimizer: registry, parameter groups, errors, and the federated flow for every name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedpac_hf.optim import (
    OPTIMIZERS,
    CurvatureOptimizer,
    create_optimizer,
    curvature_retention,
    next_global_curvature,
    sent_form,
    sophia_refresh,
)


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


@pytest.mark.parametrize(
    "name, options",
    [
        ("adamw", {}),
        ("adamw", {"betas": (0.9, 0.99)}),
        ("soap", {}),
        ("soap", {"shampoo_beta": 0.8}),
        ("soap", {"theta_max_dim": 4, "theta_compact": "basis", "theta_sketch_dim": 2}),
        ("soap", {"theta_max_dim": 4}),  # long sides as their diagonal
        ("sophia", {"betas": (0.9, 0.9), "hessian_update_interval": 5}),
        ("muon", {"momentum": 0.8}),
    ],
)
def test_curvature_retention_is_what_a_warm_start_keeps_of_the_global_theta(
    name: str, options: dict
) -> None:
    """Warm start from a global Theta, 12 steps whose gradients add nothing: the export
    (in the form clients send) is ``curvature_retention`` times the global Theta's sent form,
    with the decay rates the options set."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 12, (16, 5), generator=gen)
    labels = torch.randint(0, 3, (16,), generator=gen)
    torch.manual_seed(0)
    model = _Block()
    opt = create_optimizer(name, model, lr=1e-2, **options)
    for k in range(4):
        if hasattr(opt, "update_hessian") and opt.hessian_update_due():
            sophia_refresh(opt, lambda b=slice(k, k + 4): model(ids[b]), generator=gen)
        F.cross_entropy(model(ids[k : k + 4]), labels[k : k + 4]).backward()
        opt.step()
        opt.zero_grad()
    global_theta = next_global_curvature(None, opt.export_curvature())
    opt = create_optimizer(name, model, lr=1e-2, **options)
    opt.import_curvature(global_theta)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for _ in range(12):
        for p in trainable:
            p.grad = torch.zeros_like(p)
        if hasattr(opt, "update_hessian") and opt.hessian_update_due():
            opt.update_hessian(batch_size=4)
        opt.step()
    kept = curvature_retention(name, options, 12)
    assert 0.0 < kept < 0.999
    exported = opt.export_curvature()
    expected = sent_form(global_theta)
    assert set(exported) == set(expected) and any(t.abs().sum() > 0 for t in expected.values())
    for key, value in expected.items():
        torch.testing.assert_close(exported[key], kept * value, rtol=1e-5, atol=1e-7)
