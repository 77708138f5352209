"""Any Hugging Face Hub dataset or local dataset folder, with common column names."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict

from fedpac_hf.data._common import seeded_split

# Renames applied when the target column is absent: CIFAR-10 ships `img`,
# CIFAR-100 ships `img` + `fine_label` (and keeps `coarse_label` as is).
COLUMN_RENAMES: tuple[tuple[str, str], ...] = (
    ("img", "image"),
    ("fine_label", "label"),
)
_TEST_SPLIT_NAMES = ("test", "validation", "valid", "val")
# Builders for a single local data file, by suffix.
_FILE_BUILDERS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".arrow": "arrow",
    ".txt": "text",
}


def normalize_columns(dataset: Dataset) -> Dataset:
    """Rename CIFAR-style columns to the standard ``image``/``label``.

    ``img`` becomes ``image`` and ``fine_label`` (CIFAR-100) becomes ``label``
    unless the dataset already has a column of the target name.

    Parameters
    ----------
    dataset : datasets.Dataset
        A split of the loaded dataset.

    Returns
    -------
    datasets.Dataset
        The same data with renamed columns (no copy).
    """
    renames = {
        source: target
        for source, target in COLUMN_RENAMES
        if source in dataset.column_names and target not in dataset.column_names
    }
    return dataset.rename_columns(renames) if renames else dataset


def _is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``save_to_disk``."""
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    )


@contextlib.contextmanager
def _rows_required(name: str) -> Iterator[None]:
    """Name the dataset when ``datasets`` finds a split without a row."""
    try:
        yield
    except ValueError as error:
        if "corresponds to no data" not in str(error):
            raise
        raise ValueError(f"dataset {name!r} has no rows ({error})") from None


def load_hub_dataset(
    name: str,
    config: str | None = None,
    seed: int = 0,
    test_size: float = 0.2,
    **load_kwargs: Any,
) -> DatasetDict:
    """Load a dataset by Hub name, local path or ``save_to_disk`` folder as train/test.

    ``save_to_disk`` folders go through :func:`datasets.load_from_disk`,
    single local data files (parquet, csv, json, arrow, txt) and everything else
    (Hub names such as ``"uoft-cs/cifar10"``, local folders such as an
    ``imagefolder``) through :func:`datasets.load_dataset`.
    The result has a ``train`` and a ``test`` split: a ``test`` split (or else
    ``validation``/``valid``/``val``) is used when present, otherwise a seeded
    ``test_size`` share of ``train`` is held out. CIFAR column names are
    normalised (:func:`normalize_columns`).

    Parameters
    ----------
    name : str
        Hub dataset id, or a local path.
    config : str, optional
        Dataset configuration name (``load_dataset``'s second argument).
    seed : int
        Seed of the split when one has to be made.
    test_size : float
        Fraction held out when the source has no test split.
    **load_kwargs
        Passed to :func:`datasets.load_dataset` (e.g. ``cache_dir``,
        ``revision``).

    Returns
    -------
    datasets.DatasetDict
        ``train`` and ``test``.

    Raises
    ------
    FileNotFoundError
        If ``name`` is neither a reachable Hub dataset nor a readable path.
    ValueError
        If the source has no ``train`` split, or a data file without a row.
    """
    path = Path(os.fspath(name)).expanduser()
    if _is_saved_dataset(path):
        loaded = datasets.load_from_disk(str(path))
    elif path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"dataset file {name!r} has an unknown type; use one of "
                f"{sorted(_FILE_BUILDERS)} or a save_to_disk folder."
            )
        with _rows_required(name):
            loaded = datasets.load_dataset(builder, data_files={"train": str(path)}, **load_kwargs)
    else:
        try:
            with _rows_required(name):
                loaded = datasets.load_dataset(
                    str(path) if path.exists() else name, config, **load_kwargs
                )
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"dataset {name!r} was not found: not a local path or save_to_disk folder, and "
                f"not reachable on the Hub ({error}). Check the name, or download it where the "
                "Hub is reachable and pass the local folder."
            ) from None
        except ConnectionError as error:
            raise FileNotFoundError(
                f"dataset {name!r} is not cached and the Hub is unreachable ({error}); "
                "pass a local path or save_to_disk folder instead."
            ) from None
    if isinstance(loaded, Dataset):
        loaded = DatasetDict({"train": loaded})
    if "train" not in loaded:
        raise ValueError(
            f"dataset {name!r} has no 'train' split (splits: {list(loaded)}); save or name it "
            "with a 'train' split."
        )
    train = normalize_columns(loaded["train"])
    test_name = next((split for split in _TEST_SPLIT_NAMES if split in loaded), None)
    if test_name is not None:
        return DatasetDict({"train": train, "test": normalize_columns(loaded[test_name])})
    features = train.features
    stratify = (
        "label"
        if "label" in features and isinstance(features["label"], datasets.ClassLabel)
        else None
    )
    return seeded_split(train, test_size, seed, stratify_by=stratify)
