"""``create_optimizer``: build any client optimizer by name with sensible parameter groups.

The federated core and the trainers call this one function, so every optimizer
gets the same grouping rules: only ``requires_grad`` parameters (with PEFT/LoRA:
only the adapters and ``modules_to_save``), passed by name so that Theta's keys
are stable, and no weight decay on biases, normalisation weights (LayerNorm,
RMSNorm, BatchNorm, GroupNorm, any module whose class name ends in ``Norm``)
or any other parameter with fewer than two dimensions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .adamw import AdamW
from .base import CurvatureOptimizer
from .muon import Muon, is_muon_matrix, muon_matrix_names
from .options import check_options
from .sgd import SGD
from .soap import SOAP
from .sophia import Sophia

__all__ = ["OPTIMIZERS", "create_optimizer", "curvature_retention", "no_weight_decay_names"]

#: Registry of the client optimizers ``create_optimizer`` can build, by name.
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": SGD,
    "adamw": AdamW,
    "soap": SOAP,
    "sophia": Sophia,
    "muon": Muon,
}

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters of ``model`` that must not be weight-decayed.

    Biases, every parameter of a normalisation module (torch's norms and any
    module whose class name ends in ``Norm``, such as ``LlamaRMSNorm``), and
    every parameter with fewer than two dimensions.
    """
    names: set[str] = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm")
        for param_name, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if is_norm or param_name == "bias" or p.ndim < 2:
                names.add(full)
    return names


def create_optimizer(
    name: str,
    model_or_named_params: nn.Module | Iterable[tuple[str, torch.Tensor]],
    lr: float,
    weight_decay: float = 0.0,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Build the client optimizer ``name`` for the trainable parameters of a model.

    Parameters
    ----------
    name : str
        One of ``"sgd"``, ``"adamw"``, ``"soap"``, ``"sophia"``, ``"muon"``
        (case-insensitive); see :data:`OPTIMIZERS`.
    model_or_named_params : nn.Module or iterable of (str, Tensor)
        The model (preferred: module types tell which weights are norms and, for
        Muon, which are embeddings/heads) or its ``named_parameters()``.
    lr : float
        Learning rate (every parameter group's ``lr``, so LR schedulers scale it).
    weight_decay : float
        Decoupled weight decay of the matrix parameters; biases, norm weights and
        1-D parameters get 0.
    **kwargs
        Optimizer-specific options (for instance ``betas``, ``max_precond_dim``,
        ``hessian_update_interval``, ``momentum``).

    Returns
    -------
    torch.optim.Optimizer
        An optimizer that is also a :class:`~fedpac_hf.optim.base.CurvatureOptimizer`.

    Raises
    ------
    ValueError
        Unknown ``name`` (the message lists the valid ones) or no trainable parameter.
        Also an option the optimizer does not take, or a value out of its
        range (:data:`~fedpac_hf.optim.options.OPTIONS`; the message names it).
    """
    key, cls = _registered(name)
    check_options(key, kwargs, setting="optimizer_kwargs")  # torch's own optimizers too

    model = model_or_named_params if isinstance(model_or_named_params, nn.Module) else None
    named = list(model.named_parameters() if model is not None else model_or_named_params)
    trainable = [(n, p) for n, p in named if p.requires_grad]
    if not trainable:
        raise ValueError("create_optimizer: the model has no parameter with requires_grad=True")
    if model is not None:
        exempt = no_weight_decay_names(model)
    else:
        exempt = {
            n for n, p in trainable if p.ndim < 2 or n.endswith("bias") or "norm" in n.lower()
        }

    decay = [(n, p) for n, p in trainable if n not in exempt]
    no_decay = [(n, p) for n, p in trainable if n in exempt]
    groups: list[dict[str, Any]] = []
    if key == "muon":
        hidden = (
            muon_matrix_names(model)
            if model is not None
            else {n for n, p in trainable if is_muon_matrix(n, p)}
        )
        for members, wd in ((decay, weight_decay), (no_decay, 0.0)):
            matrices = [(n, p) for n, p in members if n in hidden]
            others = [(n, p) for n, p in members if n not in hidden]
            groups += [
                {"params": ps, "weight_decay": wd, "use_muon": flag}
                for ps, flag in ((matrices, True), (others, False))
                if ps
            ]
    else:
        groups = [
            {"params": ps, "weight_decay": wd}
            for ps, wd in ((decay, weight_decay), (no_decay, 0.0))
            if ps
        ]
    optimizer = cls(groups, lr=lr, weight_decay=weight_decay, **kwargs)
    assert isinstance(optimizer, CurvatureOptimizer)
    return optimizer


def curvature_retention(name: str, options: Mapping[str, Any], num_steps: int) -> float:
    """The share of an imported Theta that optimizer ``name`` still exports after ``num_steps``.

    :meth:`CurvatureOptimizer.curvature_retention` of the registered class
    (:data:`OPTIMIZERS`), with ``options`` as :func:`create_optimizer` gets them;
    1.0 for an optimizer without curvature (its Theta is empty).

    Raises
    ------
    ValueError
        Unknown ``name``.
    """
    _, cls = _registered(name)
    if not issubclass(cls, CurvatureOptimizer):  # narrows the type: all registered ones are
        return 1.0
    return cls.curvature_retention(options, num_steps)


def _registered(name: str) -> tuple[str, type[torch.optim.Optimizer]]:
    """``name``'s registry key (case-insensitive) and class; ``ValueError`` listing the valid
    names when it is unknown."""
    key = name.lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {sorted(OPTIMIZERS)}")
    return key, OPTIMIZERS[key]
