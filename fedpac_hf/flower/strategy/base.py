"""`PartitionStrategy`: address fedpac_hf's clients (partition indices) on Flower's nodes.

In fedpac_hf a *client* is an index into the federation's partitions. On
Flower every SuperNode holds one partition, named by its node config
(``partition-id``, set by the simulation engine and by ``flower-supernode
--node-config "partition-id=0 num-partitions=2"``). This base asks every node
which partition it holds (a ``query`` message, once per node), sends a
round's messages to the nodes holding the sampled clients, and sorts the
replies back into client order, saying for every missing or failed client
why. Which clients a round samples, and what happens to the replies, is the
round engine's business (see :class:`~fedpac_hf.flower.FedPACStrategy`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

__all__ = ["PartitionStrategy", "NODE_RECORD_KEY"]

# A child of Flower's logger: shown wherever Flower shows its logs (`flwr run --stream`).
logger = logging.getLogger("flwr").getChild(__name__)

NODE_RECORD_KEY = "node"
"""ConfigRecord of a query reply: ``partition-id`` and ``num-partitions`` of the node."""

Failure = tuple[int, str, str]
"""``(client_id, error_type, message)``: a sampled client that sent no usable reply."""


class PartitionStrategy(Strategy):
    """Base of strategies whose clients are partition indices held by Flower nodes.

    Parameters
    ----------
    num_clients:
        Partitions in the federation (every node holds one, ``0 .. num_clients - 1``).
    node_wait_timeout:
        Seconds to wait, each round, for the nodes holding the sampled
        partitions to connect; after that the round goes on without them.
    query_timeout:
        Seconds to wait for nodes to say which partition they hold.

    Attributes
    ----------
    partition_nodes:
        ``{partition_id: node_id}`` of the connected nodes known so far.
    """

    def __init__(
        self, num_clients: int, *, node_wait_timeout: float = 120.0, query_timeout: float = 60.0
    ) -> None:
        self.num_clients = int(num_clients)
        self.node_wait_timeout = float(node_wait_timeout)
        self.query_timeout = float(query_timeout)
        self.partition_nodes: dict[int, int] = {}
        self._queried_nodes: set[int] = set()
        self._round_nodes: dict[int, int] = {}

    # ------------------------------------------------------------- nodes

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

    def address_clients(
        self,
        grid: Grid,
        clients: Iterable[int],
        contents: Mapping[int, RecordDict] | None = None,
        *,
        group_id: str = "",
    ) -> tuple[list[Message], list[Failure]]:
        """Train messages to the nodes holding ``clients``, and the clients no node holds.

        Parameters
        ----------
        grid:
            Flower's grid.
        clients:
            The round's client indices.
        contents:
            ``{client_id: content}`` of each message (built by the caller).
        group_id:
            Flower's message group (the round).

        Returns
        -------
        (messages, failures)
            One message per reachable client; ``(client, "NotConnected", why)``
            for the others.
        """
        clients = list(clients)
        nodes = self.discover_nodes(grid, clients)
        self._round_nodes = {c: nodes[c] for c in clients if c in nodes}
        failures: list[Failure] = [
            (c, "NotConnected", "no connected node holds this client")
            for c in clients
            if c not in nodes
        ]
        messages = [
            Message(
                content=contents[client],
                dst_node_id=node,
                message_type=MessageType.TRAIN,
                group_id=group_id,
            )
            for client, node in self._round_nodes.items()
        ]
        return messages, failures

    def sort_replies(
        self, replies: Iterable[Message]
    ) -> tuple[list[tuple[int, RecordDict]], list[Failure]]:
        """The round's replies as ``(client_id, content)`` in client order, and the failures.

        A failure is an error reply (its reason, e.g. the ClientApp's
        exception) or a client whose node did not answer in time.
        """
        node_clients = {node: client for client, node in self._round_nodes.items()}
        ok: list[tuple[int, RecordDict]] = []
        failures: list[Failure] = []
        seen: set[int] = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            client = node_clients.get(node)
            if client is None or client in seen:
                logger.warning("ignoring an unexpected reply from node %d", node)
                continue
            seen.add(client)
            if reply.has_error():
                failures.append((client, "ClientAppError", reply.error.reason.strip()))
            else:
                ok.append((client, reply.content))
        for client, node in self._round_nodes.items():
            if client not in seen:
                failures.append((client, "NoReply", f"node {node} sent no reply in time"))
        return sorted(ok, key=lambda pair: pair[0]), sorted(failures)

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
