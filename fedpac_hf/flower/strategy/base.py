"""`PartitionStrategy`: sample client indices like FedPACTrainer and address them on Flower.

In fedpac_hf a *client* is an index into the federation's partitions, and a
round's participants are ``sample_clients(num_clients, S, seed, round)``, a
pure function of the seed and the round. On Flower every SuperNode holds one
partition, named by its node config (``partition-id``, set by the simulation
engine and by ``flower-supernode --node-config "partition-id=0
num-partitions=2"``). This base asks every node which partition it holds (a
``query`` message, once per node), samples client indices exactly as the
in-process trainer does, sends each sampled client's message to the node that
holds it and sorts the replies back into client order, dropping failed or
missing ones with a log line. Subclasses say what a message holds and how the
replies are aggregated.
"""

from __future__ import annotations

import logging
import time
from abc import abstractmethod
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpac_hf.federated import resolve_clients_per_round, sample_clients

__all__ = ["PartitionStrategy", "NODE_RECORD_KEY"]

# A child of Flower's logger: shown wherever Flower shows its logs (`flwr run --stream`).
logger = logging.getLogger("flwr").getChild(__name__)

NODE_RECORD_KEY = "node"
"""ConfigRecord of a query reply: ``partition-id`` and ``num-partitions`` of the node."""


