"""The checks every :class:`~fedpac_hf.config.arguments.FedPACArguments` passes before a run.

Each refuses a value that would otherwise be misread or fail late (inside every
client's first step, or after hours of rounds), with a message that names the
setting to change. ``docs/bad_inputs.md`` lists what each mistake gets.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import torch

from fedpac_hf.federated import TRANSPORT_DTYPES, WEIGHTINGS, Algorithm
from fedpac_hf.federated.sampling import CLIENTS_PER_ROUND
from fedpac_hf.federated.theta_budget import CURVATURE_FORMS
from fedpac_hf.optim.options import (
    Rule,
    check_options,
    count_or_fraction,
    number,
    one_of,
    optional,
    whole,
)

__all__ = ["PARTITIONER_FIELDS", "PARTITIONERS", "RULES", "CheckedSettings", "check_arguments"]

PARTITIONERS = ("iid", "dirichlet", "pathological", "quantity_skew", "natural_id")
# partitioner constructor argument -> the FedPACArguments field that sets it
PARTITIONER_FIELDS = {
    "alpha": "dirichlet_alpha",
    "scheme": "dirichlet_scheme",
    "label_column": "partition_label_column",
    "column": "partition_id_column",
}


_POSITIVE = number(0.0, low_open=True)
#: What each setting accepts on its own (the rules of :mod:`fedpac_hf.optim.options`,
#: the same words as ``simulate``'s); combinations are checked after.
RULES: dict[str, Rule] = {
    "num_rounds": whole(1),
    "local_steps": whole(1),
    "num_clients": whole(1),
    "min_clients_per_round": whole(1),
    "per_device_train_batch_size": whole(1),
    "per_device_eval_batch_size": whole(1),
    "seed": whole(0),
    "dataloader_num_workers": whole(0),
    "eval_steps": optional(count_or_fraction("rounds")),
    "save_steps": count_or_fraction("rounds"),
    "save_total_limit": optional(whole(1)),
    "gradient_accumulation_steps": whole(1),
    "learning_rate": _POSITIVE,
    "server_learning_rate": _POSITIVE,
    "clients_per_round": CLIENTS_PER_ROUND,
    "max_grad_norm": Rule("a number >= 0 (0 turns clipping off)", number(0.0).test),
    "weight_decay": number(0.0),
    "curvature": one_of(*CURVATURE_FORMS),
    "theta_budget": optional(_POSITIVE),
    "public_curvature_clients": whole(1),
    "transport_dtype": one_of(*TRANSPORT_DTYPES),
    "aggregation_weighting": one_of(*WEIGHTINGS),
    "partitioner": one_of(*PARTITIONERS),
    "secagg_headroom": number(1.0),
}


class CheckedSettings(Protocol):
    """What :func:`check_arguments` reads (and normalises): a ``FedPACArguments``.

    Declared here so that the checks need not import the class they check.
    """

    algorithm: str
    client_optimizer: str | None
    client_optimizer_kwargs: dict[str, Any] | str | None
    num_rounds: int
    local_steps: int
    num_clients: int
    min_clients_per_round: int
    clients_per_round: float
    per_device_train_batch_size: int
    per_device_eval_batch_size: int
    seed: int
    dataloader_num_workers: int
    eval_steps: float | None
    save_steps: float
    save_total_limit: int | None
    gradient_accumulation_steps: int
    learning_rate: float
    server_learning_rate: float
    max_grad_norm: float
    weight_decay: float
    curvature: str
    theta_budget: float | None
    transport_dtype: str
    aggregation_weighting: str
    partitioner: str
    partition_id_column: str | None
    eval_strategy: Any
    save_strategy: Any
    logging_strategy: Any
    deepspeed: Any
    fsdp: Any

    def get_warmup_steps(self, num_training_steps: int) -> int: ...

    def build_algorithm(self) -> Algorithm: ...

    def partitioner_kwargs(self) -> dict[str, Any]: ...

    def round_learning_rates(self) -> list[float]: ...


def check_arguments(args: CheckedSettings) -> None:
    """Refuse inconsistent or unsupported settings (after ``TrainingArguments``' own checks).

    Raises
    ------
    ValueError
        Naming the setting and what it accepts.
    """
    if isinstance(args.client_optimizer_kwargs, str):
        try:
            args.client_optimizer_kwargs = json.loads(args.client_optimizer_kwargs)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"client_optimizer_kwargs is not valid JSON ({err}); write it like "
                "'{\"precondition_frequency\": 10}'"
            ) from None
    if args.client_optimizer_kwargs is not None and not isinstance(
        args.client_optimizer_kwargs, dict
    ):
        raise ValueError("client_optimizer_kwargs must be a dict or a JSON object string")
    for name, rule in RULES.items():
        rule.check(name, getattr(args, name))
    if args.clients_per_round >= 1:
        args.clients_per_round = int(args.clients_per_round)  # a count, however it was written
    warmup = args.get_warmup_steps(args.num_rounds)
    if warmup >= args.num_rounds:
        raise ValueError(
            f"warmup_steps counts rounds (a round is one global step): {warmup} warm-up "
            f"rounds in a {args.num_rounds}-round run would never reach learning_rate; use "
            f"fewer than num_rounds={args.num_rounds} (or a fraction such as 0.1)"
        )
    args.round_learning_rates()  # the schedule's options, a positive rate for every round
    _check_client_optimizer(args)  # fail early: name, beta, options
    name = args.partitioner  # read in lower case with _ by FedPACArguments
    if name != "natural_id" or args.partition_id_column:
        from fedpac_hf.partition import get_partitioner

        kwargs = args.partitioner_kwargs()
        try:
            get_partitioner(name, **kwargs)  # fail early on its arguments
        except ValueError as err:
            fields = ", ".join(f"{PARTITIONER_FIELDS.get(k, k)}={v!r}" for k, v in kwargs.items())
            raise ValueError(f"partitioner {name!r} with {fields}: {err}") from None
    for name in ("eval_strategy", "save_strategy", "logging_strategy"):
        if str(getattr(getattr(args, name), "value", getattr(args, name))) == "epoch":
            raise ValueError(
                f"{name}='epoch' has no meaning in a federated run (there are no epochs over "
                f"one dataset); a round is one global step: use {name}='steps' with "
                f"{name.replace('_strategy', '_steps')}=N to act every N rounds"
            )
    if args.deepspeed:
        raise ValueError(
            "FedPACTrainer does not support DeepSpeed: every client trains the whole "
            "(trainable) model in one process and the server needs each client's full "
            "optimizer curvature, which ZeRO shards away. Remove --deepspeed."
        )
    if args.fsdp:
        raise ValueError(
            "FedPACTrainer does not support FSDP: clients are spread over processes, "
            "each holding the whole trainable model; sharding one client's model over "
            "processes is not implemented. Remove --fsdp (LoRA keeps models small)."
        )


def _check_client_optimizer(args: CheckedSettings) -> None:
    """The client optimizer's name and options, then one build on a 2x2 weight.

    Each option is checked against the table every door uses
    (:data:`~fedpac_hf.optim.options.OPTIONS`); the build catches what only
    several options together get wrong. Otherwise a bad option would fail
    inside every client's first step, and every client would be dropped.
    """
    from fedpac_hf.federated import get_algorithm
    from fedpac_hf.optim import OPTIMIZERS, create_optimizer

    optimizer = args.client_optimizer or get_algorithm(args.algorithm).optimizer
    if optimizer.lower() not in OPTIMIZERS:
        raise ValueError(
            f"client_optimizer={optimizer!r} is not an optimizer; valid names: {sorted(OPTIMIZERS)}"
        )
    check_options(optimizer, args.client_optimizer_kwargs or {})
    algorithm = args.build_algorithm()
    weight = torch.nn.Parameter(torch.zeros(2, 2))
    try:
        create_optimizer(
            algorithm.optimizer,
            [("weight", weight)],
            lr=args.learning_rate,
            **dict(algorithm.optimizer_kwargs),
        )
    except Exception as err:  # noqa: BLE001 - any refusal of these options is the options'
        raise ValueError(
            f"client optimizer {algorithm.optimizer!r} refuses client_optimizer_kwargs="
            f"{args.client_optimizer_kwargs or {}} / weight_decay={args.weight_decay}: {err}"
        ) from None
