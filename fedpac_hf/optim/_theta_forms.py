"""Compact, averageable forms of a large Kronecker statistic (SOAP's long sides).

A statistic ``L`` (``d x d``, symmetric positive semi-definite) of a long side
is too big to send every round when the parameter is a thin LoRA factor. Two
compact forms, both *linear* in ``L`` so that the server's weighted average of
the clients' forms is exactly the form of the average statistic:

- the diagonal ``diag(L)`` (``d`` floats);
- a Nystroem sketch ``Y = L @ Omega`` (``d x k`` floats) with a fixed test
  matrix ``Omega`` that every client and every round share (seeded by the
  shape). From the average sketch a client rebuilds the rank-``k`` Nystroem
  approximation ``Y (Omega^T Y)^+ Y^T`` of the average statistic: its leading
  directions, which the diagonal alone loses.

``expand(diagonal, sketch)`` rebuilds a full matrix: the Nystroem part plus the
diagonal it misses (clipped at zero), so the result keeps ``diag(L)``.
"""

from __future__ import annotations

import torch

__all__ = ["expand", "sketch", "test_matrix"]

_CACHE: dict[tuple[int, int], torch.Tensor] = {}


def test_matrix(d: int, k: int) -> torch.Tensor:
    """The fixed ``d x k`` test matrix of the sketch (orthonormal columns, float64, CPU)."""
    key = (int(d), int(k))
    if key not in _CACHE:
        generator = torch.Generator().manual_seed(1_000_003 * d + k)
        gaussian = torch.randn(d, k, generator=generator, dtype=torch.float64)
        _CACHE[key] = torch.linalg.qr(gaussian).Q
    return _CACHE[key]


def sketch(statistic: torch.Tensor, k: int) -> torch.Tensor:
    """``statistic @ Omega`` (``d x k``, float32): the linear sketch of a long side."""
    omega = test_matrix(statistic.shape[0], k).to(statistic.device, torch.float64)
    return (statistic.to(torch.float64) @ omega).to(torch.float32)


def expand(diagonal: torch.Tensor, sketched: torch.Tensor | None) -> torch.Tensor:
    """A full ``d x d`` statistic from its diagonal and (optionally) its sketch.

    Parameters
    ----------
    diagonal:
        ``diag(L)``, length ``d``.
    sketched:
        ``L @ Omega`` (``d x k``) or ``None`` (the diagonal matrix is returned).

    Returns
    -------
    Tensor
        ``Y (Omega^T Y)^+ Y^T + diag(max(diag(L) - diag(Nystroem), 0))``,
        symmetric, in ``diagonal``'s dtype.
    """
    if sketched is None:
        return torch.diag(diagonal)
    d, k = sketched.shape
    y = sketched.to(torch.float64)
    omega = test_matrix(d, k).to(y.device)
    core = omega.T @ y
    core = 0.5 * (core + core.T)
    nystroem = y @ torch.linalg.pinv(core, hermitian=True) @ y.T
    nystroem = 0.5 * (nystroem + nystroem.T)
    rest = (diagonal.to(torch.float64) - torch.diagonal(nystroem)).clamp_(min=0.0)
    return (nystroem + torch.diag(rest)).to(diagonal.dtype)
