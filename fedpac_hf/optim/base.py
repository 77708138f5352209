"""The curvature-state contract every federated client optimizer follows.

FedPAC averages the clients' curvature state Theta on the server and warm-starts
the next round's clients from it. This module fixes the shape of that exchange
so that the federated core, the HF trainer and the Flower apps can treat every
optimizer alike:

- ``export_curvature()`` returns a flat ``dict[str, torch.Tensor]``: keys are
  ``f"{parameter_name}.{statistic}"`` (for instance ``"fc.weight.L"``), values
  are detached float32 tensors holding only what may be averaged across
  clients (see ``docs/algorithm.md``: SOAP's Kronecker statistics, Sophia's
  Hessian EMA, Muon's momentum, AdamW's second moment), on the CPU unless
  ``device`` says otherwise (``device=None`` keeps them on the parameters' device).
- ``import_curvature(state)`` loads such a dict (normally the server's weighted
  average) as a warm start; keys and shapes are checked.
- ``reset_basis_moments()`` zeroes the state that lives in a client-specific
  basis and must not be carried across a warm start.

Parameter names come from ``param_groups[i]["param_names"]`` (torch fills it
when an optimizer is built from ``model.named_parameters()``); unnamed
parameters are called ``"group{g}.param{i}"``.
"""

from __future__ import annotations

import abc
import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import chain
from typing import Any

import torch

__all__ = [
    "CurvatureOptimizer",
    "all_finite",
    "export_device",
    "named_params",
    "check_curvature_keys",
    "check_finite_curvature",
    "check_grads",
    "check_params_supported",
    "constructor_option",
    "curvature_dtype",
    "restore_saved_state_dtypes",
    "unhooked_step",
    "warn_once",
]


