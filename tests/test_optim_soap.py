"""SOAP: reference agreement, warm start from Theta, layout, numerics and bad input."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedpac_hf.optim import SOAP, _soap_kernels, eigenbasis, preconditioner_layout


def _mlp(widths: list[int], dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(dtype)


def _batches(n: int, d_in: int, d_out: int, dtype: torch.dtype, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(32, d_in, generator=gen, dtype=dtype)
        y = torch.randn(32, d_out, generator=gen, dtype=dtype)
        yield x, y


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches) -> None:
    for x, y in batches:
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize(("widths", "max_dim"), [([8, 8, 8, 8], 10000), ([8, 16, 4], 8)])
def test_matches_reference_soap_over_50_steps(widths: list[int], max_dim: int) -> None:
    # Regression loss and full-rank statistics keep the comparison well posed: a
    # softmax output layer has an exactly singular statistic whose arbitrary null
    # basis makes any two implementations drift apart. The reference runs its QR
    # refresh in float32 even for float64 parameters, which bounds the agreement
    # at about 1e-7.
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    ref_model = _mlp(widths)
    model = copy.deepcopy(ref_model)
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01, precondition_frequency=3)
    ref = pytorch_optimizer.SOAP(ref_model.parameters(), max_precondition_dim=max_dim, **hyper)
    # the reference's first step only initialises the statistics
    ours = SOAP(
        model.named_parameters(), max_precond_dim=max_dim, first_step_updates=False, **hyper
    )
    start = [p.detach().clone() for p in model.parameters()]
    for step, (x, y) in enumerate(_batches(50, widths[0], widths[-1], torch.float64)):
        for m, o in ((ref_model, ref), (model, ours)):
            o.zero_grad()
            F.mse_loss(m(x), y).backward()
            o.step()
        if step == 0:  # fresh start: statistics only, like the reference
            for p, p0 in zip(model.parameters(), start, strict=True):
                assert torch.equal(p, p0)
    moved = max(
        (p - p0).abs().max().item() for p, p0 in zip(model.parameters(), start, strict=True)
    )
    assert moved > 0.05
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=0, msg=name)


def test_theta_holds_only_rotated_side_statistics() -> None:
    w = nn.Parameter(torch.randn(64, 4))
    opt = SOAP([("lora_B", w)], max_precond_dim=8)
    w.grad = torch.randn(64, 4)
    opt.step()
    theta = opt.export_curvature()
    assert set(theta) == {"lora_B.R"}
    assert theta["lora_B.R"].shape == (4, 4)
    assert theta["lora_B.R"].dtype == torch.float32
    assert not any(k.startswith("GG0") or k == "Q0" for k in opt.state[w])
    torch.testing.assert_close(theta["lora_B.R"], (1 - 0.95) * w.grad.T @ w.grad)


def test_layout_merges_conv_dims_and_keys_follow() -> None:
    assert preconditioner_layout((8, 3, 3, 3), 32, True, False) == ((24, 9), (True, True))
    assert preconditioner_layout((8, 3, 3, 3), 10000, True, False) == ((8, 27), (True, True))
    assert preconditioner_layout((16,), 100, False, False) == ((16,), (False,))
    assert preconditioner_layout((16,), 100, False, True) == ((16,), (True,))
    conv = nn.Conv2d(3, 8, 3)
    opt = SOAP(conv.named_parameters(), merge_dims=True, max_precond_dim=32)
    plain = SOAP(copy.deepcopy(conv).named_parameters())
    x = torch.randn(4, 3, 6, 6)
    conv(x).square().mean().backward()
    for _ in range(3):
        opt.step()
    assert {k: tuple(v.shape) for k, v in opt.export_curvature().items()} == {
        "weight.L": (24, 24),
        "weight.R": (9, 9),
    }
    assert set(plain.export_curvature()) == {f"weight.GG{i}" for i in range(4)}


def test_warm_start_recomputes_eigenbasis_and_first_step_updates() -> None:
    model = _mlp([6, 6, 6])
    original = SOAP(model.named_parameters(), lr=1e-2, precondition_frequency=1)
    _train(model, original, _batches(30, 6, 6, torch.float64))
    theta = original.export_curvature()
    assert set(theta) == {"0.weight.L", "0.weight.R", "2.weight.L", "2.weight.R"}

    clone = copy.deepcopy(model)
    warm = SOAP(clone.named_parameters(), lr=1e-2, precondition_frequency=1)
    warm.import_curvature(theta)
    for (name, p), q in zip(model.named_parameters(), clone.parameters(), strict=True):
        if p.ndim != 2:
            continue
        for i, side in enumerate("LR"):
            stat = original.state[p][f"GG{i}"]
            q_warm = warm.state[q][f"Q{i}"]
            # Warm basis = eigenvectors of the imported statistic, descending.
            values = torch.linalg.eigvalsh(stat).flip(0)
            torch.testing.assert_close(
                q_warm.T @ stat @ q_warm, torch.diag(values), atol=1e-9, rtol=0
            )
            # The original's power-iteration basis (refreshed every step) only
            # approximates eigenvectors (it may mix near-equal eigenvalues), but it
            # diagonalises the same statistic in the same eigenvalue order.
            rotated = original.state[p][f"Q{i}"].T @ stat @ original.state[p][f"Q{i}"]
            off = rotated - torch.diag(rotated.diagonal())
            assert off.norm() < 0.1 * stat.norm(), (name, side)
            torch.testing.assert_close(rotated.diagonal(), values, atol=0.05 * values[0], rtol=0)

    before = [p.detach().clone() for p in clone.parameters()]
    x, y = next(_batches(1, 6, 6, torch.float64, seed=7))
    warm.zero_grad()
    F.mse_loss(clone(x), y).backward()
    warm.step()
    assert all(not torch.equal(p, b) for p, b in zip(clone.parameters(), before, strict=True))


def test_warm_first_step_is_adam_step_one_in_imported_basis() -> None:
    torch.manual_seed(3)
    w = nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    a = torch.randn(5, 5, dtype=torch.float64)
    b = torch.randn(3, 3, dtype=torch.float64)
    theta = {"w.L": (a @ a.T).float(), "w.R": (b @ b.T).float()}
    lr, wd, (b1, b2), eps = 0.1, 0.01, (0.9, 0.95), 1e-8
    opt = SOAP([("w", w)], lr=lr, betas=(b1, b2), weight_decay=wd, eps=eps)
    opt.import_curvature(theta)
    g = torch.randn(5, 3, dtype=torch.float64)
    w.grad = g.clone()
    w0 = w.detach().clone()
    opt.step()

    ql = torch.linalg.eigh(theta["w.L"].double()).eigenvectors
    qr = torch.linalg.eigh(theta["w.R"].double()).eigenvectors
    rotated = ql.T @ g @ qr
    m, v = (1 - b1) * rotated, (1 - b2) * rotated.square()
    step = lr * (1 - b2) ** 0.5 / (1 - b1)
    expected = (w0 - step * ql @ (m / (v.sqrt() + eps)) @ qr.T) * (1 - lr * wd)
    torch.testing.assert_close(w.detach(), expected, atol=1e-10, rtol=0)
    # Statistics keep accumulating from the imported ones.
    torch.testing.assert_close(
        opt.state[w]["GG0"], 0.95 * theta["w.L"].double() + 0.05 * g @ g.T, atol=1e-5, rtol=1e-6
    )
    assert opt.state[w]["step"] == 1


def test_export_import_round_trip_and_mismatch_errors() -> None:
    model = _mlp([4, 5, 3], dtype=torch.float32)
    opt = SOAP(model.named_parameters())
    _train(model, opt, _batches(3, 4, 3, torch.float32))
    theta = opt.export_curvature()
    other = SOAP(copy.deepcopy(model).named_parameters())
    other.import_curvature(theta)
    for key, value in other.export_curvature().items():
        assert torch.equal(value, theta[key])

    with pytest.raises(ValueError, match="unexpected keys \\['encoder.weight.L'\\]"):
        other.import_curvature({**theta, "encoder.weight.L": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="missing keys \\['0.weight.L'\\]"):
        other.import_curvature({k: v for k, v in theta.items() if k != "0.weight.L"})
    with pytest.raises(ValueError, match="'0.weight.R' has shape"):
        other.import_curvature({**theta, "0.weight.R": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="non-finite"):
        other.import_curvature({**theta, "0.weight.R": torch.full((4, 4), float("nan"))})


def test_bf16_parameters_keep_float32_statistics_through_state_dict() -> None:
    model = _mlp([6, 6, 4], dtype=torch.bfloat16)
    opt = SOAP(model.named_parameters(), lr=1e-2)
    _train(model, opt, _batches(4, 6, 4, torch.bfloat16))
    w = model[0].weight
    assert {opt.state[w][k].dtype for k in ("GG0", "GG1", "Q0", "exp_avg", "exp_avg_sq")} == {
        torch.float32
    }
    saved = copy.deepcopy(opt.state_dict())
    fresh = SOAP(model.named_parameters(), lr=1e-2)
    fresh.load_state_dict(saved)
    for key in ("GG0", "GG1", "Q0", "exp_avg_sq"):
        assert fresh.state[w][key].dtype == torch.float32
        assert torch.equal(fresh.state[w][key], opt.state[w][key])
    theta = opt.export_curvature()
    assert all(v.dtype == torch.float32 for v in theta.values())
    fresh.import_curvature(theta)
    assert fresh.state[w]["GG0"].dtype == torch.float32
    assert torch.equal(fresh.state[w]["GG0"], theta["0.weight.L"])
    _train(model, fresh, _batches(2, 6, 4, torch.bfloat16, seed=5))
    assert w.dtype == torch.bfloat16 and fresh.state[w]["GG0"].dtype == torch.float32


def test_eigenbasis_falls_back_with_warning() -> None:
    with pytest.warns(RuntimeWarning, match="identity"):
        basis = eigenbasis(torch.full((3, 3), float("nan")))
    assert torch.equal(basis, torch.eye(3))

    # float32 eigh failing -> float64 retry gives a valid, descending basis.
    a = torch.randn(4, 4)
    spd = a @ a.T + torch.eye(4)
    real_eigh = torch.linalg.eigh

    def failing_in_float32(m: torch.Tensor, *args, **kwargs):
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("forced failure")
        return real_eigh(m, *args, **kwargs)

    torch.linalg.eigh = failing_in_float32
    try:
        with pytest.warns(RuntimeWarning, match="retrying in float64"):
            basis = eigenbasis(spd)
    finally:
        torch.linalg.eigh = real_eigh
    assert basis.dtype == torch.float32
    torch.testing.assert_close(basis.T @ basis, torch.eye(4), atol=1e-5, rtol=0)
    diag = (basis.T @ spd @ basis).diagonal()
    torch.testing.assert_close(diag, torch.linalg.eigvalsh(spd).flip(0), atol=1e-4, rtol=1e-4)


def test_non_finite_gradient_is_refused_without_touching_state() -> None:
    model = _mlp([4, 4, 2], dtype=torch.float32)
    opt = SOAP(model.named_parameters())
    _train(model, opt, _batches(3, 4, 2, torch.float32))
    params = [p.detach().clone() for p in model.parameters()]
    stats = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    F.mse_loss(model(torch.randn(3, 4)), torch.randn(3, 2)).backward()
    model[2].bias.grad[0] = float("nan")
    with pytest.raises(FloatingPointError, match="2.bias"):
        opt.step()
    model[2].bias.grad[0] = 0.0
    model[0].weight.grad.fill_(1e30)  # finite, but G G^T overflows float32
    with pytest.raises(FloatingPointError, match="0.weight"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    for p_id, st in stats["state"].items():
        live = opt.state[list(model.parameters())[p_id]]
        assert all(torch.equal(live[k], v) for k, v in st.items() if isinstance(v, torch.Tensor))
    assert all(torch.isfinite(v).all() for v in opt.export_curvature().values())


def test_unsupported_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="complex"):
        SOAP([("z", nn.Parameter(torch.randn(2, 2, dtype=torch.complex64)))])
    emb = nn.Embedding(10, 4, sparse=True)
    opt = SOAP(emb.named_parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()


def test_no_warnings_on_normal_training() -> None:
    model = _mlp([4, 6, 3], dtype=torch.float32)
    opt = SOAP(model.named_parameters(), precondition_frequency=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(model, opt, _batches(6, 4, 3, torch.float32))


# --------------------------------------------------------------- fast-path tests
# The step takes different code paths by parameter kind (fused matrix path,
# foreach Adam for parameters with no rotated side, the general side-by-side
# path for 1-D and higher-dimensional tensors, block-wise statistics for long
# sides); each is checked against the reference or against another path.


@pytest.mark.parametrize("n", [5, 12, 601])
def test_symmetric_update_matches_full_product(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_soap_kernels, "SYMMETRIC_BLOCK_MIN", 4)
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(n, 7, generator=gen, dtype=torch.float64)
    b = torch.randn(n, n, generator=gen, dtype=torch.float64)
    stat = b @ b.T
    expected = stat.lerp(a @ a.T, 1 - 0.9)
    _soap_kernels.symmetric_update_(stat, a, 0.9)
    torch.testing.assert_close(stat, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(stat, stat.T, atol=1e-12, rtol=0)


def test_matches_reference_with_blockwise_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    # Force the block-wise G G^T (used for sides >= 512 in practice) on small sides.
    monkeypatch.setattr(_soap_kernels, "SYMMETRIC_BLOCK_MIN", 4)
    test_matches_reference_soap_over_50_steps([8, 8, 8, 8], 10000)


class _Mixed(nn.Module):
    """A 4-D conv weight, a 3-D parameter, a one-sided and a two-sided matrix, biases."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 3, 3)
        self.mix = nn.Parameter(0.3 * torch.randn(3, 4, 5))
        self.fc1 = nn.Linear(20, 10)
        self.fc2 = nn.Linear(10, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x))  # (B, 3, 4, 4)
        h = torch.einsum("bchw,chk->bwk", h, self.mix).flatten(1)  # (B, 20)
        return self.fc2(torch.tanh(self.fc1(h)))


