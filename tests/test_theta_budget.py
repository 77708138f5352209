"""Theta's budget (#24): the basis form of a long side, the budget, one form in every entry point."""

from __future__ import annotations

import math

import pytest
import torch

from fedpac_hf.federated.theta_budget import soap_theta_floats, soap_theta_form, theta_options
from fedpac_hf.optim import SOAP, next_global_curvature
from fedpac_hf.optim._theta_forms import basis_export, next_basis
from fedpac_hf.optim._theta_forms import test_matrix as fixed_test_matrix

BASIS = {"theta_max_dim": 4, "theta_sketch_dim": 2, "theta_compact": "basis"}


def psd(d: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, rank, generator=g, dtype=torch.float64)
    return a @ a.T


def orthonormal(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q


def test_what_a_client_sends_averages_exactly_into_the_form_of_the_average():
    stats = [psd(20, 3, 0), psd(20, 5, 1), psd(20, 2, 2)]
    weights = [0.5, 0.3, 0.2]
    mean = sum(w * s for w, s in zip(weights, stats))
    q = orthonormal(20, 3)
    omega = q[:, :2]
    sent = [basis_export(s, q, omega) for s in stats]
    of_mean = basis_export(mean, q, omega)
    for part in range(2):
        averaged = sum(w * s[part].double() for w, s in zip(weights, sent))
        torch.testing.assert_close(averaged, of_mean[part].double(), rtol=1e-5, atol=1e-4)
    # the diagonal is the statistic's energy along each shared direction
    torch.testing.assert_close(
        of_mean[0].double(), torch.diagonal(q.T @ mean @ q), rtol=1e-5, atol=1e-4
    )
    # without a basis yet: the plain diagonal, and the sketch against the fixed test matrix
    rotated, sketched = basis_export(mean, None, fixed_test_matrix(20, 2))
    torch.testing.assert_close(rotated.double(), torch.diagonal(mean), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        sketched.double(), mean @ fixed_test_matrix(20, 2), rtol=1e-5, atol=1e-4
    )


def test_the_server_basis_is_orthonormal_psd_and_recovers_a_steady_statistic():
    d, k = 24, 2
    target = psd(d, 2, 4) + 1e-3 * torch.eye(d, dtype=torch.float64)  # two leading directions
    basis, test = None, fixed_test_matrix(d, k)
    for _ in range(6):
        rotated, sketched = basis_export(target, basis, test)
        basis, values, test = next_basis(basis, test, sketched, rotated)
        q = basis.double()
        torch.testing.assert_close(q.T @ q, torch.eye(d, dtype=torch.float64), atol=1e-5, rtol=0)
        assert bool((values >= 0).all()) and bool((values[:-1] >= values[1:]).all())
        torch.testing.assert_close(test.double(), q[:, :k], atol=1e-6, rtol=0)  # steered
    leading = torch.linalg.eigvalsh(target).flip(0)[:k]
    torch.testing.assert_close(values[:k].double(), leading, rtol=1e-4, atol=1e-4)
    rebuilt = q[:, :k] @ torch.diag(values[:k].double()) @ q[:, :k].T
    top = torch.linalg.eigh(target).eigenvectors[:, -k:]
    torch.testing.assert_close(
        rebuilt, top @ torch.diag(leading.flip(0)) @ top.T, atol=1e-3, rtol=0
    )


def test_an_indefinite_estimate_is_repaired_and_random_columns_stay_orthogonal():
    d, k = 10, 3
    q = orthonormal(d, 5)
    test = q[:, :k]
    sketched = -torch.ones(d, k, dtype=torch.float64)  # no statistic gives this: not PSD
    basis, values, omega = next_basis(
        q, test, sketched, torch.ones(d, dtype=torch.float64), steered=1,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert float(values.min()) >= 0.0
    w = omega.double()
    torch.testing.assert_close(w.T @ w, torch.eye(k, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(w[:, 0], basis.double()[:, 0], atol=1e-6, rtol=0)


def test_the_global_theta_keeps_plain_entries_and_turns_basis_sides():
    d, k = 12, 2
    stat = psd(d, 3, 6)
    rotated, sketched = basis_export(stat, None, fixed_test_matrix(d, k))
    mean = {"w.R": torch.eye(4), "w.L.rotated_diagonal": rotated, "w.L.steered_sketch": sketched}
    first = next_global_curvature(None, mean, steered=1, seed=3)
    assert set(first) == {"w.R", "w.L.basis", "w.L.eigenvalues", "w.L.test"}
    assert torch.equal(first["w.R"], mean["w.R"])
    assert first["w.L.test"].shape == (d, k)
    # the random columns follow the seed (a resumed run draws the same), steered ones do not
    again = next_global_curvature(None, mean, steered=1, seed=3)
    other = next_global_curvature(None, mean, steered=1, seed=4)
    assert torch.equal(again["w.L.test"], first["w.L.test"])
    assert not torch.equal(other["w.L.test"][:, 1], first["w.L.test"][:, 1])
    # the next round reads the basis and test matrix the clients started from
    rotated, sketched = basis_export(stat, first["w.L.basis"], first["w.L.test"])
    second = next_global_curvature(
        first, {**mean, "w.L.rotated_diagonal": rotated, "w.L.steered_sketch": sketched}, seed=4
    )
    expected = next_basis(first["w.L.basis"], first["w.L.test"], sketched, rotated)
    torch.testing.assert_close(second["w.L.basis"], expected[0])


def test_soap_warm_starts_from_the_server_basis_and_sends_in_it():
    torch.manual_seed(0)
    factor = torch.nn.Parameter(torch.randn(24, 4))  # a LoRA B factor: d = 24, r = 4
    opt = SOAP([("B", factor)], lr=1e-2, **BASIS)
    for _ in range(3):
        factor.grad = torch.randn(24, 4)
        opt.step()
    up = opt.export_curvature()
    assert {k: tuple(v.shape) for k, v in up.items()} == {
        "B.L.rotated_diagonal": (24,), "B.L.steered_sketch": (24, 2), "B.R": (4, 4),
    }  # fmt: skip
    down = next_global_curvature(None, up)
    fresh = SOAP([("B", torch.nn.Parameter(torch.zeros(24, 4)))], lr=1e-2, **BASIS)
    fresh.import_curvature(down)
    state = fresh.state[fresh.param_groups[0]["params"][0]]
    assert torch.equal(state["Q0"], down["B.L.basis"])  # the server's basis, no eigh
    q, values = down["B.L.basis"], down["B.L.eigenvalues"]
    torch.testing.assert_close(state["GG0"], (q * values) @ q.T)
    statistic = opt.state[factor]["GG0"]
    rotated = fresh.export_curvature()["B.L.rotated_diagonal"]  # unstepped: its warm start
    torch.testing.assert_close(rotated, values, rtol=1e-4, atol=1e-5)
    assert statistic.shape == (24, 24)
    with pytest.raises(ValueError, match="missing"):
        fresh.import_curvature(up)  # the up form is not what a client imports
    with pytest.raises(ValueError, match="theta_compact='basis'"):
        SOAP([("B", factor)], theta_max_dim=4, theta_compact="basis")
    with pytest.raises(ValueError, match="theta_steered"):
        SOAP([("B", factor)], **BASIS, theta_steered=3)


LORA_SHAPES = {  # a ViT-like block of width 64 with LoRA on every linear layer, and a head
    "attention": lambda r: [(r, 64), (64, r)] * 4,
    "mlp": lambda r: [(r, 64), (256, r), (r, 256), (64, r)],
}


@pytest.mark.parametrize("rank", [1, 2, 4, 8, 64])
@pytest.mark.parametrize("budget", [1.0, 0.25])
def test_the_derived_form_meets_the_budget_for_every_rank(rank, budget):
    shapes = LORA_SHAPES["attention"](rank) + LORA_SHAPES["mlp"](rank) + [(10, 64), (10,)]
    numel = sum(math.prod(s) for s in shapes)
    options = soap_theta_form(shapes, budget)
    assert soap_theta_floats(shapes, options) <= budget * numel
    if rank == 64:  # as wide as the layers: full Theta is 2x the factors, 1x does not fit
        assert options
    if budget == 1.0 and 4 <= rank <= 8:  # (k + 1) d + r^2 <= r d holds for k >= 1
        assert options["theta_compact"] == "basis" and options["theta_sketch_dim"] >= 1
        assert options["theta_max_dim"] >= rank  # the rank sides travel in full


def test_a_full_model_and_the_real_exported_theta_meet_the_budget(tmp_path):
    from fedpac_hf.optim import create_optimizer

    from .trainer_fixtures import tiny_vit

    for budget in (1.0, 0.5):
        model = tiny_vit()
        options = theta_options(model, "soap", "auto", budget)
        assert options  # full Theta of a ViT is about twice the model
        optimizer = create_optimizer("soap", model, lr=1e-3, **options)
        loss = model(pixel_values=torch.randn(2, 1, 16, 16)).logits.square().mean()
        loss.backward()
        optimizer.step()
        sent = sum(t.numel() for t in optimizer.export_curvature().values())
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert sent <= budget * params
        assert sent == soap_theta_floats(
            [tuple(p.shape) for p in model.parameters() if p.requires_grad], options
        )


def test_budget_settings_are_refused_naming_the_setting(tmp_path):
    from fedpac_hf import FedPACArguments

    from .trainer_fixtures import tiny_vit

    model = tiny_vit()
    with pytest.raises(ValueError, match="theta_budget"):
        theta_options(model, "soap", "auto", 0.0)
    with pytest.raises(ValueError, match="theta_budget=0.5: client optimizer 'sophia'"):
        theta_options(model, "sophia", "auto", 0.5)
    with pytest.raises(ValueError, match="too small for any form"):
        soap_theta_form([(64, 64)], 1e-4)
    with pytest.raises(ValueError, match="theta_budget"):
        FedPACArguments(output_dir=str(tmp_path), theta_budget=-1, report_to=[])
    assert theta_options(model, "soap", "full", 0.5) == {}
    assert theta_options(model, "soap") == {}  # no adapters, no budget set: full Theta
    with pytest.raises(ValueError, match="theta_budget"):
        theta_options(model, "soap", "auto", True)
    assert theta_options(model, "soap", "auto", 1.0, align=False) == {}  # nothing travels
    assert theta_options(model, "soap", "auto", 1.0, {"theta_max_dim": 8}) == {}  # the user's