def named_params(optimizer: torch.optim.Optimizer) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, parameter)`` for every parameter the optimizer updates.

    Names are the ones given at construction (``model.named_parameters()``),
    or ``group{g}.param{i}`` when the optimizer was built from bare tensors.
    """
    for g, group in enumerate(optimizer.param_groups):
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            yield (names[i] if names is not None else f"group{g}.param{i}"), p


def check_curvature_keys(
    expected: Mapping[str, tuple[int, ...]], given: Mapping[str, torch.Tensor]
) -> None:
    """Raise ``ValueError`` unless ``given`` has exactly the keys and shapes expected.

    Used by ``import_curvature`` to refuse a Theta exported from another model
    or another optimizer configuration, naming what differs.
    """
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise ValueError(
            "curvature state does not match this optimizer: "
            f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}. "
            "Was it exported from another model, optimizer or max_precond_dim?"
        )
    for key, shape in expected.items():
        if tuple(given[key].shape) != tuple(shape):
            raise ValueError(
                f"curvature entry {key!r} has shape {tuple(given[key].shape)}, "
                f"this optimizer expects {tuple(shape)}"
            )


class CurvatureOptimizer(abc.ABC):
    """Mixin marking an optimizer whose curvature state Theta can travel.

    Subclasses implement :meth:`export_curvature`, :meth:`import_curvature`
    and :meth:`reset_basis_moments`. Optimizers without curvature (SGD) export
    an empty dict, which the federated core treats as "nothing to align".

    Attributes
    ----------
    check_finite_grads:
        Whether ``step()`` (and Sophia's ``update_hessian``) refuses non-finite
        gradients up front with ``FloatingPointError``, at the cost of one host
        sync per call (:func:`check_grads`). ``True`` by default. A training
        loop that checks the outcome of all its steps once at the end (the
        federated client, :func:`fedpac_hf.federated.client_update`) sets it
        to ``False`` so that a step never waits for the device: a non-finite
        gradient then reaches the parameters and the state, where that final
        check finds it. Finite gradients give the same update either way.
    """

    check_finite_grads: bool = True

    @abc.abstractmethod
    def export_curvature(
        self, device: torch.device | str | None = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Return Theta: flat, stably named, float32 tensors on ``device``.

        ``device=None`` keeps each tensor on its parameter's device (no
        device-to-host copy, for a caller that aggregates on the accelerator).
        """

    @abc.abstractmethod
    def import_curvature(self, state: Mapping[str, torch.Tensor]) -> None:
        """Warm-start from a (global) Theta produced by :meth:`export_curvature`."""

    def reset_basis_moments(self) -> None:
        """Zero the state that lives in a client-specific basis (default: none)."""
        return None

    @classmethod
    def curvature_retention(cls, options: Mapping[str, Any], num_steps: int) -> float:
        """How much of an imported Theta is left in the exported Theta after ``num_steps`` steps.

        A warm start from ``T`` (:meth:`import_curvature`) followed by
        ``num_steps`` steps exports ``r * T`` plus what the steps' gradients
        added; this returns ``r``, a function of the constructor ``options``
        alone (the defaults for those not given), so that a server can compute
        it too. Client-level differential privacy subtracts ``r`` times the
        global Theta as public before clipping
        (:func:`fedpac_hf.federated.privacy_clip.public_reference`). The default,
        1.0, is right for a state that is not a moving average; optimizers
        whose statistics decay override it.

        Parameters
        ----------
        options:
            The keyword arguments the optimizer is built with (``lr`` and the
            parameters aside).
        num_steps:
            Optimizer steps taken since the warm start.

        Returns
        -------
        float
            ``r`` in [0, 1] (up to a bias correction just above 1).
        """
        return 1.0


def constructor_option(init: Callable[..., Any], options: Mapping[str, Any], name: str) -> Any:
    """``options[name]``, or the default of ``init``'s parameter ``name`` when it is not given."""
    if name in options:
        return options[name]
    return inspect.signature(init).parameters[name].default


def export_device(param: torch.Tensor, device: torch.device | str | None) -> torch.device:
    """Where :meth:`CurvatureOptimizer.export_curvature` puts ``param``'s entries:
    ``device``, or the parameter's own device when ``device`` is ``None``."""
    return param.device if device is None else torch.device(device)


def curvature_dtype(param: torch.Tensor) -> torch.dtype:
    """Return the dtype curvature state of ``param`` is kept in: float64 for float64
    parameters, float32 for everything else (bf16/fp16 gradients are cast up)."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def check_params_supported(optimizer: torch.optim.Optimizer) -> None:
    """Raise ``ValueError`` if the optimizer was given a complex or non-floating parameter."""
    for name, p in named_params(optimizer):
        if torch.is_complex(p) or not p.is_floating_point():
            raise ValueError(
                f"{type(optimizer).__name__} supports real floating-point parameters only; "
                f"parameter {name!r} has dtype {p.dtype}"
            )


def all_finite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Whether every entry of every tensor is finite, as a boolean tensor (no host sync).

    One max-norm per tensor (exact: it cannot overflow, and it propagates NaN),
    reduced to one 0-dim boolean on the first tensor's device; ``True`` for no
    tensors. Read it with ``bool(...)`` once, after everything else is queued.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    if not groups:
        return torch.tensor(True)
    flags = []
    for group in groups.values():
        maxima = torch._foreach_norm(group, float("inf"))
        flags.append(torch.stack(maxima).isfinite().all())
    device = flags[0].device
    return torch.stack([f.to(device, non_blocking=True) for f in flags]).all()


def check_grads(optimizer: torch.optim.Optimizer) -> None:
    """Validate every present gradient before a step mutates anything.

    Raises ``ValueError`` for a sparse gradient and ``FloatingPointError`` naming
    the parameters whose gradient holds a NaN or an infinity. Checking up front
    means a rejected step leaves parameters and curvature state untouched (no NaN
    ever reaches Theta). Under ``torch.amp.GradScaler`` non-finite steps are
    skipped by the scaler before ``step`` is called, so this only fires on real
    divergence; a federated client may catch ``FloatingPointError`` to drop itself.

    The finiteness check costs one host sync: one 2-norm per gradient, read in
    one transfer (a NaN or an infinity makes the norm non-finite; only when a
    norm is not finite, which a finite gradient whose squares overflow can also
    cause, are the exact max-norms computed to decide). An optimizer whose
    ``check_finite_grads`` is ``False`` skips it (no sync): the caller checks the
    result of its steps instead (see :class:`CurvatureOptimizer`).
    """
    names: list[str] = []
    grads: list[torch.Tensor] = []
    for name, p in named_params(optimizer):
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise ValueError(
                f"{type(optimizer).__name__} does not support sparse gradients "
                f"(parameter {name!r}); use a dense embedding (sparse=False)"
            )
        names.append(name)
        grads.append(p.grad)
    if not grads or not getattr(optimizer, "check_finite_grads", True):
        return
    norms = torch._foreach_norm(grads)
    if len({(n.device, n.dtype) for n in norms}) == 1:
        if bool(torch.stack(norms).isfinite().all()):
            return
    elif all(math.isfinite(float(n)) for n in norms):
        return
    # The max-norm of a finite tensor cannot overflow, and it propagates NaN.
    maxima = torch._foreach_norm(grads, float("inf"))
    bad = [n for n, m in zip(names, maxima, strict=True) if not torch.isfinite(m)]
    if not bad:
        return  # finite gradients whose 2-norm overflowed
    raise FloatingPointError(
        f"{type(optimizer).__name__}: non-finite gradient in {bad[:5]}"
        f"{'...' if len(bad) > 5 else ''}; the step was refused and no state was changed"
    )


def check_finite_curvature(state: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` naming the entries of a Theta that hold NaN or infinity.

    One host sync for the whole state (:func:`all_finite`); the entries are
    looked at one by one only when something is not finite.
    """
    if bool(all_finite(state.values())):
        return
    bad = sorted(k for k, v in state.items() if not bool(torch.isfinite(v).all()))
    if bad:
        raise ValueError(f"curvature state has non-finite values in {bad[:5]}")


def restore_saved_state_dtypes(
    optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any]
) -> None:
    """Undo the dtype cast ``Optimizer.load_state_dict`` applies to floating state.

    ``torch.optim.Optimizer.load_state_dict`` casts every floating tensor in the
    per-parameter state to the parameter's dtype, which would turn float32
    curvature of a bf16 model into bf16. Call this right after it: each floating
    tensor whose saved dtype differs is replaced by a copy of the saved tensor on
    the parameter's device with its saved dtype.
    """
    saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    params = chain.from_iterable(g["params"] for g in optimizer.param_groups)
    id_map = dict(zip(saved_ids, params, strict=True))
    for key, saved_state in state_dict["state"].items():
        param = id_map.get(key)
        if param is None:
            continue
        live = optimizer.state[param]
        for name, value in saved_state.items():
            if (
                isinstance(value, torch.Tensor)
                and value.is_floating_point()
                and name in live
                and live[name].dtype != value.dtype
            ):
                live[name] = value.to(device=param.device).clone()


def unhooked_step(step: Callable[..., Any]) -> Callable[..., Any]:
    """Return a parent class's ``step`` without torch's profiling/hook wrapper.

    ``torch.optim.Optimizer`` wraps ``cls.step`` so that step hooks run; a subclass
    that overrides ``step`` and calls the parent's wrapped ``step`` would run the
    hooks twice. Only that one wrapper is removed.
    """
    if getattr(step, "hooked", False):
        return step.__wrapped__  # type: ignore[attr-defined]
    return step


def warn_once(optimizer: object, key: str, message: str) -> None:
    """Emit ``warnings.warn(message)`` at most once per optimizer object and key."""
    seen = optimizer.__dict__.setdefault("_fedpac_warned", set())
    if key not in seen:
        seen.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
