"""Datasets for federated experiments, as ``datasets.DatasetDict`` with ``train``/``test``.

Image datasets have an ``image`` column (PIL, so Hugging Face image
processors work) and a ``label`` ClassLabel; Shakespeare has ``text``,
``speaker`` and ``play``. :func:`load_dataset_by_name` picks a loader by name.
"""

from __future__ import annotations

from typing import Any

from datasets import DatasetDict

from fedpac_hf.data.hub import load_hub_dataset, normalize_columns
from fedpac_hf.data.images import load_digits, load_mnist5k
from fedpac_hf.data.shakespeare import (
    download_shakespeare,
    load_shakespeare,
    parse_play,
    read_plays,
)

BUILTIN_DATASETS = {
    "mnist5k": load_mnist5k,
    "digits": load_digits,
    "shakespeare": load_shakespeare,
}


def load_dataset_by_name(name: str, **kwargs: Any) -> DatasetDict:
    """Load a dataset by name: a built-in one, else a Hub id or local path.

    Parameters
    ----------
    name : str
        ``"mnist5k"``, ``"digits"``, ``"shakespeare"``, or anything
        :func:`load_hub_dataset` accepts (Hub id, local path,
        ``save_to_disk`` folder).
    **kwargs
        Passed to the loader (e.g. ``seed``, ``test_size``,
        ``min_lines_per_speaker``).

    Returns
    -------
    datasets.DatasetDict
        ``train`` and ``test``.
    """
    loader = BUILTIN_DATASETS.get(name.strip().lower())
    if loader is not None:
        return loader(**kwargs)
    return load_hub_dataset(name, **kwargs)


__all__ = [
    "BUILTIN_DATASETS",
    "download_shakespeare",
    "load_dataset_by_name",
    "load_digits",
    "load_hub_dataset",
    "load_mnist5k",
    "load_shakespeare",
    "normalize_columns",
    "parse_play",
    "read_plays",
]
