"""What travels between the FedPAC ServerApp and ClientApps, as Flower records.

Downlink (server to client), one ``RecordDict``:

- ``"params"``: the global trainable parameters theta^r (``ArrayRecord``);
- ``"curvature"``: the global Theta^r, only when the algorithm aligns and a
  Theta exists (``ArrayRecord``);
- ``"direction"``: the global direction g_G^r, only when the algorithm
  corrects and a direction exists (``ArrayRecord``);
- ``"config"``: ``server-round`` (1-based), ``round-index`` (0-based, the
  trainer's), ``lr`` (this round's local learning rate) and ``partition-id``
  (the client index that the server sampled) (``ConfigRecord``).

Uplink (client to server), one ``RecordDict``:

- ``"delta"``: Delta_i per trainable parameter (``ArrayRecord``);
- ``"curvature"``: the client's Theta_i, absent for optimizers without one;
- ``"metrics"``: ``num-examples``, ``num-steps``, ``partition-id`` and the
  client's training metrics (``MetricRecord``).

Tensors travel as float32 NumPy arrays, so a round trip is exact; with
``transport_dtype="bfloat16"`` the downlink state and the uplink delta and
Theta travel as bfloat16 bit patterns (``int16`` arrays), half the bytes, and
``config["transport-dtype"]`` tells the client to send its update the same way.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedpac_hf.federated import Algorithm, ClientUpdate, ServerState

__all__ = [
    "PARAMS_KEY",
    "CURVATURE_KEY",
    "DIRECTION_KEY",
    "CONFIG_KEY",
    "DELTA_KEY",
    "METRICS_KEY",
    "CLIP_NORM_KEYS",
    "array_record_to_tensors",
    "client_update_from_content",
    "client_update_to_content",
    "server_state_from_content",
    "server_state_to_content",
    "tensors_to_array_record",
    "with_partition",
]

PARAMS_KEY = "params"
CURVATURE_KEY = "curvature"
DIRECTION_KEY = "direction"
CONFIG_KEY = "config"
DELTA_KEY = "delta"
METRICS_KEY = "metrics"
#: Downlink config keys of the round's clip norms under ``dp_clip_schedule: adaptive``.
CLIP_NORM_KEYS = ("dp-clip-norm", "dp-theta-clip-norm")

# MetricRecord keys that describe the update rather than the training
_NUM_EXAMPLES = "num-examples"
_NUM_STEPS = "num-steps"
_PARTITION_ID = "partition-id"


def _to_array(tensor: torch.Tensor) -> Array:
    """A float32 tensor as float32; a bfloat16 one as its raw bits (numpy has no bfloat16)."""
    tensor = tensor.detach().to("cpu")
    if tensor.dtype == torch.bfloat16:
        return Array(np.ascontiguousarray(tensor.view(torch.int16).numpy()))
    return Array(np.ascontiguousarray(tensor.to(torch.float32).numpy()))


def tensors_to_array_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Pack named tensors into an ``ArrayRecord`` (CPU, names kept in order).

    Parameters
    ----------
    tensors:
        Parameters, a delta, a curvature state or a direction, by name.
        bfloat16 tensors (reduced-precision transport) travel as their 16-bit
        patterns, everything else as float32.

    Returns
    -------
    ArrayRecord
        One ``Array`` per tensor.
    """
    return ArrayRecord({name: _to_array(t) for name, t in tensors.items()})


