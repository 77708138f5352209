"""Evaluating a global model: perplexity for language models, and a server-side evaluator.

:class:`~fedpac_hf.FedPACTrainer` evaluates with ``Trainer.evaluate``. A
server that holds only the global model (the Flower ServerApp) evaluates with
:func:`make_evaluator`, a plain ``transformers.Trainer`` over the evaluation
set: the same collator, ``compute_metrics`` and metric names, without any of
the federated training machinery.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fedpac_hf.rundir.resume import model_name

__all__ = ["Evaluator", "add_perplexity", "is_causal_lm", "make_evaluator"]

Evaluator = Callable[[torch.nn.Module], Mapping[str, float]]
"""``evaluate(model) -> {"eval_loss": ..., "eval_accuracy": ...}`` on the global model."""


def is_causal_lm(model: torch.nn.Module) -> bool:
    """Whether ``model`` (under any PEFT wrapper) is a causal language model."""
    return model_name(model).endswith("ForCausalLM") or type(model).__name__.endswith("ForCausalLM")


def add_perplexity(
    metrics: dict[str, float], model: torch.nn.Module, prefix: str = "eval"
) -> dict[str, float]:
    """Add ``{prefix}_perplexity = exp({prefix}_loss)`` for causal LMs; return what was added.

    The exponent is capped at 50 so that a diverged model logs a large
    finite number rather than ``inf``.
    """
    loss_key = f"{prefix}_loss"
    if loss_key not in metrics or not is_causal_lm(model):
        return {}
    added = {f"{prefix}_perplexity": math.exp(min(float(metrics[loss_key]), 50.0))}
    metrics.update(added)
    return added


def make_evaluator(
    args: Any,
    eval_dataset: Any,
    *,
    data_collator: Callable | None = None,
    compute_metrics: Callable | None = None,
    processing_class: Any = None,
) -> Evaluator:
    """An evaluator of global models on ``eval_dataset`` with ``Trainer.evaluate``.

    Parameters
    ----------
    args:
        The run's :class:`~fedpac_hf.FedPACArguments` (eval batch size,
        device, precision, ``remove_unused_columns``).
    eval_dataset:
        The evaluation data.
    data_collator, compute_metrics, processing_class:
        As for ``Trainer``.

    Returns
    -------
    Evaluator
        ``evaluate(model)`` returning ``eval_loss``, ``compute_metrics``'
        entries (prefixed ``eval_``) and, for causal LMs, ``eval_perplexity``.
    """
    from transformers import Trainer, TrainingArguments

    options = {
        key: getattr(args, key)
        for key in (
            "output_dir",
            "per_device_eval_batch_size",
            "bf16",
            "use_cpu",
            "remove_unused_columns",
            "dataloader_num_workers",
            "dataloader_pin_memory",  # FedPACArguments turns it off without an accelerator
            "seed",
        )
    }
    eval_args = TrainingArguments(**options, report_to=[], disable_tqdm=True)
    trainers: dict[int, Any] = {}

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        key = id(model)
        if key not in trainers:
            trainers.clear()
            trainers[key] = Trainer(
                model=model,
                args=eval_args,
                eval_dataset=eval_dataset,
                data_collator=data_collator,
                compute_metrics=compute_metrics,
                processing_class=processing_class,
            )
        metrics = trainers[key].evaluate()
        add_perplexity(metrics, model)
        return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}

    return evaluate
