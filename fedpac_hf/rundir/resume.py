"""Resuming a run: what must match, and the one path that finds, reads and checks a checkpoint.

A checkpoint (:mod:`fedpac_hf.rundir.checkpoint`) records the identity of the run
that wrote it (:func:`run_identity`: model class, algorithm, number of
clients, sampling seed, partition, trainable parameter shapes). A run that
resumes calls :func:`load_resumable_checkpoint`, which finds the checkpoint
(``resume_from_checkpoint``: a path, or true for the latest under
``output_dir``), reads it and refuses one written by another run, naming the
setting that differs (:func:`check_resumable`). ``FedPACTrainer`` and the
Flower ServerApp both resume through it, then build their round engine from
the state and history it returns.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedpac_hf.federated.state import ServerState
from fedpac_hf.rundir.checkpoint import (
    CHECKPOINT_PREFIX,
    STATE_JSON,
    STATE_TENSORS,
    latest_checkpoint,
    load_federated_checkpoint,
)

__all__ = ["check_resumable", "load_resumable_checkpoint", "model_name", "run_identity"]


def load_resumable_checkpoint(
    checkpoint: str | bool | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    identity: Mapping[str, Any],
    num_rounds: int,
    setting_names: Mapping[str, str] | None = None,
) -> tuple[Path, ServerState, dict]:
    """Find, read and check the checkpoint a run resumes from (``resume_from_checkpoint``).

    The one resume path of the package: ``FedPACTrainer`` and the Flower
    ServerApp both call it, then build their round engine from the state
    and history it returns.

    Parameters
    ----------
    checkpoint:
        A checkpoint directory, or ``True`` (also ``"true"`` / ``"latest"``
        when no such path exists) for the latest complete one under ``output_dir``.
    output_dir:
        The run directory searched for the latest checkpoint.
    identity:
        This run's identity (:func:`run_identity`); the checkpoint's must match.
    num_rounds:
        The run's number of rounds; a checkpoint past it is refused.
    setting_names:
        See :func:`check_resumable`.

    Returns
    -------
    (path, state, metadata)
        The checkpoint's directory, its global state and its JSON metadata
        (``metadata["history"]`` holds the metrics of the rounds done).

    Raises
    ------
    FileNotFoundError
        If ``checkpoint`` is ``True`` and ``output_dir`` holds no checkpoint,
        or the named checkpoint is missing or incomplete.
    ValueError
        If the checkpoint is corrupt, past ``num_rounds``, or from another run
        (the message names the setting that differs).
    """
    if isinstance(checkpoint, str) and checkpoint.strip().lower() in ("true", "latest"):
        if not Path(checkpoint).exists():  # `--resume_from_checkpoint true` on a command line
            checkpoint = True
    if checkpoint is True:
        found = latest_checkpoint(output_dir)
        if found is None:
            raise FileNotFoundError(
                f"resume_from_checkpoint=True but {output_dir} holds no {CHECKPOINT_PREFIX}* "
                "checkpoint (save them with save_strategy='steps' and save_steps)"
            )
        checkpoint = found
    path = Path(checkpoint)
    state, metadata = load_federated_checkpoint(path)
    if state.round > num_rounds:
        raise ValueError(
            f"cannot resume from {path}: it is at round {state.round}, past "
            f"num_rounds={num_rounds}; raise num_rounds to continue the run"
        )
    check_resumable(path, metadata.get("run", {}), identity, state, setting_names)
    return path, state, metadata


def model_name(model: torch.nn.Module) -> str:
    """The class name of the model under any PEFT or Accelerate wrapper (e.g. ``ViTForImageClassification``)."""
    model = getattr(model, "module", model)
    base = getattr(getattr(model, "base_model", None), "model", model)
    return type(base).__name__


def run_identity(
    *,
    model: torch.nn.Module,
    algorithm: Any,
    num_clients: int,
    seed: int,
    partition: Mapping[str, Any] | None,
    params: Mapping[str, torch.Tensor],
    training: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed by a run.

    Parameters
    ----------
    model:
        The run's model (its class is recorded).
    algorithm:
        The run's :class:`~fedpac_hf.federated.Algorithm`.
    num_clients:
        Clients in the federation.
    seed:
        The seed of client sampling.
    partition:
        How the training data was split: the partitioner's settings and the
        clients' sizes (``None`` when the clients were given as datasets and
        only their sizes are known, which then sit here too).
    params:
        The global trainable parameters (their names and shapes are recorded).
    training:
        The settings every round trains with (clients per round, local steps,
        learning rate and its schedule, the client optimizer's options, ...):
        a resume that changes one would leave a run directory whose first
        rounds no longer match its record. Checkpoints written before this
        was recorded resume without the check.

    Returns
    -------
    dict
        JSON-serialisable identity, stored under ``"run"`` in the checkpoint's JSON.
    """
    return {
        "model": model_name(model),
        "algorithm": algorithm.name,
        "client_optimizer": algorithm.optimizer,
        "beta": algorithm.beta,
        "align": algorithm.align,
        "num_clients": int(num_clients),
        "seed": int(seed),
        "partition": dict(partition) if partition is not None else None,
        "param_shapes": {n: list(t.shape) for n, t in params.items()},
        "training": json.loads(json.dumps(dict(training or {}), default=str)),
    }


