"""``dp_projection_rank``: the server keeps the noised delta where SOAP's shared curvature has
its mass (post-processing of a client-level DP round)."""

from __future__ import annotations

import copy

import pytest
import torch

from fedpac_hf import FedPACArguments
from fedpac_hf.federated import get_algorithm, simulate
from fedpac_hf.federated.privacy_clip import public_reference
from fedpac_hf.federated.privacy_projection import (
    PROJECTION_KEPT,
    leading_directions,
    projected,
)

from .test_privacy import CLIENT_DP, _clients, _loss, _model


def _orthonormal(d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64)).Q


def _statistic(q: torch.Tensor, values: list[float]) -> torch.Tensor:
    return (q * torch.tensor(values, dtype=torch.float64)) @ q.T


def test_the_leading_directions_come_from_a_basis_or_a_full_statistic_of_a_long_side():
    q_basis, q_full = _orthonormal(6, 0), _orthonormal(5, 1)
    curvature = {
        "a.R.basis": q_basis.float(),  # the basis form: columns by descending eigenvalue
        "a.L": torch.eye(3),  # a side of 3: kept whole at k = 3
        "b.L": _statistic(q_full, [0.1, 5.0, 0.2, 3.0, 0.0]).float(),
        "c.L": torch.ones(7),  # a side sent as its diagonal: no directions
    }
    shapes = {"a": torch.Size([3, 6]), "b": torch.Size([5]), "c": torch.Size([7]), "d": (2, 2)}
    directions = leading_directions(curvature, shapes, 3)
    assert set(directions) == {"a", "b"}
    assert directions["a"][0] is None
    torch.testing.assert_close(directions["a"][1], q_basis[:, :3].float().double())
    lead = directions["b"][0]
    expected = q_full[:, [1, 3, 2]]  # eigenvalues 5, 3, 0.2
    torch.testing.assert_close(lead.abs(), expected.abs(), atol=1e-6, rtol=0)
    assert leading_directions(None, shapes, 3) == {}
    assert leading_directions(curvature, shapes, 6) == {}  # no side longer than 6


