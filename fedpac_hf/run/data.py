"""Data preparation of a run: load the splits, filter them, encode labels, tokenize.

Used by the task builders of :mod:`fedpac_hf.run.tasks`; every check names
the setting to change when a column or a class is missing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedpac_hf.config.arguments import FedPACArguments

from .config import ModelDataArguments, split_list

__all__ = [
    "encode_labels",
    "image_processor_backend",
    "load_splits",
    "require_columns",
    "tokenize",
    "train_bpe_tokenizer",
    "vit_image_processor",
]


def image_processor_backend() -> dict[str, str]:
    """Keyword arguments that pick the image processors' PIL backend when torchvision is missing.

    transformers' image processors prefer a torchvision backend and, without
    torchvision, fall back to PIL with a warning on every run that the user
    cannot act on (PyPI's torchvision does not install beside every torch
    build). Asking for PIL explicitly gives the same pixels without the
    warning. Empty where torchvision is installed or transformers has no
    backends (its default is then kept).
    """
    import transformers

    if importlib.util.find_spec("torchvision") is not None:
        return {}
    if not hasattr(transformers, "ViTImageProcessorPil"):
        return {}
    return {"backend": "pil"}


def vit_image_processor(**kwargs: Any) -> Any:
    """A ViT image processor with ``kwargs``, on the PIL backend when torchvision is missing."""
    import transformers

    if image_processor_backend():
        return transformers.ViTImageProcessorPil(**kwargs)
    return transformers.ViTImageProcessor(**kwargs)


def _limit(dataset: Any, limit: int | None, seed: int) -> Any:
    if limit is None or len(dataset) <= limit:
        return dataset
    rng = np.random.default_rng(seed)
    return dataset.select(np.sort(rng.choice(len(dataset), size=limit, replace=False)))


def load_splits(margs: ModelDataArguments, args: FedPACArguments) -> tuple[Any, Any]:
    """The run's train and test splits, filtered (``label_values``, ``max_clients``) and limited."""
    from fedpac_hf.data import load_dataset_by_name
    from fedpac_hf.partition import read_column

    kwargs: dict[str, Any] = {"seed": margs.data_seed_split}
    name = margs.dataset.strip().lower()
    if name == "shakespeare":
        kwargs["min_lines_per_speaker"] = margs.min_lines_per_speaker
    elif margs.dataset_config is not None:
        kwargs["config"] = margs.dataset_config
    splits = load_dataset_by_name(margs.dataset, **kwargs)
    train, test = splits["train"], splits["test"]
    if margs.label_values:
        keep = set(split_list(margs.label_values))
        column = read_column(train, margs.label_column, argument="label_column")
        missing = keep - {str(v) for v in np.unique(column)}
        if missing:
            raise ValueError(
                f"label_values {sorted(missing)} do not occur in column {margs.label_column!r}"
            )
        train = train.select(np.flatnonzero([str(v) in keep for v in column]))
        test_column = read_column(test, margs.label_column, argument="label_column")
        test = test.select(np.flatnonzero([str(v) in keep for v in test_column]))
    if margs.max_clients is not None and args.partitioner.replace("-", "_") == "natural_id":
        id_column = args.partition_id_column
        if not id_column:
            raise ValueError("partitioner='natural_id' needs partition_id_column (e.g. speaker)")
        ids = read_column(train, id_column, argument="partition_id_column")
        values, counts = np.unique(ids, return_counts=True)
        order = sorted(range(len(values)), key=lambda i: (-counts[i], str(values[i])))
        kept = {values[i] for i in order[: margs.max_clients]}
        train = train.select(np.flatnonzero([v in kept for v in ids]))
        if id_column in test.column_names:
            test_ids = read_column(test, id_column, argument="partition_id_column")
            test = test.select(np.flatnonzero([v in kept for v in test_ids]))
    train = _limit(train, margs.max_train_examples, args.seed)
    test = _limit(test, margs.max_eval_examples, args.seed + 1)
    if len(train) == 0 or len(test) == 0:
        raise ValueError(
            f"dataset {margs.dataset!r} has no {'training' if len(train) == 0 else 'test'} row "
            "left after filtering; relax label_values / max_clients / min_lines_per_speaker"
        )
    return train, test


