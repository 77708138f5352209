"""SOAP's per-parameter layout and state, and its curvature state Theta.

Split out of :mod:`fedpac_hf.optim.soap`, which keeps the step: this module
decides how SOAP views a parameter (:func:`preconditioner_layout`), creates a
parameter's state (statistics ``GG{i}``, eigenbases ``Q{i}``, Adam's moments),
and turns the statistics into Theta and back (:class:`SOAPState`, the base of
:class:`~fedpac_hf.optim.soap.SOAP`).

Federated use (FedPAC): the curvature state Theta is ``{name.L, name.R}`` for the
rotated sides only (``name.L`` alone for a preconditioned 1-D parameter,
``name.GG{i}`` for the sides of a parameter with more than two dimensions).
The eigenbases and Adam's moments are not part of Theta. With
``theta_max_dim`` the statistic of a longer side travels in a compact form:
its diagonal, a ``theta_sketch_dim``-column Nystroem sketch, or both
(``theta_compact="sketch"``), or its diagonal in the server's basis and a
sketch steered to that basis's leading directions (``theta_compact="basis"``;
the server sends the basis down, see :mod:`fedpac_hf.optim._theta_forms`).

A warm start (:meth:`SOAPState.import_curvature`) sets the statistics, computes
the eigenbases from them by ``eigh`` and zeroes Adam's moments.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ._soap_kernels import Keeps, eigenbases, highest_matmul_precision, range_mask
from ._theta_forms import UP_KEYS, axes_completed_basis, basis_export, expand, sketch, test_matrix
from .base import (
    CurvatureOptimizer,
    check_curvature_keys,
    check_finite_curvature,
    constructor_option,
    curvature_dtype,
    export_device,
    named_params,
)

__all__ = ["SOAPState", "check_theta_options", "preconditioner_layout", "stat_names"]


def preconditioner_layout(
    shape: torch.Size | tuple[int, ...],
    max_precond_dim: int,
    merge_dims: bool,
    precondition_1d: bool,
) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """Return how SOAP views a parameter: ``(view_shape, rotated_per_side)``.

    ``view_shape`` is the shape the gradient is reshaped to (identical to
    ``shape`` unless ``merge_dims`` merges the dimensions of a tensor with more
    than two dimensions); ``rotated_per_side[i]`` tells whether side ``i`` gets a
    statistic and an eigenbasis (it does when it is at most ``max_precond_dim``).

    Merging (``merge_dims=True``, tensors with more than two dimensions only)
    joins consecutive dimensions greedily while their product stays at most
    ``max_precond_dim``; if everything would collapse into one side, the result
    is ``(shape[0], prod(shape[1:]))`` (out-channels x fan-in for a conv weight).
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) == 0:
        return (1,), (False,)
    if len(shape) == 1:
        return shape, (precondition_1d and shape[0] <= max_precond_dim,)
    view = shape
    if merge_dims and len(shape) > 2:
        merged: list[int] = []
        product = 1
        for d in shape:
            if product * d > max_precond_dim and product > 1:
                merged.append(product)
                product = d
            else:
                product *= d
        merged.append(product)
        view = tuple(merged) if len(merged) > 1 else (shape[0], math.prod(shape[1:]))
    return view, tuple(d <= max_precond_dim for d in view)


def check_theta_options(
    theta_sketch_dim: int,
    theta_diagonal: bool,
    theta_compact: str,
    theta_steered: int | None,
) -> None:
    """Refuse combinations of SOAP's Theta options that cannot work together.

    Each option's own range is checked first, by the table of
    :mod:`fedpac_hf.optim.options`.
    """
    if not theta_diagonal and theta_sketch_dim < 1:
        raise ValueError(
            "SOAP: theta_diagonal=False sends a long side as its sketch alone and needs "
            f"theta_sketch_dim >= 1, got {theta_sketch_dim}"
        )
    if theta_compact == "basis" and (theta_sketch_dim < 1 or not theta_diagonal):
        raise ValueError(
            "SOAP: theta_compact='basis' sends the diagonal and a steered sketch of every long "
            f"side: it needs theta_sketch_dim >= 1 and theta_diagonal, got {theta_sketch_dim} "
            f"and {theta_diagonal}"
        )
    if theta_steered is not None and theta_steered > theta_sketch_dim:
        raise ValueError(
            f"SOAP: theta_steered must be None or in [0, theta_sketch_dim={theta_sketch_dim}], "
            f"got {theta_steered}"
        )


def stat_names(ndim: int) -> list[str]:
    """Names of the per-side statistics in Theta for a view with ``ndim`` sides."""
    if ndim == 1:
        return ["L"]
    if ndim == 2:
        return ["L", "R"]
    return [f"GG{i}" for i in range(ndim)]