def test_the_projection_keeps_the_leading_span_and_removes_the_rest():
    q = _orthonormal(8, 2)
    directions = {"w": [None, q[:, :2]], "v": [q[:, :2]]}
    inside = torch.randn(4, 2, dtype=torch.float64) @ q[:, :2].T
    outside = torch.randn(4, 6, dtype=torch.float64) @ q[:, 2:].T
    sums = {"w": (inside + outside).float(), "v": q[:, 5].float(), "bias": torch.ones(3)}
    result, kept = projected(sums, directions)
    torch.testing.assert_close(result["w"], inside.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(result["v"], torch.zeros(8), atol=1e-6, rtol=0)
    assert torch.equal(result["bias"], sums["bias"])
    assert result["w"].dtype == torch.float32
    total = sum(float(t.double().pow(2).sum()) for t in sums.values())
    expected = (float(inside.pow(2).sum()) + 3.0) / total
    assert kept == pytest.approx(expected, rel=1e-5)
    again, kept_again = projected(result, directions)
    torch.testing.assert_close(again["w"], result["w"], atol=1e-6, rtol=0)
    assert kept_again == pytest.approx(1.0, abs=1e-6)


def test_isotropic_noise_keeps_about_k_over_d_of_its_energy():
    q = _orthonormal(64, 3)
    gen = torch.Generator().manual_seed(4)
    noise = {"w": torch.randn(64, 400, generator=gen)}
    _, kept = projected(noise, {"w": [q[:, :8], None]})
    assert kept == pytest.approx(8 / 64, rel=0.05)


def _run(rank: int | None, z: float, states: list | None = None):
    settings = {
        "dp_mode": "client",
        "dp_clip_norm": 1e9 if z == 0 else 1.0,
        "dp_theta_clip_norm": 1e9 if z == 0 else 1.0,
        "dp_noise_multiplier": z,
        "dp_delta": 0.01,
        "dp_noise_seed": 7,
        "dp_projection_rank": rank,
    }
    return simulate(
        _model(),
        _clients(num=6),
        "fedpac_soap",
        4,
        6,
        2,
        _loss,
        lr=0.05,
        lr_schedule="constant",
        preflight=False,
        callback=None if states is None else (lambda s, m: states.append(copy.deepcopy(s))),
        **settings,
    )


def _clients_part(states: list, r: int) -> dict[str, torch.Tensor]:
    """Round ``r``'s mean delta less the public correction added back to it."""
    before, after = states[r - 1], states[r]
    reference = public_reference(before, get_algorithm("fedpac_soap"), 0.05, 2)[0] or {}
    return {
        n: after.params[n].double() - before.params[n].double() - reference.get(n, 0.0)
        for n in after.params
    }


@pytest.mark.parametrize("projection", [None, 2])
def test_a_projected_round_applies_only_the_leading_part_of_what_the_clients_added(projection):
    """Clipping only (z = 0, q = 1): from round 2 (round 1 has no shared curvature yet) the
    clients' part of the applied delta lies in the span the global Theta's leading directions
    give; without the projection it does not."""
    states: list = []
    history = _run(projection, 0.0, states)
    assert len(states) == 4
    for r in (2, 3):
        part = _clients_part(states, r)
        shapes = {n: t.shape for n, t in part.items()}
        directions = leading_directions(states[r - 1].curvature, shapes, 2)
        assert set(directions) == {"0.weight", "2.weight"}  # 8 x 6 and 3 x 8: sides > 2
        again, kept = projected(part, directions)
        if projection is None:
            assert kept < 0.99
            assert PROJECTION_KEPT not in history[r - 1]
        else:
            assert kept == pytest.approx(1.0, abs=1e-5)
            assert 0.0 < history[r - 1][PROJECTION_KEPT] < 1.0
    if projection is not None:
        assert history[0][PROJECTION_KEPT] == 1.0  # round 1: nothing to project on


def test_the_projection_changes_nothing_before_the_server_has_a_curvature():
    states: dict[int | None, list] = {None: [], 2: []}
    for rank, collected in states.items():
        _run(rank, 1.0, collected)
    first = [s[0].params for s in states.values()]
    for name in first[0]:
        assert torch.equal(first[0][name], first[1][name])
    assert any(not torch.equal(states[None][1].params[n], states[2][1].params[n]) for n in first[0])


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"algorithm": "fedavg_adamw"}, "dp_projection_rank .* needs an algorithm"),
        ({"algorithm": "fedadamw"}, "dp_projection_rank .* needs an algorithm"),
        ({"dp_projection_rank": 0}, "dp_projection_rank must be a whole number"),
        ({"dp_projection_rank": 2.5}, "dp_projection_rank must be a whole number"),
        ({"dp_mode": "none"}, "dp_projection_rank set with dp_mode: none"),
    ],
)
def test_bad_projection_settings_fail_when_read_naming_the_setting(tmp_path, settings, named):
    arguments = {**CLIENT_DP, "dp_projection_rank": 4, **settings}
    if arguments["dp_mode"] == "none":
        arguments = {"algorithm": "fedpac_soap", "dp_mode": "none", "dp_projection_rank": 4}
    with pytest.raises(ValueError, match=named):
        FedPACArguments(output_dir=str(tmp_path), **arguments)


def test_record_level_dp_refuses_the_projection(tmp_path):
    with pytest.raises(ValueError, match="dp_projection_rank is for dp_mode: client"):
        FedPACArguments(
            output_dir=str(tmp_path),
            algorithm="fedpac_soap",
            dp_mode="record",
            dp_clip_norm=1.0,
            dp_noise_multiplier=1.0,
            dp_projection_rank=4,
        )
