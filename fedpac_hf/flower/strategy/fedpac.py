"""`FedPACStrategy`: the core's round engine as a Flower strategy.

Flower's ``Strategy.start`` owns the loop; each round this strategy asks the
core's :class:`~fedpac_hf.federated.RoundEngine` for the round's plan (its
sampled clients and learning rate), sends the global parameters, Theta (when
the algorithm aligns) and the global direction (when it corrects) to the
nodes holding those clients, records every reply or failure in the plan, and
lets the engine finish the round: the same sampling, schedule, server rule,
failure rule (``RoundError`` naming why each dropped client failed) and
metric names as ``simulate`` and ``FedPACTrainer``. Every registered
algorithm (FedPAC, its ablations, the baselines) runs through it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedpac_hf.federated import ClientUpdate, RoundEngine, RoundPlan, ServerState

from ..records import (
    client_update_from_content,
    server_state_to_content,
    tensors_to_array_record,
    with_partition,
)
from .base import PartitionStrategy

__all__ = ["FedPACStrategy"]

# A child of Flower's logger: shown wherever Flower shows its logs (`flwr run --stream`).
logger = logging.getLogger("flwr").getChild(__name__)

RoundCallback = Callable[[int, ServerState, dict[str, float]], None]


def _wire_bytes(content: RecordDict) -> int:
    return sum(record.count_bytes() for record in content.array_records.values())


class FedPACStrategy(PartitionStrategy):
    """FedPAC (or any registered algorithm) on Flower's message API.

    Parameters
    ----------
    engine:
        The round engine (algorithm, global state, sampling, schedule, server
        rule), e.g. ``args.round_engine(ServerState.from_model(model), num_clients)``.
        Rounds continue from ``engine.state.round``, so an engine built from a
        checkpoint's state resumes.
    on_round_end:
        Called after each round with ``(round, state, metrics)``.
    train_public:
        ``train_public(plan)``: the client rule on the server's public data
        (one update or several), for algorithms with ``public_curvature`` (its Theta is the
        next global Theta; see :data:`~fedpac_hf.flower.config.PublicCurvatureFactory`).
    **partition_kwargs:
        ``node_wait_timeout`` / ``query_timeout`` of :class:`PartitionStrategy`.

    Attributes
    ----------
    engine:
        The round engine; ``engine.state`` is theta, Theta and g_G after the
        last completed round, ``engine.history`` the metrics of every round.
    """

    def __init__(
        self,
        engine: RoundEngine,
        *,
        on_round_end: RoundCallback | None = None,
        train_public: Callable[[RoundPlan], ClientUpdate | Sequence[ClientUpdate]] | None = None,
        **partition_kwargs: Any,
    ) -> None:
        super().__init__(engine.num_clients, **partition_kwargs)
        if engine.algorithm.public_curvature and train_public is None:
            raise ValueError(
                f"{engine.algorithm.name} takes Theta from public data (public_curvature): give "
                "the server its public data (make_server_app's build_public_curvature)"
            )
        self.engine = engine
        self.on_round_end = on_round_end
        self.train_public = train_public
        self._plan: RoundPlan | None = None
        self._bytes_down = 0

    @property
    def engine(self) -> RoundEngine:
        """The round engine; set a new one (e.g. rebuilt from a checkpoint) before ``start``."""
        return self._engine

    @engine.setter
    def engine(self, engine: RoundEngine) -> None:
        if engine.num_clients != self.num_clients:
            raise ValueError(
                f"the engine has {engine.num_clients} clients, the strategy {self.num_clients}"
            )
        engine.log = logger  # dropped clients are logged where Flower shows its logs
        self._engine = engine

    @property
    def server_state(self) -> ServerState:
        """theta, Theta and g_G after the last completed round."""
        return self.engine.state

    @property
    def history(self) -> list[dict[str, float]]:
        """The metrics of every completed round."""
        return self.engine.history

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Plan the engine's next round and send each sampled client its message.

        ``arrays`` (Flower's copy of the global parameters) is not read: the
        engine's state is the global state. ``config`` travels in every message.
        """
        plan = self.engine.plan_round()
        self._plan = plan
        logger.info(
            "round %d of %d%s: clients %s, learning rate %.4g",
            plan.round_number,
            self.engine.num_rounds,
            f" (Flower's round {server_round})" if server_round != plan.round_number else "",
            plan.clients,
            plan.learning_rate,
        )
        content = server_state_to_content(
            plan.state,
            self.engine.algorithm,
            server_round=plan.round_number,
            lr=plan.learning_rate,
            partition_id=-1,
        )
        for key, value in config.items():  # the user's train_config travels too
            content["config"].setdefault(key, value)
        contents = {client: with_partition(content, client) for client in plan.clients}
        messages, failures = self.address_clients(
            grid, plan.clients, contents, group_id=str(plan.round_number)
        )
        for client, error_type, message in failures:
            plan.fail(client, error_type, message)
        self._bytes_down = _wire_bytes(content) * len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record the round's replies in the plan and let the engine finish the round.

        Raises
        ------
        RoundError
            If fewer than ``min_clients_per_round`` clients sent a usable
            update (the message lists why each dropped client failed) or the
            aggregate is not finite; nothing changes.
        """
        plan = self._plan
        if plan is None:
            raise RuntimeError("aggregate_train ran before configure_train planned the round")
        ok, failures = self.sort_replies(replies)
        for client, error_type, message in failures:
            plan.fail(client, error_type, message)
        bytes_up = 0
        for client, content in ok:
            try:
                update = client_update_from_content(content, client)
                plan.record(update)
            except ValueError as err:
                plan.fail(client, "ValueError", str(err))
                continue
            bytes_up += _wire_bytes(content)
        return self.finish(plan, bytes_up, self._bytes_down)

    def finish(
        self, plan: RoundPlan, bytes_up: int, bytes_down: int, **extra: float
    ) -> tuple[ArrayRecord, MetricRecord]:
        """Let the engine finish the recorded round; log it, call back, return Flower's results.

        ``extra`` metrics join the round's (e.g. ``secagg_clipped``).
        """
        self._plan = None
        if self.engine.algorithm.public_curvature and self.train_public is not None:
            plan.use_public_curvature(self.train_public(plan))  # the server's Theta
        metrics = self.engine.finish_round(plan)
        metrics["wire_bytes_up"] = float(bytes_up)
        metrics["wire_bytes_down"] = float(bytes_down)
        metrics.update({k: float(v) for k, v in extra.items()})
        logger.info(
            "round %d: %d/%d clients %s, train_loss %.4f, drift %s, bytes up %d down %d",
            plan.round_number,
            plan.aggregator.num_clients,
            len(plan.clients),
            sorted(plan.aggregator.client_ids),
            metrics["train_loss"],
            f"{metrics['drift']:.4g} (relative {metrics['drift_relative']:.4g})"
            if "drift" in metrics
            else "n/a",
            int(metrics["bytes_up"]),
            int(metrics["bytes_down"]),
        )
        if self.on_round_end is not None:
            self.on_round_end(plan.round_number, self.engine.state, metrics)
        return tensors_to_array_record(self.engine.state.params), MetricRecord(metrics)

    def summary(self) -> None:
        """Log the algorithm, how clients are sampled and, on a resumed run, where it resumes."""
        engine, algorithm = self.engine, self.engine.algorithm
        if engine.state.round:
            logger.info(
                "resuming after round %d of %d: Flower numbers the remaining rounds from 1, "
                "the rounds logged, recorded and saved here keep the run's numbers (%d..%d)",
                engine.state.round,
                engine.num_rounds,
                engine.state.round + 1,
                engine.num_rounds,
            )
        logger.info(
            "%s: %d of %d clients per round (seed %d), at least %d must succeed; rounds %d..%d",
            type(self).__name__,
            engine.clients_per_round,
            engine.num_clients,
            engine.seed,
            engine.min_clients_per_round,
            engine.state.round + 1,
            engine.num_rounds,
        )
        logger.info(
            "algorithm %s: optimizer %s, align %s, beta %s, K %d, weighting %s",
            algorithm.name,
            algorithm.optimizer,
            algorithm.align,
            algorithm.beta,
            engine.local_steps,
            engine.weighting,
        )
