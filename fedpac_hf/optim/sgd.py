"""Plain SGD (optionally with momentum) with the curvature API and an empty Theta.

Used by the ``fedavg`` and ``fedcm`` baselines: there is nothing to align, so
:meth:`SGD.export_curvature` returns ``{}`` and :meth:`SGD.import_curvature`
accepts only ``{}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .base import CurvatureOptimizer, check_curvature_keys, check_grads, unhooked_step
from .options import check_options

__all__ = ["SGD"]


class SGD(torch.optim.SGD, CurvatureOptimizer):
    """``torch.optim.SGD`` whose ``step`` refuses sparse or non-finite gradients
    (``ValueError`` / ``FloatingPointError``, nothing changed); Theta is empty."""

    def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        check_options("sgd", kwargs, setting=None)  # the options table; torch checks the rest
        super().__init__(params, *args, **kwargs)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Validate gradients, then perform one ``torch.optim.SGD`` step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        check_grads(self)
        unhooked_step(torch.optim.SGD.step)(self)
        return loss

    def export_curvature(
        self, device: torch.device | str | None = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Return ``{}``: SGD has no curvature state."""
        return {}

    def import_curvature(self, state: Mapping[str, torch.Tensor]) -> None:
        """Accept only an empty Theta (``ValueError`` naming the keys otherwise)."""
        check_curvature_keys({}, state)
