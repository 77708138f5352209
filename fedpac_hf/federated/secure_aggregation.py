"""Secure aggregation's arithmetic: the public scaling of each tensor, and the server's sums.

Flower's SecAgg+ sums clients' vectors after clipping every value to
``[-C, C]`` (``C = CLIPPING_RANGE`` = 8, Flower's default) and quantizing it to
``2**22`` levels, and hands the server only the weighted *mean* of those
vectors. FedPAC's tensors do not fit one fixed range (a delta is ~1e-3, a
SOAP statistic can be >> 8, an AdamW second moment ~1e-8), so every tensor n
is scaled by a public bound b_n first: a client sends ``x_n * C / b_n`` and
the server multiplies the unmasked mean by ``b_n / C``. The bounds come from
what every client of the round received:

- the delta: ``HEADROOM * max(K * eta_l, max|g_G^r| * K * eta_l)``, i.e. the
  previous round's mean delta in this round's units, at least K steps of size
  eta_l (adaptive optimizers move about eta_l per coordinate and step);
- Theta: ``HEADROOM * max|Theta^r_n|``, the global Theta in the form clients
  send it up (:func:`~fedpac_hf.optim.sent_form`).

Under client-level DP the bounds are the round's clip norms instead
(:func:`dp_bounds`): no entry of a clipped part exceeds its L2 bound, so
nothing is clipped by SecAgg+, and each client first shrinks each part by
SecAgg+'s rounding margin (:func:`within_rounding`), so that the vector SecAgg+
sums still has at most the clip norm: the sensitivity the server's noise is
sized for. The calibration pass then carries no magnitudes (zeros), only the
names of the clients' Theta entries. Whether a client's delta and Theta were
clipped (its flags, 0 or 1, :func:`clip_flags`) travels inside the secure sum
too, not in the clear: the server learns only how many clients of the round
were clipped (:func:`clipped_counts`), the counts that adaptive clip norms noise.

With or without DP, a client's ``train_loss`` (the classic signal of
membership inference) travels inside the secure sum as well, over
:data:`LOSS_SCALE`, and so do its counts under uniform weighting (examples,
skipped steps, Hessian refreshes: :data:`SUMMED_COUNTS`, :func:`secure_metrics`),
as does, under record-level DP, its epsilon, as a one-hot histogram
(:mod:`~fedpac_hf.federated.secure_epsilon`; it depends on the client's examples):
the server learns the round's weighted mean loss, total counts and an upper
bound of the largest epsilon, the numbers its metrics report, and no client's
own. Of a client's other metrics only those the server reads
(:data:`CLEAR_METRICS`) travel, in the clear.

In the first round (no global direction nor Theta yet) a *calibration* pass
of SecAgg+ comes first: each client sends, per tensor, log2 of its largest
entry (:func:`log_magnitudes`), and the bound is ``HEADROOM * 2**mean``
(:func:`bounds_from_log_magnitudes`); the server learns only the clients'
mean log-magnitude of each tensor.

Quantization adds an unbiased error of at most ``b_n * 2**-21 / S`` per entry
of the mean of S clients; an entry above its bound is clipped (biased). The
mean goes into the round's :class:`~fedpac_hf.federated.RoundAggregator` as
sums (:func:`add_secure_mean`); the diagnostics that need single clients'
tensors (drift, client dispersion) are then left out of the round's metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from fedpac_hf.optim import sent_form

from .privacy_clip import CLIP_FLAGS
from .secure_epsilon import epsilon_histogram, largest_epsilon
from .server import RoundAggregator
from .state import ServerState

__all__ = [
    "CLIPPING_RANGE",
    "CLEAR_METRICS",
    "COUNT_UNIT",
    "HEADROOM",
    "LOSS_SCALE",
    "SUMMED_COUNTS",
    "SecureMetrics",
    "add_secure_mean",
    "bounds_from_log_magnitudes",
    "clip_flags",
    "clipped_counts",
    "dp_bounds",
    "log_magnitudes",
    "read_secure_metrics",
    "scale_tensors",
    "secagg_bounds",
    "secure_metrics",
    "unscale_tensors",
    "within_rounding",
]

CLIPPING_RANGE = 8.0
"""C: SecAgg+ clips every value it sums to [-C, C] (Flower's default)."""

LOSS_SCALE = 4.0
"""A client's ``train_loss`` is summed as ``train_loss / LOSS_SCALE``: losses in [-32, 32]."""

COUNT_UNIT = 2.0**-18
"""A client's counts are summed as ``count * COUNT_UNIT``: one step of SecAgg+'s grid
(``2 C / 2**22``) per unit, so the total is exact."""

_MAX_COUNT = 2**21 - 1  # the largest count that fits in [-C, C] at COUNT_UNIT each

SUMMED_COUNTS = ("num_examples", "skipped_steps", "hessian_refreshes", "secagg_clipped")
"""A client's counts that SecAgg+ sums under uniform weighting (each unit one grid step); the
last is how many of its values were summed at an end of SecAgg+'s range."""

CLEAR_METRICS = ("skipped_steps", "hessian_refreshes", "dp_record_epsilon")
"""The metrics a secure reply may carry in the clear: those the server's round reads, only
under ``num_examples`` weighting (where the client's examples, which each of them would tell,
are clear already). A client's other metrics stay with it."""

HEADROOM = 8.0
"""How far above its expected largest entry a tensor's bound lies."""

_LOG_LIMIT = 60.0  # log2 magnitudes are clamped to [-60, 60] ...
_LOG_SCALE = 8.0  # ... and sent divided by 8, inside [-C, C]
_TINY = 2.0**-60  # the smallest bound (a tensor of zeros)
_STEP = 2.0**-21  # SecAgg+'s quantization step over the bound: 2 C / 2**22 / C


def secagg_bounds(
    state: ServerState,
    lr: float,
    local_steps: int,
    headroom: float = HEADROOM,
    *,
    theta: bool = True,
) -> tuple[dict[str, float], dict[str, float]] | None:
    """Per-tensor bounds ``(delta, theta)`` from the global state (see the module docstring).

    Returns ``None`` when the state has no global direction yet (the first
    round): the bounds then come from a calibration pass. ``theta=False``: the
    clients send no Theta (``public_curvature``), so there are no Theta bounds.
    """
    if state.direction is None:
        return None
    unit = local_steps * lr
    delta = {}
    for name in state.params:
        d = state.direction.get(name)
        largest = float(d.abs().max()) * unit if d is not None and d.numel() else 0.0
        delta[name] = headroom * max(unit, largest)
    sent = (sent_form(state.curvature) if theta else None) or {}
    bounds = {
        name: headroom * max(float(t.abs().max()) if t.numel() else 0.0, _TINY)
        for name, t in sent.items()
    }
    return delta, bounds


def dp_bounds(
    clip_norms: tuple[float, float | None],
    delta_names: Sequence[str],
    theta_names: Sequence[str],
) -> tuple[dict[str, float], dict[str, float]]:
    """The bounds under client-level DP: the round's clip norms ``(C, C_Theta)``.

    A part clipped to L2 norm ``C`` has no entry above ``C``, so SecAgg+ clips
    nothing and needs no calibrated magnitudes.
    """
    delta_bound, theta_bound = clip_norms
    return (
        {n: float(delta_bound) for n in delta_names},
        {n: float(theta_bound or _TINY) for n in theta_names},
    )


def within_rounding(
    tensors: Mapping[str, torch.Tensor], clip_norm: float
) -> dict[str, torch.Tensor]:
    """``tensors`` (one part, clipped to ``clip_norm``) shrunk by SecAgg+'s rounding margin.

    With the bound equal to the clip norm, SecAgg+'s stochastic rounding moves
    each entry by less than one step, ``clip_norm * 2**-21``, so a part of
    ``n`` entries by less than ``sqrt(n) * clip_norm * 2**-21`` in L2. Scaled
    to norm at most ``clip_norm * (1 - sqrt(n) * 2**-21)`` first, the rounded
    part stays within ``clip_norm``: the sensitivity the DP noise is sized for.
    """
    numel = sum(t.numel() for t in tensors.values())
    if not numel:
        return dict(tensors)
    room = float(clip_norm) * (1.0 - math.sqrt(numel) * _STEP)
    if room <= 0.0:
        raise ValueError(
            f"a part of {numel:,} values is too large for SecAgg+'s 2**22 levels under DP: "
            "the rounding alone could exceed the clip norm"
        )
    norm = float(
        torch.linalg.vector_norm(torch.stack([t.double().norm() for t in tensors.values()]))
    )
    scale = min(1.0, room / norm) if norm > 0 else 1.0
    return {n: t * scale for n, t in tensors.items()}


def clip_flags(metrics: Mapping[str, float]) -> tuple[list[float], dict[str, float]]:
    """A client's clip flags and its other metrics.

    The flags are :data:`~fedpac_hf.federated.privacy_clip.CLIP_FLAGS` (0.0
    where the metrics have none).

    Under SecAgg+ the flags are summed with the update, unscaled: 0 and 1 lie
    on SecAgg+'s grid (``2**22`` levels over ``[-8, 8]``), so its stochastic
    rounding leaves them exact.
    """
    flags = [float(metrics.get(name, 0.0)) for name in CLIP_FLAGS]
    return flags, {k: v for k, v in metrics.items() if k not in CLIP_FLAGS}


def secure_metrics(
    metrics: Mapping[str, float],
    private: bool,
    examples: int | None = None,
    clipped: int = 0,
) -> tuple[list[float], dict[str, float], int]:
    """What of a client's metrics SecAgg+ sums with its update, and what stays in the clear.

    Parameters
    ----------
    metrics:
        The client's metrics.
    private:
        Whether the round runs client-level DP (the clip flags are summed too).
    examples:
        The client's examples, summed with its other :data:`SUMMED_COUNTS` and,
        under record-level DP, its epsilon's histogram (uniform weighting;
        ``None``: the examples are its weight, ``num_examples`` weighting, and
        its counts and epsilon stay in the clear: the weighted mean of a count
        is not its total, nor a weighted histogram a count).
    clipped:
        How many of the client's scaled tensor values exceed SecAgg+'s range.

    Returns
    -------
    summed : list of float
        ``train_loss / LOSS_SCALE`` (0 without a loss), the counts times
        :data:`COUNT_UNIT` (when ``examples`` is given), then under
        client-level DP the clip flags (:func:`clip_flags`), under record-level
        DP with ``examples`` given the epsilon's histogram
        (:func:`~fedpac_hf.federated.secure_epsilon.epsilon_histogram`).
    clear : dict
        The client's :data:`CLEAR_METRICS` not summed; it sends nothing else.
    clipped : int
        ``clipped`` plus how many of the loss (outside ``LOSS_SCALE * [-C, C]``
        or not finite) and the counts (more than ``C / COUNT_UNIT``) are summed
        at the nearest end of SecAgg+'s range; summed as the last count when
        ``examples`` is given.
    """
    flags, rest = clip_flags(metrics)
    loss = float(rest.get("train_loss", 0.0))
    top = LOSS_SCALE * CLIPPING_RANGE
    kept = min(max(loss, -top), top) if math.isfinite(loss) else math.copysign(top, loss)
    summed, clipped = [kept / LOSS_SCALE], int(clipped) + int(kept != loss)
    clear = {k: float(rest[k]) for k in CLEAR_METRICS if k in rest}
    tail = flags if private else []
    if examples is not None:
        counts = [int(examples), *(round(clear.pop(n, 0.0)) for n in SUMMED_COUNTS[1:-1])]
        clipped += sum(int(c > _MAX_COUNT or c < 0) for c in counts)
        summed += [min(max(c, 0), _MAX_COUNT) * COUNT_UNIT for c in [*counts, clipped]]
        if "dp_record_epsilon" in clear:  # record-level DP
            tail = epsilon_histogram(clear.pop("dp_record_epsilon"))
    return summed + tail, clear, clipped


class SecureMetrics(NamedTuple):
    """What the server reads from the secure mean of the clients' :func:`secure_metrics`."""

    train_loss: float
    """The clients' weighted mean loss."""
    counts: dict[str, int] | None
    """The totals of their :data:`SUMMED_COUNTS` (``None``: not summed, they travel in the
    clear)."""
    clipped: list[float] | None
    """Under DP, how many had their delta and their Theta clipped (:func:`clipped_counts`)."""
    record_epsilon: float | None = None
    """Under record-level DP with summed counts, an upper bound of the largest epsilon a
    client reported (:func:`~fedpac_hf.federated.secure_epsilon.largest_epsilon`)."""


def read_secure_metrics(
    mean: torch.Tensor, num_clients: int, private: bool, counts: bool = False
) -> SecureMetrics:
    """The round's :class:`SecureMetrics` from the secure mean of ``num_clients`` clients'
    :func:`secure_metrics` (``counts``: whether their counts were summed; values after them
    that are not DP's clip flags are the clients' epsilon histogram)."""
    values = mean.to(torch.float64).flatten()
    totals = None
    if counts:
        sums = values[1 : 1 + len(SUMMED_COUNTS)] * num_clients / COUNT_UNIT
        totals = {n: round(float(v)) for n, v in zip(SUMMED_COUNTS, sums)}
    rest = values[1 + (len(SUMMED_COUNTS) if counts else 0) :]
    flags = clipped_counts(rest, num_clients) if private else None
    epsilon = largest_epsilon(rest, num_clients) if len(rest) and not private else None
    return SecureMetrics(float(values[0]) * LOSS_SCALE, totals, flags, epsilon)


def clipped_counts(mean: torch.Tensor, num_clients: int) -> list[float]:
    """How many of ``num_clients`` clients were clipped, per part, from the mean of their flags.

    The mean of unit-weight flags times the clients is an integer up to float
    rounding (:func:`clip_flags`). Raises ``ValueError`` when it is not, i.e.
    when the flags were weighted or scaled: their counts would not be those
    the adaptive clip norms' noise is sized for.
    """
    totals = mean.to(torch.float64).flatten() * int(num_clients)
    counts = totals.round()
    if float((totals - counts).abs().max()) > 1e-3 or len(counts) != len(CLIP_FLAGS):
        raise ValueError(
            f"the secure sum of {num_clients} clients' clip flags is not a count: "
            f"{totals.tolist()} (every client must weigh 1)"
        )
    return counts.tolist()


def log_magnitudes(tensors: Mapping[str, torch.Tensor], names: Sequence[str]) -> list[float]:
    """Per tensor of ``names``: log2 of its largest |entry|, clamped to [-60, 60], divided by 8.

    What a client sends in the calibration pass (inside SecAgg+'s range).
    """
    values = []
    for name in names:
        t = tensors[name]
        largest = float(t.detach().abs().max()) if t.numel() else 0.0
        log2 = math.log2(largest) if largest > 0 and math.isfinite(largest) else -_LOG_LIMIT
        values.append(min(max(log2, -_LOG_LIMIT), _LOG_LIMIT) / _LOG_SCALE)
    return values


def bounds_from_log_magnitudes(
    mean: Sequence[float], names: Sequence[str], headroom: float = HEADROOM
) -> dict[str, float]:
    """Bounds ``headroom * 2**m`` from the clients' mean of :func:`log_magnitudes`."""
    return {n: max(headroom * 2.0 ** (float(m) * _LOG_SCALE), _TINY) for n, m in zip(names, mean)}


def scale_tensors(
    tensors: Mapping[str, torch.Tensor], bounds: Mapping[str, float]
) -> dict[str, torch.Tensor]:
    """``x_n * C / b_n`` (float32) for every tensor of ``bounds``, in their order.

    Raises
    ------
    ValueError
        If a tensor of ``bounds`` is missing or one is not in ``bounds``.
    """
    if set(tensors) != set(bounds):
        extra, missing = sorted(set(tensors) - set(bounds)), sorted(set(bounds) - set(tensors))
        raise ValueError(
            f"the update's tensors differ from the secure aggregation's: extra {extra[:3]}, "
            f"missing {missing[:3]}"
        )
    return {
        n: (tensors[n].detach().to(torch.float64) * (CLIPPING_RANGE / b)).to(torch.float32)
        for n, b in bounds.items()
    }


def unscale_tensors(
    means: Sequence[torch.Tensor], bounds: Mapping[str, float]
) -> dict[str, torch.Tensor]:
    """The unmasked means ``m_n * b_n / C`` (float64), named in ``bounds``' order."""
    if len(means) != len(bounds):
        raise ValueError(f"{len(means)} aggregated tensors for {len(bounds)} bounds")
    return {
        n: m.to(torch.float64) * (b / CLIPPING_RANGE) for (n, b), m in zip(bounds.items(), means)
    }


def add_secure_mean(
    aggregator: RoundAggregator,
    delta: Mapping[str, torch.Tensor],
    curvature: Mapping[str, torch.Tensor] | None,
    clients: Sequence[tuple[int, int, Mapping[str, float]]],
    summed: SecureMetrics | None = None,
) -> None:
    """Put a round's securely aggregated means into ``aggregator`` as its sums.

    Parameters
    ----------
    aggregator:
        The round's aggregator (no update added yet).
    delta, curvature:
        The weighted means over the clients that completed the protocol.
    clients:
        ``(client_id, num_examples, metrics)`` of each of them (what travels
        in the clear: the weight and the :data:`CLEAR_METRICS` sent).
    summed:
        What the clients' vectors summed besides the update
        (:func:`read_secure_metrics`): the mean loss, under uniform weighting
        the total counts (each client's examples in ``clients`` are then 0)
        and record-level DP's largest epsilon, and under client-level DP the
        clip counts; none of them is in ``clients``' metrics. ``None``: each
        client's own, from its metrics.

    The sums are ``mean * W`` with W the clients' total weight; Theta is
    repaired after unmasking, and the drift and client dispersion (they need
    single clients' tensors) are left out of the round's metrics.
    """
    if aggregator.num_clients or not clients:
        raise ValueError("add_secure_mean needs an empty aggregator and at least one client")
    if set(delta) != set(aggregator.delta_sum):
        raise ValueError("the secure mean covers other parameters than the global model's")
    by_examples = aggregator.weighting == "num_examples"
    weights = [float(n) if by_examples else 1.0 for _, n, _ in clients]
    total = sum(weights)
    device = aggregator.device
    for name, mean in delta.items():
        aggregator.delta_sum[name] = mean.to(device, torch.float64) * total
    for name, mean in (curvature or {}).items():
        aggregator.curvature_weighted_sum[name] = mean.to(device, torch.float64) * total
    aggregator.secure = True
    for (client_id, examples, metrics), weight in zip(clients, weights):
        aggregator.count_client(client_id, examples, metrics, weight)
    if summed is not None:
        aggregator.loss_sum, aggregator.losses_missing = summed.train_loss * total, 0
        if summed.counts is not None:
            aggregator.num_examples = summed.counts["num_examples"]
            aggregator.skipped_steps = float(summed.counts["skipped_steps"])
            aggregator.hessian_refreshes = float(summed.counts["hessian_refreshes"])
        if summed.clipped is not None:
            aggregator.clipped = [float(c) for c in summed.clipped]
        if summed.record_epsilon is not None:
            aggregator.record_epsilon = summed.record_epsilon
    sizes = [sum(t.numel() * 4 for t in part.values()) for part in (delta, curvature or {})]
    aggregator.delta_bytes += sizes[0] * len(clients)  # as float32, like the plain round
    if aggregator.algorithm.align:
        aggregator.theta_bytes += sizes[1] * len(clients)
