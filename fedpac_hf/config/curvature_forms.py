"""The ``curvature`` setting: which form of Theta a client's optimizer sends.

``"full"`` sends every statistic as the optimizer keeps it; ``"lora"`` (and
``"auto"`` on a PEFT model) keeps Theta about the size of the LoRA adapters by
sending each long side of a SOAP statistic in a compact form
(:mod:`fedpac_hf.optim._theta_forms`). :func:`curvature_options` turns the
setting and the model into client-optimizer options.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["CURVATURE_FORMS", "LORA_SKETCH_COLUMNS", "curvature_options", "lora_rank"]

CURVATURE_FORMS: tuple[str, ...] = ("auto", "full", "lora")

# Columns of the Nystroem sketch a LoRA factor's long side (the d of a d x r factor)
# sends with curvature "lora" (and "auto" on a PEFT model), beside its diagonal:
# min(4, r - 2). Chosen on the validation split of benchmarks/LORA.md (section 2):
# the best form that sends at most as much curvature as adapter (cheaper forms lose
# most of FedPAC's gain there); fewer columns at small ranks keep Theta below the
# adapter's size.
LORA_SKETCH_COLUMNS = 4


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


def curvature_options(form: str, optimizer: str, model: torch.nn.Module) -> dict[str, Any]:
    """Client-optimizer options that give Theta the ``curvature`` form asked for.

    ``"lora"`` (and ``"auto"`` on a PEFT model) keeps SOAP's statistics of the
    sides no longer than the LoRA rank r (a factor's rank side) in full and
    sends every longer side as its diagonal plus a k-column Nystroem sketch of
    its statistic, k = min(4, r - 2) (:data:`LORA_SKETCH_COLUMNS`): Theta is
    then r^2 + (k + 1) d floats per d x r factor instead of r^2 + d^2, that is
    r/d + (k + 1)/r of the factor (0.66 at r = 8, d = 256; 0.32 at r = 16,
    d = 4096; 0.88 at r = 4, d = 32). Client options given by the user
    (``client_optimizer_kwargs``, e.g. ``theta_sketch_dim``) override these. Sophia's and Muon's Theta is
    already the adapters' size and does not change.

    Raises
    ------
    ValueError
        For ``"lora"`` on a model without LoRA adapters.
    """
    if form not in CURVATURE_FORMS:
        raise ValueError(f"curvature must be one of {CURVATURE_FORMS}, got {form!r}")
    rank = lora_rank(model)
    if form == "lora" and rank is None:
        raise ValueError(
            "curvature='lora' sizes Theta for LoRA adapters, but the model has none (no "
            "peft_config); use curvature='full' or 'auto', or train adapters (lora_r > 0)"
        )
    if form == "full" or rank is None or optimizer.lower() != "soap":
        return {}
    columns = min(LORA_SKETCH_COLUMNS, max(rank - 2, 0))
    return {"theta_max_dim": rank, "theta_sketch_dim": columns, "theta_diagonal": True}
