"""Helpers shared by the loaders: optional imports, cache folder, seeded splits."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

from datasets import Dataset, DatasetDict

EXTRA_HINT = 'pip install "fedpac_hf[data]"'


def import_optional(module: str, purpose: str) -> ModuleType:
    """Import an optional dependency or raise an ``ImportError`` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{purpose} needs the optional package {module.split('.')[0]!r}; install it with "
            f"{EXTRA_HINT}."
        ) from error


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The fedpac_hf cache folder: ``cache_dir``, else ``$FEDPAC_HF_CACHE``, else ``~/.cache/fedpac_hf``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("FEDPAC_HF_CACHE")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/fedpac_hf").expanduser()


def check_test_size(test_size: float) -> float:
    """Validate a test fraction in ``(0, 1)``."""
    if not 0.0 < float(test_size) < 1.0:
        raise ValueError(
            f"test_size must be a fraction strictly between 0 and 1 (got {test_size!r}), "
            "e.g. test_size=0.2."
        )
    return float(test_size)


def seeded_split(
    dataset: Dataset, test_size: float, seed: int, stratify_by: str | None = None
) -> DatasetDict:
    """Split into ``train``/``test`` with a fixed seed, stratified on a ClassLabel column if given."""
    split = dataset.train_test_split(
        test_size=check_test_size(test_size), seed=seed, stratify_by_column=stratify_by
    )
    return DatasetDict({"train": split["train"], "test": split["test"]})
