"""`FedPACArguments`: `TrainingArguments` plus the federated knobs.

Everything a federated run needs beyond ordinary fine-tuning lives here as
dataclass fields with help text, so `HfArgumentParser` reads it from the
command line (``--num_rounds 50``) and from YAML (``parse_yaml_file``).
The learning rate (``learning_rate``, ``lr_scheduler_type``, warm-up) is the
*local* rate eta_l and is scheduled over rounds, cosine by default as in the
paper; ``per_device_train_batch_size`` is the client batch size.

A round is one ``global_step`` of ``Trainer``: ``eval_strategy="steps"`` with
``eval_steps=N`` evaluates every N rounds, ``save_strategy``/``save_steps``
checkpoint every N rounds, ``logging_steps`` logs, and
``metric_for_best_model``, ``load_best_model_at_end`` and
``transformers.EarlyStoppingCallback`` work as they do in ``Trainer``.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from fedpac_hf.federated import (
    TRANSPORT_DTYPES,
    WEIGHTINGS,
    Algorithm,
    RoundEngine,
    ServerState,
    get_algorithm,
    parse_beta,
    round_learning_rates,
)
from fedpac_hf.validation import coerce_fields

__all__ = [
    "CURVATURE_FORMS",
    "LORA_SKETCH_COLUMNS",
    "FedPACArguments",
    "REPLACED_SETTINGS",
    "curvature_options",
    "lora_rank",
]

CURVATURE_FORMS: tuple[str, ...] = ("auto", "full", "lora")

# Columns of the Nystroem sketch a LoRA factor's long side (the d of a d x r factor)
# sends with curvature "lora" (and "auto" on a PEFT model), beside its diagonal:
# min(4, r - 2). Chosen on the validation split of benchmarks/LORA.md (section 2):
# the best form that sends at most as much curvature as adapter (cheaper forms lose
# most of FedPAC's gain there); fewer columns at small ranks keep Theta below the
# adapter's size.
LORA_SKETCH_COLUMNS = 4


# Settings of earlier versions -> what replaces them (named in the error for the old key).
REPLACED_SETTINGS = {
    "eval_every_rounds": "eval_strategy: steps with eval_steps: N (a round is one global step)",
    "save_every_rounds": "save_strategy: steps with save_steps: N (a round is one global step)",
}

_PARTITIONERS = ("iid", "dirichlet", "pathological", "quantity_skew", "natural_id")
# partitioner constructor argument -> the FedPACArguments field that sets it
_PARTITIONER_FIELDS = {
    "alpha": "dirichlet_alpha",
    "scheme": "dirichlet_scheme",
    "label_column": "partition_label_column",
    "column": "partition_id_column",
}


@dataclass
class FedPACArguments(TrainingArguments):
    """Training arguments of a federated (FedPAC or baseline) run."""

    # --- algorithm -----------------------------------------------------------
    algorithm: str = field(
        default="fedpac_soap",
        metadata={
            "help": "Federated algorithm by name: fedpac_soap, fedpac_sophia, fedpac_muon, "
            "local_soap/sophia/muon (naive), fedavg, fedavg_adamw, fedcm, fedadamw, "
            "fedpac_align_<opt>, fedpac_correct_<opt> (see fedpac_hf.federated.list_algorithms)."
        },
    )
    client_optimizer: str | None = field(
        default=None,
        metadata={
            "help": "Override the algorithm's base client optimizer (sgd, adamw, soap, "
            "sophia, muon)."
        },
    )
    client_optimizer_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Extra keyword arguments of the client optimizer, as a dict (YAML) "
            "or a JSON string, e.g. '{\"precondition_frequency\": 10}'."
        },
    )
    curvature: str = field(
        default="auto",
        metadata={
            "help": "Form of the curvature state Theta that travels: 'full' (every statistic; "
            "two-sided SOAP sends d x d per long side), 'lora' (adapter-sized: a LoRA factor's "
            "rank side in full, each longer side as its diagonal plus a 4-column sketch, 5 d "
            "floats; needs a PEFT model), or 'auto' ('lora' for a PEFT model, 'full' "
            "otherwise)."
        },
    )
    beta: float | str | None = field(
        default=None,
        metadata={
            "help": "Correction strength in [0, 1): the base step is scaled by 1 - beta and "
            "beta * lr * global_direction is subtracted after it; or 'auto' (experimental, "
            "trailed fixed 0.5 in benchmarks/RESULTS.md): the server chooses it every round "
            "from the spread of the client updates and the change of the global direction "
            "(at most 0.75). Default: the algorithm's (0.5 for FedPAC)."
        },
    )
    align: bool | None = field(
        default=None,
        metadata={
            "help": "Warm-start clients from the aggregated curvature (alignment). "
            "Default: the algorithm's."
        },
    )
    # --- rounds --------------------------------------------------------------
    num_rounds: int = field(default=10, metadata={"help": "Number of federated rounds R."})
    clients_per_round: float = field(
        default=0.1,
        metadata={
            "help": "Clients sampled per round: a fraction in (0, 1) of num_clients (0.1: "
            "10%) or a whole count >= 1 (1: one client; num_clients: all)."
        },
    )
    local_steps: int = field(
        default=10, metadata={"help": "Local optimizer steps K per client and round."}
    )
    server_learning_rate: float = field(
        default=1.0, metadata={"help": "Server learning rate eta_g applied to the mean delta."}
    )
    aggregation_weighting: str = field(
        default="uniform",
        metadata={
            "help": "Weights of client updates: 'uniform' (the paper) or 'num_examples' (FedAvg)."
        },
    )
    transport_dtype: str = field(
        default="float32",
        metadata={
            "help": "What the global state and the clients' deltas and curvature travel as: "
            "'float32' or 'bfloat16' (half the bytes; the server keeps float32 parameters and "
            "sums in float64)."
        },
    )
    min_clients_per_round: int = field(
        default=1,
        metadata={"help": "A round whose surviving client updates are fewer than this fails."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a new run in an output_dir that holds another run's checkpoints "
            "or metrics (they are deleted). Without it such a start is refused; "
            "resume_from_checkpoint continues the run instead."
        },
    )
    # --- partitioning (used when the trainer gets one train_dataset) --------
    num_clients: int = field(
        default=10, metadata={"help": "Number of clients to split train_dataset into."}
    )
    partitioner: str = field(
        default="dirichlet",
        metadata={"help": f"How to split train_dataset into clients: one of {_PARTITIONERS}."},
    )
    dirichlet_alpha: float = field(
        default=0.1,
        metadata={
            "help": "Dirichlet concentration (label skew: 0.05 extreme, 1 ~ IID); also the "
            "quantity-skew concentration."
        },
    )
    dirichlet_scheme: str = field(
        default="client",
        metadata={
            "help": "'client': per-client class proportions, equal client sizes (the "
            "FedPAC paper); 'class': per-class proportions over clients (Hsu et al.)."
        },
    )
    classes_per_client: int = field(
        default=2, metadata={"help": "Classes per client for the pathological partitioner."}
    )
    partition_label_column: str = field(
        default="label", metadata={"help": "Label column used by label-skew partitioners."}
    )
    partition_id_column: str | None = field(
        default=None,
        metadata={"help": "Column with a natural client id (e.g. speaker) for natural_id."},
    )
    min_examples_per_client: int = field(
        default=1, metadata={"help": "Smallest client a partitioner may produce."}
    )
    # --- defaults that differ from Trainer's ---------------------------------
    lr_scheduler_type: str = field(
        default="cosine",
        metadata={
            "help": "Schedule of the local learning rate over rounds (any transformers "
            "scheduler; cosine as in the paper). Warm-up (warmup_steps) counts rounds."
        },
    )
    logging_steps: float = field(
        default=1,
        metadata={
            "help": "Log the round metrics to report_to every N rounds (a round is one "
            "global step)."
        },
    )

    def __post_init__(self) -> None:
        if int(os.environ.get("LOCAL_RANK", -1)) != -1 and not torch.cuda.is_available():
            # torchrun / accelerate launch on a CPU-only machine: Accelerate only sets up
            # its gloo process group (and reports the real world size) with cpu=True.
            self.use_cpu = True
        if isinstance(self.resume_from_checkpoint, bool):  # TOML/YAML `true` / `false`
            self.resume_from_checkpoint = "true" if self.resume_from_checkpoint else None
        # one reading of every setting, whichever door (YAML, CLI, Python, Flower) it came by
        coerce_fields(self)
        if self.beta is not None:
            self.beta = parse_beta(self.beta)
        if isinstance(
            self.resume_from_checkpoint, str
        ) and self.resume_from_checkpoint.strip().lower() in ("", "false", "no", "none"):
            self.resume_from_checkpoint = None
        if self.dataloader_pin_memory and not torch.cuda.is_available():
            self.dataloader_pin_memory = (
                False  # pinning needs an accelerator; torch warns otherwise
            )
        if self.output_dir and os.path.exists(self.output_dir):
            if not os.path.isdir(self.output_dir):
                raise ValueError(
                    f"output_dir={self.output_dir!r} is a file, not a directory; choose another "
                    "output_dir"
                )
        super().__post_init__()
        if isinstance(self.client_optimizer_kwargs, str):
            try:
                self.client_optimizer_kwargs = json.loads(self.client_optimizer_kwargs)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"client_optimizer_kwargs is not valid JSON ({err}); write it like "
                    "'{\"precondition_frequency\": 10}'"
                ) from None
        if self.client_optimizer_kwargs is not None and not isinstance(
            self.client_optimizer_kwargs, dict
        ):
            raise ValueError("client_optimizer_kwargs must be a dict or a JSON object string")
        for name in (
            "num_rounds",
            "local_steps",
            "num_clients",
            "min_clients_per_round",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(
                f"learning_rate (the clients' local rate) must be a positive number, got "
                f"{self.learning_rate}"
            )
        if not 0 < self.clients_per_round < 1 and (
            self.clients_per_round < 1 or not float(self.clients_per_round).is_integer()
        ):
            raise ValueError(
                f"clients_per_round must be a fraction in (0, 1) or a whole count >= 1, got "
                f"{self.clients_per_round}"
            )
        if self.clients_per_round >= 1:
            self.clients_per_round = int(self.clients_per_round)  # a count, however it was written
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise ValueError(
                f"max_grad_norm must be a finite number >= 0 (0 turns clipping off), got "
                f"{self.max_grad_norm}"
            )
        warmup = self.get_warmup_steps(self.num_rounds)
        if warmup >= self.num_rounds:
            raise ValueError(
                f"warmup_steps counts rounds (a round is one global step): {warmup} warm-up "
                f"rounds in a {self.num_rounds}-round run would never reach learning_rate; use "
                f"fewer than num_rounds={self.num_rounds} (or a fraction such as 0.1)"
            )
        if not (self.server_learning_rate > 0 and math.isfinite(self.server_learning_rate)):
            raise ValueError(
                f"server_learning_rate must be positive, got {self.server_learning_rate}"
            )
        if self.curvature not in CURVATURE_FORMS:
            raise ValueError(f"curvature must be one of {CURVATURE_FORMS}, got {self.curvature!r}")
        if self.transport_dtype not in TRANSPORT_DTYPES:
            raise ValueError(
                f"transport_dtype must be one of {TRANSPORT_DTYPES}, got {self.transport_dtype!r}"
            )
        if self.aggregation_weighting not in WEIGHTINGS:
            raise ValueError(
                f"aggregation_weighting must be one of {WEIGHTINGS}, got "
                f"{self.aggregation_weighting!r}"
            )
        if self.partitioner.replace("-", "_") not in _PARTITIONERS:
            raise ValueError(
                f"partitioner must be one of {_PARTITIONERS}, got {self.partitioner!r}"
            )
        self._check_client_optimizer(self.build_algorithm())  # fail early: name, beta, options
        name = self.partitioner.replace("-", "_")
        if name != "natural_id" or self.partition_id_column:
            from fedpac_hf.partition import get_partitioner

            kwargs = self.partitioner_kwargs()
            try:
                get_partitioner(name, **kwargs)  # fail early on its arguments
            except ValueError as err:
                fields = ", ".join(
                    f"{_PARTITIONER_FIELDS.get(k, k)}={v!r}" for k, v in kwargs.items()
                )
                raise ValueError(f"partitioner {name!r} with {fields}: {err}") from None
        for name in ("eval_strategy", "save_strategy", "logging_strategy"):
            if str(getattr(getattr(self, name), "value", getattr(self, name))) == "epoch":
                raise ValueError(
                    f"{name}='epoch' has no meaning in a federated run (there are no epochs over "
                    f"one dataset); a round is one global step: use {name}='steps' with "
                    f"{name.replace('_strategy', '_steps')}=N to act every N rounds"
                )
        if self.deepspeed:
            raise ValueError(
                "FedPACTrainer does not support DeepSpeed: every client trains the whole "
                "(trainable) model in one process and the server needs each client's full "
                "optimizer curvature, which ZeRO shards away. Remove --deepspeed."
            )
        if self.fsdp:
            raise ValueError(
                "FedPACTrainer does not support FSDP: clients are spread over processes, "
                "each holding the whole trainable model; sharding one client's model over "
                "processes is not implemented. Remove --fsdp (LoRA keeps models small)."
            )

    def build_algorithm(self, model: torch.nn.Module | None = None) -> Algorithm:
        """The :class:`Algorithm` these arguments describe (registry entry + overrides).

        Parameters
        ----------
        model:
            The model the clients train; with ``curvature`` ``"auto"`` or
            ``"lora"`` its LoRA rank sizes the curvature state (see
            :func:`curvature_options`). Without it, Theta is the full one.
        """
        base = get_algorithm(self.algorithm)
        optimizer = self.client_optimizer or base.optimizer
        kwargs: dict[str, Any] = {"weight_decay": self.weight_decay}
        kwargs.update(base.optimizer_kwargs)
        if model is not None:
            kwargs.update(curvature_options(self.curvature, optimizer, model))
        kwargs.update(self.client_optimizer_kwargs or {})
        return get_algorithm(
            base,
            optimizer=self.client_optimizer,
            beta=self.beta,
            align=self.align,
            optimizer_kwargs=kwargs,
        )

    def round_learning_rates(self) -> list[float]:
        """eta_l of every round: ``lr_scheduler_type`` stepped once per round, warm-up in rounds."""
        return round_learning_rates(
            self.learning_rate,
            self.num_rounds,
            self.lr_scheduler_type,
            warmup_rounds=self.get_warmup_steps(self.num_rounds),
            scheduler_kwargs=self.lr_scheduler_kwargs,
        )

    def round_engine(
        self,
        state: ServerState,
        num_clients: int,
        history: Any = (),
        algorithm: Algorithm | None = None,
        device: torch.device | str | None = None,
    ) -> RoundEngine:
        """The :class:`~fedpac_hf.federated.RoundEngine` these arguments describe.

        Parameters
        ----------
        state:
            The global state to start (or resume) from.
        num_clients:
            Clients in the federation.
        history:
            Metrics of the rounds already done (when resuming).
        algorithm:
            Overrides :meth:`build_algorithm`.
        device:
            Where the clients train, when they train in this process (the
            round's state is copied there once and the server's sums live
            there); ``None``: the CPU.
        """
        return RoundEngine(
            algorithm or self.build_algorithm(),
            state,
            num_clients=num_clients,
            clients_per_round=self.clients_per_round,
            learning_rates=self.round_learning_rates(),
            local_steps=self.local_steps,
            seed=self.seed,
            server_learning_rate=self.server_learning_rate,
            weighting=self.aggregation_weighting,
            min_clients_per_round=self.min_clients_per_round,
            transport_dtype=self.transport_dtype,
            history=history,
            device=device,
        )

    def build_partitioner(self) -> Any:
        """The :class:`~fedpac_hf.partition.Partitioner` these arguments describe."""
        from fedpac_hf.partition import get_partitioner

        return get_partitioner(self.partitioner, **self.partitioner_kwargs())

    @staticmethod
    def partition_setting_names() -> dict[str, str]:
        """Partitioner argument -> the field of these arguments that sets it."""
        return {**_PARTITIONER_FIELDS, "partitioner": "partitioner", "seed": "seed"}

    def _check_client_optimizer(self, algorithm: Algorithm) -> None:
        """Build the client optimizer once on a 2x2 weight: a bad name or option fails now.

        Otherwise it would fail inside every client's first step, and every
        client would be dropped.
        """
        from fedpac_hf.optim import OPTIMIZERS, create_optimizer

        if algorithm.optimizer.lower() not in OPTIMIZERS:
            raise ValueError(
                f"client_optimizer={algorithm.optimizer!r} is not an optimizer; valid names: "
                f"{sorted(OPTIMIZERS)}"
            )
        weight = torch.nn.Parameter(torch.zeros(2, 2))
        try:
            create_optimizer(
                algorithm.optimizer,
                [("weight", weight)],
                lr=self.learning_rate,
                **dict(algorithm.optimizer_kwargs),
            )
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"client optimizer {algorithm.optimizer!r} refuses client_optimizer_kwargs="
                f"{self.client_optimizer_kwargs or {}} / weight_decay={self.weight_decay}: {err}"
            ) from None

    def assign_clients(self, dataset: Any, partitioner: Any = None) -> list[Any]:
        """Split ``dataset`` into client index arrays with ``partitioner`` or the configured one.

        A missing column is reported under the name of the field to change
        (``partition_label_column`` / ``partition_id_column``).
        """
        if partitioner is None:
            partitioner = self.build_partitioner()
        try:
            return partitioner.assign(dataset)
        except ValueError as err:
            pattern = r"\b(" + "|".join(_PARTITIONER_FIELDS) + r")="
            message = re.sub(pattern, lambda m: f"{_PARTITIONER_FIELDS[m.group(1)]}=", str(err))
            raise ValueError(message) from None

    def partitioner_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of the configured partitioner."""
        name = self.partitioner.replace("-", "_")
        if name == "natural_id":
            if not self.partition_id_column:
                raise ValueError(
                    "partitioner='natural_id' needs partition_id_column (e.g. 'speaker')"
                )
            return {"column": self.partition_id_column}
        kwargs: dict[str, Any] = {"num_clients": self.num_clients, "seed": self.seed}
        if name == "dirichlet":
            kwargs.update(
                alpha=self.dirichlet_alpha,
                label_column=self.partition_label_column,
                scheme=self.dirichlet_scheme,
                min_examples_per_client=self.min_examples_per_client,
            )
        elif name == "pathological":
            kwargs.update(
                classes_per_client=self.classes_per_client,
                label_column=self.partition_label_column,
            )
        elif name == "quantity_skew":
            kwargs.update(
                alpha=self.dirichlet_alpha, min_examples_per_client=self.min_examples_per_client
            )
        return kwargs