class PartitionStrategy(Strategy):
    """Base of strategies whose clients are partition indices sampled from a seed.

    Parameters
    ----------
    num_clients:
        Partitions in the federation (every node holds one, ``0 .. num_clients - 1``).
    clients_per_round:
        A count, or a fraction in (0, 1] of ``num_clients``
        (:func:`fedpac_hf.federated.resolve_clients_per_round`).
    seed:
        Seed of the client sampling; with the trainer's ``args.seed`` the
        rounds sample the clients ``FedPACTrainer`` samples.
    min_clients_per_round:
        A round with fewer successful replies fails with ``RuntimeError``.
    node_wait_timeout:
        Seconds to wait, each round, for the nodes holding the sampled
        partitions to connect; after that the round goes on without them.
    query_timeout:
        Seconds to wait for nodes to say which partition they hold.
    """

    def __init__(
        self,
        num_clients: int,
        clients_per_round: int | float,
        *,
        seed: int,
        min_clients_per_round: int = 1,
        node_wait_timeout: float = 120.0,
        query_timeout: float = 60.0,
    ) -> None:
        self.num_clients = int(num_clients)
        self.clients_per_round = resolve_clients_per_round(self.num_clients, clients_per_round)
        if not 1 <= min_clients_per_round <= self.clients_per_round:
            raise ValueError(
                f"min_clients_per_round={min_clients_per_round} must lie in "
                f"[1, {self.clients_per_round}] (the clients sampled per round)"
            )
        self.seed = int(seed)
        self.min_clients_per_round = int(min_clients_per_round)
        self.node_wait_timeout = float(node_wait_timeout)
        self.query_timeout = float(query_timeout)
        self.partition_nodes: dict[int, int] = {}
        self._queried_nodes: set[int] = set()
        self._round_nodes: dict[int, int] = {}
        self._round_clients: list[int] = []

    # ------------------------------------------------------------- sampling

    def sample(self, server_round: int) -> list[int]:
        """Client indices of Flower's 1-based ``server_round`` (the trainer's round - 1)."""
        return sample_clients(self.num_clients, self.clients_per_round, self.seed, server_round - 1)

    def discover_nodes(self, grid: Grid, needed: Iterable[int]) -> dict[int, int]:
        """Map partitions to node ids, asking newly connected nodes which they hold.

        Waits up to ``node_wait_timeout`` for the ``needed`` partitions to
        appear. Returns ``{partition_id: node_id}`` of the connected nodes.

        Raises
        ------
        ValueError
            If a node reports another ``num-partitions`` than ``num_clients``.
        """
        needed = set(needed)
        deadline = time.monotonic() + self.node_wait_timeout
        while True:
            connected = set(grid.get_node_ids())
            self.partition_nodes = {p: n for p, n in self.partition_nodes.items() if n in connected}
            new = sorted(connected - self._queried_nodes)
            if new:
                self._query_nodes(grid, new)
            if needed <= set(self.partition_nodes) or time.monotonic() >= deadline:
                return dict(self.partition_nodes)
            logger.info(
                "waiting for the nodes of partitions %s (%d nodes connected)",
                sorted(needed - set(self.partition_nodes)),
                len(connected),
            )
            time.sleep(1.0)

    def _query_nodes(self, grid: Grid, node_ids: list[int]) -> None:
        messages = [
            Message(content=RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
            for n in node_ids
        ]
        replies = list(grid.send_and_receive(messages, timeout=self.query_timeout))
        answered = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                logger.warning(
                    "node %d did not say which partition it holds, it is left out: %s",
                    node,
                    reply.error.reason,
                )
                continue
            info = reply.content.config_records.get(NODE_RECORD_KEY, ConfigRecord())
            if "partition-id" not in info:
                logger.warning("node %d holds no partition (no partition-id), left out", node)
                continue
            partition, num = int(info["partition-id"]), int(info.get("num-partitions", -1))
            if num not in (-1, self.num_clients):
                raise ValueError(
                    f"node {node} holds partition {partition} of {num}, but the strategy has "
                    f"num_clients={self.num_clients}; start the SuperNodes with "
                    f'--node-config "partition-id=<i> num-partitions={self.num_clients}" or set '
                    "num_clients to the number of partitions"
                )
            if not 0 <= partition < self.num_clients:
                raise ValueError(
                    f"node {node} holds partition {partition}, outside 0..{self.num_clients - 1}"
                )
            other = self.partition_nodes.get(partition)
            if other is not None and other != node:
                logger.warning(
                    "nodes %d and %d both hold partition %d; using node %d",
                    other,
                    node,
                    partition,
                    min(other, node),
                )
                node = min(other, node)
            self.partition_nodes[partition] = node
        self._queried_nodes.update(answered)

    # ----------------------------------------------------------- messaging

    @abstractmethod
    def train_content(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord
    ) -> RecordDict:
        """The message of one round, before it is addressed to a client index."""

    @abstractmethod
    def address(self, content: RecordDict, client_id: int) -> RecordDict:
        """``content`` addressed to client ``client_id`` (its partition id added)."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample the round's clients and send each one its message."""
        sampled = self.sample(server_round)
        nodes = self.discover_nodes(grid, sampled)
        missing = [c for c in sampled if c not in nodes]
        if missing:
            logger.warning(
                "round %d: no connected node holds client(s) %s; they miss this round",
                server_round,
                missing,
            )
        self._round_clients = sampled
        self._round_nodes = {c: nodes[c] for c in sampled if c in nodes}
        content = self.train_content(server_round, arrays, config)
        return [
            Message(
                content=self.address(content, client),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
                group_id=str(server_round),
            )
            for client, node in self._round_nodes.items()
        ]

    def collect_replies(
        self, server_round: int, replies: Iterable[Message]
    ) -> list[tuple[int, RecordDict]]:
        """The successful replies of a round as ``(client_id, content)``, in client order.

        Error replies and clients that did not answer are dropped with a
        warning that names the client, its node and the reason.
        """
        node_clients = {node: client for client, node in self._round_nodes.items()}
        ok: list[tuple[int, RecordDict]] = []
        seen: set[int] = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            client = node_clients.get(node)
            if client is None or client in seen:
                logger.warning(
                    "round %d: ignoring an unexpected reply from node %d", server_round, node
                )
                continue
            seen.add(client)
            if reply.has_error():
                logger.warning(
                    "round %d: dropping client %d (node %d), its ClientApp failed: %s",
                    server_round,
                    client,
                    node,
                    reply.error.reason.strip(),
                )
                continue
            ok.append((client, reply.content))
        for client in self._round_clients:
            if client not in seen:
                logger.warning(
                    "round %d: dropping client %d, no reply (node %s)",
                    server_round,
                    client,
                    self._round_nodes.get(client, "not connected"),
                )
        return sorted(ok, key=lambda pair: pair[0])

    def check_enough(self, server_round: int, num_ok: int) -> None:
        """Fail the round when fewer than ``min_clients_per_round`` clients succeeded."""
        if num_ok < self.min_clients_per_round:
            raise RuntimeError(
                f"round {server_round}: only {num_ok} of {len(self._round_clients)} sampled "
                f"clients {self._round_clients} sent a usable update, fewer than "
                f"min_clients_per_round={self.min_clients_per_round}; see the warnings above "
                "for why the others were dropped"
            )

    # ---------------------------------------------------------- evaluation

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: the ServerApp evaluates the global model centrally."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Nothing to aggregate (see :meth:`configure_evaluate`)."""
        return None

    def summary(self) -> None:
        """Log how clients are sampled."""
        logger.info(
            "%s: %d of %d clients per round (seed %d), at least %d must succeed",
            type(self).__name__,
            self.clients_per_round,
            self.num_clients,
            self.seed,
            self.min_clients_per_round,
        )
