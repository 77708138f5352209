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

The *basis* form (``theta_compact="basis"``) gives the long side a memory on
the server. The server keeps an orthonormal basis ``Q`` and eigenvalues
``lambda`` per long side and sends them down with the test matrix ``Omega`` of
the next round (the ``k`` leading columns of ``Q``: steered where the global
statistic has its mass). A client warm-starts from ``Q diag(lambda) Q^T`` with
``Q`` as its eigenbasis, and sends up ``diag(Q^T L Q)`` (the energy of its
statistic along each shared direction) and ``L Omega`` (how the leading
directions couple to all others). Both are linear in ``L``, so their averages
are exactly those of the average statistic; :func:`next_basis` turns them into
the next ``Q``, ``lambda`` and ``Omega`` (:func:`next_global_curvature` on a whole
Theta). Per long side: ``(k + 1) d`` floats up, ``d^2 + (k + 1) d`` down.
"""

from __future__ import annotations

import zlib

import torch

__all__ = [
    "BASIS_KEYS",
    "UP_KEYS",
    "axes_completed_basis",
    "basis_export",
    "expand",
    "next_basis",
    "next_global_curvature",
    "sent_form",
    "sketch",
    "test_matrix",
]

#: Entry suffixes of a basis-form long side ``X``: what a client sends up ...
UP_KEYS = ("rotated_diagonal", "steered_sketch")
#: ... and what the server sends down.
BASIS_KEYS = ("basis", "eigenvalues", "test")

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


def basis_export(
    statistic: torch.Tensor, basis: torch.Tensor | None, test: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's basis-form long side: ``diag(Q^T L Q)`` and ``L @ Omega`` (float32).

    ``basis`` ``None`` (no global basis yet) means the coordinate axes.
    """
    stat = statistic.to(torch.float64)
    if basis is None:
        rotated = torch.diagonal(stat).clone()
    else:
        q = basis.to(stat.device, torch.float64)
        rotated = ((stat @ q) * q).sum(0)
    sketched = stat @ test.to(stat.device, torch.float64)
    return rotated.to(torch.float32), sketched.to(torch.float32)


