"""Resumable federated checkpoints: safetensors + JSON, written atomically.

A checkpoint directory holds

- ``fedpac_state.safetensors``: the global trainable parameters, the global
  curvature Theta and the global direction g_G, under the prefixes
  ``params::``, ``curvature::`` and ``direction::``;
- ``fedpac_state.json``: the round, the algorithm, the run's identity (model
  parameter names and shapes, number of clients, seed, partition) and the
  per-round metrics so far;
- whatever ``save_model`` writes (the model or the PEFT adapter), so that a
  checkpoint is also a loadable model.

Everything is written to a temporary sibling directory and renamed into place,
so a process killed at any moment leaves either the previous checkpoint or the
new one, never half of one. Nothing is unpickled when loading.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedpac_hf.federated.state import ServerState

__all__ = [
    "STATE_TENSORS",
    "STATE_JSON",
    "save_federated_checkpoint",
    "load_federated_checkpoint",
    "latest_checkpoint",
]

STATE_TENSORS = "fedpac_state.safetensors"
STATE_JSON = "fedpac_state.json"
CHECKPOINT_PREFIX = "checkpoint-round-"
FORMAT_VERSION = 1
_PARTS = ("params", "curvature", "direction")


def save_federated_checkpoint(
    directory: str | os.PathLike[str],
    state: ServerState,
    metadata: dict[str, Any],
    save_model: Callable[[str], None] | None = None,
) -> Path:
    """Write ``state`` (+ ``metadata`` + optionally the model) atomically to ``directory``.

    Returns the final path. An existing checkpoint at that path is replaced.
    """
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        tensors: dict[str, torch.Tensor] = {}
        for part in _PARTS:
            for name, t in (getattr(state, part) or {}).items():
                tensors[f"{part}::{name}"] = t.detach().to("cpu").contiguous()
        save_file(tensors, str(tmp / STATE_TENSORS), metadata={"format": "fedpac_hf"})
        doc = {
            "format_version": FORMAT_VERSION,
            "round": state.round,
            "has_curvature": state.curvature is not None,
            "has_direction": state.direction is not None,
            **metadata,
        }
        (tmp / STATE_JSON).write_text(json.dumps(doc, indent=2, sort_keys=True))
        if save_model is not None:
            save_model(str(tmp))
        if final.exists():
            old = final.with_name(f".old-{final.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_federated_checkpoint(directory: str | os.PathLike[str]) -> tuple[ServerState, dict]:
    """Read a checkpoint written by :func:`save_federated_checkpoint`.

    Raises ``FileNotFoundError`` if a file is missing and ``ValueError`` naming
    the file if it is truncated or corrupt.
    """
    path = Path(directory)
    json_path, tensor_path = path / STATE_JSON, path / STATE_TENSORS
    for f in (json_path, tensor_path):
        if not f.is_file():
            raise FileNotFoundError(
                f"{f} not found: {path} is not a fedpac_hf checkpoint (or it is incomplete)"
            )
    try:
        metadata = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{json_path} is corrupt or truncated ({err})") from None
    if not isinstance(metadata, dict) or metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{json_path} is not a fedpac_hf checkpoint of format {FORMAT_VERSION}")
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{tensor_path} is corrupt or truncated ({err})") from None
    parts: dict[str, dict[str, torch.Tensor]] = {p: {} for p in _PARTS}
    for key, t in tensors.items():
        part, _, name = key.partition("::")
        if part not in parts or not name:
            raise ValueError(f"{tensor_path} holds an unexpected entry {key!r}")
        parts[part][name] = t
    state = ServerState(
        params=parts["params"],
        curvature=parts["curvature"] if metadata.get("has_curvature") else None,
        direction=parts["direction"] if metadata.get("has_direction") else None,
        round=int(metadata["round"]),
    )
    return state, metadata


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint of the highest round under ``output_dir``, if any."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith(CHECKPOINT_PREFIX) and (d / STATE_JSON).is_file():
            suffix = d.name[len(CHECKPOINT_PREFIX) :]
            if suffix.isdigit():
                found.append((int(suffix), d))
    return max(found)[1] if found else None
