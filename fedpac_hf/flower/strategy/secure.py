"""`SecureFedPACStrategy`: FedPAC's round with the updates summed by Flower's SecAgg+.

The round is :class:`FedPACStrategy`'s: ``configure_train`` plans it with the
engine and builds one train message per sampled client, and the engine's
``finish_round`` applies the server rule. What differs is how the updates
travel: ``configure_train`` hands Flower's loop no message, and
``aggregate_train`` sends the round's messages through SecAgg+
(:func:`~fedpac_hf.flower.secagg.secure_mean`), which returns only the
weighted mean of the clients' scaled delta and Theta. The mean, unscaled with
the round's public bounds (:mod:`fedpac_hf.federated.secure_aggregation`),
goes into the round's aggregator as its sums; Theta is repaired after
unmasking. In the first round a calibration pass of SecAgg+ first sets the
bounds (the clients then send the update they kept from it).

Under client-level DP the bounds are the round's clip norms, the calibration
pass only names Theta's entries, the clients' clip flags are summed with
their updates (the server learns how many clients were clipped, which
adaptive clip norms need, not which), and the server adds the mechanism's
noise to the unmasked sums as in a plain round. A round with a single client
(Poisson sampling draws some) skips SecAgg+, which cannot hide one update:
that client adds the round's noise itself and the server adds none.

A client that drops out during SecAgg+ is recorded as dropped, with its
error; the protocol recovers the sum of the others as long as enough shares
remain (``secagg_reconstruction_threshold``), else every client of the round
is dropped and the engine's failure rule stops the run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedpac_hf.federated import RoundEngine, RoundPlan
from fedpac_hf.federated.secure_aggregation import (
    HEADROOM,
    add_secure_mean,
    bounds_from_log_magnitudes,
    dp_bounds,
    read_secure_metrics,
    secagg_bounds,
    unscale_tensors,
)
from fedpac_hf.optim import sent_form

from ..records import CONFIG_KEY
from ..secagg import (
    CLIPPED,
    NOISE_STDS,
    SECAGG_KEY,
    SecAggOutcome,
    as_tensors,
    secure_mean,
    theta_names_of,
)
from .fedpac import FedPACStrategy

__all__ = ["SecureFedPACStrategy"]

logger = logging.getLogger("flwr").getChild(__name__)

Bounds = tuple[dict[str, float], dict[str, float]]
_CLEAR = ("partition-id", "num-examples", "num-steps", "secagg-theta-names", CLIPPED)


class SecureFedPACStrategy(FedPACStrategy):
    """:class:`FedPACStrategy` whose clients' updates are aggregated with SecAgg+.

    Parameters
    ----------
    engine:
        The round engine (float32 transport, fixed beta).
    secagg:
        ``num_shares``, ``reconstruction_threshold``, ``max_weight`` and, optionally,
        ``headroom``, how far above the expected largest entry each tensor's bound lies
        (default :data:`~fedpac_hf.federated.secure_aggregation.HEADROOM`;
        ``FedPACArguments.secure_aggregation_settings``).
    secagg_timeout:
        Seconds each of SecAgg+'s four exchanges waits for replies (``None``: no limit).
    record_target_epsilon:
        Record-level DP's ``dp_target_epsilon``: no client's epsilon exceeds it, so the
        round's epsilon, an upper bin edge of the clients' histogram, is capped at it.

    Attributes
    ----------
    round_bounds:
        ``{round: (delta_bounds, theta_bounds)}``, the public bounds of each round.
    """

    def __init__(
        self,
        engine: RoundEngine,
        *,
        secagg: Mapping[str, Any],
        secagg_timeout: float | None = None,
        record_target_epsilon: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(engine, **kwargs)
        self.secagg = dict(secagg)
        self.secagg_timeout = secagg_timeout
        self.record_target_epsilon = record_target_epsilon
        self.headroom = float(secagg.get("headroom", HEADROOM))
        self.round_bounds: dict[int, Bounds] = {}
        self._grid: Grid | None = None
        self._messages: list[Message] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Plan the round and build its messages, kept for SecAgg+ (Flower's loop sends none).

        Under client-level DP a round with one client (Poisson sampling, or
        the others unreachable) goes through Flower's loop instead: SecAgg+
        cannot hide a single update, so the client adds the round's noise
        itself (:data:`~fedpac_hf.flower.secagg.NOISE_STDS`) and the server adds none.
        """
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._grid = grid
        plan = self._plan
        if plan is not None and self.engine.privacy is not None and len(messages) == 1:
            stds = plan.dp_round().noise_stds()
            messages[0].content.config_records[CONFIG_KEY][NOISE_STDS] = list(stds)
            plan.aggregator.client_noised = True
            logger.info(
                "round %d: one client, which adds the round's noise itself (no SecAgg+ pass)",
                plan.round_number,
            )
            self._messages = []
            return messages
        self._messages = messages
        return []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Run SecAgg+ over the round's messages, add the mean, let the engine finish the round."""
        plan = self._plan
        if plan is None or self._grid is None:
            raise RuntimeError("aggregate_train ran before configure_train planned the round")
        if plan.aggregator.client_noised:  # one client, noised by itself: a plain round
            return super().aggregate_train(server_round, replies)
        clients = {m.metadata.dst_node_id: c for c, m in self._round_messages.items()}
        contents = {m.metadata.dst_node_id: m.content for m in self._messages}
        self._round_messages, self._messages = {}, []
        traffic, clipped = [0, 0], 0.0
        bounds = self._bounds(plan)
        light = False
        if bounds is None and contents:  # the first round: calibrate the bounds first
            calibrate = {"stage": "calibrate", "names-only": self.engine.privacy is not None}
            calibration = self._pass(plan, clients, contents, calibrate, traffic)
            bounds = self._calibrated(plan, calibration)
            contents = {n: contents[n] for n in calibration.completed} if bounds else {}
            light = True  # the clients kept their update: the state need not travel again
        if bounds is not None and contents:
            delta_bounds, theta_bounds = bounds
            self.round_bounds[plan.round_number] = bounds
            secagg = {
                "stage": "aggregate",
                "delta-bounds": list(delta_bounds.values()),
                "theta-names": list(theta_bounds),
                "theta-bounds": list(theta_bounds.values()),
            }
            if self.engine.privacy is not None:  # the clients keep SecAgg+'s rounding inside
                secagg["dp-clip-norms"] = list(self._clip_norms(plan))
            outcome = self._pass(plan, clients, contents, secagg, traffic, light)
            if outcome.mean is not None:
                means = as_tensors(outcome.mean)
                sizes = len(delta_bounds), len(delta_bounds) + len(theta_bounds)
                delta = unscale_tensors(means[: sizes[0]], delta_bounds)
                theta = unscale_tensors(means[sizes[0] : sizes[1]], theta_bounds)
                summed = read_secure_metrics(  # the vector's last array
                    means[sizes[1]],
                    len(outcome.completed),
                    self.engine.privacy is not None,
                    counts=plan.aggregator.weighting != "num_examples",
                )
                if summed.record_epsilon is not None and self.record_target_epsilon is not None:
                    cap = min(summed.record_epsilon, self.record_target_epsilon)
                    summed = summed._replace(record_epsilon=cap)
                completed = [
                    (
                        clients[n],
                        int(m.get("num-examples", 0)),  # summed under uniform weighting
                        {k: v for k, v in m.items() if k not in _CLEAR},
                    )
                    for n, (_, m) in sorted(outcome.completed.items(), key=lambda i: clients[i[0]])
                ]
                add_secure_mean(plan.aggregator, delta, theta or None, completed, summed)
                if summed.counts is None:  # num_examples weighting: the counts are clear
                    clipped = sum(float(m.get(CLIPPED, 0)) for _, m in outcome.completed.values())
                else:
                    clipped = float(summed.counts["secagg_clipped"])
                if clipped:
                    logger.warning(
                        "round %d: the bounds clipped %d values of the clients' updates "
                        "(biased; raise secagg_headroom, now %g, to avoid it)",
                        plan.round_number,
                        clipped,
                        self.headroom,
                    )
        return self.finish(plan, traffic[0], traffic[1], secagg_clipped=clipped)

    def finish(
        self, plan: RoundPlan, bytes_up: int, bytes_down: int, **extra: float
    ) -> tuple[ArrayRecord, MetricRecord]:
        """:meth:`FedPACStrategy.finish`, with ``secagg_clipped`` 0 in rounds without SecAgg+."""
        extra.setdefault("secagg_clipped", 0.0)
        return super().finish(plan, bytes_up, bytes_down, **extra)

    def _pass(
        self,
        plan: RoundPlan,
        clients: Mapping[int, int],
        contents: Mapping[int, RecordDict],
        secagg: dict[str, Any],
        traffic: list[int],
        light: bool = False,
    ) -> SecAggOutcome:
        """One SecAgg+ pass over ``contents``; the clients that did not complete are dropped."""
        record = ConfigRecord(
            {
                **secagg,
                "weighting": str(self.engine.weighting),
                "max-weight": float(self.secagg["max_weight"]),
                "delta-names": list(plan.state.params),
            }
        )
        messages = {}
        for node, content in contents.items():
            message = RecordDict({} if light else dict(content.array_records))
            message[CONFIG_KEY] = ConfigRecord(dict(content.config_records[CONFIG_KEY]))
            message[SECAGG_KEY] = record
            messages[node] = message
        logger.info(
            "round %d: SecAgg+ %s pass over clients %s",
            plan.round_number,
            secagg["stage"],
            sorted(clients[n] for n in messages),
        )
        outcome = secure_mean(
            self._grid, messages, plan.round_number, self.secagg, self.secagg_timeout
        )
        traffic[0] += outcome.bytes_up
        traffic[1] += outcome.bytes_down
        for node in sorted(messages, key=clients.__getitem__):
            if outcome.mean is not None and node in outcome.completed:
                continue
            if node in outcome.errors:
                plan.fail(clients[node], "ClientAppError", outcome.errors[node].strip())
            elif outcome.mean is None:
                plan.fail(
                    clients[node],
                    "SecAggHalted",
                    f"SecAgg+'s {secagg['stage']} pass halted: too few clients left for "
                    f"secagg_reconstruction_threshold={self.secagg['reconstruction_threshold']}",
                )
            else:
                plan.fail(clients[node], "NoReply", f"node {node} dropped out of SecAgg+")
        return outcome

    def _clip_norms(self, plan: RoundPlan) -> tuple[float, float]:
        """The round's client-level DP bounds ``(C, C_Theta)`` (``C_Theta`` 0 without Theta)."""
        dp_round = plan.dp_round()
        theta = dp_round.theta_clip_norm if dp_round.share_theta else None
        return float(dp_round.clip_norm), float(theta or 0.0)

    def _bounds(self, plan: RoundPlan) -> Bounds | None:
        """The round's public bounds from the global state; ``None``: calibrate first.

        Without DP, the global state's magnitudes (:func:`secagg_bounds`; the
        first round calibrates). Under client-level DP, the clip norms
        (:func:`dp_bounds`); only the first round of an algorithm that shares
        Theta calibrates, to learn the names of Theta's entries.
        """
        theta = self.engine.algorithm.shares_curvature  # not with public_curvature
        if self.engine.privacy is None:
            state, lr = plan.state, plan.learning_rate
            return secagg_bounds(state, lr, self.engine.local_steps, self.headroom, theta=theta)
        sent = sent_form(plan.state.curvature) if theta else {}
        if sent is None:
            return None
        return dp_bounds(self._clip_norms(plan), list(plan.state.params), list(sent))

    def _calibrated(self, plan: RoundPlan, outcome: SecAggOutcome) -> Bounds | None:
        """The round's bounds from a calibration pass's mean log-magnitudes (``None``: halted);
        under client-level DP the pass only names Theta's entries (:func:`dp_bounds`)."""
        if outcome.mean is None:
            return None
        names = {tuple(theta_names_of(m)) for _, m in outcome.completed.values()}
        if len(names) != 1:
            raise ValueError(
                f"round {plan.round_number}: the clients sent different Theta entries "
                "(another optimizer or model on some node?)"
            )
        delta_names, theta_names = list(plan.state.params), list(names.pop())
        if self.engine.privacy is not None:
            return dp_bounds(self._clip_norms(plan), delta_names, theta_names)
        delta_logs, theta_logs = outcome.mean
        return (
            bounds_from_log_magnitudes(delta_logs, delta_names, self.headroom),
            bounds_from_log_magnitudes(theta_logs, theta_names, self.headroom),
        )
