"""The FedPAC ClientApp: the core's client rule behind Flower's ``train`` messages.

One :class:`FedPACClient` per client process builds a
:class:`~fedpac_hf.FedPACTrainer` once per run (model, data, collator) with
``build_trainer(args, run_config)`` and answers every ``train`` message with
the trainer's client step (:meth:`FedPACTrainer.train_client_by_id`) from the
received global state: the same local-step code as an in-process run, so
that a Flower run and ``trainer.train()`` give the same clients' updates.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import tempfile
import threading
from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import console_handler

from fedpac_hf.config.arguments import FedPACArguments
from fedpac_hf.federated import ClientError, ClientUpdate, run_client
from fedpac_hf.federated.privacy_noise import client_noised_update
from fedpac_hf.trainer.fedpac_trainer import FedPACTrainer
from fedpac_hf.trainer.logs import show_package_log

from .config import TrainerFactory, arguments_from_run_config
from .records import (
    CONFIG_KEY,
    PARAMS_KEY,
    client_update_from_content,
    client_update_to_content,
    server_state_from_content,
)
from .secagg import NOISE_STDS, SECAGG_KEY, secagg_mod, secure_reply
from .strategy.base import NODE_RECORD_KEY

__all__ = ["FedPACClient", "make_client_app"]

# A child of Flower's logger: shown wherever Flower shows its logs (`flwr run --stream`).
logger = logging.getLogger("flwr").getChild(__name__)


def _scratch_dir() -> str:
    """A per-process output_dir for client trainers (they write nothing by default)."""
    path = os.path.join(tempfile.gettempdir(), f"fedpac-flower-client-{os.getpid()}")
    os.makedirs(path, exist_ok=True)
    return path


def _partition_of(context: Context) -> tuple[int, int | None]:
    config = context.node_config
    if "partition-id" not in config:
        raise ValueError(
            "this SuperNode has no partition-id in its node config; start it with "
            '--node-config "partition-id=<i> num-partitions=<n>"'
        )
    num = config.get("num-partitions")
    return int(config["partition-id"]), int(num) if num is not None else None


# One trainer per process: Flower's simulation engine unpickles a fresh ClientApp
# for every message, so the cache lives at module level, keyed by run and config.
_TRAINERS: dict[tuple[Any, ...], tuple[FedPACTrainer, int]] = {}
_TRAINERS_LOCK = threading.Lock()


def _factory_key(build_trainer: TrainerFactory) -> str:
    module = getattr(build_trainer, "__module__", "")
    name = getattr(build_trainer, "__qualname__", type(build_trainer).__qualname__)
    return f"{module}.{name}"


class FedPACClient:
    """A FedPAC client: builds the trainer once per process and run, reuses it every round.

    Parameters
    ----------
    build_trainer:
        ``build_trainer(args, run_config)`` builds the :class:`FedPACTrainer`;
        its ``client_dataset(partition_id)`` is this node's data.
    arguments:
        Fixed arguments; default: read from each run's run config
        (:func:`arguments_from_run_config`).
    """

    def __init__(
        self,
        build_trainer: TrainerFactory,
        arguments: FedPACArguments | None = None,
        app_settings: Iterable[str] = (),
    ) -> None:
        self.build_trainer = build_trainer
        self.arguments = arguments
        self.app_settings = tuple(app_settings)

    def client_arguments(self, context: Context) -> FedPACArguments:
        """The run's arguments as a client uses them: no evaluation, no saving, scratch output."""
        # a client neither evaluates, saves nor resumes: the server does
        settings = dict(
            output_dir=_scratch_dir(),
            eval_strategy="no",
            save_strategy="no",
            load_best_model_at_end=False,
            resume_from_checkpoint=None,
        )
        if self.arguments is not None:
            return dataclasses.replace(self.arguments, **settings)
        return arguments_from_run_config(context.run_config, self.app_settings, **settings)

    def trainer_for(self, context: Context) -> tuple[FedPACTrainer, int]:
        """The trainer of the context's run (built on first use) and its number of clients.

        On first use the package's log is handed to Flower's console (at the
        run's ``log_level``), the trainer's preflight runs on this node's partition
        (``preflight=False`` skips it) and, under record-level DP, the model is
        checked and the noise on each local step logged; a trainer that fails
        either is not kept.

        The arguments are built only with the trainer: building any
        ``TrainingArguments`` resets Accelerate's process-wide state, which a
        cached trainer still uses.
        """
        key = (
            context.run_id,
            _factory_key(self.build_trainer),
            repr(sorted(context.run_config.items())),
        )
        with _TRAINERS_LOCK:
            if key not in _TRAINERS:
                _TRAINERS.clear()  # one trainer (one model) per process
                args = self.client_arguments(context)
                show_package_log(args, console_handler)  # the notes below, in Flower's log
                trainer = self.build_trainer(args, dict(context.run_config))
                trainer.model.to(trainer.args.device)
                num_clients = trainer.setup_clients()
                trainer.check_record_privacy(trainer.model)  # DP-SGD: refused or described
                partition, _ = _partition_of(context)
                if trainer.args.preflight and 0 <= partition < num_clients:
                    # on the first message, before any round's work: a failure is
                    # this node's error reply, every time, until the server stops
                    trainer.preflight(partition)
                _TRAINERS[key] = (trainer, num_clients)
            return _TRAINERS[key]

    def query(self, message: Message, context: Context) -> Message:
        """Say which partition this node holds (the strategy maps clients to nodes with it)."""
        partition, num = _partition_of(context)
        info = ConfigRecord({"partition-id": partition})
        if num is not None:
            info["num-partitions"] = num
        return Message(content=RecordDict({NODE_RECORD_KEY: info}), reply_to=message)

    def train(self, message: Message, context: Context) -> Message:
        """Run the client rule on this node's partition from the received global state.

        Raises
        ------
        ValueError
            If the message is addressed to another partition than this node's,
            or the partition does not exist in the trainer's data.
        ClientError
            If the local training failed (any exception, a non-finite loss or
            update): logged here by :func:`~fedpac_hf.federated.run_client`, the
            same rule as in-process runs, and sent back as an error reply whose
            reason names the exception, so the strategy drops this client.
        """
        partition, _ = _partition_of(context)
        config = message.content.config_records[CONFIG_KEY]
        requested = int(config["partition-id"])
        if requested != partition:
            raise ValueError(
                f"the server sent client {requested}'s message to the node of partition {partition}"
            )
        trainer, num_clients = self.trainer_for(context)
        if not 0 <= partition < num_clients:
            raise ValueError(
                f"partition-id {partition} is not among the trainer's {num_clients} clients; "
                "num_clients (run config) must equal the number of partitions"
            )
        round_index = int(config["round-index"])
        secagg = message.content.config_records.get(SECAGG_KEY)
        if secagg is not None and PARAMS_KEY not in message.content.array_records:
            # SecAgg+'s pass after the calibration: this round's update, kept from it
            update = _take_pending(context, partition, round_index)
            return Message(content=secure_reply(update, secagg), reply_to=message)
        state = server_state_from_content(message.content)
        update = run_client(
            functools.partial(
                trainer.train_client_by_id, partition, round_index, float(config["lr"]), state
            ),
            partition,
            round_index + 1,
            logger,
        )
        if not isinstance(update, ClientUpdate):
            raise ClientError(str(update))
        own_loss = update.metrics.get("train_loss", float("nan"))  # for this client's log only
        if NOISE_STDS in config:  # a secure round's only client: it adds the round's noise
            stds = [float(s) for s in config[NOISE_STDS]]  # type: ignore[union-attr]
            update = client_noised_update(update, stds, round_index, trainer.args.dp_noise_seed)
        if secagg is not None:
            if secagg["stage"] == "calibrate":
                _keep_pending(context, update, round_index)
            return Message(content=secure_reply(update, secagg), reply_to=message)
        if config.get("transport-dtype") == "bfloat16":  # send as the server sent: half the bytes
            update = update.cast(torch.bfloat16)
        logger.info(
            "round %d: client %d trained %d steps on %d examples, train_loss %.4f",
            int(config["server-round"]),
            partition,
            update.num_steps,
            update.num_examples,
            own_loss,
        )
        return Message(content=client_update_to_content(update), reply_to=message)


