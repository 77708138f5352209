"""`FedPACStrategy`: the core's server rule as a Flower strategy.

Each round it sends the global parameters, Theta (when the algorithm aligns)
and the global direction (when it corrects) to the sampled clients, folds
their deltas and Theta into :class:`fedpac_hf.federated.RoundAggregator` in
client order, and keeps the resulting :class:`~fedpac_hf.federated.ServerState`.
Every registered algorithm (FedPAC, its ablations, the baselines) runs through
it: the algorithm object decides what travels and how clients step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedpac_hf.federated import Algorithm, RoundAggregator, ServerState
from fedpac_hf.trainer import FedPACTrainer

from ..records import (
    array_record_to_tensors,
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
    algorithm:
        The federated method (:func:`fedpac_hf.federated.get_algorithm`).
    num_clients, clients_per_round, seed, min_clients_per_round:
        Client sampling, as in :class:`PartitionStrategy`.
    learning_rates:
        eta_l of every round, index 0 for round 1
        (:meth:`FedPACTrainer.round_learning_rates`).
    local_steps:
        K, the clients' optimizer steps per round (turns the mean delta into
        the global direction).
    server_learning_rate:
        eta_g applied to the mean delta.
    weighting:
        ``"uniform"`` or ``"num_examples"`` weights of the client updates.
    initial_state:
        The state to start from (e.g. a checkpoint's, with Theta and the
        direction); default: the ``initial_arrays`` given to :meth:`start`.
    on_round_end:
        Called after each round with ``(server_round, state, metrics)``.
    **partition_kwargs:
        ``node_wait_timeout`` / ``query_timeout`` of :class:`PartitionStrategy`.

    Attributes
    ----------
    server_state:
        theta, Theta and g_G after the last completed round.
    history:
        The metrics of every round (drift, bytes, loss, ...).
    """

    def __init__(
        self,
        algorithm: Algorithm,
        *,
        num_clients: int,
        clients_per_round: int | float,
        learning_rates: Sequence[float],
        local_steps: int,
        seed: int = 42,
        server_learning_rate: float = 1.0,
        weighting: str = "uniform",
        min_clients_per_round: int = 1,
        initial_state: ServerState | None = None,
        on_round_end: RoundCallback | None = None,
        **partition_kwargs: Any,
    ) -> None:
        super().__init__(
            num_clients,
            clients_per_round,
            seed=seed,
            min_clients_per_round=min_clients_per_round,
            **partition_kwargs,
        )
        if local_steps < 1:
            raise ValueError(f"local_steps must be at least 1, got {local_steps}")
        if not learning_rates or any(lr <= 0 for lr in learning_rates):
            raise ValueError("learning_rates needs one positive local learning rate per round")
        self.algorithm = algorithm
        self.learning_rates = [float(lr) for lr in learning_rates]
        self.local_steps = int(local_steps)
        self.server_learning_rate = float(server_learning_rate)
        self.weighting = weighting
        self.server_state = initial_state
        self.on_round_end = on_round_end
        self.history: list[dict[str, float]] = []
        self._round_start = 0.0
        self._bytes_down = 0

    @classmethod
    def from_trainer(
        cls, trainer: FedPACTrainer, num_clients: int, **kwargs: Any
    ) -> FedPACStrategy:
        """The strategy that a :class:`FedPACTrainer`'s arguments describe.

        Algorithm, participation, seed, learning-rate schedule, K, eta_g,
        weighting and ``min_clients_per_round`` come from ``trainer.args``, so
        that the Flower run samples and steps like ``trainer.train()``.
        ``kwargs`` override any constructor argument.
        """
        args = trainer.args
        options: dict[str, Any] = dict(
            num_clients=num_clients,
            clients_per_round=args.clients_per_round,
            learning_rates=trainer.round_learning_rates(),
            local_steps=args.local_steps,
            seed=args.seed,
            server_learning_rate=args.server_learning_rate,
            weighting=args.aggregation_weighting,
            min_clients_per_round=args.min_clients_per_round,
        )
        options.update(kwargs)
        return cls(trainer.algorithm, **options)

    def learning_rate(self, server_round: int) -> float:
        """eta_l of Flower's 1-based ``server_round``."""
        if not 1 <= server_round <= len(self.learning_rates):
            raise ValueError(
                f"round {server_round} is past the {len(self.learning_rates)} rounds the "
                "learning-rate schedule covers; give as many rates as num_rounds"
            )
        return self.learning_rates[server_round - 1]

    def train_content(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord
    ) -> RecordDict:
        """theta^r, Theta^r (aligning) and g_G^r (correcting) plus the round's config."""
        self._round_start = time.perf_counter()
        if self.server_state is None:
            self.server_state = ServerState(params=array_record_to_tensors(arrays))
        content = server_state_to_content(
            self.server_state,
            self.algorithm,
            server_round=server_round,
            lr=self.learning_rate(server_round),
            partition_id=-1,
        )
        for key, value in config.items():  # the user's train_config travels too
            content["config"].setdefault(key, value)
        self._bytes_down = _wire_bytes(content) * len(self._round_nodes)
        return content

    def address(self, content: RecordDict, client_id: int) -> RecordDict:
        """The round's message for client ``client_id``."""
        return with_partition(content, client_id)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Apply the server rule to the round's successful replies.

        Raises
        ------
        RuntimeError
            If fewer than ``min_clients_per_round`` clients sent a usable update.
        """
        assert self.server_state is not None, "configure_train runs before aggregate_train"
        lr = self.learning_rate(server_round)
        aggregator = RoundAggregator(self.server_state, self.algorithm, self.weighting)
        bytes_up = 0
        for client, content in self.collect_replies(server_round, replies):
            try:
                update = client_update_from_content(content, client)
                aggregator.add(update)
            except ValueError as err:
                logger.warning("round %d: dropping client %d: %s", server_round, client, err)
                continue
            bytes_up += _wire_bytes(content)
        self.check_enough(server_round, aggregator.num_clients)
        self.server_state, metrics = aggregator.finalize(
            lr=lr, local_steps=self.local_steps, server_lr=self.server_learning_rate
        )
        metrics = {
            "round": float(server_round),
            "learning_rate": lr,
            **metrics,
            "num_dropped": float(len(self._round_clients) - aggregator.num_clients),
            "wire_bytes_up": float(bytes_up),
            "wire_bytes_down": float(self._bytes_down),
            "round_time": time.perf_counter() - self._round_start,
        }
        self.history.append(metrics)
        logger.info(
            "round %d: %d/%d clients %s, train_loss %.4f, drift %s, bytes up %d down %d",
            server_round,
            aggregator.num_clients,
            len(self._round_clients),
            sorted(aggregator.client_ids),
            metrics["train_loss"],
            f"{metrics['drift']:.4g} (relative {metrics['drift_relative']:.4g})"
            if "drift" in metrics
            else "n/a",
            int(metrics["bytes_up"]),
            int(metrics["bytes_down"]),
        )
        if self.on_round_end is not None:
            self.on_round_end(server_round, self.server_state, metrics)
        return tensors_to_array_record(self.server_state.params), MetricRecord(metrics)

    def summary(self) -> None:
        """Log the algorithm and how clients are sampled."""
        super().summary()
        logger.info(
            "algorithm %s: optimizer %s, align %s, beta %s, K %d, weighting %s",
            self.algorithm.name,
            self.algorithm.optimizer,
            self.algorithm.align,
            self.algorithm.beta,
            self.local_steps,
            self.weighting,
        )
