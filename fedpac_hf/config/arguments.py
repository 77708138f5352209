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

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from fedpac_hf.config.checks import check_arguments
from fedpac_hf.config.partitioning import PartitionArguments
from fedpac_hf.config.privacy import PrivacyArguments
from fedpac_hf.config.validation import coerce_fields, parse_resume
from fedpac_hf.federated import (
    Algorithm,
    RoundEngine,
    ServerState,
    get_algorithm,
    parse_beta,
    round_learning_rates,
)
from fedpac_hf.federated.local_step import LocalSteps
from fedpac_hf.federated.theta_budget import theta_options

__all__ = [
    "FedPACArguments",
    "REPLACED_SETTINGS",
]

# Settings of earlier versions -> what replaces them (named in the error for the old key).
REPLACED_SETTINGS = {
    "eval_every_rounds": "eval_strategy: steps with eval_steps: N (a round is one global step)",
    "save_every_rounds": "save_strategy: steps with save_steps: N (a round is one global step)",
}


@dataclass
class FedPACArguments(PartitionArguments, PrivacyArguments, TrainingArguments):
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
            "help": "Form of the curvature state Theta that travels: 'auto' (the richest form "
            "that fits theta_budget), 'full' (every statistic as the optimizer keeps it; "
            "two-sided SOAP sends d x d per side), or 'lora' (the LoRA-rank form of earlier "
            "versions: rank side in full, each longer side as its diagonal plus a "
            "min(4, r - 2)-column fixed sketch; needs a PEFT model)."
        },
    )
    theta_budget: float | None = field(
        default=None,
        metadata={
            "help": "With curvature 'auto': Theta's bytes up per client and round as a "
            "fraction of the trainable parameters' bytes (1.0: as much curvature as delta). "
            "SOAP sends small sides in full and long sides as their diagonal in a basis the "
            "server keeps plus a few sketch columns, as many as fit (docs/algorithm.md). "
            "Default: 1.0 for a model with LoRA adapters, full Theta without."
        },
    )
    public_curvature: bool = field(
        default=False,
        metadata={
            "help": "Take the global Theta from public data at the server instead of from the "
            "clients: each round the server runs the client rule on the public data "
            "(FedPACTrainer's curvature_dataset; the CLI's public_curvature_dataset) from the "
            "round's state, and clients send no Theta (no uplink for it, and under dp_mode "
            "'client' the delta gets the whole mechanism). Needs an algorithm that aligns."
        },
    )
    public_curvature_clients: int = field(
        default=1,
        metadata={
            "help": "With public_curvature: how many runs of the client rule on the public data "
            "(each from the round's state, on its own batches) the server's Theta averages "
            "per round; the clients' Theta averages over a round's clients."
        },
    )
    preflight: bool = field(
        default=True,
        metadata={
            "help": "Before round 1 and before anything is written: check the labels against "
            "the model's head, then one client step, one aggregation, one warm-started step "
            "and one evaluation batch on the real model, all put back (the run trains as "
            "without it). A failure stops the run naming the stage and the cause."
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
            "one in ten) or a whole count >= 1 (1: one client; num_clients: all)."
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
        # true/yes/1 (the latest checkpoint), false/no/0, or a path: whichever door it came by
        self.resume_from_checkpoint = parse_resume(self.resume_from_checkpoint)
        # one reading of every setting, whichever door (YAML, CLI, Python, Flower) it came by
        coerce_fields(self)
        self.partitioner = self.partitioner.strip().lower().replace("-", "_")
        self.dp_mode = str(self.dp_mode).strip().lower()
        if self.eval_steps == 0:  # TrainingArguments would read 0 as unset (logging_steps)
            raise ValueError(
                "eval_steps must be a fraction in (0, 1) or a whole number of rounds >= 1, got "
                "0; leave it unset to evaluate every logging_steps rounds"
            )
        if self.beta is not None:
            self.beta = parse_beta(self.beta)
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
        check_arguments(self)
        algorithm = self.build_algorithm()
        self.secure_aggregation_settings(algorithm)  # first: its conflicts name SecAgg+
        self.client_privacy(algorithm)
        self.record_privacy(algorithm)

    def build_algorithm(self, model: torch.nn.Module | None = None) -> Algorithm:
        """The :class:`Algorithm` these arguments describe (registry entry + overrides).

        Parameters
        ----------
        model:
            The model the clients train: with ``curvature`` ``"auto"`` its
            trainable parameters and ``theta_budget`` size the curvature state
            (see :func:`~fedpac_hf.federated.theta_budget.theta_options`, the
            function every entry point uses). Without it, Theta is the full one.
        """
        base = get_algorithm(self.algorithm)
        optimizer = self.client_optimizer or base.optimizer
        kwargs: dict[str, Any] = {"weight_decay": self.weight_decay}
        kwargs.update(base.optimizer_kwargs)
        if model is not None:
            align = base.align if self.align is None else self.align
            kwargs.update(
                theta_options(
                    model,
                    optimizer,
                    self.curvature,
                    self.theta_budget,
                    self.client_optimizer_kwargs,
                    align=align,
                )
            )
        kwargs.update(self.client_optimizer_kwargs or {})
        return get_algorithm(
            base,
            optimizer=self.client_optimizer,
            beta=self.beta,
            align=self.align,
            optimizer_kwargs=kwargs,
            public_curvature=True if self.public_curvature else None,
        )

    def training_settings(self, algorithm: Algorithm) -> dict[str, Any]:
        """The settings every round trains with: a resume must keep them (see ``run_identity``)."""
        return {
            "clients_per_round": self.clients_per_round,
            "local_steps": self.local_steps,
            "learning_rate": self.learning_rate,
            "lr_scheduler_type": getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type),
            "lr_scheduler_kwargs": self.lr_scheduler_kwargs or {},
            "warmup_rounds": self.get_warmup_steps(self.num_rounds),
            "per_device_train_batch_size": self.per_device_train_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "max_grad_norm": self.max_grad_norm,
            "server_learning_rate": self.server_learning_rate,
            "aggregation_weighting": self.aggregation_weighting,
            "transport_dtype": self.transport_dtype,
            "client_optimizer_kwargs": dict(algorithm.optimizer_kwargs),
            **self.privacy_settings(),
            # only when set: checkpoints from before the setting resume as they did
            **({"public_curvature": True} if algorithm.public_curvature else {}),
        }

    def local_step_settings(self, lr: float, num_steps: int | None = None) -> LocalSteps:
        """A client's round as these arguments set it, at local rate ``lr``.

        ``num_steps`` defaults to ``local_steps`` (a preflight takes one).
        """
        return LocalSteps(
            lr=lr,
            num_steps=self.local_steps if num_steps is None else num_steps,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            max_grad_norm=self.max_grad_norm,
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
        algorithm = algorithm or self.build_algorithm()
        return RoundEngine(
            algorithm,
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
            privacy=self.client_privacy(algorithm),
            noise_seed=self.dp_noise_seed,
        )
