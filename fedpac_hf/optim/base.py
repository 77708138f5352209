"""The curvature-state contract every federated client optimizer follows.

FedPAC averages the clients' curvature state Theta on the server and warm-starts
the next round's clients from it. This module fixes the shape of that exchange
so that the federated core, the HF trainer and the Flower apps can treat every
optimizer alike:

- ``export_curvature()`` returns a flat ``dict[str, torch.Tensor]``: keys are
  ``f"{parameter_name}.{statistic}"`` (for instance ``"fc.weight.L"``), values
  are detached float32 CPU tensors holding only what may be averaged across
  clients (see ``FEDPAC.md``: SOAP's Kronecker statistics, Sophia's Hessian
  EMA, Muon's momentum, AdamW's second moment).
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
from collections.abc import Iterator, Mapping

import torch

__all__ = ["CurvatureOptimizer", "named_params", "check_curvature_keys"]


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
    """

    @abc.abstractmethod
    def export_curvature(self) -> dict[str, torch.Tensor]:
        """Return Theta: flat, stably named, float32 CPU tensors."""

    @abc.abstractmethod
    def import_curvature(self, state: Mapping[str, torch.Tensor]) -> None:
        """Warm-start from a (global) Theta produced by :meth:`export_curvature`."""

    def reset_basis_moments(self) -> None:
        """Zero the state that lives in a client-specific basis (default: none)."""
