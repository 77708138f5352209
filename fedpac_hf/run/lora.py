"""LoRA adapters for a run: which layers get them, and applying them with PEFT.

By default the adapters go on the attention query and value projections of
the model actually loaded, whatever the installed transformers names them
(``q_proj``/``v_proj`` for Llama and, since transformers 5, ViT;
``query``/``value`` for BERT); ``lora_target_modules`` overrides that, and a
target that matches nothing is refused with the model's linear layers listed.
"""

from __future__ import annotations

import warnings
from typing import Any

from .config import ModelDataArguments

__all__ = [
    "ATTENTION_PROJECTIONS",
    "apply_lora",
    "check_lora_rank",
    "default_lora_targets",
    "linear_layer_names",
]


# Attention projections under the names transformers gives them, most specific first:
# the query and value projections, as in the LoRA paper (fused projections: the fused one).
ATTENTION_PROJECTIONS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "v_proj"),  # Llama, Mistral, OPT, ViT in transformers >= 5
    ("query", "value"),  # BERT, RoBERTa, MiniLM, ViT before transformers 5
    ("q_lin", "v_lin"),  # DistilBERT
    ("q", "v"),  # T5
    ("c_attn",),  # GPT-2 (fused, Conv1D)
    ("qkv_proj",),
    ("Wqkv",),
    ("qkv",),
)


def linear_layer_names(model: Any) -> list[str]:
    """The distinct last names of the model's linear layers (what LoRA can target)."""
    import torch

    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if name and (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D")
    }
    return sorted(names)


def default_lora_targets(model: Any) -> list[str]:
    """The model's attention query/value projections, whatever this transformers names them.

    Raises
    ------
    ValueError
        If the model has none of the known names; the message lists its
        linear layers, to choose ``lora_target_modules`` from.
    """
    present = set(linear_layer_names(model))
    for names in ATTENTION_PROJECTIONS:
        if set(names) <= present:
            return list(names)
    raise ValueError(
        f"no attention projection of {type(model).__name__} has a name LoRA defaults know; set "
        f"lora_target_modules to some of its linear layers: {', '.join(sorted(present))}"
    )


def check_lora_rank(model: Any, targets: list[str], rank: int) -> None:
    """Refuse a LoRA rank above the smaller side of a layer it adapts.

    An adapter of rank ``r`` on a ``d_out x d_in`` layer has ``r (d_in + d_out)``
    parameters; above ``min(d_in, d_out)`` it adds parameters (and upload
    bytes) without adding anything the layer could express.

    Raises
    ------
    ValueError
        Naming ``lora_r``, the narrowest targeted layer and the largest rank it takes.
    """
    sides = [
        (min(module.weight.shape), name)
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in targets
        and getattr(module, "weight", None) is not None
        and module.weight.ndim == 2
    ]
    if sides and rank > min(sides)[0]:
        width, name = min(sides)
        raise ValueError(
            f"lora_r={rank} is larger than the narrowest layer it adapts ({name}, "
            f"{'x'.join(map(str, dict(model.named_modules())[name].weight.shape))}): a rank above "
            f"min(in, out) adds parameters without adding capacity; use lora_r <= {width}"
        )


def apply_lora(model: Any, margs: ModelDataArguments, task_type: str | None) -> Any:
    """``model`` with LoRA adapters as ``margs`` says (``lora_r``, targets, ``modules_to_save``)."""
    from peft import LoraConfig, get_peft_model

    targets = margs.lora_targets() or default_lora_targets(model)
    check_lora_rank(model, targets, margs.lora_r)
    config = LoraConfig(
        r=margs.lora_r,
        lora_alpha=margs.lora_alpha if margs.lora_alpha is not None else 2 * margs.lora_r,
        lora_dropout=margs.lora_dropout,
        target_modules=targets,
        modules_to_save=margs.lora_saved_modules(),
        task_type=task_type,
    )
    try:
        with warnings.catch_warnings():
            # peft (0.21) reads transformers' deprecated is_gradient_checkpointing while
            # wrapping: a notice about two libraries' internals that no setting changes
            warnings.filterwarnings(
                "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
            )
            return get_peft_model(model, config)
    except ValueError as err:
        if "target" not in str(err).lower():
            raise
        raise ValueError(
            f"lora_target_modules={','.join(targets)!r} matches no layer of "
            f"{type(model).__name__}; its linear layers are named "
            f"{', '.join(linear_layer_names(model))}"
        ) from None
