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

Everything, the model files included, is written to a temporary sibling
directory, flushed to disk and renamed into place, so a process killed at any
moment leaves either the previous checkpoint or the new one, never half of one
(a half-written temporary directory is ignored and removed by the next save).
A state with a non-finite tensor is refused, so a diverged run never replaces
a good checkpoint. Loading reads only safetensors and JSON: nothing is
unpickled, and a truncated, corrupt or incomplete checkpoint fails with a
message naming the file.
"""

from __future__ import annotations

import json
import math
import os
import re
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
    "CHECKPOINT_PREFIX",
    "STATE_TENSORS",
    "STATE_JSON",
    "latest_checkpoint",
    "load_federated_checkpoint",
    "rotate_checkpoints",
    "save_federated_checkpoint",
]

STATE_TENSORS = "fedpac_state.safetensors"
STATE_JSON = "fedpac_state.json"
CHECKPOINT_PREFIX = "checkpoint-round-"
FORMAT_VERSION = 1
_OLD = ".old-"
_PARTS = ("params", "curvature", "direction")


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` and the directories themselves to disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - e.g. Windows
        pass
    finally:
        os.close(fd)


def _temporary_prefix(name: str) -> str:
    base = CHECKPOINT_PREFIX if name.startswith(CHECKPOINT_PREFIX) else name
    return f".tmp-{base}"


def _require_finite_state(state: ServerState) -> None:
    for part in _PARTS:
        for name, t in (getattr(state, part) or {}).items():
            if not torch.isfinite(t).all():
                raise ValueError(
                    f"refusing to save round {state.round}: its global {part} {name!r} holds "
                    "inf/nan; the previous checkpoint is kept. Lower the learning rate or clip "
                    "gradients (max_grad_norm)"
                )


def save_federated_checkpoint(
    directory: str | os.PathLike[str],
    state: ServerState,
    metadata: dict[str, Any],
    save_model: Callable[[str], None] | None = None,
) -> Path:
    """Write ``state`` (+ ``metadata`` + optionally the model) atomically to ``directory``.

    Parameters
    ----------
    directory:
        The checkpoint directory to create; an existing one is replaced.
    state:
        The global state to save.
    metadata:
        JSON-serialisable run information (identity, history).
    save_model:
        Called with the temporary directory to write the model files into
        (e.g. ``Trainer.save_model``), so they are renamed into place with the
        rest.

    Returns
    -------
    Path
        The final path.

    Raises
    ------
    ValueError
        If a tensor of ``state`` is not finite (nothing is written).
    """
    _require_finite_state(state)
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = _temporary_prefix(final.name)
    for stale in final.parent.glob(f"{prefix}*"):  # left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=final.parent))
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
            "beta": state.beta,
            **({} if state.noise_seed is None else {"dp_noise_seed": state.noise_seed}),
            **({} if state.dp_clip_norms is None else {"dp_clip_norms": list(state.dp_clip_norms)}),
            **metadata,
        }
        (tmp / STATE_JSON).write_text(json.dumps(doc, indent=2, sort_keys=True))
        if save_model is not None:
            save_model(str(tmp))
        _fsync_tree(tmp)
        if final.exists():
            # killed between these renames: latest_checkpoint() finds the .old- copy
            old = final.with_name(f"{_OLD}{final.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
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
        metadata = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{json_path} is corrupt or truncated ({err}); resume from an earlier checkpoint"
        ) from None
    if not isinstance(metadata, dict) or metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{json_path} is not a fedpac_hf checkpoint of format {FORMAT_VERSION}")
    round_number = metadata.get("round")
    if not isinstance(round_number, int) or isinstance(round_number, bool) or round_number < 0:
        raise ValueError(f"{json_path} is corrupt: 'round' is {round_number!r}, not a round number")
    if not isinstance(metadata.get("run", {}), dict) or not isinstance(
        metadata.get("history", []), list
    ):
        raise ValueError(f"{json_path} is corrupt: 'run' must be an object and 'history' a list")
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"{tensor_path} is corrupt or truncated ({err}); resume from an earlier checkpoint"
        ) from None
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
        round=round_number,
        beta=_beta_of(metadata, json_path),
        noise_seed=_noise_seed_of(metadata, json_path),
        dp_clip_norms=_clip_norms_of(metadata, json_path),
    )
    if not state.params:
        raise ValueError(f"{tensor_path} holds no global parameters (no 'params::' entry)")
    return state, metadata


def _noise_seed_of(metadata: dict[str, Any], json_path: Path) -> int | None:
    """The server's DP noise seed (``None`` without DP and in older checkpoints)."""
    seed = metadata.get("dp_noise_seed")
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{json_path} is corrupt: 'dp_noise_seed' is {seed!r}, not a seed")
    return seed


def _clip_norms_of(metadata: dict[str, Any], json_path: Path) -> tuple[float, float | None] | None:
    """The adaptive clip norms of the next round (``None`` without ``dp_clip_schedule: adaptive``)."""
    norms = metadata.get("dp_clip_norms")
    if norms is None:
        return None

    def positive(n: Any) -> bool:
        return not isinstance(n, bool) and isinstance(n, int | float) and 0 < n < math.inf

    if not (
        isinstance(norms, list)
        and len(norms) == 2
        and positive(norms[0])
        and (norms[1] is None or positive(norms[1]))
    ):
        raise ValueError(
            f"{json_path} is corrupt: 'dp_clip_norms' is {norms!r}, not [C, C_Theta or null] "
            "of positive numbers"
        )
    return float(norms[0]), None if norms[1] is None else float(norms[1])


def _beta_of(metadata: dict[str, Any], json_path: Path) -> float | None:
    """The saved ``beta="auto"`` choice for the next round (absent in older checkpoints)."""
    beta = metadata.get("beta")
    if beta is None:
        return None
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 <= beta < 1:
        raise ValueError(f"{json_path} is corrupt: 'beta' is {beta!r}, not a number in [0, 1)")
    return float(beta)


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint of the highest round under ``output_dir``, if any.

    Temporary directories of an interrupted save are ignored; the previous
    copy of a checkpoint that was being replaced (``.old-checkpoint-round-N``)
    counts when the new one never got into place.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = []
    for d in root.iterdir():
        name = d.name.removeprefix(_OLD)
        if d.name.startswith(_OLD) and (root / name).exists():
            continue
        if d.is_dir() and name.startswith(CHECKPOINT_PREFIX) and (d / STATE_JSON).is_file():
            suffix = name[len(CHECKPOINT_PREFIX) :]
            if suffix.isdigit():
                found.append((int(suffix), d))
    return max(found)[1] if found else None


def rotate_checkpoints(
    output_dir: str | os.PathLike[str],
    limit: int | None,
    keep: str | os.PathLike[str] | None = None,
) -> None:
    """Delete all but the newest ``limit`` checkpoints under ``output_dir`` (``save_total_limit``).

    ``keep`` (the best checkpoint, with ``load_best_model_at_end``) is never
    deleted, as in ``Trainer``.
    """
    if not limit:
        return
    root = Path(output_dir)
    pattern = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
    found = sorted((int(m.group(1)), d) for d in root.iterdir() if (m := pattern.match(d.name)))
    kept = Path(keep).resolve() if keep else None
    old = [d for _, d in found[:-limit] if d.resolve() != kept]
    for d in old:
        shutil.rmtree(d, ignore_errors=True)