def test_mixed_shapes_match_reference() -> None:
    # max_precond_dim=12 leaves fc1's 20-side unrotated (one-sided path); every
    # rotated side has a full-rank statistic from the first step (a rotated side
    # longer than the other sides' product would have an arbitrary null basis).
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    ref_model = _Mixed().double()
    model = copy.deepcopy(ref_model)
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01, precondition_frequency=4)
    ref = pytorch_optimizer.SOAP(ref_model.parameters(), max_precondition_dim=12, **hyper)
    ours = SOAP(model.named_parameters(), max_precond_dim=12, first_step_updates=False, **hyper)
    assert len(ours.state) == 0
    gen = torch.Generator().manual_seed(2)
    start = [p.detach().clone() for p in model.parameters()]
    for _ in range(30):
        x = torch.randn(32, 2, 6, 6, generator=gen, dtype=torch.float64)
        y = torch.randn(32, 10, generator=gen, dtype=torch.float64)
        for m, o in ((ref_model, ref), (model, ours)):
            o.zero_grad()
            F.mse_loss(m(x), y).backward()
            o.step()
    assert not any("GG1" in k for k in ours.state[model.fc1.weight])
    for (name, p), q, p0 in zip(
        model.named_parameters(), ref_model.parameters(), start, strict=True
    ):
        assert (p - p0).abs().max() > 1e-3, name
        torch.testing.assert_close(p, q, atol=2e-6, rtol=0, msg=name)


