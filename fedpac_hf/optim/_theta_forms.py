"""Compact, averageable forms of a large Kronecker statistic (SOAP's long sides).

A statistic ``L`` (``d x d``, symmetric positive semi-definite) of a long side
is too big to send every round when the parameter is a thin LoRA factor. Two
compact forms, sent alone or together, both *linear* in ``L`` so that the
server's weighted average of the clients' forms is exactly the form of the
average statistic:

- the diagonal ``diag(L)`` (``d`` floats);
- a Nystroem sketch ``Y = L @ Omega`` (``d x k`` floats) with a fixed test
  matrix ``Omega`` that every client and every round share (seeded by the
  shape). From the average sketch a client rebuilds the rank-``k`` Nystroem
  approximation ``Y (Omega^T Y)^+ Y^T`` of the average statistic: its leading
  directions, which the diagonal alone loses.

``expand(diagonal, sketch)`` rebuilds a full matrix: the Nystroem part plus the
diagonal it misses (clipped at zero), so the result keeps ``diag(L)``; without
the diagonal, the Nystroem part alone.

The long-side statistic of a LoRA factor is nearly low-rank (each step adds a
``G G^T`` of rank at most ``r``, and successive gradients share directions): a
sketch keeps its leading directions, which its diagonal loses. A sketch sent
without the diagonal rebuilds a rank-``k`` matrix, whose eigenbasis is
arbitrary outside those ``k`` directions; :func:`axes_completed_basis` gives the
warm start the sketch's directions followed by the coordinate axes instead (the
basis a diagonal statistic gives).
"""

from __future__ import annotations

import torch

__all__ = ["axes_completed_basis", "expand", "sketch", "test_matrix"]

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


def expand(diagonal: torch.Tensor | None, sketched: torch.Tensor | None) -> torch.Tensor:
    """A full ``d x d`` statistic from its diagonal and/or its sketch.

    Parameters
    ----------
    diagonal:
        ``diag(L)``, length ``d``, or ``None`` (the sketch alone travelled).
    sketched:
        ``L @ Omega`` (``d x k``) or ``None`` (the diagonal matrix is returned).

    Returns
    -------
    Tensor
        ``Y (Omega^T Y)^+ Y^T + diag(max(diag(L) - diag(Nystroem), 0))``,
        symmetric, in ``diagonal``'s dtype; without ``diagonal`` the Nystroem
        part ``Y (Omega^T Y)^+ Y^T`` alone, in ``sketched``'s dtype.

    Raises
    ------
    ValueError
        If both are ``None``.
    """
    if sketched is None:
        if diagonal is None:
            raise ValueError("expand needs a diagonal, a sketch or both")
        return torch.diag(diagonal)
    d, k = sketched.shape
    y = sketched.to(torch.float64)
    omega = test_matrix(d, k).to(y.device)
    core = omega.T @ y
    core = 0.5 * (core + core.T)
    nystroem = y @ torch.linalg.pinv(core, hermitian=True) @ y.T
    nystroem = 0.5 * (nystroem + nystroem.T)
    if diagonal is None:
        return nystroem.to(sketched.dtype)
    rest = (diagonal.to(torch.float64) - torch.diagonal(nystroem)).clamp_(min=0.0)
    return (nystroem + torch.diag(rest)).to(diagonal.dtype)


def axes_completed_basis(statistic: torch.Tensor, k: int) -> torch.Tensor:
    """An orthonormal basis: a rank-``k`` statistic's eigenvectors, then the coordinate axes.

    The first columns are the eigenvectors of ``statistic`` with a non-zero
    eigenvalue (at most ``k``, by descending eigenvalue); the rest are the
    coordinate axes e_1, e_2, ... made orthogonal to them (Gram-Schmidt, by
    a QR factorisation). An all-zero statistic gives the identity.

    Parameters
    ----------
    statistic:
        A symmetric ``d x d`` matrix of rank at most ``k`` (a Nystroem rebuild).
    k:
        The sketch's number of columns.

    Returns
    -------
    Tensor
        ``d x d`` with orthonormal columns, in ``statistic``'s dtype and device.
    """
    d = statistic.shape[0]
    eye = torch.eye(d, dtype=torch.float64, device=statistic.device)
    values, vectors = torch.linalg.eigh(statistic.to(torch.float64))
    keep = values > 1e-12 * values.abs().max().clamp(min=torch.finfo(torch.float64).tiny)
    top = vectors[:, keep].flip(1)[:, :k]  # descending eigenvalue
    if top.shape[1] == 0:
        return eye.to(statistic.dtype)
    basis, _ = torch.linalg.qr(torch.cat([top, eye], dim=1))  # d x d: span(top), then axes
    return basis.to(statistic.dtype)
