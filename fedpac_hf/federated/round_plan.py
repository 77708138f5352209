"""One round in progress: its clients, its learning rate, and the running sums of their updates.

:meth:`~fedpac_hf.federated.RoundEngine.plan_round` makes a :class:`RoundPlan`;
the shell records each client's update or failure in it (and, with
``public_curvature``, the server's own updates on public data), and
:meth:`~fedpac_hf.federated.RoundEngine.finish_round` applies the server rule.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .failures import ClientFailure
from .privacy import ClientDP
from .server import RoundAggregator
from .state import ClientUpdate, ServerState, mean_curvature

__all__ = ["RoundPlan"]

logger = logging.getLogger("fedpac_hf.federated.engine")  # where dropped clients are logged


@dataclass
class RoundPlan:
    """One round in progress: who trains, at which rate, and the running sums.

    Attributes
    ----------
    round_index:
        The round, counted from 0 (``round_number`` counts from 1).
    clients:
        The sampled client indices, sorted.
    learning_rate:
        eta_l of this round.
    aggregator:
        The running sums of the updates recorded so far.
    state:
        What the clients start from: the global state as it travels (rounded
        to the transport dtype; the server keeps its float32 master copy), on
        the engine's ``device``.
    transport_dtype:
        The dtype updates travel in; :meth:`record` rounds updates to it.
    started:
        ``time.perf_counter()`` when the round was planned.
    log:
        Where dropped clients are logged.
    """

    round_index: int
    clients: list[int]
    learning_rate: float
    aggregator: RoundAggregator
    state: ServerState
    transport_dtype: torch.dtype = torch.float32
    started: float = field(default_factory=time.perf_counter)
    log: logging.Logger = logger

    @property
    def round_number(self) -> int:
        """The round, counted from 1 (as logged and as Flower counts)."""
        return self.round_index + 1

    def dp_round(self) -> ClientDP:
        """The round's client-level DP settings at its rate and bounds
        (:meth:`~fedpac_hf.federated.privacy.ClientDP.at_rate`, as the server applies them).

        Raises ``ValueError`` when the run has no client-level DP.
        """
        dp = self.aggregator.privacy
        if dp is None:
            raise ValueError(f"round {self.round_number} has no client-level DP")
        return dp.at_rate(self.learning_rate, self.state.dp_clip_norms)

    def record(self, result: ClientUpdate | ClientFailure) -> None:
        """Fold a client's update into the sums, or note why it sent none."""
        if isinstance(result, ClientFailure):
            self.aggregator.drop(result)
        else:
            self.aggregator.add(result.cast(self.transport_dtype))

    def use_public_curvature(self, updates: ClientUpdate | Sequence[ClientUpdate]) -> None:
        """Make the server's own updates on public data the source of the next global Theta.

        For algorithms with ``public_curvature``: ``updates`` are runs of the
        client rule by the server on public data from :attr:`state`; the mean
        of their Theta is used, their deltas are not (the parameters come from
        the clients alone).
        """
        updates = [updates] if isinstance(updates, ClientUpdate) else list(updates)
        if not updates or not all(update.curvature for update in updates):
            raise ValueError(
                "the server's update on the public data has no curvature: the optimizer "
                f"{self.aggregator.algorithm.optimizer!r} exports no Theta"
            )
        self.aggregator.public_curvature = mean_curvature(updates)
        losses = [update.metrics.get("train_loss", math.nan) for update in updates]
        self.aggregator.public_loss = math.fsum(losses) / len(losses)

    def fail(self, client_id: int, error_type: str, message: str) -> None:
        """Record that ``client_id`` produced no update, and why (logged as a warning)."""
        failure = ClientFailure(int(client_id), self.round_number, error_type, message)
        self.log.warning("round %d: dropping %s", self.round_number, failure)
        self.aggregator.drop(failure)
