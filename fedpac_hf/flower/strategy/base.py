"""`PartitionStrategy`: address fedpac_hf's clients (partition indices) on Flower's nodes.

In fedpac_hf a *client* is an index into the federation's partitions. On
Flower every SuperNode holds one partition, named by its node config
(``partition-id``, set by the simulation engine and by ``flower-supernode
--node-config "partition-id=0 num-partitions=2"``). This base asks every node
which partition it holds (a ``query`` message, once per node: a node that
connects later, e.g. a SuperNode restarted after a crash, is asked when it
appears and takes its partition back), sends a round's messages to the nodes
holding the sampled clients, and sorts the replies back into client order,
saying for every missing or failed client why:

- ``NotConnected``: no connected node held the partition when the round
  started (after waiting ``node_wait_timeout`` for it);
- ``NodeUnavailable``: the node stopped reporting to the SuperLink during the
  round (killed, machine or network down): the SuperLink answers for it once
  its heartbeat has expired;
- ``NoReply``: no reply within the round's timeout;
- ``ClientAppError`` / ``ClientAppCrashed``: the ClientApp raised (its
  reason) or died.

Which clients a round samples, and what happens to the replies, is the
round engine's business (see :class:`~fedpac_hf.flower.FedPACStrategy`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

__all__ = ["PartitionStrategy", "NODE_RECORD_KEY"]

# A child of Flower's logger: shown wherever Flower shows its logs (`flwr run --stream`).
logger = logging.getLogger("flwr").getChild(__name__)

NODE_RECORD_KEY = "node"
"""ConfigRecord of a query reply: ``partition-id`` and ``num-partitions`` of the node."""

Failure = tuple[int, str, str]
"""``(client_id, error_type, message)``: a sampled client that sent no usable reply."""

# How an error reply's code is reported (any other code: "ClientAppError").
_ERROR_TYPES = {
    ErrorCode.NODE_UNAVAILABLE: "NodeUnavailable",
    ErrorCode.MESSAGE_UNAVAILABLE: "NoReply",
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "NoReply",
    ErrorCode.CLIENT_APP_CRASHED: "ClientAppCrashed",
}
_WAIT_LOG_SECONDS = 30.0  # while waiting for nodes, say so at most this often


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
        # every node that answered a query, in the order asked: its partition (None: none)
        self._node_partitions: dict[int, int | None] = {}
        self._round_messages: dict[int, Message] = {}

    # ------------------------------------------------------------- nodes

    def discover_nodes(self, grid: Grid, needed: Iterable[int]) -> dict[int, int]:
        """Map partitions to node ids, asking newly connected nodes which they hold.

        Waits up to ``node_wait_timeout`` for the ``needed`` partitions to
        appear. A partition held by two connected nodes goes to the one that
        connected last (a restarted SuperNode replaces its lost predecessor).

        Returns
        -------
        dict
            ``{partition_id: node_id}`` of the connected nodes.

        Raises
        ------
        ValueError
            If a node reports another ``num-partitions`` than ``num_clients``.
        """
        needed = set(needed)
        deadline = time.monotonic() + self.node_wait_timeout
        said: tuple[set[int], float] | None = None
        while True:
            connected = set(grid.get_node_ids())
            new = sorted(connected - set(self._node_partitions))
            if new:
                self._query_nodes(grid, new)
            self.partition_nodes = {
                partition: node
                for node, partition in self._node_partitions.items()
                if node in connected and partition is not None
            }
            missing = needed - set(self.partition_nodes)
            if not missing or time.monotonic() >= deadline:
                return dict(self.partition_nodes)
            if said is None or said[0] != missing or time.monotonic() - said[1] > _WAIT_LOG_SECONDS:
                logger.info(
                    "waiting up to %.0f s for the nodes of partitions %s (%d nodes connected)",
                    max(deadline - time.monotonic(), 0.0),
                    sorted(missing),
                    len(connected),
                )
                said = (missing, time.monotonic())
            time.sleep(1.0)

    def _query_nodes(self, grid: Grid, node_ids: list[int]) -> None:
        messages = [
            Message(content=RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
            for n in node_ids
        ]
        replies = list(grid.send_and_receive(messages, timeout=self.query_timeout))
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in node_ids:  # e.g. the SuperLink answering for a node that left
                continue
            if reply.has_error():
                logger.warning(
                    "node %d did not say which partition it holds, it is left out: %s",
                    node,
                    reply.error.reason,
                )
                self._node_partitions[node] = None
                continue
            info = reply.content.config_records.get(NODE_RECORD_KEY, ConfigRecord())
            if "partition-id" not in info:
                logger.warning("node %d holds no partition (no partition-id), left out", node)
                self._node_partitions[node] = None
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
                    "node %d now holds partition %d (before: node %d)", node, partition, other
                )
            else:
                logger.info("node %d holds partition %d", node, partition)
            self._node_partitions.pop(node, None)
            self._node_partitions[node] = partition

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
        failures: list[Failure] = [
            (c, "NotConnected", "no connected node holds this client")
            for c in clients
            if c not in nodes
        ]
        self._round_messages = {
            client: Message(
                content=contents[client],
                dst_node_id=nodes[client],
                message_type=MessageType.TRAIN,
                group_id=group_id,
            )
            for client in clients
            if client in nodes
        }
        return list(self._round_messages.values()), failures

    def sort_replies(
        self, replies: Iterable[Message]
    ) -> tuple[list[tuple[int, RecordDict]], list[Failure]]:
        """The round's replies as ``(client_id, content)`` in client order, and the failures.

        A reply is matched to its client by the message it answers, so an
        error reply that the SuperLink sends for a lost node counts too. A
        failure is an error reply (see the module docstring for the types) or
        a client whose node did not answer in time.
        """
        sent = self._round_messages
        by_message = {m.metadata.message_id: c for c, m in sent.items() if m.metadata.message_id}
        by_node = {m.metadata.dst_node_id: c for c, m in sent.items()}
        ok: list[tuple[int, RecordDict]] = []
        failures: list[Failure] = []
        seen: set[int] = set()
        for reply in replies:
            client = by_message.get(reply.metadata.reply_to_message_id)
            if client is None:
                client = by_node.get(reply.metadata.src_node_id)
            if client is None or client in seen:
                logger.warning(
                    "ignoring an unexpected reply from node %d", reply.metadata.src_node_id
                )
                continue
            seen.add(client)
            node = sent[client].metadata.dst_node_id
            if reply.has_error():
                kind = _ERROR_TYPES.get(reply.error.code, "ClientAppError")
                reason = reply.error.reason.strip()
                if kind != "ClientAppError":
                    reason = f"node {node}: {reason}"
                failures.append((client, kind, reason))
            else:
                ok.append((client, reply.content))
        for client, message in sent.items():
            if client not in seen:
                node = message.metadata.dst_node_id
                failures.append((client, "NoReply", f"node {node} sent no reply in time"))
        self._round_messages = {}
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
