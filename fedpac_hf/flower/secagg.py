"""FedPAC's round through Flower's SecAgg+ (``secure_aggregation: true``).

Nothing here masks, shares or encrypts: Flower's
:class:`~flwr.server.workflow.SecAggPlusWorkflow` (server) and
:func:`~flwr.client.mod.secaggplus_mod` (client) do. This module plugs FedPAC's
messages into them:

- server, :func:`secure_mean`: runs the workflow once over the round's train
  messages (the strategy's own, one per sampled client) and returns the
  unmasked weighted mean of the clients' vectors, the clients that completed
  and why the others dropped out. The workflow talks to a legacy ``Strategy``
  (:class:`_Collect`) that only names the round's nodes and keeps the results;
  its setup stage is given FedPAC's messages instead of legacy ``FitIns``.
- client, :func:`secagg_mod`: installs ``secaggplus_mod`` for the train
  messages that carry SecAgg+'s config record (and only those), and
  :func:`secure_reply` packs a client's update as the ``FitRes`` the mod
  masks: the delta and Theta scaled by the public bounds the server sent
  (:mod:`fedpac_hf.federated.secure_aggregation`), or, in a calibration pass,
  their log-magnitudes (zeros under client-level DP, whose bounds are the
  clip norms).

What travels in the clear: the weight SecAgg+ sums with (1, or the client's
examples under ``num_examples`` weighting), its local steps (the round's
setting), the names of its Theta entries, and, under ``num_examples``
weighting, of its metrics those the server reads
(:data:`~fedpac_hf.federated.secure_aggregation.CLEAR_METRICS`). Its
``train_loss``, under uniform weighting its examples, skipped steps, Hessian
refreshes, how many of its values its bounds clipped and record-level DP's
epsilon (as a histogram), and under client-level DP whether its delta and
Theta were clipped are summed with the update instead (the vector's last array;
:func:`~fedpac_hf.federated.secure_aggregation.secure_metrics`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from fedpac_hf.federated import ClientUpdate
from fedpac_hf.federated.secure_aggregation import (
    CLIPPING_RANGE,
    log_magnitudes,
    scale_tensors,
    secure_metrics,
    within_rounding,
)

__all__ = [
    "CLIPPED",
    "NOISE_STDS",
    "SECAGG_KEY",
    "SecAggOutcome",
    "as_tensors",
    "secagg_mod",
    "secure_mean",
    "secure_reply",
    "theta_names_of",
]

logger = logging.getLogger("flwr").getChild(__name__)

SECAGG_KEY = "secagg"
"""ConfigRecord of a secure train message: ``stage`` (``calibrate``/``aggregate``),
``max-weight``, ``weighting``, ``delta-names``/``delta-bounds`` and
``theta-names``/``theta-bounds`` (aggregate); under client-level DP
``names-only`` (calibrate) and ``dp-clip-norms`` (aggregate)."""

_THETA_NAMES = "secagg-theta-names"  # FitRes metric: the client's Theta entries (JSON)

NOISE_STDS = "dp-noise-stds"
"""Train config of a secure round's only client under client-level DP: the noise stds of its
delta and Theta, which it adds itself (SecAgg+ cannot hide a single client's update)."""

CLIPPED = "secagg-clipped"
"""FitRes metric: how many of the client's values lay outside their bound (clipped)."""


# ------------------------------------------------------------------ server


@dataclass
class SecAggOutcome:
    """One SecAgg+ pass: the unmasked mean, who completed, why the others did not.

    Attributes
    ----------
    mean:
        The weighted mean of the completed clients' vectors (float64 arrays),
        ``None`` when the protocol halted (too few clients left).
    completed:
        ``{node_id: (num_examples, metrics)}`` of the clients in the mean
        (the FitRes' weight and metrics, sent in the clear).
    errors:
        ``{node_id: reason}`` of the nodes whose reply was an error.
    bytes_up, bytes_down:
        What the protocol's messages carried (all four stages).
    """

    mean: list[np.ndarray] | None = None
    completed: dict[int, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0


class _Collect(Strategy):
    """The legacy strategy SecAgg+ talks to: names the round's nodes, keeps the results."""

    def __init__(self, nodes: Iterable[int], grid: Grid) -> None:
        self.proxies = [GridClientProxy(n, grid, 0) for n in nodes]
        self.results: list[tuple[Any, FitRes]] | None = None

    def initialize_parameters(self, client_manager: Any) -> None:
        return None

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list:
        return [(p, FitIns(Parameters(tensors=[], tensor_type=""), {})) for p in self.proxies]

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple:
        self.results = list(results)
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple:
        return None, {}

    def evaluate(self, server_round: int, parameters: Any) -> None:
        return None


class _FedPACSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, sending FedPAC's train messages at the masking stage."""

    def __init__(self, contents: Mapping[int, RecordDict], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.contents = contents

    def setup_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        ok = super().setup_stage(grid, context, state)
        state.nid_to_fitins = {nid: self.contents[nid] for nid in state.nid_to_fitins}
        return ok


class _CountingGrid:
    """The grid as SecAgg+ uses it, noting each error reply's reason and the bytes moved."""

    def __init__(self, grid: Grid, outcome: SecAggOutcome) -> None:
        self.grid, self.outcome = grid, outcome

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        messages = list(messages)
        self.outcome.bytes_down += sum(_content_bytes(m.content) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_error():
                self.outcome.errors.setdefault(reply.metadata.src_node_id, reply.error.reason)
            else:
                self.outcome.bytes_up += _content_bytes(reply.content)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


def _content_bytes(content: RecordDict) -> int:
    """The bytes of a message's arrays and of its config values (masked vectors, keys)."""
    total = sum(record.count_bytes() for record in content.array_records.values())
    for record in content.config_records.values():
        for value in record.values():
            for item in value if isinstance(value, list) else [value]:
                total += len(item) if isinstance(item, bytes | str) else 8
    return total


def secure_mean(
    grid: Grid,
    contents: Mapping[int, RecordDict],
    server_round: int,
    settings: Mapping[str, Any],
    timeout: float | None = None,
) -> SecAggOutcome:
    """Run SecAgg+ once over ``contents`` (``{node_id: train message content}``).

    ``settings``: ``num_shares``, ``reconstruction_threshold``, ``max_weight``
    (``PrivacyArguments.secure_aggregation_settings``). ``timeout`` bounds
    each of the protocol's four exchanges.
    """
    outcome = SecAggOutcome()
    strategy = _Collect(contents, grid)
    state = RecordDict(
        {
            MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: int(server_round)}),
            MAIN_PARAMS_RECORD: ArrayRecord(),
        }
    )
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
        strategy=strategy,
    )
    workflow = _FedPACSecAggPlus(
        contents,
        num_shares=settings["num_shares"],
        reconstruction_threshold=settings["reconstruction_threshold"],
        max_weight=float(settings["max_weight"]),
        clipping_range=CLIPPING_RANGE,
        timeout=timeout,
    )
    workflow(_CountingGrid(grid, outcome), context)  # type: ignore[arg-type]
    if strategy.results is None:  # the protocol halted: too few clients left
        return outcome
    for proxy, fitres in strategy.results:
        outcome.completed[proxy.node_id] = (int(fitres.num_examples), dict(fitres.metrics))
        if outcome.mean is None:
            outcome.mean = parameters_to_ndarrays(fitres.parameters)
    return outcome


# ------------------------------------------------------------------ client


def secagg_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """Flower's ``secaggplus_mod`` for the train messages of SecAgg+ only.

    ``secaggplus_mod`` refuses a train message without its config record, so
    plain rounds (and query messages) go straight to the handler.
    """
    if (
        msg.metadata.message_type == MessageType.TRAIN
        and RECORD_KEY_CONFIGS in msg.content.config_records
    ):
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def theta_names_of(metrics: Mapping[str, Any]) -> list[str]:
    """The Theta entries a client named in its secure reply's metrics."""
    return list(json.loads(str(metrics.get(_THETA_NAMES, "[]"))))


def secure_reply(update: ClientUpdate, secagg: ConfigRecord) -> RecordDict:
    """``update`` as the FitRes-style reply content that ``secaggplus_mod`` masks.

    The vector is the delta (in the server's parameter order) then Theta, each
    tensor scaled by its bound, then the client's scaled ``train_loss``, its
    scaled counts (uniform weighting: examples, skipped steps, Hessian
    refreshes and how many of its values were summed at an end of SecAgg+'s
    range) and, under client-level DP, its two clip flags (under record-level
    DP with uniform weighting, its epsilon's histogram); in a calibration
    pass, one log-magnitude per tensor. The weight is 1 (uniform weighting)
    or the client's examples, which then travel in the clear with its counts
    (and its epsilon). The loss and the clip flags never do.

    Raises
    ------
    ValueError
        If the client's examples exceed ``secagg_max_weight`` or its tensors
        differ from the bounds' (another model or optimizer).
    """
    delta_names = list(secagg["delta-names"])
    theta_names = sorted(update.curvature)
    uniform = secagg["weighting"] != "num_examples"
    private = "dp-clip-norms" in secagg
    examples = update.num_examples if uniform else None
    if secagg["stage"] == "calibrate":
        arrays = [
            np.asarray(log_magnitudes(update.delta, delta_names), dtype=np.float64),
            np.asarray(log_magnitudes(update.curvature, theta_names), dtype=np.float64),
        ]
        if secagg.get("names-only"):  # client-level DP: the bounds are the clip norms
            arrays = [np.zeros_like(a) for a in arrays]
        clear, clipped = secure_metrics(update.metrics, private, examples)[1], 0
    else:
        theta_names = list(secagg["theta-names"])
        delta, curvature = update.delta, update.curvature
        if private:  # client-level DP: SecAgg+'s rounding within the clip
            delta_norm, theta_norm = secagg["dp-clip-norms"]
            delta = within_rounding(delta, delta_norm)
            curvature = within_rounding(curvature, theta_norm) if curvature else curvature
        parts = [
            scale_tensors(delta, dict(zip(delta_names, secagg["delta-bounds"]))),
            scale_tensors(curvature, dict(zip(theta_names, secagg["theta-bounds"]))),
        ]
        arrays = [t.numpy() for part in parts for t in part.values()]
        beyond = sum(int((np.abs(a) > CLIPPING_RANGE).sum()) for a in arrays)
        summed, clear, clipped = secure_metrics(update.metrics, private, examples, beyond)
        arrays.append(np.asarray(summed, dtype=np.float32))  # loss, counts, DP's clip flags
    weight = 1
    if not uniform:
        weight = int(update.num_examples)
        if weight > float(secagg["max-weight"]):
            raise ValueError(
                f"client {update.client_id} trained on {weight} examples, more than "
                f"secagg_max_weight={secagg['max-weight']}: raise secagg_max_weight"
            )
    metrics: dict[str, Any] = {k: float(v) for k, v in clear.items()}
    metrics.update(
        {
            "partition-id": int(update.client_id),
            "num-steps": int(update.num_steps),
            _THETA_NAMES: json.dumps(theta_names),
        }
    )
    if not uniform:  # the weight SecAgg+ sums with, and the counts a weighted mean would lose
        metrics.update({"num-examples": int(update.num_examples), CLIPPED: clipped})
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), weight, metrics)
    return compat.fitres_to_recorddict(fitres, False)


def as_tensors(arrays: Iterable[np.ndarray]) -> list[torch.Tensor]:
    """Unmasked arrays as float64 tensors."""
    return [torch.from_numpy(np.asarray(a, dtype=np.float64)) for a in arrays]