def lora_rank(model: torch.nn.Module) -> int | None:
    """The largest LoRA rank of a PEFT model's adapters (``None`` without adapters)."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        return None
    ranks = []
    for config in configs.values():
        rank = getattr(config, "r", None)
        if rank is None:
            continue
        ranks += [
            int(rank),
            *(int(r) for r in (getattr(config, "rank_pattern", None) or {}).values()),
        ]
    return max(ranks) if ranks else None


def curvature_options(form: str, optimizer: str, model: torch.nn.Module) -> dict[str, Any]:
    """Client-optimizer options that give Theta the ``curvature`` form asked for.

    ``"lora"`` (and ``"auto"`` on a PEFT model) keeps SOAP's statistics of the
    sides no longer than the LoRA rank r (a factor's rank side) in full and
    sends every longer side as its diagonal plus a k-column Nystroem sketch of
    its statistic, k = min(4, r - 2) (:data:`LORA_SKETCH_COLUMNS`): Theta is
    then r^2 + (k + 1) d floats per d x r factor instead of r^2 + d^2, that is
    r/d + (k + 1)/r of the factor (0.66 at r = 8, d = 256; 0.32 at r = 16,
    d = 4096; 0.88 at r = 4, d = 32). Client options given by the user
    (``client_optimizer_kwargs``, e.g. ``theta_sketch_dim``) override these. Sophia's and Muon's Theta is
    already the adapters' size and does not change.

    Raises
    ------
    ValueError
        For ``"lora"`` on a model without LoRA adapters.
    """
    if form not in CURVATURE_FORMS:
        raise ValueError(f"curvature must be one of {CURVATURE_FORMS}, got {form!r}")
    rank = lora_rank(model)
    if form == "lora" and rank is None:
        raise ValueError(
            "curvature='lora' sizes Theta for LoRA adapters, but the model has none (no "
            "peft_config); use curvature='full' or 'auto', or train adapters (lora_r > 0)"
        )
    if form == "full" or rank is None or optimizer.lower() != "soap":
        return {}
    columns = min(LORA_SKETCH_COLUMNS, max(rank - 2, 0))
    return {"theta_max_dim": rank, "theta_sketch_dim": columns, "theta_diagonal": True}