def check_resumable(
    checkpoint: str | os.PathLike[str],
    saved: Mapping[str, Any],
    expected: Mapping[str, Any],
    state: ServerState,
    setting_names: Mapping[str, str] | None = None,
) -> None:
    """Refuse to resume a checkpoint made by another run, naming what differs.

    Parameters
    ----------
    checkpoint:
        The checkpoint's directory (for the message).
    saved:
        The checkpoint's run identity (its JSON's ``"run"``).
    expected:
        This run's identity (:func:`run_identity`).
    state:
        The checkpoint's loaded state (its tensors must match its JSON).
    setting_names:
        How a partition entry is called in the user's settings, e.g.
        ``{"alpha": "dirichlet_alpha"}``, so the message names the setting to change.

    Raises
    ------
    ValueError
        If a part of the identity differs, or the checkpoint's tensors do not
        match its own JSON (a corrupt checkpoint).
    """
    names = setting_names or {}
    for key, value in expected.items():
        if saved.get(key) == value or (key == "training" and key not in saved):
            continue
        old = saved.get(key)
        if key == "param_shapes":
            detail = _shape_difference(old or {}, value)
        elif isinstance(value, dict) and isinstance(old, dict):
            detail = ", ".join(
                f"{names.get(k, k)}: checkpoint has {_short(old.get(k))}, "
                f"this run has {_short(value.get(k))}"
                for k in sorted(set(old) | set(value))
                if old.get(k) != value.get(k)
            )
        else:
            detail = f"checkpoint has {_short(old)}, this run has {_short(value)}"
        raise ValueError(
            f"cannot resume from {checkpoint}: {key} differs ({detail}); resume with the same "
            "model, algorithm, data, partition and training settings, or start a new output_dir"
        )
    actual = {n: list(t.shape) for n, t in state.params.items()}
    if actual != expected["param_shapes"]:
        raise ValueError(
            f"cannot resume from {checkpoint}: its {STATE_TENSORS} does not match its "
            f"{STATE_JSON} ({_shape_difference(actual, expected['param_shapes'])}); the "
            "checkpoint is corrupt, resume from an earlier one"
        )


def _short(value: Any) -> str:
    """A value for a message: lists of client sizes are summarised."""
    if isinstance(value, list) and len(value) > 6:
        return f"{len(value)} entries starting {value[:4]!r}"
    return repr(value)


def _shape_difference(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """Name the first trainable parameter that differs between a checkpoint and this model."""
    only_saved = sorted(set(saved) - set(current))
    only_current = sorted(set(current) - set(saved))
    if only_saved or only_current:
        parts = []
        if only_saved:
            parts.append(f"only the checkpoint has {only_saved[:3]}")
        if only_current:
            parts.append(f"only this model has {only_current[:3]}")
        return "trainable parameters differ: " + ", ".join(parts)
    for name in sorted(current):
        if list(saved[name]) != list(current[name]):
            return (
                f"parameter {name!r} has shape {list(saved[name])} in the checkpoint and "
                f"{list(current[name])} in this model"
            )
    return "shapes differ"