_PENDING = "fedpac-secagg-pending"  # this node's update between SecAgg+'s two passes


def _keep_pending(context: Context, update: ClientUpdate, round_index: int) -> None:
    """Keep the round's update in the node's state (Flower keeps it between messages)."""
    for key, record in client_update_to_content(update).items():
        context.state[f"{_PENDING}.{key}"] = record
    context.state[_PENDING] = ConfigRecord({"round-index": round_index})


def _take_pending(context: Context, partition: int, round_index: int) -> ClientUpdate:
    """The update :func:`_keep_pending` kept for ``round_index`` (removed from the state)."""
    kept = context.state.config_records.get(_PENDING)
    if kept is None or int(kept["round-index"]) != round_index:
        raise ValueError(
            f"round {round_index + 1}: SecAgg+ asked for this node's update, but it kept none "
            "from the round's calibration pass"
        )
    prefix = f"{_PENDING}."
    content = RecordDict()
    for key in [k for k in context.state if k.startswith(prefix)]:
        content[key[len(prefix) :]] = context.state.pop(key)
    del context.state[_PENDING]
    return client_update_from_content(content, partition)


def make_client_app(
    build_trainer: TrainerFactory,
    arguments: FedPACArguments | None = None,
    *,
    app_settings: Iterable[str] = (),
) -> ClientApp:
    """A Flower ``ClientApp`` that trains FedPAC clients with ``build_trainer``'s trainer.

    Parameters
    ----------
    build_trainer:
        ``build_trainer(args, run_config) -> FedPACTrainer`` (model + data).
    arguments:
        Fixed arguments; default: each run's run config.
    app_settings:
        The app's own run-config keys (e.g. ``("dataset",)``); any other key
        that is not a ``FedPACArguments`` field is refused.

    Returns
    -------
    ClientApp
        Handles ``train`` (local steps) and ``query`` (which partition this
        node holds) messages.
    """
    client = FedPACClient(build_trainer, arguments, app_settings)
    app = ClientApp(mods=[secagg_mod])  # Flower's SecAgg+ for secure rounds' messages only
    app.train()(client.train)
    app.query()(client.query)
    return app
