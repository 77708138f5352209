"""Numerical kernels of the SOAP step (private to :mod:`fedpac_hf.optim.soap`).

Split out of ``soap.py`` so that the optimizer class stays readable. The
kernels compute the reference SOAP update (up to rounding); they only avoid work:

- :func:`matrix_adam_step_` handles a parameter viewed as a matrix (the common
  case): two products into the eigenbases, Adam's moments updated in place,
  and the last product back out accumulated straight into the parameter
  (``addmm_``) instead of into a direction tensor that is then added.
- :func:`symmetric_update_` updates a statistic ``L <- beta L + (1 - beta) A A^T``
  in place; for large sides it computes only the upper blocks of ``A A^T`` and
  mirrors them, which saves a third of that product.
- :func:`foreach_adam_step_` runs plain Adam (with ``torch._foreach_*`` ops) on
  the parameters that have no rotated side (biases, norm weights).
- :func:`refresh_bases_` is the reference's power-iteration + QR refresh
  (without a host sync).
- :func:`rotate` and :func:`side_outer_products` are the general versions used
  for 1-D and higher-dimensional parameters.
- :func:`range_mask` and :func:`fresh_rotated` keep a fresh start's first step
  to what its gradient holds (see :func:`fresh_rotated`).
- :func:`eigenbasis` (re-exported by ``soap.py``) is the ``eigh`` basis of a
  fresh or warm start, with its fallbacks; :func:`eigenbases` does a warm
  start's matrices with one host sync for all.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from .base import all_finite

__all__ = [
    "eigenbases",
    "eigenbasis",
    "foreach_adam_step_",
    "fresh_rotated",
    "highest_matmul_precision",
    "matmul_precision",
    "matrix_adam_step_",
    "range_mask",
    "refresh_bases_",
    "rotate",
    "side_outer_products",
    "symmetric_update_",
]

#: One 0/1 mask per side of a parameter's view (``None``: a side not rotated).
Keeps = tuple[torch.Tensor | None, ...]

#: Statistics with a side at least this long are updated block-wise (upper
#: blocks of ``A A^T`` only, then mirrored); below it one ``addmm_`` is faster.
SYMMETRIC_BLOCK_MIN = 512
#: Number of blocks per side for the block-wise statistic update.
SYMMETRIC_BLOCKS = 3


def eigenbasis(matrix: torch.Tensor, warn_not_finite: bool = True) -> torch.Tensor:
    """Orthonormal eigenvectors of a symmetric matrix, by descending eigenvalue.

    Used for SOAP's eigenbasis on a fresh start and on a warm start from an
    imported statistic. ``eigh`` runs in the matrix's dtype (float32 or float64);
    if it raises or returns non-finite values it is retried in float64, and if
    that fails too (or the matrix itself is not finite) the identity is returned
    (that side is then simply not rotated). Every fallback emits a warning
    (except a non-finite matrix with ``warn_not_finite=False``: a caller that
    checks its result later knows already); the function never raises.
    """
    n = matrix.shape[0]
    eye = torch.eye(n, dtype=matrix.dtype, device=matrix.device)
    if not bool(torch.isfinite(matrix).all()):
        if not warn_not_finite:
            return eye
        warnings.warn(
            f"SOAP: statistic of size {n}x{n} is not finite; using the identity basis",
            RuntimeWarning,
            stacklevel=2,
        )
        return eye
    dtypes = [matrix.dtype] if matrix.dtype == torch.float64 else [matrix.dtype, torch.float64]
    for dtype in dtypes:
        try:
            m = matrix.to(dtype)
            # A tiny diagonal jitter, as in the reference, keeps an all-zero
            # statistic from producing an arbitrary basis.
            _, vectors = torch.linalg.eigh(m + 1e-30 * torch.eye(n, dtype=dtype, device=m.device))
        except RuntimeError as error:  # torch.linalg.LinAlgError is a RuntimeError
            warnings.warn(
                f"SOAP: eigh failed in {dtype} for a {n}x{n} statistic ({error}); "
                + ("retrying in float64" if dtype != torch.float64 else "using the identity"),
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        if bool(torch.isfinite(vectors).all()):
            return vectors.flip(1).to(matrix.dtype)
        warnings.warn(
            f"SOAP: eigh returned non-finite values in {dtype} for a {n}x{n} statistic; "
            + ("retrying in float64" if dtype != torch.float64 else "using the identity"),
            RuntimeWarning,
            stacklevel=2,
        )
    return eye


def eigenbases(matrices: list[torch.Tensor], warn_not_finite: bool = True) -> list[torch.Tensor]:
    """:func:`eigenbasis` of several symmetric matrices, with one host sync for all.

    One ``eigh`` per matrix in its own dtype (as :func:`eigenbasis` tries
    first), then one finiteness check of all the bases together (a
    non-finite matrix gives a non-finite basis). Only a matrix whose ``eigh``
    raised or returned non-finite values goes through :func:`eigenbasis` and
    its fallbacks (and warnings; ``warn_not_finite`` is passed on).
    """
    bases: list[torch.Tensor | None] = []
    for m in matrices:
        n = m.shape[0]
        try:
            _, vectors = torch.linalg.eigh(m + 1e-30 * torch.eye(n, dtype=m.dtype, device=m.device))
        except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
            bases.append(None)
            continue
        bases.append(vectors.flip(1))
    done = [b for b in bases if b is not None]
    if len(done) == len(bases) and bool(all_finite(done)):
        return done
    return [
        b
        if b is not None and bool(torch.isfinite(b).all())
        else eigenbasis(m, warn_not_finite=warn_not_finite)
        for m, b in zip(matrices, bases, strict=True)
    ]


@contextlib.contextmanager
def highest_matmul_precision(device: torch.device) -> Iterator[None]:
    """Disable TF32 for float32 matmuls on CUDA while curvature is computed."""
    with matmul_precision(device, "highest"):
        yield


@contextlib.contextmanager
def matmul_precision(device: torch.device, precision: str | None) -> Iterator[None]:
    """Run float32 matmuls on CUDA at ``precision`` (``torch.set_float32_matmul_precision``:
    ``"highest"`` full float32, ``"high"`` TensorFloat-32 tensor cores) inside the
    block, then restore the caller's setting. ``None`` keeps the caller's setting;
    nothing changes on other devices."""
    if device.type != "cuda" or precision is None:
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def rotate(
    x: torch.Tensor,
    bases: list[torch.Tensor | None],
    view_shape: tuple[int, ...],
    back: bool,
) -> torch.Tensor:
    """Rotate ``x`` into (``back=False``: ``Q^T x``) or out of (``back=True``: ``Q x``)
    the eigenbases, side by side; ``None`` sides are left as they are.

    Parameters
    ----------
    x : torch.Tensor
        A tensor with as many elements as ``view_shape``.
    bases : list of torch.Tensor or None
        One orthogonal matrix (or ``None``) per side of ``view_shape``.
    view_shape : tuple of int
        The shape ``x`` is viewed as (see :func:`~fedpac_hf.optim._soap_state.preconditioner_layout`).
    back : bool
        Rotate out of the eigenbases instead of into them.

    Returns
    -------
    torch.Tensor
        The rotated tensor, with the shape of ``x`` (``x`` itself if no side is rotated).
    """
    if all(q is None for q in bases):
        return x
    shape = x.shape
    y = x.reshape(view_shape)
    if len(view_shape) == 2:
        left, right = bases
        if left is not None:
            y = (left if back else left.T) @ y
        if right is not None:
            y = y @ (right.T if back else right)
        return y.reshape(shape)
    for q in bases:
        if q is None:
            y = y.movedim(0, -1)
        else:
            # contract side 0 with Q (or Q^T) and append the result as the last side
            y = torch.tensordot(y, q, dims=([0], [1 if back else 0]))
    return y.reshape(shape)


def side_outer_products(g: torch.Tensor, rotated: tuple[bool, ...]) -> list[torch.Tensor | None]:
    """For each rotated side ``i`` of ``g``: the contraction of ``g`` with itself
    over all other sides (``G G^T`` and ``G^T G`` for a matrix, ``g g^T`` for a vector)."""
    if g.dim() == 1:
        return [torch.outer(g, g) if rotated[0] else None]
    if g.dim() == 2:
        return [g @ g.T if rotated[0] else None, g.T @ g if rotated[1] else None]
    out: list[torch.Tensor | None] = []
    for i, on in enumerate(rotated):
        if not on:
            out.append(None)
            continue
        others = [j for j in range(g.dim()) if j != i]
        out.append(torch.tensordot(g, g, dims=(others, others)))
    return out


def symmetric_update_(stat: torch.Tensor, a: torch.Tensor, beta: float) -> None:
    """In place: ``stat <- beta * stat + (1 - beta) * a @ a.T`` for a symmetric ``stat``.

    For ``stat`` of side at least :data:`SYMMETRIC_BLOCK_MIN` the side is cut into
    :data:`SYMMETRIC_BLOCKS` blocks; only the blocks on and above the diagonal
    are computed (``addmm_`` into views of ``stat``) and the blocks below are
    copied from their transposes. This assumes ``stat`` is symmetric on entry
    (to rounding), which every SOAP statistic is: zero, an imported average of
    symmetric matrices, or the result of earlier updates.
    """
    n = stat.shape[0]
    alpha = 1.0 - beta
    if n < SYMMETRIC_BLOCK_MIN or SYMMETRIC_BLOCKS < 2:
        stat.addmm_(a, a.T, beta=beta, alpha=alpha)
        return
    edges = [n * k // SYMMETRIC_BLOCKS for k in range(SYMMETRIC_BLOCKS + 1)]
    blocks = list(zip(edges[:-1], edges[1:], strict=True))
    for i, (r0, r1) in enumerate(blocks):
        for c0, c1 in blocks[i:]:
            stat[r0:r1, c0:c1].addmm_(a[r0:r1], a[c0:c1].T, beta=beta, alpha=alpha)
    for i, (r0, r1) in enumerate(blocks):
        for c0, c1 in blocks[i + 1 :]:
            stat[c0:c1, r0:r1].copy_(stat[r0:r1, c0:c1].T)


def matrix_adam_step_(
    p: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, Any],
    view: tuple[int, int],
    left: torch.Tensor | None,
    right: torch.Tensor | None,
    step_size: float,
    beta1: float,
    beta2: float,
    eps: float,
    keeps: Keeps | None = None,
) -> None:
    """One Adam step in the eigenbasis for a parameter viewed as a matrix.

    With ``G`` the gradient viewed as ``view``: ``G~ = Q_L^T G Q_R``; Adam's
    moments (kept in the rotated basis) are updated with ``G~``; the parameter
    moves by ``-step_size * Q_L (m / (sqrt(v) + eps)) Q_R^T``. The last product
    is accumulated straight into the parameter when it has the statistics'
    dtype (``addmm_``); otherwise the direction is cast to the parameter's dtype
    first, as in the reference.

    Parameters
    ----------
    p : torch.Tensor
        The parameter (updated in place; weight decay is not applied here).
    grad : torch.Tensor
        Its gradient in the statistics' dtype.
    state : dict
        The parameter's SOAP state (``exp_avg``, ``exp_avg_sq``).
    view : tuple of int
        The matrix shape the parameter is viewed as.
    left, right : torch.Tensor or None
        The eigenbases of the two sides (``None``: that side is not rotated;
        at least one is not ``None``).
    step_size : float
        Learning rate times Adam's bias correction.
    beta1, beta2, eps : float
        Adam's hyper-parameters.
    keeps : tuple or None
        The first step of a fresh start, whose bases come from ``grad`` itself:
        each side's :func:`range_mask` (:func:`fresh_rotated`).
    """
    g = grad.reshape(view)
    rotated = g
    if left is not None:
        rotated = left.T @ rotated
    if right is not None:
        rotated = rotated @ right
    if keeps is not None:
        rotated = fresh_rotated(rotated, keeps)
    exp_avg = state["exp_avg"].view(view)
    exp_avg_sq = state["exp_avg_sq"].view(view)
    exp_avg.lerp_(rotated, 1.0 - beta1)
    exp_avg_sq.lerp_(rotated.square_(), 1.0 - beta2)  # `rotated` is a temporary here
    update = exp_avg_sq.sqrt().add_(eps)
    torch.div(exp_avg, update, out=update)

    if p.dtype == update.dtype and p.is_contiguous():
        target = p.view(view)
        if left is not None and right is not None:
            target.addmm_(left @ update, right.T, alpha=-step_size)
        elif left is not None:
            target.addmm_(left, update, alpha=-step_size)
        else:
            assert right is not None
            target.addmm_(update, right.T, alpha=-step_size)
        return
    direction = rotate(update, [left, right], view, back=True)
    p.add_(direction.reshape(p.shape).to(p.dtype), alpha=-step_size)


def range_mask(statistic: torch.Tensor, basis: torch.Tensor, inner: int) -> torch.Tensor:
    """1.0 for the directions of ``basis`` in the numerical range of the PSD ``statistic``, else 0.0.

    A direction is in the range when its eigenvalue (the diagonal of ``Q^T S Q``)
    exceeds ``max(n, inner) * eps`` times the largest, where ``statistic = A A^T``
    sums ``inner`` products (``numpy.linalg.matrix_rank``'s tolerance for ``A``).
    """
    values = ((statistic @ basis) * basis).sum(dim=0)  # diag(Q^T S Q), n x n memory
    size = max(statistic.shape[0], inner)
    return (values > size * torch.finfo(values.dtype).eps * values.max().clamp_min(0.0)).to(
        statistic.dtype
    )


def fresh_rotated(rotated: torch.Tensor, keeps: Keeps) -> torch.Tensor:
    """A fresh start's rotated gradient (one dim per side) with its rounding set to 0.

    At a fresh start the eigenbases are those of this very gradient's ``G G^T``
    and ``G^T G``: in exact arithmetic ``Q_L^T G Q_R`` has no entry along the
    statistics' null directions, and is diagonal (the singular values) when both
    sides rotate. Computed, those entries are rounding, and Adam's first step
    (``x / (|x| + eps)``, a sign step) would turn each into a step of up to the
    learning rate along an arbitrary direction: for a classifier head, whose
    gradient has at most the batch's rank, most of the step. So the null
    directions (``keeps``, each side's :func:`range_mask`) are dropped, and so is
    any entry no larger than ``size * eps`` times the largest (``size``: the
    rotated sides' lengths summed), without a host sync.
    """
    for dim, keep in enumerate(keeps):
        if keep is not None:
            shape = [1] * rotated.dim()
            shape[dim] = -1
            rotated = rotated * keep.view(shape)
    magnitude = rotated.abs()
    size = sum(keep.numel() for keep in keeps if keep is not None)
    tol = size * torch.finfo(rotated.dtype).eps * magnitude.max()
    return torch.where(magnitude > tol, rotated, torch.zeros_like(rotated))


def foreach_adam_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    step_size: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """Plain Adam (no rotation) on same-device parameters that share a step size.

    The same operations as the rotated path with identity bases, batched with
    ``torch._foreach_*`` ops; ``grads`` and the moments are in the statistics'
    dtype, the direction is cast to each parameter's dtype before it is added.
    Weight decay is not applied here.
    """
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_lerp_(exp_avg_sqs, torch._foreach_mul(grads, grads), 1.0 - beta2)
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denoms, eps)
    directions = torch._foreach_div(exp_avgs, denoms)
    if any(p.dtype != d.dtype for p, d in zip(params, directions, strict=True)):
        directions = [d.to(p.dtype) for p, d in zip(params, directions, strict=True)]
    torch._foreach_add_(params, directions, alpha=-step_size)


def refresh_bases_(
    state: dict[str, Any],
    view: tuple[int, ...],
    rotated: tuple[bool, ...],
) -> None:
    """One power-iteration step + QR per rotated side (the reference's refresh).

    For each rotated side ``i``: ``P = GG_i Q_i``; the columns are sorted by the
    estimated eigenvalues ``diag(Q_i^T P)`` (descending), Adam's second moment is
    permuted along side ``i`` to follow, and ``Q_i <- qr(P).Q``. Adam's first
    moment is not touched here.

    A QR that yields non-finite values (which only a non-finite statistic
    produces) leaves that side as it was: its previous basis and the second
    moment's order are kept. The choice is made on the device with
    ``torch.where``, so a refresh never waits for the device (no host sync).
    """
    exp_avg_sq = state["exp_avg_sq"]
    v = exp_avg_sq.reshape(view)
    for i, on in enumerate(rotated):
        if not on:
            continue
        stat, basis = state[f"GG{i}"], state[f"Q{i}"]
        power = stat @ basis
        estimated_eigenvalues = (basis * power).sum(dim=0)
        order = torch.argsort(estimated_eigenvalues, descending=True)
        q, _ = torch.linalg.qr(power.index_select(1, order))
        # |q| <= 1 when it is finite, so its sum is finite exactly when every entry is
        # (one reduction instead of an elementwise isfinite + all).
        finite = torch.isfinite(q.sum())
        state[f"Q{i}"] = torch.where(finite, q, basis)
        v = torch.where(finite, v.index_select(i, order), v)
    exp_avg_sq.copy_(v.reshape(exp_avg_sq.shape))