def load_public_rows(
    margs: ModelDataArguments, args: FedPACArguments, names: Sequence[str], size: Any = None
) -> Any:
    """The server's public data: the training split of ``margs.public_curvature_dataset``.

    Filtered by ``label_values`` as the clients' data is, its ``label`` column
    set to the run's class ids (``names``, the classes of the training data),
    and its images resized to ``size`` (the training images' ``(width,
    height)``) where they differ. Its test split is not read.
    """
    from datasets import ClassLabel

    public = dataclasses.replace(
        margs, dataset=margs.public_curvature_dataset, dataset_config=None, max_clients=None
    )
    rows, _ = load_splits(public, args)
    column = margs.label_column
    feature = rows.features.get(column)
    as_name = feature.int2str if isinstance(feature, ClassLabel) else str
    labels = [str(as_name(v)) for v in rows[column]]
    ids = {str(name): i for i, name in enumerate(names)}
    unknown = sorted(set(labels) - set(ids))
    if unknown:
        raise ValueError(
            f"public_curvature_dataset {public.dataset!r} has classes the training data has not "
            f"({unknown[:5]}): keep the shared ones with label_values"
        )
    if "label" in rows.column_names:
        rows = rows.remove_columns("label")
    rows = rows.add_column("label", [ids[label] for label in labels])
    image = margs.image_column
    if size is not None and image in rows.column_names and rows[0][image].size != tuple(size):
        rows = rows.map(
            lambda row: {image: row[image].resize(tuple(size))}, desc="resizing the public images"
        )
    return rows


def require_columns(train: Any, test: Any, **columns: str) -> None:
    """Fail with the setting to change if a column a task reads is missing."""
    for argument, column in columns.items():
        for split, dataset in (("training", train), ("test", test)):
            if column not in dataset.column_names:
                raise ValueError(
                    f"{argument}={column!r} is not a column of the {split} data; available "
                    f"columns: {dataset.column_names}. Set {argument} to one of them."
                )


def encode_labels(train: Any, test: Any, column: str) -> tuple[Any, Any, list[str]]:
    """Add an integer ``label`` column (class ids) from ``column``; return the class names."""
    from datasets import ClassLabel, Value

    feature = train.features.get(column)
    scalar = [name for name, f in train.features.items() if isinstance(f, ClassLabel | Value)]
    if not isinstance(feature, ClassLabel | Value):
        raise ValueError(
            f"label_column={column!r} holds {type(feature).__name__} values, not classes; "
            f"set label_column to a column of class names or ids: {scalar}"
        )
    if isinstance(feature, Value) and feature.dtype.startswith("float"):
        values = np.asarray(train[column], dtype=np.float64)
        if not np.all(np.isfinite(values) & (values == np.round(values))):
            example = next(v for v in values if not (np.isfinite(v) and v == round(v)))
            raise ValueError(
                f"label_column={column!r} holds continuous values (e.g. {example:g}): "
                "classification needs classes; round or bin the column, or choose another "
                "label_column"
            )
    for split, dataset in (("training", train), ("test", test)):
        empty = sum(_is_missing(v) for v in dataset[column])
        if empty:
            raise ValueError(
                f"label_column={column!r} has {empty} {split} row(s) without a label (an empty "
                "cell would become a class of its own); fill or drop those rows"
            )
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
        to_id = None
    else:
        values = sorted({str(v) for v in train[column]} | {str(v) for v in test[column]})
        names = values
        to_id = {name: i for i, name in enumerate(names)}

    def encode(dataset: Any) -> Any:
        if column == "label" and to_id is None:
            return dataset
        labels = [to_id[str(v)] if to_id else int(v) for v in dataset[column]]
        if "label" in dataset.column_names:
            dataset = dataset.remove_columns("label")
        return dataset.add_column("label", labels)

    present = {str(v) for v in train[column]}
    if len(present) < 2:
        raise ValueError(
            f"label_column={column!r} holds one class in the training data ({sorted(present)}): "
            "classification needs at least two; check label_values or the dataset"
        )
    return encode(train), encode(test), names


def _is_missing(value: Any) -> bool:
    """An empty cell: ``None``, blank text, or a float NaN."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, float) and not np.isfinite(value)


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``, as a ``PreTrainedTokenizerFast``.

    Any text can be encoded (the 256 bytes are in the vocabulary); ``<pad>``,
    ``<s>`` and ``</s>`` are the special tokens.

    Parameters
    ----------
    texts : sequence of str
        Training texts.
    vocab_size : int
        Vocabulary size (at least 259: the bytes and the special tokens).

    Returns
    -------
    transformers.PreTrainedTokenizerFast
        The tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 259:
        raise ValueError(f"tokenizer_vocab_size must be at least 259 (bytes + 3), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def tokenize(dataset: Any, tokenizer: Any, column: str, max_length: int, keep: Sequence[str]):
    """Tokenize ``column`` (cut at ``max_length``), dropping every column but ``keep``."""

    empty = sum(_is_missing(v) for v in dataset[column])
    if empty:
        raise ValueError(
            f"text_column={column!r} has {empty} row(s) without text (the tokenizer cannot take "
            "an empty cell); fill or drop those rows"
        )

    def encode(batch: dict[str, list]) -> dict[str, Any]:
        return tokenizer(batch[column], truncation=True, max_length=max_length)

    drop = [name for name in dataset.column_names if name not in keep]
    return dataset.map(encode, batched=True, remove_columns=drop)