def test_preconditioned_vector_equals_column_matrix() -> None:
    # precondition_1d: a vector takes the general path; the same values as an
    # (n, 1) matrix take the fused matrix path. Both have the same statistic.
    torch.manual_seed(4)
    vec = nn.Parameter(torch.randn(6, dtype=torch.float64))
    col = nn.Parameter(vec.detach().clone().unsqueeze(1))
    opt_v = SOAP([("v", vec)], lr=1e-2, precondition_1d=True, precondition_frequency=2)
    opt_c = SOAP([("c", col)], lr=1e-2, precondition_frequency=2)
    for _ in range(7):
        g = torch.randn(6, dtype=torch.float64)
        vec.grad, col.grad = g.clone(), g.clone().unsqueeze(1)
        opt_v.step()
        opt_c.step()
    assert (vec - col.squeeze(1)).abs().max() < 1e-12
    assert (vec.detach() - opt_v.state[vec]["exp_avg"]).abs().max() > 0  # it did move
    torch.testing.assert_close(opt_v.export_curvature()["v.L"], opt_c.export_curvature()["c.L"])


def test_unpreconditioned_parameters_take_plain_adam_with_their_own_step_counts() -> None:
    # Two biases in one group; the second misses its gradient on one step, so the
    # two are at different Adam step counts (different bias corrections).
    lr, (b1, b2), eps, wd = 1e-2, (0.9, 0.99), 1e-8, 0.1
    a = nn.Parameter(torch.randn(5, dtype=torch.float64))
    b = nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = SOAP(
        [("a", a), ("b", b)],
        lr=lr,
        betas=(b1, b2),
        eps=eps,
        weight_decay=wd,
        first_step_updates=False,
    )
    oracle = {}
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        for name, p in (("a", a), ("b", b)):
            p.grad = (
                None
                if (name == "b" and step == 3)
                else torch.randn(p.shape, generator=gen, dtype=p.dtype)
            )
        expected = {}
        for name, p in (("a", a), ("b", b)):
            if p.grad is None:
                expected[name] = p.detach().clone()
                continue
            if name not in oracle:  # fresh start: no update
                oracle[name] = [0, torch.zeros_like(p), torch.zeros_like(p)]
                expected[name] = p.detach().clone()
                continue
            o = oracle[name]
            o[0] += 1
            o[1] = o[1].lerp(p.grad, 1 - b1)
            o[2] = o[2].lerp(p.grad.square(), 1 - b2)
            size = lr * (1 - b2 ** o[0]) ** 0.5 / (1 - b1 ** o[0])
            expected[name] = (p - size * o[1] / (o[2].sqrt() + eps)) * (1 - lr * wd)
        opt.step()
        torch.testing.assert_close(a.detach(), expected["a"], atol=1e-14, rtol=0)
        torch.testing.assert_close(b.detach(), expected["b"], atol=1e-14, rtol=0)
    assert opt.state[a]["step"] == 5 and opt.state[b]["step"] == 4
    assert set(opt.state[a]) == {"step", "exp_avg", "exp_avg_sq"}


