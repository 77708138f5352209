"""Keep a DP round's noised mean delta where the shared curvature has its mass.

Under client-level DP the server adds isotropic Gaussian noise to the sum of
the clients' clipped deltas: every float of the delta gets the same noise,
whether or not the clients' updates move it. SOAP's shared curvature, the
global Theta the round's clients started from, says where their gradients
have their energy: the statistic ``L = EMA(G G^T)`` of a side of a matrix has
its leading eigenvectors along the directions the gradients take.
``dp_projection_rank: k`` keeps, for every side of every matrix (and vector)
parameter whose statistic is longer than ``k``, only the component of the
noised sum in that side's ``k`` leading eigenvectors:

    Delta <- P_L Delta P_R,   P = Q_k Q_k^T,

with ``Q_k`` the ``k`` leading columns of the side's basis (the basis form's
``X.basis``, sorted by descending eigenvalue) or of the eigendecomposition of
its full statistic (``X``, a square matrix). A side of ``k`` or fewer floats
(a LoRA factor's rank side), a side sent as its diagonal, and a parameter
without a statistic are left as they are. The noise on a projected ``m x n``
matrix keeps about ``k / m`` (or ``k / n``) of its energy.

The global Theta is a release of earlier rounds (or public), so the
projection is post-processing: it costs no privacy, and the accounting is
unchanged. It applies to the noised sum of what the clients added; the public
reference (the correction steps, :mod:`~fedpac_hf.federated.privacy_clip`) is
added back after it. Before the server has a statistic (round 1 of a run
without one) nothing is projected.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedpac_hf.optim import stat_names

__all__ = ["PROJECTION_KEPT", "leading_directions", "projected"]

PROJECTION_KEPT = "dp_projection_kept"
"""Round metric: the fraction of the noised sum's squared norm the projection kept."""


def leading_directions(
    curvature: Mapping[str, torch.Tensor] | None,
    shapes: Mapping[str, torch.Size],
    rank: int,
) -> dict[str, list[torch.Tensor | None]]:
    """The ``rank`` leading eigenvectors of each side of each parameter, where there are more.

    Parameters
    ----------
    curvature:
        The global Theta (SOAP's statistics, in full or in the basis form).
    shapes:
        The parameters' shapes by name (the delta's).
    rank:
        k, the directions kept per side.

    Returns
    -------
    dict
        Parameter name -> one entry per side: ``Q_k`` (``d x k``, float64, orthonormal
        columns) or ``None`` (the side is kept whole). Parameters with no side to project
        are left out.
    """
    result: dict[str, list[torch.Tensor | None]] = {}
    if not curvature:
        return result
    for name, shape in shapes.items():
        if len(shape) not in (1, 2):
            continue
        sides = [
            _leading(curvature, f"{name}.{stat}", d, rank)
            for stat, d in zip(stat_names(len(shape)), shape, strict=True)
        ]
        if any(q is not None for q in sides):
            result[name] = sides
    return result


def _leading(
    curvature: Mapping[str, torch.Tensor], key: str, d: int, rank: int
) -> torch.Tensor | None:
    """``Q_k`` of one side from its basis or full statistic (``None``: keep it whole)."""
    if d <= rank:
        return None
    basis = curvature.get(f"{key}.basis")
    if basis is not None and tuple(basis.shape) == (d, d):
        return basis[:, :rank].to(torch.float64)
    statistic = curvature.get(key)
    if statistic is None or tuple(statistic.shape) != (d, d):
        return None
    values, vectors = torch.linalg.eigh(statistic.to(torch.float64))
    return vectors[:, values.argsort(descending=True)[:rank]]


def projected(
    sums: Mapping[str, torch.Tensor], directions: Mapping[str, list[torch.Tensor | None]]
) -> tuple[dict[str, torch.Tensor], float]:
    """``sums`` with each listed parameter projected on its sides' leading directions.

    Returns the projected sums (each in its own dtype and device) and the
    fraction of their squared norm kept (1.0 when nothing was projected or the
    sums are zero).
    """
    result = dict(sums)
    before = after = 0.0
    for name, total in sums.items():
        energy = float(total.double().pow(2).sum())
        before += energy
        sides = directions.get(name)
        if sides is None:
            after += energy
            continue
        value = total.to(torch.float64)
        view = value.reshape(-1, 1) if value.dim() == 1 else value
        left = sides[0]
        if left is not None:
            left = left.to(view.device)
            view = left @ (left.T @ view)
        if len(sides) > 1 and sides[1] is not None:
            right = sides[1].to(view.device)
            view = (view @ right) @ right.T
        kept = view.reshape(total.shape)
        after += float(kept.pow(2).sum())
        result[name] = kept.to(total.dtype)
    return result, (after / before if before > 0.0 else 1.0)
