"""AdamW whose second moment is the curvature state Theta (the ``fedadamw`` baseline).

Theta is ``{name.exp_avg_sq}``: the bias-corrected second moment
``v / (1 - beta2**step)``, an estimate of ``E[g^2]`` that can be averaged across
clients that took different numbers of steps.

Warm-start policy (:meth:`AdamW.import_curvature`): ``exp_avg_sq`` is set to the
imported estimate, the first moment is zero, and the step count is set to
:func:`warm_start_step` (``beta2**step <= 1e-8``) so that the imported second
moment is used as it is (its bias correction is 1). torch's AdamW has one step
count for both moments, so the zeroed first moment then ramps up without bias
correction over about ``1 / (1 - beta1)`` steps. The state lives in the
parameter dtype, as in ``torch.optim.AdamW``; Theta is exported as float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .base import (
    CurvatureOptimizer,
    check_curvature_keys,
    check_finite_curvature,
    check_grads,
    check_params_supported,
    constructor_option,
    export_device,
    named_params,
    unhooked_step,
)
from .options import check_options

__all__ = ["AdamW", "warm_start_step"]


def warm_start_step(beta2: float, tolerance: float = 1e-8) -> int:
    """Smallest step count whose second-moment bias correction ``1 - beta2**step``
    is within ``tolerance`` of 1 (0 when ``beta2 == 0``)."""
    if beta2 <= 0.0:
        return 0
    return math.ceil(math.log(tolerance) / math.log(beta2))


class AdamW(torch.optim.AdamW, CurvatureOptimizer):
    """``torch.optim.AdamW`` with Theta = bias-corrected ``exp_avg_sq``.

    Same constructor as :class:`torch.optim.AdamW`. ``step`` first validates the
    gradients (sparse -> ``ValueError``, NaN/inf -> ``FloatingPointError`` with no
    state changed), then runs torch's AdamW.
    """

    def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        check_options("adamw", kwargs, setting=None)  # the options table; torch checks the rest
        super().__init__(params, *args, **kwargs)
        check_params_supported(self)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Validate gradients, then perform one ``torch.optim.AdamW`` step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        check_grads(self)
        unhooked_step(torch.optim.AdamW.step)(self)
        return loss

    def _groups_by_name(self) -> dict[str, tuple[torch.Tensor, dict[str, Any]]]:
        names = iter(named_params(self))
        out = {}
        for group in self.param_groups:
            for _ in group["params"]:
                name, p = next(names)
                out[name] = (p, group)
        return out

    def export_curvature(
        self, device: torch.device | str | None = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Return ``{name.exp_avg_sq}``: bias-corrected second moments, float32 on
        ``device`` (``None``: each parameter's device); zeros for parameters that
        have not been stepped."""
        theta = {}
        for name, (p, group) in self._groups_by_name().items():
            state = self.state.get(p, {})
            target = export_device(p, device)
            if "exp_avg_sq" not in state:
                theta[f"{name}.exp_avg_sq"] = torch.zeros(
                    p.shape, dtype=torch.float32, device=target
                )
                continue
            step = float(state["step"])  # torch keeps the step count on the host
            correction = 1.0 - group["betas"][1] ** step if step > 0 else 1.0
            value = state["exp_avg_sq"].detach().to(device=target, dtype=torch.float32)
            theta[f"{name}.exp_avg_sq"] = value / correction
        return theta

    def import_curvature(self, state: Mapping[str, torch.Tensor]) -> None:
        """Warm-start: second moment imported, first moment zero, step count
        :func:`warm_start_step` (see the module docstring)."""
        named = self._groups_by_name()
        check_curvature_keys(
            {f"{n}.exp_avg_sq": tuple(p.shape) for n, (p, _) in named.items()}, state
        )
        check_finite_curvature(state)
        for name, (p, group) in named.items():
            v = state[f"{name}.exp_avg_sq"].to(device=p.device, dtype=p.dtype).clone()
            new: dict[str, Any] = {
                "step": torch.tensor(
                    float(warm_start_step(group["betas"][1])),
                    dtype=torch.float32,
                    device=p.device if group["capturable"] or group["fused"] else "cpu",
                ),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": v,
            }
            if group["amsgrad"]:
                new["max_exp_avg_sq"] = v.clone()
            self.state[p] = new

    @classmethod
    def curvature_retention(cls, options: Mapping[str, Any], num_steps: int) -> float:
        """``beta2**K / (1 - beta2**(s + K))``: after ``K`` steps from the warm start's step
        count ``s`` (:func:`warm_start_step`) the second moment holds ``beta2**K`` times the
        imported one, and the export divides it by its bias correction."""
        beta2 = float(constructor_option(torch.optim.AdamW.__init__, options, "betas")[1])
        steps = max(int(num_steps), 0)
        if beta2 <= 0.0:  # no memory: the import survives only an export before any step
            return 1.0 if steps == 0 else 0.0
        return beta2**steps / (1.0 - beta2 ** (warm_start_step(beta2) + steps))

    def reset_basis_moments(self) -> None:
        """Zero the first moment (the client-specific direction); keep the second."""
        for state in self.state.values():
            if "exp_avg" in state:
                state["exp_avg"].zero_()