def test_fused_and_fallback_matrix_paths_agree() -> None:
    # A non-contiguous float32 parameter takes the fallback (direction, then add);
    # its contiguous twin the fused addmm_ path.
    torch.manual_seed(5)
    base = torch.randn(7, 5)
    fused = nn.Parameter(base.clone())
    strided = nn.Parameter(base.T.contiguous().T)  # same values, column-major
    assert not strided.is_contiguous()
    opts = [SOAP([("w", p)], lr=1e-2, precondition_frequency=3) for p in (fused, strided)]
    for _ in range(8):
        g = torch.randn(7, 5)
        for p, o in zip((fused, strided), opts, strict=True):
            p.grad = g.clone()
            o.step()
    torch.testing.assert_close(fused.detach(), strided.detach(), atol=1e-6, rtol=0)
    assert (fused.detach() - base).abs().max() > 1e-2


def test_bf16_parameters_follow_float32_run_with_float32_state() -> None:
    # bf16 matrices take the unfused path (direction cast to bf16, then added),
    # bf16 vectors the foreach path with the same cast; the state stays float32.
    torch.manual_seed(6)
    w16 = nn.Parameter(torch.randn(5, 5).to(torch.bfloat16))
    b16 = nn.Parameter(torch.randn(4).to(torch.bfloat16))
    w32 = nn.Parameter(w16.detach().float())
    b32 = nn.Parameter(b16.detach().float())
    start = [w32.detach().clone(), b32.detach().clone()]
    opt16 = SOAP([("w", w16), ("b", b16)], lr=1e-1, precondition_frequency=2)
    opt32 = SOAP([("w", w32), ("b", b32)], lr=1e-1, precondition_frequency=2)
    for _ in range(4):
        gw, gb = torch.randn(5, 5).to(torch.bfloat16), torch.randn(4).to(torch.bfloat16)
        w16.grad, b16.grad = gw, gb
        w32.grad, b32.grad = gw.float(), gb.float()
        opt16.step()
        opt32.step()
    for p16, p32, p0 in zip((w16, b16), (w32, b32), start, strict=True):
        assert p16.dtype == torch.bfloat16
        assert (p32.detach() - p0).abs().max() > 0.1  # it moved
        torch.testing.assert_close(p16.detach().float(), p32.detach(), atol=3e-2, rtol=1e-2)
        assert {v.dtype for v in opt16.state[p16].values() if isinstance(v, torch.Tensor)} == {
            torch.float32
        }


