"""Muon for hidden matrices and AdamW for everything else, behind one optimizer.

The matrix update is ``torch.optim.Muon``'s (:func:`muon_matrix_step_`: the
same operations in the same order, so in bfloat16 it matches torch's bit for
bit) and the rest is delegated to ``torch.optim.AdamW``: :class:`Muon` owns the
parameter groups and the state (so ``state_dict``/``load_state_dict``,
``zero_grad`` and LR schedulers see one ordinary optimizer) and hands the AdamW
groups to an inner torch optimizer that shares those very group dicts and the
state dict. Every group has ``lr`` (schedulers scale it) and a boolean
``use_muon``.

Which parameters get Muon: 2-D parameters that are not embeddings or output
heads (:func:`is_muon_matrix`). Embeddings, classifier/LM heads, norms,
biases, 1-D parameters and tensors with more than two dimensions (conv
kernels) get AdamW.

Theta is ``{name.momentum}``: Muon's momentum buffer of every matrix parameter
(zeros before the first step). The AdamW part exports nothing: its state starts
from zero on every warm start. The momentum lives in the parameter dtype;
Theta is exported as float32.

Precision of the Newton-Schulz iteration (``ns_dtype``): torch runs it in
bfloat16, which tensor cores do fast. A CPU without bfloat16 instructions
(AVX2 only) multiplies bfloat16 matrices through a slow fallback, about 25x
slower than float32 (benchmarks/optimizer_step.md), so ``"auto"`` (the default)
iterates in bfloat16 on CUDA and in float32 elsewhere; ``"bfloat16"`` or
``"float32"`` force one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import Optimizer

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
from .options import check_options, given_options

__all__ = ["Muon", "is_muon_matrix", "muon_matrix_names", "muon_matrix_step_"]

"""Accepted ``ns_dtype`` values of :class:`Muon`."""

_NOT_HIDDEN = ("embed", "lm_head", "classifier", "score", "wte", "wpe", "pooler")


def is_muon_matrix(name: str | None, param: torch.Tensor) -> bool:
    """Whether a parameter is a hidden matrix that Muon should update.

    True for 2-D parameters whose name does not mark an embedding or an output
    head (``embed``, ``lm_head``, ``classifier``, ``score``, ``wte``, ``wpe``,
    ``pooler``, or a ``head`` path component). Unnamed 2-D parameters count as
    hidden matrices.
    """
    if param.ndim != 2:
        return False
    if name is None:
        return True
    lowered = name.lower()
    return not (any(t in lowered for t in _NOT_HIDDEN) or "head" in lowered.split("."))


def muon_matrix_names(model: nn.Module) -> set[str]:
    """Names of the parameters of ``model`` that Muon updates: :func:`is_muon_matrix`,
    minus the weights of ``nn.Embedding`` modules and of the model's output
    embeddings (``get_output_embeddings()`` of HF models), whatever their names."""
    excluded: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding | nn.EmbeddingBag):
            excluded.update(id(p) for p in module.parameters(recurse=False))
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        head = get_output()
        if isinstance(head, nn.Module):
            excluded.update(id(p) for p in head.parameters())
    return {
        n for n, p in model.named_parameters() if id(p) not in excluded and is_muon_matrix(n, p)
    }


def newton_schulz(
    update: torch.Tensor,
    coefficients: tuple[float, float, float],
    steps: int,
    eps: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Approximately orthogonalise ``update`` (``U S V^T -> U S' V^T``, S' near 1) by
    ``steps`` quintic Newton-Schulz iterations in ``dtype``, as ``torch.optim.Muon``
    does (there in bfloat16). The input is not modified."""
    a, b, c = coefficients
    x = update.to(dtype=dtype, copy=True)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def _adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """``torch.optim.Muon``'s learning-rate adjustment for a matrix of ``shape``."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


def ns_dtype_for(setting: str, device: torch.device) -> torch.dtype:
    """The dtype ``ns_dtype=setting`` iterates in on ``device``."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, setting)


@torch.no_grad()
def muon_matrix_step_(optimizer: Optimizer, group: dict[str, Any]) -> None:
    """One Muon step of a ``use_muon`` group: momentum, Nesterov, Newton-Schulz,
    decoupled weight decay, adjusted learning rate (``torch.optim.Muon``'s rule).

    The momentum buffer ``optimizer.state[p]["momentum_buffer"]`` is created at
    the first step, like torch's.
    """
    lr = float(group["lr"])
    momentum = group["momentum"]
    for p in group["params"]:
        if p.grad is None:
            continue
        grad = p.grad
        state = optimizer.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        buf = state["momentum_buffer"]
        buf.lerp_(grad, 1 - momentum)
        update = grad.lerp(buf, momentum) if group["nesterov"] else buf
        dtype = ns_dtype_for(group.get("ns_dtype", "auto"), p.device)
        update = newton_schulz(
            update, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype
        )
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(update, alpha=-_adjusted_lr(lr, group["adjust_lr_fn"], p.shape))