def array_record_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Unpack an ``ArrayRecord`` into writable CPU tensors (float32, or bfloat16 as sent)."""
    tensors = {}
    for name, array in record.items():
        values = array.numpy()
        if values.dtype == np.int16:
            tensors[name] = torch.from_numpy(values.copy()).view(torch.bfloat16)
        else:
            tensors[name] = torch.from_numpy(np.array(values, dtype=np.float32, copy=True))
    return tensors


def server_state_to_content(
    state: ServerState,
    algorithm: Algorithm,
    *,
    server_round: int,
    lr: float,
    partition_id: int,
) -> RecordDict:
    """The downlink message of one client: what the client rule needs and nothing more.

    Theta goes down only when ``algorithm.align`` and the direction only when
    ``algorithm.correction`` (the same rule :func:`fedpac_hf.federated.downlink_bytes`
    counts).

    Parameters
    ----------
    state:
        The server's global state theta^r, Theta^r, g_G^r.
    algorithm:
        Decides whether Theta and the direction are sent.
    server_round:
        Flower's 1-based round number.
    lr:
        The round's local learning rate eta_l.
    partition_id:
        The client index the server sampled for this message.
    """
    content = RecordDict({PARAMS_KEY: tensors_to_array_record(state.params)})
    if algorithm.align and state.curvature:
        content[CURVATURE_KEY] = tensors_to_array_record(state.curvature)
    if algorithm.correction and state.direction is not None:
        content[DIRECTION_KEY] = tensors_to_array_record(state.direction)
    content[CONFIG_KEY] = ConfigRecord(
        {
            "server-round": int(server_round),
            "round-index": int(server_round) - 1,
            "lr": float(lr),
            "partition-id": int(partition_id),
            "transport-dtype": _dtype_name(state),
        }
    )
    if state.beta is not None:  # beta="auto": the server's choice for this round
        content[CONFIG_KEY]["beta"] = float(state.beta)
    if state.dp_clip_norms is not None:  # dp_clip_schedule: adaptive, this round's bounds
        content[CONFIG_KEY][CLIP_NORM_KEYS[0]] = float(state.dp_clip_norms[0])
        if state.dp_clip_norms[1] is not None:
            content[CONFIG_KEY][CLIP_NORM_KEYS[1]] = float(state.dp_clip_norms[1])
    return content


def _dtype_name(state: ServerState) -> str:
    return "bfloat16" if next(iter(state.params.values())).dtype == torch.bfloat16 else "float32"


def with_partition(content: RecordDict, partition_id: int) -> RecordDict:
    """A copy of a downlink message addressed to another client index.

    The ``ArrayRecord`` objects are shared, not copied: the server builds a
    round's parameters, Theta and direction once, whatever the number of
    sampled clients.
    """
    config = ConfigRecord(dict(content.config_records[CONFIG_KEY]))
    config["partition-id"] = int(partition_id)
    out = RecordDict({key: record for key, record in content.array_records.items()})
    out[CONFIG_KEY] = config
    return out


def server_state_from_content(content: RecordDict) -> ServerState:
    """Rebuild the global state a client starts from out of a downlink message.

    Raises
    ------
    ValueError
        If the message carries no ``"params"`` record (not a FedPAC train message).
    """
    if PARAMS_KEY not in content.array_records:
        raise ValueError(
            f"the train message has no {PARAMS_KEY!r} ArrayRecord: it was not sent by "
            "FedPACStrategy (records present: " + ", ".join(sorted(content)) + ")"
        )
    config = content.config_records.get(CONFIG_KEY, ConfigRecord())
    curvature = content.array_records.get(CURVATURE_KEY)
    direction = content.array_records.get(DIRECTION_KEY)
    return ServerState(
        params=array_record_to_tensors(content.array_records[PARAMS_KEY]),
        curvature=array_record_to_tensors(curvature) if curvature is not None else None,
        direction=array_record_to_tensors(direction) if direction is not None else None,
        round=int(config.get("round-index", 0)),
        beta=float(config["beta"]) if "beta" in config else None,
        dp_clip_norms=_clip_norms(config),
    )


def _clip_norms(config: ConfigRecord) -> tuple[float, float | None] | None:
    """The round's adaptive clip norms of a downlink config (``None`` when it has none)."""
    if CLIP_NORM_KEYS[0] not in config:
        return None
    theta = config.get(CLIP_NORM_KEYS[1])
    return float(config[CLIP_NORM_KEYS[0]]), None if theta is None else float(theta)


def client_update_to_content(update: ClientUpdate) -> RecordDict:
    """The uplink message of one client: Delta_i, Theta_i, n_i and metrics."""
    content = RecordDict({DELTA_KEY: tensors_to_array_record(update.delta)})
    if update.curvature:
        content[CURVATURE_KEY] = tensors_to_array_record(update.curvature)
    metrics = MetricRecord(
        {
            _NUM_EXAMPLES: int(update.num_examples),
            _NUM_STEPS: int(update.num_steps),
            _PARTITION_ID: int(update.client_id),
        }
    )
    for name, value in update.metrics.items():
        metrics[name] = float(value)
    content[METRICS_KEY] = metrics
    return content


def client_update_from_content(content: RecordDict, client_id: int) -> ClientUpdate:
    """Turn a client's reply back into the core's :class:`ClientUpdate`.

    Parameters
    ----------
    content:
        The reply's content.
    client_id:
        The client index the server sent the message for; a reply that names
        another partition is refused.

    Raises
    ------
    ValueError
        If the reply lacks the delta or its metrics, or answers for another client.
    """
    if DELTA_KEY not in content.array_records or METRICS_KEY not in content.metric_records:
        raise ValueError(
            f"client {client_id} replied without {DELTA_KEY!r} or {METRICS_KEY!r} records "
            "(is the node running fedpac_hf's ClientApp?)"
        )
    metrics = dict(content.metric_records[METRICS_KEY])
    replied_for = int(metrics.pop(_PARTITION_ID, client_id))
    if replied_for != client_id:
        raise ValueError(f"the reply for client {client_id} was computed for client {replied_for}")
    curvature = content.array_records.get(CURVATURE_KEY)
    return ClientUpdate(
        client_id=client_id,
        delta=array_record_to_tensors(content.array_records[DELTA_KEY]),
        curvature=array_record_to_tensors(curvature) if curvature is not None else {},
        num_examples=int(metrics.pop(_NUM_EXAMPLES)),
        num_steps=int(metrics.pop(_NUM_STEPS)),
        metrics={k: float(v) for k, v in metrics.items()},
    )
