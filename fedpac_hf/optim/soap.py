"""SOAP: Adam in the eigenbasis of Shampoo's Kronecker statistics.

SOAP (Vyas et al., 2024, arXiv 2409.11321) keeps, for every matrix parameter
``W`` of shape ``m x n`` with gradient ``G``, the Shampoo statistics

    L <- shampoo_beta * L + (1 - shampoo_beta) * G G^T      (m x m)
    R <- shampoo_beta * R + (1 - shampoo_beta) * G^T G      (n x n)

and runs Adam on the rotated gradient ``Q_L^T G Q_R``, where ``Q_L``, ``Q_R`` are
eigenbases of ``L`` and ``R``. The bases are computed with ``eigh`` once and then
refreshed every ``precondition_frequency`` steps by one power-iteration step
followed by a QR decomposition, which also reorders Adam's second moment to
follow the eigenvalue order. A side longer than ``max_precond_dim`` is not
rotated (identity), so a LoRA factor ``B`` of shape ``4096 x 16`` with
``max_precond_dim=1024`` is preconditioned on its 16-side only.

Implementation notes (the update is the reference's; see ``_soap_kernels.py``):
the reference keeps Adam's first moment in the original basis and rotates it
every step. Here it is kept in the rotated basis and, when the bases are
refreshed, rotated back and into the new bases; since the bases are orthogonal
this is the same quantity, and it saves two matrix products per matrix per step.
Matrices take a fused path (the product back out of the eigenbasis is
accumulated straight into the parameter, the statistics are updated in place,
only the upper blocks of a large ``G G^T`` are computed), and parameters with no
rotated side take one ``torch._foreach_*`` Adam step per parameter group.

Federated use (FedPAC): Theta is the statistics of the rotated sides; which
travel, in which form, and how a warm start rebuilds them is in
:mod:`fedpac_hf.optim._soap_state` (the layout and state half of this class).

Step-count policy
-----------------
- Fresh start (no :meth:`SOAP.import_curvature`): the first ``step()`` of a
  parameter initialises the statistics and the eigenbasis (eigh) from its
  gradient and then takes Adam step 1 in that basis, so every step moves the
  parameters (a cold federated client with ``local_steps=1`` trains). The
  reference skips that update (``first_step_updates=False`` reproduces it).
  In that basis the gradient is exact up to rounding, along the statistics'
  null directions and off the diagonal; Adam's first step, a sign step, would
  make each rounded entry a step of up to ``lr`` along an arbitrary direction,
  so they are set to 0 (``_soap_kernels.fresh_rotated``): with both sides
  rotated the first step is ``-lr U V^T`` of the gradient's SVD.
- Warm start (:meth:`SOAP.import_curvature`): the statistics are the imported
  ones, the eigenbases are computed from them by ``eigh``, Adam's moments are
  zero and Adam's step count restarts at 0, so the first ``step()`` already
  updates the parameters with the usual bias correction of step 1. The
  statistics keep accumulating from the imported values, and the
  power-iteration refresh runs after Adam steps ``precondition_frequency``,
  ``2 * precondition_frequency``, ...

Numerics: statistics, moments, eigh and QR are float32 (float64 for float64
parameters) whatever the parameter dtype; bf16/fp16 gradients are cast up, and
:meth:`SOAP.load_state_dict` keeps them float32. A failing ``eigh`` is retried in
float64 and then replaced by the identity, each with a warning. A non-finite
gradient (or one whose squared norm overflows the statistics' dtype) raises
``FloatingPointError`` before anything is changed (one host sync per step; none
with ``check_finite_grads = False``, see
:class:`~fedpac_hf.optim.base.CurvatureOptimizer`). A refresh whose QR is not
finite keeps that side's previous basis, decided on the device (no host sync).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch.optim.optimizer import Optimizer, ParamsT

from ._soap_kernels import (
    Keeps,
    foreach_adam_step_,
    fresh_rotated,
    highest_matmul_precision,
    matmul_precision,
    matrix_adam_step_,
    refresh_bases_,
    rotate,
    side_outer_products,
    symmetric_update_,
)
from ._soap_state import SOAPState, check_theta_options
from .base import (
    check_grads,
    check_params_supported,
    curvature_dtype,
    named_params,
    restore_saved_state_dtypes,
)
from .options import check_options, given_options

__all__ = ["SOAP"]


class SOAP(Optimizer, SOAPState):
    """SOAP optimizer with an exportable curvature state (Theta = Shampoo statistics).

    Follows the reference SOAP step for step on a fresh start (see the module
    docstring for the warm-start policy).

    Parameters
    ----------
    params : iterable
        Parameters, ``(name, parameter)`` pairs (preferred: names make Theta's
        keys) or parameter-group dicts.
    lr : float
        Learning rate.
    betas : tuple of float
        Adam's decay rates for the first and second moment.
    shampoo_beta : float or None
        Decay rate of the statistics ``L``, ``R``; ``None`` uses ``betas[1]``.
    eps : float
        Added to the square root of the second moment.
    weight_decay : float
        Decoupled weight decay (``p <- p * (1 - lr * weight_decay)`` after the update).
    precondition_frequency : int
        Adam steps between power-iteration + QR refreshes of the eigenbases.
    max_precond_dim : int
        Sides longer than this are not rotated and get no statistic.
    merge_dims : bool
        Merge small dimensions of tensors with more than two dimensions (conv
        weights) before preconditioning; see :func:`preconditioner_layout`.
    precondition_1d : bool
        Rotate 1-D parameters too (one ``n x n`` statistic); by default they
        get plain Adam.
    correct_bias : bool
        Adam bias correction.
    theta_max_dim : int or None
        Statistics of sides longer than this travel in Theta as their diagonal
        (``d`` floats instead of ``d x d``); the client still keeps and uses the
        full statistic, and a warm start from a diagonal starts from that
        diagonal matrix. ``None``: every statistic travels in full. This is how
        a LoRA factor's long side (``d`` of a ``d x r`` adapter) is kept
        adapter-sized (``curvature="lora"``).
    theta_sketch_dim : int
        With ``theta_max_dim``: a long side also sends ``k`` columns of a
        Nystroem sketch ``L @ Omega`` (a shared, fixed test matrix), from
        which the warm start rebuilds the statistic's leading directions; 0
        sends the diagonal alone. Both forms are linear in ``L``, so the
        server's average is exact.
    theta_diagonal : bool
        With ``theta_max_dim``: whether a long side sends its diagonal.
        ``False`` (which needs ``theta_sketch_dim >= 1``) sends the sketch
        alone and the warm start is its rank-``k`` Nystroem approximation: the
        same ``d`` floats as the diagonal for ``k = 1``, but a LoRA factor's
        long-side statistic is nearly low-rank, so its leading direction
        carries far more of it than its diagonal does.
    theta_compact : str
        How a long side travels: ``"sketch"`` (the diagonal and/or a sketch
        with a fixed test matrix, rebuilt by each client) or ``"basis"`` (the
        diagonal in the server's basis and a ``theta_sketch_dim``-column sketch
        steered to its leading directions; the server turns the basis with
        them and sends it down, so the long side keeps a memory across rounds;
        needs ``theta_sketch_dim >= 1`` and ``theta_diagonal``).
    theta_steered : int or None
        With ``theta_compact="basis"``: how many of the ``theta_sketch_dim``
        columns the server steers to its basis's leading directions; the others
        are random directions, new every round (``None``: all steered). Read
        by the server, which chooses the test matrices it sends down.
    first_step_updates : bool
        A fresh start (no warm start) updates the parameters on its first
        step, with the eigenbasis of that step's gradient. ``False`` follows
        the reference, whose first step only initialises the statistics, so a
        client with ``local_steps=1`` would never move.
    rotation_precision : str or None
        Float32 matmul precision, on CUDA, of the products that rotate the
        gradient into the eigenbases and the update back out (the bulk of
        SOAP's arithmetic): ``"highest"`` (full float32), ``"high"``
        (TensorFloat-32 tensor cores, about 1e-3 relative error per product),
        or ``None`` (default): torch's setting at the time of the step, which
        is full float32 unless TF32 was turned on (``TrainingArguments(tf32=True)``,
        ``torch.set_float32_matmul_precision("high")``). The statistics,
        ``eigh``, the refresh and Theta always run at ``"highest"``. No effect
        on a CPU.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        correct_bias: bool = True,
        theta_max_dim: int | None = None,
        theta_sketch_dim: int = 0,
        theta_diagonal: bool = True,
        theta_compact: str = "sketch",
        theta_steered: int | None = None,
        first_step_updates: bool = True,
        rotation_precision: str | None = None,
    ) -> None:
        check_options("soap", given_options(locals()), setting=None)  # the table's ranges
        check_theta_options(theta_sketch_dim, theta_diagonal, theta_compact, theta_steered)
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "shampoo_beta": shampoo_beta,
            "eps": eps,
            "weight_decay": weight_decay,
            "precondition_frequency": int(precondition_frequency),
            "max_precond_dim": int(max_precond_dim),
            "merge_dims": merge_dims,
            "precondition_1d": precondition_1d,
            "correct_bias": correct_bias,
            "theta_max_dim": theta_max_dim,
            "theta_sketch_dim": int(theta_sketch_dim),
            "theta_diagonal": bool(theta_diagonal),
            "theta_compact": theta_compact,
            "theta_steered": theta_steered,
            "first_step_updates": bool(first_step_updates),
            "rotation_precision": rotation_precision,
        }
        super().__init__(params, defaults)
        check_params_supported(self)

    # ------------------------------------------------------------------ step
    def _check_gradients(self) -> None:
        """Refuse sparse or non-finite gradients, and gradients whose squared norm
        would overflow the statistics, before anything is changed.

        One 2-norm per gradient decides both (it is non-finite when the gradient
        holds a NaN or an infinity), read in one host sync; only when it flags
        something does the slower :func:`~fedpac_hf.optim.base.check_grads` run,
        to raise its usual error. With ``check_finite_grads = False`` only the
        sparse check runs (no sync).
        """
        names, grads = [], []
        for name, p in named_params(self):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                check_grads(self)  # raises, naming the parameter
            names.append(name)
            grads.append(p.grad)
        if not grads or not self.check_finite_grads:
            return
        norms = torch._foreach_norm(grads)
        if len({(n.device, n.dtype) for n in norms}) == 1:
            values = torch.stack(norms).tolist()  # one transfer instead of one per norm
        else:
            values = [float(n) for n in norms]
        limits = [
            torch.finfo(torch.float64 if g.dtype == torch.float64 else torch.float32).max
            for g in grads
        ]
        if all(math.isfinite(v) and v * v < m for v, m in zip(values, limits, strict=True)):
            return
        check_grads(self)  # raises for a NaN or an infinity
        for name, value, limit in zip(names, values, limits, strict=True):
            if not (math.isfinite(value) and value * value < limit):
                raise FloatingPointError(
                    f"SOAP: gradient of {name!r} has norm {value:.3g}; its outer products "
                    "would overflow the statistics. The step was refused and no state was changed"
                )

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one SOAP step (see the step-count policy in the module docstring).

        Parameters viewed as matrices take the fused path
        (:func:`~fedpac_hf.optim._soap_kernels.matrix_adam_step_`), parameters
        with no rotated side take one ``torch._foreach_*`` Adam step per group,
        and the rest (preconditioned 1-D and higher-dimensional tensors) the
        general side-by-side rotation.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_gradients()
        started = self._start_fresh()

        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            shampoo_beta = group["shampoo_beta"] if group["shampoo_beta"] is not None else beta2
            # Plain-Adam parameters, batched per (device, step): foreach lists.
            plain: dict[tuple[torch.device, int], list[list[torch.Tensor]]] = {}
            updated: list[torch.Tensor] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                view, rotated = self._layout(p, group)
                grad = p.grad.to(curvature_dtype(p))
                fresh = p in started
                if fresh and not group.get("first_step_updates", True):
                    continue  # the reference: a fresh start only gathers statistics

                state["step"] += 1
                t = state["step"]
                updated.append(p)
                if not any(rotated):
                    lists = plain.setdefault((p.device, t), [[], [], [], []])
                    for lst, x in zip(lists, (p, grad, state["exp_avg"], state["exp_avg_sq"])):
                        lst.append(x)
                    continue
                with matmul_precision(p.device, group.get("rotation_precision")):
                    keeps = started.get(p)
                    self._adam_in_eigenbasis(p, grad, state, view, rotated, group, t, keeps)
                with highest_matmul_precision(p.device):
                    if not fresh:  # a fresh start has folded this gradient in already
                        self._accumulate(state, grad, view, rotated, shampoo_beta)
                    if t % group["precondition_frequency"] == 0:
                        self._refresh(state, view, rotated)

            for (_, t), lists in plain.items():
                foreach_adam_step_(*lists, self._step_size(group, t), beta1, beta2, group["eps"])
            if group["weight_decay"] != 0.0 and updated:
                torch._foreach_mul_(updated, 1.0 - group["lr"] * group["weight_decay"])
        return loss

    def _start_fresh(self) -> dict[torch.Tensor, Keeps]:
        """Start every parameter that has a gradient and no state yet.

        Its statistics come from this gradient and its eigenbases from them (one
        batched computation, one host sync for all). Returns the parameters
        started, each with its sides' :func:`~._soap_kernels.range_mask`
        (``None``: a side not rotated), which its first step needs.
        """
        layouts: dict[torch.Tensor, tuple[bool, ...]] = {}
        sides: list[tuple[dict[str, Any], int]] = []
        for group in self.param_groups:
            shampoo_beta = group["shampoo_beta"]
            shampoo_beta = shampoo_beta if shampoo_beta is not None else group["betas"][1]
            for p in group["params"]:
                if p.grad is None or len(self.state[p]) != 0:
                    continue
                state = self.state[p]
                view, rotated = self._layout(p, group)
                state.update(self._fresh_state(p, group))
                with highest_matmul_precision(p.device):
                    self._accumulate(
                        state, p.grad.to(curvature_dtype(p)), view, rotated, shampoo_beta
                    )
                sides += [(state, i) for i, on in enumerate(rotated) if on]
                layouts[p] = rotated
        self._set_bases(sides)
        return {p: self._range_masks(self.state[p], rotated) for p, rotated in layouts.items()}

    @staticmethod
    def _step_size(group: Mapping[str, Any], t: int) -> float:
        """Learning rate times Adam's bias correction at Adam step ``t``."""
        beta1, beta2 = group["betas"]
        step_size = group["lr"]
        if group["correct_bias"]:
            step_size *= math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
        return step_size

    def _adam_in_eigenbasis(
        self,
        p: torch.Tensor,
        grad: torch.Tensor,
        state: dict[str, Any],
        view: tuple[int, ...],
        rotated: tuple[bool, ...],
        group: Mapping[str, Any],
        t: int,
        keeps: Keeps | None = None,
    ) -> None:
        """Adam step of a parameter with at least one rotated side (no weight decay);
        ``keeps``: a fresh start's first step (:func:`~._soap_kernels.fresh_rotated`)."""
        beta1, beta2 = group["betas"]
        step_size = self._step_size(group, t)
        bases = self._bases(state, rotated)
        if len(view) == 2:
            left, right = bases
            matrix_adam_step_(
                p, grad, state, view, left, right, step_size, beta1, beta2, group["eps"], keeps
            )
            return
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        grad_rotated = rotate(grad, bases, view, back=False)
        if keeps is not None:
            grad_rotated = fresh_rotated(grad_rotated.reshape(view), keeps).reshape(grad.shape)
        exp_avg.lerp_(grad_rotated, 1.0 - beta1)
        exp_avg_sq.lerp_(grad_rotated.square(), 1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        direction = rotate(exp_avg / denom, bases, view, back=True)
        p.add_(direction.to(p.dtype), alpha=-step_size)

    @staticmethod
    def _accumulate(
        state: dict[str, Any],
        grad: torch.Tensor,
        view: tuple[int, ...],
        rotated: tuple[bool, ...],
        shampoo_beta: float,
    ) -> None:
        """Update the statistic of every rotated side: ``GG_i <- b GG_i + (1 - b) G_i G_i^T``."""
        if not any(rotated):
            return
        g = grad.reshape(view)
        if g.dim() <= 2:
            sides = [g, g.T] if g.dim() == 2 else [g.unsqueeze(1)]
            for i, (side, on) in enumerate(zip(sides, rotated, strict=True)):
                if on:
                    symmetric_update_(state[f"GG{i}"], side, shampoo_beta)
            return
        for i, outer in enumerate(side_outer_products(g, rotated)):
            if outer is not None:
                state[f"GG{i}"].lerp_(outer, 1.0 - shampoo_beta)

    @staticmethod
    def _refresh(state: dict[str, Any], view: tuple[int, ...], rotated: tuple[bool, ...]) -> None:
        """Refresh the eigenbases (power iteration + QR) and carry Adam's first moment,
        which is kept in the rotated basis, over to the new bases exactly."""
        exp_avg = state["exp_avg"]
        original = rotate(exp_avg, SOAP._bases(state, rotated), view, back=True)
        refresh_bases_(state, view, rotated)
        exp_avg.copy_(rotate(original, SOAP._bases(state, rotated), view, back=False))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, keeping the saved (float32) dtype of statistics and moments."""
        super().load_state_dict(state_dict)
        restore_saved_state_dtypes(self, state_dict)