class Muon(Optimizer, CurvatureOptimizer):
    """``torch.optim.Muon`` on hidden matrices plus ``torch.optim.AdamW`` on the rest.

    Parameters
    ----------
    params : iterable
        ``(name, parameter)`` pairs, tensors, or group dicts. A group may set
        ``use_muon`` to force its kind; otherwise it is split with
        :func:`is_muon_matrix`.
    lr : float
        Learning rate of both parts (the AdamW part uses ``adamw_lr`` if given).
    weight_decay : float
        Decoupled weight decay of both parts (groups may override).
    momentum, nesterov, ns_coefficients, eps, ns_steps : see ``torch.optim.Muon``.
    adjust_lr_fn : str or None
        ``torch.optim.Muon``'s LR adjustment; the default ``"match_rms_adamw"``
        scales the matrix update to AdamW's RMS so one ``lr`` suits both parts.
    adamw_lr : float or None
        Learning rate of the AdamW part (default: ``lr``).
    adamw_betas, adamw_eps : AdamW's ``betas`` and ``eps``.
    ns_dtype : str
        Dtype of the Newton-Schulz iteration: ``"auto"`` (bfloat16 on CUDA,
        float32 elsewhere), ``"bfloat16"`` (torch's choice) or ``"float32"``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = "match_rms_adamw",
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        ns_dtype: str = "auto",
    ) -> None:
        check_options("muon", given_options(locals()), setting=None)
        muon_defaults = {
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": tuple(ns_coefficients),
            "eps": eps,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
        }
        # torch validates these and fills every key its AdamW step reads.
        torch.optim.Muon([torch.zeros(1, 1)], lr=lr, weight_decay=weight_decay, **muon_defaults)
        muon_defaults["ns_dtype"] = ns_dtype
        adamw_defaults = dict(
            torch.optim.AdamW(
                [torch.zeros(1)],
                lr=lr if adamw_lr is None else adamw_lr,
                betas=adamw_betas,
                eps=adamw_eps,
                weight_decay=weight_decay,
            ).defaults
        )
        groups: list[dict[str, Any]] = []
        items = list(params)
        raw_groups = items if items and isinstance(items[0], dict) else [{"params": items}]
        for raw in raw_groups:
            members = list(raw["params"])
            named = [(m if isinstance(m, tuple) else (None, m)) for m in members]
            if "use_muon" in raw:
                split = [(bool(raw["use_muon"]), named)]
            else:
                split = [
                    (flag, [(n, p) for n, p in named if is_muon_matrix(n, p) == flag])
                    for flag in (True, False)
                ]
            for flag, subset in split:
                if not subset:
                    continue
                group = {k: v for k, v in raw.items() if k != "params"}
                group["use_muon"] = flag
                group["params"] = [(n, p) if n is not None else p for n, p in subset]
                if not flag and "lr" not in raw and adamw_lr is not None:
                    group["lr"] = adamw_lr
                for k, v in (muon_defaults if flag else adamw_defaults).items():
                    group.setdefault(k, v)
                groups.append(group)
        super().__init__(groups, {"lr": lr, "weight_decay": weight_decay})
        check_params_supported(self)
        for name, p in self._named(muon=True):
            if p.ndim != 2:
                raise ValueError(
                    f"Muon: parameter {name!r} with shape {tuple(p.shape)} is in a "
                    "use_muon group; only 2-D parameters can use Muon"
                )
        self._bind_adamw()

    def _named(self, muon: bool) -> list[tuple[str, torch.Tensor]]:
        names = iter(named_params(self))
        out = []
        for group in self.param_groups:
            for _ in group["params"]:
                name, p = next(names)
                if group["use_muon"] == muon:
                    out.append((name, p))
        return out

    def _bind_adamw(self) -> None:
        """(Re)create the inner ``torch.optim.AdamW`` over this optimizer's AdamW groups
        and state."""
        self._adamw: Optimizer | None = None
        groups = [g for g in self.param_groups if not g["use_muon"]]
        if groups:
            self._adamw = torch.optim.AdamW([p for g in groups for p in g["params"]])
            self._adamw.param_groups = groups
            self._adamw.state = self.state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._bind_adamw()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Validate gradients, then step the Muon groups and ``torch.optim.AdamW``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        check_grads(self)
        for group in self.param_groups:
            if group["use_muon"]:
                muon_matrix_step_(self, group)
        if self._adamw is not None:
            unhooked_step(torch.optim.AdamW.step)(self._adamw)
        return loss

    def export_curvature(
        self, device: torch.device | str | None = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Return ``{name.momentum}`` for the Muon matrices (float32 on ``device``;
        ``None``: each parameter's device)."""
        theta = {}
        for name, p in self._named(muon=True):
            buf = self.state.get(p, {}).get("momentum_buffer")
            target = export_device(p, device)
            theta[f"{name}.momentum"] = (
                torch.zeros(p.shape, dtype=torch.float32, device=target)
                if buf is None
                else buf.detach().to(device=target, dtype=torch.float32, copy=True)
            )
        return theta

    @classmethod
    def curvature_retention(cls, options: Mapping[str, Any], num_steps: int) -> float:
        """``momentum**K``: every step moves the buffer ``1 - momentum`` of the way to the
        gradient."""
        momentum = float(constructor_option(cls.__init__, options, "momentum"))
        return momentum ** max(int(num_steps), 0)

    def import_curvature(self, state: Mapping[str, torch.Tensor]) -> None:
        """Warm-start: Muon's momentum buffers from Theta; the AdamW part starts fresh."""
        muon_params = self._named(muon=True)
        check_curvature_keys({f"{n}.momentum": tuple(p.shape) for n, p in muon_params}, state)
        check_finite_curvature(state)
        for name, p in muon_params:
            self.state[p] = {
                "momentum_buffer": state[f"{name}.momentum"]
                .to(device=p.device, dtype=p.dtype)
                .clone()
            }
        for _, p in self._named(muon=False):
            self.state.pop(p, None)