def next_basis(
    basis: torch.Tensor | None,
    test: torch.Tensor,
    sketched: torch.Tensor,
    rotated_diagonal: torch.Tensor,
    steered: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The server's next basis, eigenvalues and test matrix of one long side.

    In the basis ``Q`` (the axes when ``None``) the averaged statistic is
    ``B = Q^T L Q``. What the clients sent fixes its diagonal ``c`` exactly, and
    with ``W = Q^T Omega``, ``Z = Q^T (L Omega) = B W`` fixes every entry that
    touches ``span(W)``. The estimate keeps those and assumes ``Q`` already
    diagonalises the rest:

        B' = Z W^T + W Z^T - W (W^T Z) W^T + (I - P) diag(c) (I - P),  P = W W^T,

    then its diagonal is set to ``c``. ``B' = V diag(w) V^T`` turns the basis:
    ``Q' = Q V`` (by descending ``w``), ``lambda' = max(w, 0)`` (the statistic stays
    positive semi-definite). The next test matrix is the leading ``steered``
    columns of ``Q'`` (where the statistic has its mass: they are re-measured
    every round) completed by ``k - steered`` random directions orthogonal to
    them (so that the coupling of the other directions is measured too, a
    few at a time). All in float64; returned in float32 on ``sketched``'s device.

    Parameters
    ----------
    basis:
        ``Q`` of this round (``d x d``, orthonormal columns) or ``None``.
    test:
        ``Omega`` of this round (``d x k``, orthonormal columns).
    sketched, rotated_diagonal:
        The clients' weighted averages of ``L @ Omega`` and ``diag(Q^T L Q)``.
    steered:
        Columns of the next test matrix steered to the leading directions
        (default: all ``k``).
    generator:
        Draws the random columns (seeded by the caller, e.g. by the round).

    Returns
    -------
    tuple of Tensor
        ``Q'`` (``d x d``), ``lambda'`` (``d``), ``Omega'`` (``d x k``).
    """
    device = sketched.device
    c = rotated_diagonal.to(device, torch.float64)
    d, k = sketched.shape
    q = (
        torch.eye(d, dtype=torch.float64, device=device)
        if basis is None
        else basis.to(device, torch.float64)
    )
    w = q.T @ test.to(device, torch.float64)
    z = q.T @ sketched.to(torch.float64)
    projected = torch.eye(d, dtype=torch.float64, device=device) - w @ w.T
    estimate = z @ w.T + w @ z.T - w @ (w.T @ z) @ w.T + projected @ torch.diag(c) @ projected
    estimate = 0.5 * (estimate + estimate.T)
    estimate.diagonal().copy_(c)
    values, vectors = torch.linalg.eigh(estimate)
    values, vectors = values.flip(0), vectors.flip(1)  # descending
    turned = q @ vectors
    steered = k if steered is None else min(max(int(steered), 0), k)
    lead = turned[:, :steered]
    draw = torch.randn(d, k - steered, generator=generator, dtype=torch.float64).to(device)
    draw = draw - lead @ (lead.T @ draw)
    omega = torch.linalg.qr(torch.cat([lead, draw], dim=1)).Q
    omega[:, :steered] = lead  # QR may flip signs; keep the steered columns as they are
    # contiguous: LAPACK returns column-major tensors, and a checkpoint restores row-major
    # ones; the same strides keep a resumed run's products bit-identical
    return (
        turned.to(torch.float32).contiguous(),
        values.clamp(min=0.0).to(torch.float32).contiguous(),
        omega.to(torch.float32).contiguous(),
    )


def next_global_curvature(
    previous: dict[str, torch.Tensor] | None,
    mean: dict[str, torch.Tensor],
    steered: int | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The global Theta to send down, from the clients' weighted average ``mean``.

    Every entry is the average as it is, except basis-form long sides: their
    ``X.rotated_diagonal`` and ``X.steered_sketch`` become ``X.basis``,
    ``X.eigenvalues`` and ``X.test`` by :func:`next_basis`, from the basis and
    test matrix of ``previous`` (the Theta the clients started from; the axes
    and :func:`test_matrix` when it has none). ``steered`` columns of each next
    test matrix follow the leading directions, the others are drawn from a
    generator seeded by ``seed`` and the side's name (pass the round, so that a
    resumed run draws the same).
    """
    previous = previous or {}
    suffix = "." + UP_KEYS[1]
    result = {}
    for key, value in mean.items():
        if key.endswith("." + UP_KEYS[0]) or key.endswith(suffix):
            continue
        result[key] = value
    for key, sketched in mean.items():
        if not key.endswith(suffix):
            continue
        side = key[: -len(suffix)]
        d, k = sketched.shape
        basis = previous.get(f"{side}.basis")
        test = previous.get(f"{side}.test")
        if test is None:
            test = test_matrix(d, k)
        generator = torch.Generator().manual_seed(zlib.crc32(side.encode()) + 1_000_003 * seed)
        q, values, omega = next_basis(
            basis, test, sketched, mean[f"{side}.{UP_KEYS[0]}"], steered, generator
        )
        result.update({f"{side}.basis": q, f"{side}.eigenvalues": values, f"{side}.test": omega})
    return result


def sent_form(curvature: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """A global Theta in the form the clients send it up (for the drift from the start).

    A basis-form side ``X`` (``X.basis``, ``X.eigenvalues``, ``X.test``) is the
    statistic ``M = Q diag(lambda) Q^T``; sent up it would be
    ``diag(Q^T M Q) = lambda`` and ``M Omega``. Other entries are as they are.
    """
    if not curvature:
        return curvature
    result = {
        k: v for k, v in curvature.items() if not k.endswith(tuple("." + s for s in BASIS_KEYS))
    }
    for key, q in curvature.items():
        if not key.endswith(".basis"):
            continue
        side = key[: -len(".basis")]
        values, test = curvature[f"{side}.eigenvalues"], curvature[f"{side}.test"]
        result[f"{side}.{UP_KEYS[0]}"] = values
        result[f"{side}.{UP_KEYS[1]}"] = (q * values) @ (q.T @ test)
    return result