def test_gradient_whose_norm_overflows_is_refused_as_overflow() -> None:
    w = nn.Parameter(torch.zeros(4, 4))
    opt = SOAP([("w", w)])
    w.grad = torch.full((4, 4), 1e38)  # finite, but its 2-norm is inf in float32
    with pytest.raises(FloatingPointError, match="overflow the statistics"):
        opt.step()
    assert len(opt.state[w]) == 0


def test_a_cold_first_step_moves_the_parameters_in_its_own_eigenbasis() -> None:
    """A fresh SOAP takes a real step at once: K = 1 local step trains (not the reference)."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    b = nn.Parameter(torch.randn(4, dtype=torch.float64))
    start = (w.detach().clone(), b.detach().clone())
    opt = SOAP([("w", w), ("b", b)], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0)
    w.grad, b.grad = torch.randn(6, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    opt.step()
    state = opt.state[w]
    assert state["step"] == 1 and opt.state[b]["step"] == 1
    # Adam step 1 in the eigenbasis of this gradient's statistics: -lr * sign in that basis
    left, right = state["Q0"], state["Q1"]
    rotated = left.T @ w.grad @ right
    expected = start[0] - 1e-2 * left @ (rotated / (rotated.abs() + 1e-8)) @ right.T
    torch.testing.assert_close(w.detach(), expected, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(b.detach(), start[1] - 1e-2 * b.grad.sign(), rtol=0, atol=1e-8)
    # the statistics hold this gradient once, not twice
    torch.testing.assert_close(state["GG0"], 0.01 * w.grad @ w.grad.T)


def _low_rank(shape: tuple[int, int], rank: int, seed: int = 0) -> torch.Tensor:
    """A float64 matrix of exactly ``rank`` with singular values 0.5 to 3 (a large gradient)."""
    gen = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(shape[0], rank, generator=gen, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(shape[1], rank, generator=gen, dtype=torch.float64))[0]
    return left @ torch.diag(torch.linspace(3.0, 0.5, rank, dtype=torch.float64)) @ right.T


def _first_step(grad: torch.Tensor, **options) -> torch.Tensor:
    """The change a fresh float32 SOAP (lr 1, no weight decay) makes on its first step."""
    w = nn.Parameter(torch.zeros(grad.shape))
    opt = SOAP([("w", w)], lr=1.0, weight_decay=0.0, **options)
    w.grad = grad.to(torch.float32)
    opt.step()
    return w.detach().double()


@pytest.mark.parametrize(("shape", "rank"), [((10, 64), 6), ((64, 4), 3), ((48, 48), 40)])
def test_a_cold_first_step_in_float32_is_the_gradients_polar_factor(shape, rank) -> None:
    """Both sides rotated, the bases are the gradient's singular vectors, so in exact
    arithmetic Adam's first step (a sign step in that basis) is ``-lr U V^T``. The float32
    rounding of ``Q_L^T G Q_R`` along the null directions and off the diagonal is not
    blown up into steps along arbitrary directions (a head's gradient has the batch's rank).
    """
    grad = _low_rank(shape, rank)
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    polar = u[:, :rank] @ vh[:rank]
    torch.testing.assert_close(_first_step(grad), -polar, rtol=0, atol=1e-4)


def test_a_cold_first_step_stays_in_the_span_of_its_gradient() -> None:
    """One side rotated (the long side over ``max_precond_dim``) and a preconditioned vector:
    the first step has no component along directions the gradient does not reach."""
    grad = _low_rank((6, 64), 4)
    step = _first_step(grad, max_precond_dim=16)
    columns = torch.linalg.svd(grad, full_matrices=False)[0][:, :4]
    outside = step - columns @ (columns.T @ step)
    assert step.norm() > 1.0 and outside.norm() < 1e-5 * step.norm()
    vector = _low_rank((12, 1), 1).reshape(12)
    step = _first_step(vector, precondition_1d=True)
    torch.testing.assert_close(step, -vector / vector.norm(), rtol=0, atol=1e-5)


def test_rotation_precision_is_checked_and_changes_nothing_on_a_cpu() -> None:
    with pytest.raises(
        ValueError, match=r"rotation_precision must be one of \[None, 'highest', 'high'\]"
    ):
        SOAP([("w", nn.Parameter(torch.zeros(2, 2)))], rotation_precision="medium")
    models = [_mlp([8, 16, 4], dtype=torch.float32) for _ in range(3)]
    for model, precision in zip(models, (None, "highest", "high"), strict=True):
        opt = SOAP(model.named_parameters(), precondition_frequency=3, rotation_precision=precision)
        _train(model, opt, _batches(8, 8, 4, torch.float32))  # two refreshes
    for p, q, r in zip(*(m.parameters() for m in models), strict=True):
        assert torch.equal(p, q) and torch.equal(p, r)


def test_matmul_precision_applies_on_cuda_only_and_restores_the_callers_setting() -> None:
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        with _soap_kernels.matmul_precision(torch.device("cpu"), "highest"):
            assert torch.get_float32_matmul_precision() == "medium"
        with pytest.raises(RuntimeError, match="inside"):
            with _soap_kernels.matmul_precision(torch.device("cuda"), "high"):
                assert torch.get_float32_matmul_precision() == "high"
                raise RuntimeError("inside")
        assert torch.get_float32_matmul_precision() == "medium"
        with _soap_kernels.matmul_precision(torch.device("cuda"), None):
            assert torch.get_float32_matmul_precision() == "medium"
        with _soap_kernels.highest_matmul_precision(torch.device("cuda")):
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)
