"""Configuration shared by the FedPAC ServerApp and ClientApp.

Both apps read the same :class:`~fedpac_hf.FedPACArguments`, from Python or
from Flower's run config (``[tool.flwr.app.config]`` in the app's
``pyproject.toml``, overridable with ``flwr run --run-config``), whose keys
are the argument names with ``-`` or ``_`` (``num-rounds = 5``,
``learning-rate = 3e-3``); other keys are the app's own (e.g. which dataset).

What each side builds from them is given as a factory called with
``(args, run_config)``:

- the ClientApp: a :data:`TrainerFactory`, the :class:`~fedpac_hf.FedPACTrainer`
  whose client step trains the node's partition;
- the ServerApp: a :data:`ModelFactory` (the global model: initial
  parameters, the model files of checkpoints) and optionally an
  :data:`EvaluatorFactory` (centralised evaluation). The server needs neither
  the training data nor a trainer.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from fedpac_hf.config.arguments import FedPACArguments
from fedpac_hf.config.validation import closest_name
from fedpac_hf.trainer.evaluation import Evaluator

if TYPE_CHECKING:  # the server side never imports the trainer
    from fedpac_hf.federated import ClientUpdate, RoundPlan
    from fedpac_hf.trainer.fedpac_trainer import FedPACTrainer

__all__ = [
    "FLOWER_SETTINGS",
    "EvaluatorFactory",
    "ModelFactory",
    "PublicCurvatureFactory",
    "TrainerFactory",
    "argument_names",
    "arguments_from_run_config",
    "flower_setting",
]

RunConfig = Mapping[str, Any]

TrainerFactory = Callable[[FedPACArguments, RunConfig], "FedPACTrainer"]
"""``build_trainer(args, run_config)``: the client side's :class:`FedPACTrainer` (model + data).

Every ClientApp process calls it once per run; the node trains
``trainer.client_dataset(partition_id)``. It must build the same model with
the same initial weights as the server's :data:`ModelFactory` (e.g. from a
config with a fixed seed, or from a pretrained checkpoint).
"""

ModelFactory = Callable[[FedPACArguments, RunConfig], torch.nn.Module]
"""``build_model(args, run_config)``: the global model on the server (same trainable parameters)."""

EvaluatorFactory = Callable[[FedPACArguments, RunConfig], Evaluator]
"""``build_evaluator(args, run_config)``: ``evaluate(model) -> metrics`` on the server
(e.g. :func:`fedpac_hf.trainer.evaluation.make_evaluator` over a held-out set)."""

PublicCurvatureFactory = Callable[
    [FedPACArguments, RunConfig],
    Callable[["RoundPlan"], "ClientUpdate | Sequence[ClientUpdate]"],
]
"""``build_public_curvature(args, run_config)``: the server's Theta for ``public_curvature``.

Returns ``train_public(plan)``, the client rule on the server's public data
from the round's state (one update or several; the mean of their Theta becomes
the next global Theta), e.g. ``build_trainer(args, run_config, public_rows).train_public``
with a :class:`FedPACTrainer` given ``curvature_dataset=public_rows``.
"""

FLOWER_SETTINGS: dict[str, float] = {"round-timeout": 3600.0, "node-wait-timeout": 120.0}
"""Run-config keys of the apps themselves, with their defaults (seconds).

``round-timeout``: how long a round waits for its replies (later ones are
dropped, ``NoReply``); ``node-wait-timeout``: how long a round waits for the
nodes of its sampled partitions to connect (a partition whose node is still
missing then is dropped, ``NotConnected``). Both apps accept them; the
ServerApp uses them.
"""

# Fields of TrainingArguments whose JSON-looking string values must be decoded.
_JSON_FIELDS = {"client_optimizer_kwargs", "lr_scheduler_kwargs", "report_to"}


def argument_names() -> set[str]:
    """Names of every :class:`FedPACArguments` field (``TrainingArguments``' included)."""
    return {f.name for f in dataclasses.fields(FedPACArguments) if f.init}


def arguments_from_run_config(
    run_config: Mapping[str, Any], app_settings: Iterable[str] = (), **overrides: Any
) -> FedPACArguments:
    """Build :class:`FedPACArguments` from a Flower run config.

    Keys that name a ``FedPACArguments`` field (``-`` read as ``_``) become
    that field, read like YAML and command-line values (``local-steps = 2.5``
    is refused). Keys in ``app_settings`` are the app's own (e.g. which
    dataset) and are left to it; any other key is a mistake, refused with the
    closest valid name. Defaults that suit a federated app: no ``report_to``
    integration, no progress bars and a temporary ``output_dir`` when none is
    given.

    Parameters
    ----------
    run_config:
        ``context.run_config`` of a ServerApp or ClientApp, or any mapping.
    app_settings:
        The app's own run-config keys (written with ``-`` or ``_``).
    **overrides:
        Fields set last, over the run config.

    Returns
    -------
    FedPACArguments
        Validated arguments (a bad value raises ``ValueError`` naming the field).

    Raises
    ------
    ValueError
        For a key that is neither a field nor an app setting, or a bad value.
    """
    names = argument_names()
    app = {key.replace("-", "_") for key in app_settings}
    own = app | {key.replace("-", "_") for key in FLOWER_SETTINGS}
    kwargs: dict[str, Any] = {"report_to": [], "disable_tqdm": True}
    for key, value in run_config.items():
        name = key.replace("-", "_")
        if name in own:
            continue
        if name not in names:
            close = closest_name(name, names | own)
            hint = f"; did you mean {close.replace('_', '-')!r}?" if close else ""
            raise ValueError(
                f"unknown run-config key {key!r}{hint} (keys are FedPACArguments fields written "
                f"with - or _, {' and '.join(FLOWER_SETTINGS)}, plus the app's own: "
                f"{sorted(app) or 'none'})"
            )
        if name in _JSON_FIELDS and isinstance(value, str) and value.strip()[:1] in "{[":
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise ValueError(f"run-config key {key!r} is not valid JSON ({err})") from None
        kwargs[name] = value
    kwargs.update(overrides)
    if not kwargs.get("output_dir"):
        kwargs["output_dir"] = tempfile.mkdtemp(prefix="fedpac-flower-")
    return FedPACArguments(**kwargs)


def flower_setting(run_config: Mapping[str, Any], key: str, default: float | None = None) -> float:
    """A positive number of seconds from the run config (one of :data:`FLOWER_SETTINGS`).

    Parameters
    ----------
    run_config:
        ``context.run_config``.
    key:
        The key, written with ``-``.
    default:
        Used when the run config does not have the key (default: :data:`FLOWER_SETTINGS`').

    Raises
    ------
    ValueError
        If the value is not a positive number, naming the key.
    """
    value = run_config.get(key, run_config.get(key.replace("-", "_")))
    if value is None:
        return float(FLOWER_SETTINGS[key] if default is None else default)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if isinstance(value, bool) or not seconds > 0 or seconds == float("inf"):
        raise ValueError(
            f"run-config key {key!r} must be a positive number of seconds, got {value!r}"
        )
    return seconds
