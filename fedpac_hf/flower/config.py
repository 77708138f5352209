"""Configuration shared by the FedPAC ServerApp and ClientApp.

Both apps are configured exactly like :class:`~fedpac_hf.FedPACTrainer`: a
:class:`~fedpac_hf.FedPACArguments` and a *trainer factory*, a callable that
builds the trainer (model, data, collator, metrics) from those arguments. The
arguments either come from Python or from Flower's run config
(``[tool.flwr.app.config]`` in the app's ``pyproject.toml``, overridable with
``flwr run --run-config``), whose keys are the argument names with ``-`` or
``_`` (``num-rounds = 5``, ``learning-rate = 3e-3``).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

from fedpac_hf.arguments import FedPACArguments
from fedpac_hf.trainer import FedPACTrainer

__all__ = ["TrainerFactory", "arguments_from_run_config", "argument_names"]

TrainerFactory = Callable[[FedPACArguments], FedPACTrainer]
"""Builds the :class:`FedPACTrainer` (model + data) that a run's arguments describe.

The ServerApp calls it once (initial parameters, learning-rate schedule,
evaluation, checkpoints) and every ClientApp process calls it once (its
partition, its local steps). It must build the same model with the same
initial weights everywhere, e.g. from a config with a fixed seed, or from a
pretrained checkpoint.
"""

# Fields of TrainingArguments whose JSON-looking string values must be decoded.
_JSON_FIELDS = {"client_optimizer_kwargs", "lr_scheduler_kwargs", "report_to"}


def argument_names() -> set[str]:
    """Names of every :class:`FedPACArguments` field (``TrainingArguments``' included)."""
    return {f.name for f in dataclasses.fields(FedPACArguments) if f.init}


def arguments_from_run_config(run_config: Mapping[str, Any], **overrides: Any) -> FedPACArguments:
    """Build :class:`FedPACArguments` from a Flower run config.

    Keys that name a ``FedPACArguments`` field (``-`` read as ``_``) become
    that field; other keys are left to the app (e.g. which dataset to load).
    Defaults that suit a federated app: no ``report_to`` integration, no
    progress bars and a temporary ``output_dir`` when none is given.

    Parameters
    ----------
    run_config:
        ``context.run_config`` of a ServerApp or ClientApp, or any mapping.
    **overrides:
        Fields set last, over the run config.

    Returns
    -------
    FedPACArguments
        Validated arguments (a bad value raises ``ValueError`` naming the field).
    """
    names = argument_names()
    kwargs: dict[str, Any] = {"report_to": [], "disable_tqdm": True}
    for key, value in run_config.items():
        name = key.replace("-", "_")
        if name not in names:
            continue
        if name in _JSON_FIELDS and isinstance(value, str) and value.strip()[:1] in "{[":
            value = json.loads(value)
        kwargs[name] = value
    kwargs.update(overrides)
    if not kwargs.get("output_dir"):
        kwargs["output_dir"] = tempfile.mkdtemp(prefix="fedpac-flower-")
    return FedPACArguments(**kwargs)
