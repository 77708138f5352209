"""How large Theta may be: the ``curvature`` setting and ``theta_budget``, for any model.

One function, :func:`theta_options`, turns the model, the client optimizer and
the two settings into the client-optimizer options that give Theta its form.
Every entry point calls it (``simulate``, ``FedPACArguments.build_algorithm``
and so ``FedPACTrainer``, ``fedpac-hf train`` and both Flower apps), so the
same model trains with the same Theta whichever door it came in by.

``theta_budget`` is the size of Theta a client sends up per round, as a
fraction of the trainable parameters (``1.0``: as many bytes of curvature as
of parameter deltas). Unset, it is 1.0 for a model with LoRA adapters and
unlimited (full Theta) for a model without: on the full-model ViT of
benchmarks/LORA.md (section "Theta budget") the budget cost 0.6 points against
full Theta on the validation split while saving only 9 % of Theta's traffic
(its downlink, the basis, is 1.4x full Theta's), and full Theta of a square
layer is only twice the layer.
For SOAP the form is the richest that fits
(:func:`soap_theta_form`):

1. every statistic in full, if that fits;
2. else sides up to a length ``t`` in full (a LoRA factor's rank side, a small
   head's output side) and every longer side in the *basis* form (its
   diagonal in the server's basis plus a ``k``-column sketch, ``(k + 1) d``
   floats; see :mod:`fedpac_hf.optim._theta_forms`), with the largest ``t``,
   then the largest ``k`` that fit;
3. else longer sides as their diagonal alone (``d`` floats);
4. else only the sides up to ``t`` are preconditioned at all (longer sides get
   SOAP's plain Adam and send nothing).

Sophia's, Muon's and AdamW's Theta is as large as the parameters it
preconditions and has no compact form: a budget below 1 is refused for them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from fedpac_hf.optim import preconditioner_layout

from .state import trainable_parameters

__all__ = [
    "CURVATURE_FORMS",
    "LORA_SKETCH_COLUMNS",
    "MAX_SKETCH_COLUMNS",
    "lora_rank",
    "soap_theta_floats",
    "soap_theta_form",
    "theta_options",
]

CURVATURE_FORMS: tuple[str, ...] = ("auto", "full", "lora")

# Columns of the fixed-test-matrix sketch of curvature "lora" (the form chosen in
# benchmarks/LORA.md, section 2, before theta_budget): min(4, r - 2) beside the diagonal.
LORA_SKETCH_COLUMNS = 4

#: The budget never buys more sketch columns than this per long side.
MAX_SKETCH_COLUMNS = 32

# SOAP's layout settings and their defaults (they decide which sides have a statistic).
_LAYOUT_DEFAULTS = {"max_precond_dim": 10000, "merge_dims": False, "precondition_1d": False}


def lora_rank(model: torch.nn.Module) -> int | None:
    """The largest LoRA rank of a PEFT model's adapters (``None`` without adapters)."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        return None
    ranks = []
    for config in configs.values():
        rank = getattr(config, "r", None)
        if rank is None:
            continue
        ranks += [
            int(rank),
            *(int(r) for r in (getattr(config, "rank_pattern", None) or {}).values()),
        ]
    return max(ranks) if ranks else None


def _sides(shapes: Iterable[tuple[int, ...]], layout: Mapping[str, Any]) -> list[int]:
    """The lengths of every side that has a statistic, over all parameters."""
    sides = []
    for shape in shapes:
        view, rotated = preconditioner_layout(
            shape, layout["max_precond_dim"], layout["merge_dims"], layout["precondition_1d"]
        )
        sides += [d for d, on in zip(view, rotated, strict=True) if on]
    return sides


def soap_theta_floats(
    shapes: Iterable[tuple[int, ...]], options: Mapping[str, Any] | None = None
) -> int:
    """Floats of SOAP's Theta sent up per round, for parameters of ``shapes`` and ``options``.

    Counts a side ``d`` as ``d^2`` in full, ``(k + 1) d`` in the basis form,
    ``d`` / ``k d`` / ``(k + 1) d`` in the sketch form (diagonal and/or ``k``
    columns), and nothing when it is longer than ``max_precond_dim``.
    """
    options = dict(options or {})
    layout = {key: options.get(key, value) for key, value in _LAYOUT_DEFAULTS.items()}
    limit = options.get("theta_max_dim")
    k = int(options.get("theta_sketch_dim", 0))
    diagonal = bool(options.get("theta_diagonal", True))
    total = 0
    for d in _sides(shapes, layout):
        if limit is None or d <= limit:
            total += d * d
        else:
            total += min(k, d) * d + (d if diagonal else 0)
    return total