class SOAPState(CurvatureOptimizer):
    """The layout, state and Theta half of SOAP (the optimizer is :class:`~fedpac_hf.optim.soap.SOAP`).

    Meant to be mixed into a ``torch.optim.Optimizer`` whose groups carry SOAP's
    settings (``max_precond_dim``, ``merge_dims``, ``precondition_1d``,
    ``theta_max_dim``, ``theta_sketch_dim``, ``theta_diagonal``); it reads
    ``self.param_groups`` and ``self.state`` and writes only ``self.state``.
    """

    param_groups: list[dict[str, Any]]
    state: Any

    @staticmethod
    def _layout(
        p: torch.Tensor, group: Mapping[str, Any]
    ) -> tuple[tuple[int, ...], tuple[bool, ...]]:
        return preconditioner_layout(
            p.shape, group["max_precond_dim"], group["merge_dims"], group["precondition_1d"]
        )

    def _named_with_groups(self) -> Iterator[tuple[str, torch.Tensor, dict[str, Any]]]:
        names = iter(named_params(self))
        for group in self.param_groups:
            for _ in group["params"]:
                name, p = next(names)
                yield name, p, group

    @staticmethod
    def _travels_as_diagonal(group: Mapping[str, Any], d: int) -> bool:
        limit = group.get("theta_max_dim")
        return limit is not None and d > limit

    @staticmethod
    def _basis_form(group: Mapping[str, Any]) -> bool:
        return group.get("theta_compact", "sketch") == "basis"

    def _curvature_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for name, p, group in self._named_with_groups():
            view, rotated = self._layout(p, group)
            for stat, d, on in zip(stat_names(len(view)), view, rotated, strict=True):
                if not on:
                    continue
                if not self._travels_as_diagonal(group, d):
                    shapes[f"{name}.{stat}"] = (d, d)
                    continue
                k = min(group.get("theta_sketch_dim", 0), d)
                if self._basis_form(group):  # what the server sends down
                    shapes[f"{name}.{stat}.basis"] = (d, d)
                    shapes[f"{name}.{stat}.eigenvalues"] = (d,)
                    shapes[f"{name}.{stat}.test"] = (d, k)
                    continue
                if group.get("theta_diagonal", True):
                    shapes[f"{name}.{stat}"] = (d,)
                if k:
                    shapes[f"{name}.{stat}.sketch"] = (d, k)
        return shapes

    def _fresh_state(self, p: torch.Tensor, group: Mapping[str, Any]) -> dict[str, Any]:
        dtype = curvature_dtype(p)
        state: dict[str, Any] = {
            "step": 0,
            "exp_avg": torch.zeros(p.shape, dtype=dtype, device=p.device),
            "exp_avg_sq": torch.zeros(p.shape, dtype=dtype, device=p.device),
        }
        view, rotated = self._layout(p, group)
        for i, (d, on) in enumerate(zip(view, rotated, strict=True)):
            if on:
                state[f"GG{i}"] = torch.zeros(d, d, dtype=dtype, device=p.device)
        return state

    @staticmethod
    def _bases(state: Mapping[str, Any], rotated: tuple[bool, ...]) -> list[torch.Tensor | None]:
        return [state[f"Q{i}"] if on else None for i, on in enumerate(rotated)]

    @staticmethod
    def _range_masks(state: Mapping[str, Any], rotated: tuple[bool, ...]) -> Keeps:
        """Each rotated side's :func:`~._soap_kernels.range_mask` (``None``: not rotated)."""
        numel = state["exp_avg"].numel()
        return tuple(
            range_mask(state[f"GG{i}"], state[f"Q{i}"], numel // state[f"GG{i}"].shape[0])
            if on
            else None
            for i, on in enumerate(rotated)
        )

    def _set_bases(self, sides: list[tuple[dict[str, Any], int]]) -> None:
        """Eigenbases of the given (state, side) statistics, with one host sync for all."""
        if not sides:
            return
        with highest_matmul_precision(sides[0][0][f"GG{sides[0][1]}"].device):
            bases = eigenbases(
                [state[f"GG{i}"] for state, i in sides], warn_not_finite=self.check_finite_grads
            )
        for (state, i), basis in zip(sides, bases, strict=True):
            state[f"Q{i}"] = basis

    def export_curvature(
        self, device: torch.device | str | None = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Return Theta: the statistics ``L``/``R`` (``GG{i}``) of every rotated side.

        A side longer than ``theta_max_dim`` exports the diagonal of its statistic
        (unless ``theta_diagonal`` is off) and, with ``theta_sketch_dim``, its sketch.

        Parameters that have not been stepped yet export zero statistics, so the
        keys only depend on the model and the optimizer configuration. Float32
        copies on ``device`` (``None``: each parameter's device).
        """
        theta: dict[str, torch.Tensor] = {}
        for name, p, group in self._named_with_groups():
            view, rotated = self._layout(p, group)
            state = self.state.get(p, {})
            for i, (stat, d, on) in enumerate(
                zip(stat_names(len(view)), view, rotated, strict=True)
            ):
                if not on:
                    continue
                value = state.get(f"GG{i}")
                target = export_device(p, device)
                if value is None:
                    value = torch.zeros(d, d, dtype=torch.float32, device=p.device)
                value = value.detach()
                if self._travels_as_diagonal(group, d) and self._basis_form(group):
                    k = min(group["theta_sketch_dim"], d)
                    test = state.get(f"theta_test{i}")
                    rotated, sketched = basis_export(
                        value,
                        state.get(f"theta_basis{i}"),
                        test_matrix(d, k) if test is None else test,
                    )
                    theta[f"{name}.{stat}.{UP_KEYS[0]}"] = rotated.to(target)
                    theta[f"{name}.{stat}.{UP_KEYS[1]}"] = sketched.to(target)
                    continue
                if self._travels_as_diagonal(group, d):
                    k = min(group.get("theta_sketch_dim", 0), d)
                    if k:
                        theta[f"{name}.{stat}.sketch"] = sketch(value, k).to(
                            device=target, dtype=torch.float32
                        )
                    if not group.get("theta_diagonal", True):
                        continue
                    value = torch.diagonal(value)
                theta[f"{name}.{stat}"] = value.to(device=target, dtype=torch.float32, copy=True)
        return theta

    def import_curvature(self, state: Mapping[str, torch.Tensor]) -> None:
        """Warm-start from Theta: statistics imported, eigenbases by eigh, moments zero.

        A long side that sent its sketch alone (``theta_diagonal=False``) is
        rebuilt as the sketch's rank-``k`` Nystroem matrix, and its basis is the
        sketch's directions followed by the coordinate axes
        (:func:`~fedpac_hf.optim._theta_forms.axes_completed_basis`) rather than
        the arbitrary completion ``eigh`` would pick for the zero eigenvalues.

        Raises ``ValueError`` if keys or shapes do not match this optimizer's
        parameters and ``max_precond_dim``/``merge_dims``/``precondition_1d``, or
        if a value is not finite. The next ``step()`` updates every parameter.
        """
        check_curvature_keys(self._curvature_shapes(), state)
        check_finite_curvature(state)
        sides: list[tuple[dict[str, Any], int]] = []
        for name, p, group in self._named_with_groups():
            fresh = self._fresh_state(p, group)
            view, rotated = self._layout(p, group)
            for i, (stat, on) in enumerate(zip(stat_names(len(view)), rotated, strict=True)):
                if on:
                    dtype = curvature_dtype(p)
                    shared = state.get(f"{name}.{stat}.basis")
                    if shared is not None:  # the server's basis: no eigh, kept for export
                        # copies: own memory, as the statistics get (a view into a loaded
                        # checkpoint's buffer can round differently in a product)
                        shared = shared.to(device=p.device, dtype=dtype, copy=True)
                        values = state[f"{name}.{stat}.eigenvalues"].to(p.device, dtype)
                        test = state[f"{name}.{stat}.test"]
                        fresh[f"GG{i}"] = (shared * values) @ shared.T
                        fresh[f"Q{i}"] = fresh[f"theta_basis{i}"] = shared
                        fresh[f"theta_test{i}"] = test.to(p.device, dtype, copy=True)
                        continue
                    imported = state.get(f"{name}.{stat}")
                    basis = None
                    if imported is not None:
                        imported = imported.to(device=p.device, dtype=dtype)
                    if imported is None or imported.ndim == 1:  # a compact long side
                        sketched = state.get(f"{name}.{stat}.sketch")
                        if sketched is not None:
                            sketched = sketched.to(device=p.device)
                        diagonal = imported
                        imported = expand(diagonal, sketched).to(dtype)
                        if diagonal is None:  # the sketch alone: its directions, then axes
                            basis = axes_completed_basis(imported, sketched.shape[1])
                    fresh[f"GG{i}"] = imported.clone()
                    if basis is not None:
                        fresh[f"Q{i}"] = basis
                    else:
                        sides.append((fresh, i))
            self.state[p] = fresh
        self._set_bases(sides)

    @classmethod
    def curvature_retention(cls, options: Mapping[str, Any], num_steps: int) -> float:
        """``shampoo_beta**K``: every step decays the statistics once (``betas[1]`` when
        ``shampoo_beta`` is ``None``); the compact forms are linear in them, so they decay alike.

        Exact for full statistics, the diagonal and the basis form, whose warm start exports
        what was imported. The fixed-test-matrix sketch (``theta_compact="sketch"`` with
        ``theta_sketch_dim >= 1``) warm-starts from a rebuilt statistic whose diagonal and
        sketch differ from the imported ones, so there ``r`` times the import is close to, not
        exactly, what is left of it."""
        beta = constructor_option(cls.__init__, options, "shampoo_beta")
        if beta is None:
            beta = constructor_option(cls.__init__, options, "betas")[1]
        return float(beta) ** max(int(num_steps), 0)

    def reset_basis_moments(self) -> None:
        """Zero Adam's moments (they live in the client's rotated basis) and its step count."""
        for state in self.state.values():
            if "exp_avg" in state:
                state["exp_avg"].zero_()
                state["exp_avg_sq"].zero_()
                state["step"] = 0