def soap_theta_form(
    shapes: Iterable[tuple[int, ...]],
    budget: float,
    layout: Mapping[str, Any] | None = None,
    steered: float = 1.0,
) -> dict[str, Any]:
    """SOAP options that fit Theta into ``budget`` times the parameters (see the module docstring).

    Parameters
    ----------
    shapes:
        The shapes of the trainable parameters.
    budget:
        Theta's floats up as a fraction of the parameters' floats (``> 0``).
    layout:
        SOAP's ``max_precond_dim``, ``merge_dims``, ``precondition_1d`` when
        the client options set them.
    steered:
        The fraction of the sketch columns the server steers to its basis's
        leading directions (rounded up; the rest are random every round).
        All of them by default: the steered columns led in screening runs on
        a validation split; on the test split of benchmarks/LORA.md (section
        "Theta budget") all, half and none steered measure alike.

    Returns
    -------
    dict
        ``{}`` when full Theta fits, else ``theta_max_dim``,
        ``theta_sketch_dim``, ``theta_compact``, ``theta_steered`` (or, for the
        cheapest forms, ``theta_diagonal`` / ``max_precond_dim``).

    Raises
    ------
    ValueError
        If not even the cheapest form fits, naming the smallest budget that does.
    """
    shapes = [tuple(int(d) for d in s) for s in shapes]
    layout = {**_LAYOUT_DEFAULTS, **dict(layout or {})}
    numel = sum(math.prod(s) for s in shapes)
    allowed = budget * numel
    if soap_theta_floats(shapes, layout) <= allowed:
        return {}
    sides = _sides(shapes, layout)
    thresholds = sorted({1, *sides})

    def fits(options: dict[str, Any]) -> bool:
        return soap_theta_floats(shapes, {**layout, **options}) <= allowed

    for t in reversed(thresholds):
        basis = {"theta_max_dim": t, "theta_compact": "basis", "theta_sketch_dim": 1}
        if fits(basis):
            longest_k = min([d - 1 for d in sides if d > t] + [MAX_SKETCH_COLUMNS])
            k = max(
                (
                    k
                    for k in range(1, max(longest_k, 1) + 1)
                    if fits({**basis, "theta_sketch_dim": k})
                ),
                default=1,
            )
            return {**basis, "theta_sketch_dim": k, "theta_steered": math.ceil(steered * k)}
    for t in reversed(thresholds):
        diagonal = {"theta_max_dim": t, "theta_sketch_dim": 0, "theta_diagonal": True}
        if fits(diagonal):
            return diagonal
    for t in sorted(set(sides), reverse=True):  # at least the shortest sides stay preconditioned
        if t < layout["max_precond_dim"] and fits({"max_precond_dim": t}):
            return {"max_precond_dim": t}
    shortest = min(sides)
    smallest = soap_theta_floats(shapes, {**layout, "max_precond_dim": shortest}) / numel
    raise ValueError(
        f"theta_budget={budget:g} is too small for any form of SOAP's Theta on this model: the "
        f"cheapest (only sides of length {shortest} preconditioned) needs {smallest:.3g}; raise "
        "theta_budget or use curvature='full'"
    )


def theta_options(
    model: torch.nn.Module,
    optimizer: str,
    curvature: str = "auto",
    theta_budget: float | None = None,
    optimizer_kwargs: Mapping[str, Any] | None = None,
    align: bool = True,
) -> dict[str, Any]:
    """Client-optimizer options that give Theta the form ``curvature`` and ``theta_budget`` ask for.

    ``"auto"`` (default) fits Theta into ``theta_budget`` times the trainable
    parameters (:func:`soap_theta_form`; ``None``: 1.0 with LoRA adapters, full
    Theta without); ``"full"`` sends every statistic as
    the optimizer keeps it; ``"lora"`` is the form sized by the LoRA rank before
    the budget existed (rank side in full, each longer side as its diagonal
    plus a ``min(4, r - 2)``-column sketch with a fixed test matrix), kept so
    that earlier benchmark commands reproduce. Client options the user sets
    win: merge ``optimizer_kwargs`` after the result; and once they name any
    ``theta_*`` option, ``"auto"`` derives nothing (the user's options alone
    define the form). Without alignment (``align=False``) Theta
    does not travel and keeps its full form (the server still averages it, as a
    diagnostic of the drift).

    Raises
    ------
    ValueError
        For an unknown ``curvature``, a ``theta_budget`` that is not a positive
        number, ``"lora"`` on a model without adapters, a budget below 1 for an
        optimizer without a compact Theta, or a budget too small for SOAP.
    """
    if curvature not in CURVATURE_FORMS:
        raise ValueError(f"curvature must be one of {CURVATURE_FORMS}, got {curvature!r}")
    rank = lora_rank(model)
    if theta_budget is None:  # adapters: as much curvature as adapter; else full Theta
        theta_budget = 1.0 if rank is not None else math.inf
    elif (
        isinstance(theta_budget, bool)
        or not isinstance(theta_budget, int | float)
        or not math.isfinite(theta_budget)
        or not theta_budget > 0
    ):
        raise ValueError(
            f"theta_budget (Theta's bytes up as a fraction of the trainable parameters') must "
            f"be a positive number, got {theta_budget!r}"
        )
    name = optimizer.lower()
    if curvature == "lora":
        if rank is None:
            raise ValueError(
                "curvature='lora' sizes Theta for LoRA adapters, but the model has none (no "
                "peft_config); use curvature='full' or 'auto', or train adapters (lora_r > 0)"
            )
        if name != "soap":
            return {}
        columns = min(LORA_SKETCH_COLUMNS, max(rank - 2, 0))
        return {"theta_max_dim": rank, "theta_sketch_dim": columns, "theta_diagonal": True}
    if curvature == "full" or name == "sgd" or not align or theta_budget == math.inf:
        return {}
    if name != "soap":
        if theta_budget < 1.0:
            raise ValueError(
                f"theta_budget={theta_budget:g}: client optimizer {optimizer!r} has no compact "
                "Theta (it is as large as the parameters it preconditions); use theta_budget "
                ">= 1, or client_optimizer soap"
            )
        return {}
    kwargs = dict(optimizer_kwargs or {})
    if any(key.startswith("theta_") for key in kwargs):
        return {}  # the user chose the form: theirs alone
    layout = {key: kwargs[key] for key in _LAYOUT_DEFAULTS if key in kwargs}
    shapes = [tuple(p.shape) for p in trainable_parameters(model).values()]
    return soap_theta_form(shapes, theta_budget, layout)
