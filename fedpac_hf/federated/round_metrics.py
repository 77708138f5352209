"""The server's per-round diagnostics, computed from exact running sums.

:class:`~fedpac_hf.federated.server.RoundAggregator` keeps, over the S clients
of a round with weights w_i (W = sum_i w_i), the sums sum_i w_i Delta_i,
sum_i w_i ||Delta_i||^2, sum_i Theta_i, sum_i w_i Theta_i and
sum_i ||Theta_i||^2. Every diagnostic below is a difference of such sums, so
none needs the clients' tensors after they were added:

- drift D = (1/S) sum_i ||Theta_i - M||_F^2 with M = sum_i w_i Theta_i / W
  = (1/S) sum ||Theta_i||^2 - 2 <(1/S) sum_i Theta_i, M> + ||M||^2,
  reported absolute and relative to ||M||^2;
- drift from the start D_0 = (1/S) sum_i ||Theta_i - Theta^r||_F^2, expanded
  the same way around the Theta^r the round started from (from round 2 on);
- client dispersion sigma^2 = (sum_i w_i ||Delta_i||^2 / W - ||Delta||^2)
  / (K eta_l)^2, the spread of the updates in the global direction's units;
- direction change tau^2 = ||g_G^{r+1} - g_G^r||^2.

:data:`ROUND_METRICS` names every metric a round reports, whichever shell ran it.
The functions return device scalars (float64 0-d tensors) so that the caller
reads every metric of the round in one host transfer, then turn those values
into the metrics dict.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "ROUND_METRICS",
    "byte_metrics",
    "curvature_scalars",
    "drift_metrics",
    "norm_medians",
    "update_scalars",
]

ROUND_METRICS: tuple[str, ...] = (
    "round",
    "learning_rate",
    "train_loss",
    "num_clients",
    "num_dropped",
    "num_examples",
    "update_norm",
    "skipped_steps",
    "hessian_refreshes",
    "drift",
    "drift_relative",
    "drift_from_start",
    "drift_from_start_relative",
    "beta",
    "client_dispersion",
    "direction_change",
    "delta_norm_median",
    "theta_norm_median",
    "public_train_loss",
    "bytes_up",
    "bytes_down",
    "bytes_up_delta",
    "bytes_up_theta",
    "bytes_down_params",
    "bytes_down_direction",
    "bytes_down_theta",
    "round_time",
)
"""The metrics every round reports, whichever shell ran it.

Under client-level differential privacy rounds add ``epsilon`` (after this
round) at ``dp_delta`` (the run's, its default resolved),
``dp_clipped_delta``/``dp_clipped_theta`` (the fraction of the round's
clients whose part was clipped) and
``dp_clip_norm``/``dp_theta_clip_norm`` (the round's bounds: they move with
``dp_clip_schedule`` ``learning_rate`` or ``adaptive``; Theta's when it travels)
and ``dp_noise_norm`` (the root-mean-square L2 norm of the noise on the round's
mean delta, to set against ``update_norm``).

``drift``/``drift_relative`` appear only for optimizers with a curvature
state, ``drift_from_start``/``drift_from_start_relative`` (each client's Theta
against the global Theta the round started from) from round 2 on, and
``direction_change`` (how far the global direction moved) from round 2 on.
``beta`` is the correction strength the round's clients used (chosen by the
server with ``beta="auto"``), ``client_dispersion`` the spread of their
updates (:mod:`~fedpac_hf.federated.adaptive_beta`). Evaluation adds
``eval_*`` entries and Flower adds ``wire_bytes_*``.
``bytes_up``/``bytes_down`` are the totals of the parts: the clients' deltas
and Theta up; the parameters, the global direction and Theta down.
``delta_norm_median``/``theta_norm_median`` (rounds without client-level DP
or secure aggregation; Theta's when it travels) are the median over the
round's clients of the L2 norm of what client-level DP would clip, each
client's delta and Theta minus their public parts
(:func:`~fedpac_hf.federated.privacy_clip.own_norms`): the numbers to choose
``dp_clip_norm`` and ``dp_theta_clip_norm`` from.
``public_train_loss`` (algorithms with ``public_curvature`` only) is the mean
loss of the server's local steps on the public data that gave the next Theta;
the clients then send no Theta, so the drift metrics are absent.
``skipped_steps`` sums, over the round's clients, the local steps that an fp16
gradient scaler skipped because their gradients overflowed (0 without fp16);
``hessian_refreshes`` the extra curvature passes (Sophia's Gauss-Newton-Bartlett
refreshes, each one more forward and backward) of the round's clients.
"""


def update_scalars(
    delta: Mapping[str, torch.Tensor],
    delta_square_mean: torch.Tensor,
    direction: Mapping[str, torch.Tensor],
    previous_direction: Mapping[str, torch.Tensor] | None,
    units: float,
) -> dict[str, torch.Tensor]:
    """Norm and spread of the round's updates, and how much the direction moved.

    Parameters
    ----------
    delta:
        The weighted mean update Delta, by parameter name (float64).
    delta_square_mean:
        sum_i w_i ||Delta_i||^2 / W (a float64 device scalar).
    direction:
        The new global direction g_G^{r+1}.
    previous_direction:
        g_G^r, or ``None`` in the first round (no ``direction_change`` then).
    units:
        1 / (K eta_l)^2: turns squared deltas into squared direction units.

    Returns
    -------
    dict
        ``update_norm``, ``client_dispersion`` and, when ``previous_direction``
        is given, ``direction_change``: device scalars.
    """
    delta_sq = torch.stack([d.square().sum() for d in delta.values()]).sum()
    scalars = {
        "update_norm": delta_sq.sqrt(),
        "client_dispersion": (delta_square_mean - delta_sq) * units,
    }
    if previous_direction is not None:
        device = delta_sq.device
        scalars["direction_change"] = torch.stack(
            [
                (d - previous_direction[n].to(device, torch.float32)).double().square().sum()
                for n, d in direction.items()
            ]
        ).sum()
    return scalars


def curvature_scalars(
    curvature_sum: Mapping[str, torch.Tensor],
    mean: Mapping[str, torch.Tensor],
    square_sum: torch.Tensor,
    num_clients: int,
    start: Mapping[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """Drift of the clients' Theta around their mean and around the round's start.

    Parameters
    ----------
    curvature_sum:
        sum_i Theta_i (unweighted, float64).
    mean:
        M = sum_i w_i Theta_i / W, the new global Theta (float64).
    square_sum:
        sum_i ||Theta_i||_F^2 (a float64 device scalar).
    num_clients:
        S.
    start:
        Theta^r, the global Theta the clients started from, or ``None``;
        ``drift_from_start`` is computed only when its entries are ``mean``'s.

    Returns
    -------
    dict
        ``drift`` and ``norm_sq`` (||M||^2); with ``start``, also
        ``drift_from_start`` and ``start_norm_sq``: device scalars.
    """
    inv_s = 1.0 / num_clients

    def spread_around(reference: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        norm_sq = torch.stack([t.square().sum() for t in reference.values()]).sum()
        cross = torch.stack([(curvature_sum[n] * t).sum() for n, t in reference.items()]).sum()
        return inv_s * square_sum - 2.0 * inv_s * cross + norm_sq, norm_sq

    scalars: dict[str, torch.Tensor] = {}
    scalars["drift"], scalars["norm_sq"] = spread_around(mean)
    if start and set(start) == set(mean):
        device = square_sum.device
        start64 = {n: t.to(device, torch.float64) for n, t in start.items()}
        scalars["drift_from_start"], scalars["start_norm_sq"] = spread_around(start64)
    return scalars


def drift_metrics(read: Mapping[str, float]) -> dict[str, float]:
    """``drift``, ``drift_relative`` and the same from the start, from the values read.

    A drift computed as a difference of sums can come out a rounding error
    below zero; it is reported as 0. A relative drift against a zero norm is 0.
    """
    metrics: dict[str, float] = {}
    for name, norm in (("drift", "norm_sq"), ("drift_from_start", "start_norm_sq")):
        if name in read:
            value = max(0.0, read[name])
            metrics[name] = value
            metrics[f"{name}_relative"] = value / read[norm] if read[norm] > 0 else 0.0
    return metrics


def norm_medians(norms: Sequence[float], theta: bool) -> dict[str, float]:
    """``delta_norm_median`` (and, with ``theta``, ``theta_norm_median``) from the clients'
    norms, read back flat as ``[delta_1, Theta_1, delta_2, Theta_2, ...]``."""
    medians = {"delta_norm_median": statistics.median(norms[0::2])}
    if theta:
        medians["theta_norm_median"] = statistics.median(norms[1::2])
    return medians


def byte_metrics(
    delta_bytes: int, theta_bytes: int, down: Mapping[str, int], num_clients: int
) -> dict[str, float]:
    """Bytes up (the clients' deltas and Theta) and down (``down``: the parameters, g_G and
    Theta one client receives, times ``num_clients``) in one round."""
    down = {part: size * num_clients for part, size in down.items()}
    return {
        "bytes_up": float(delta_bytes + theta_bytes),
        "bytes_down": float(sum(down.values())),
        "bytes_up_delta": float(delta_bytes),
        "bytes_up_theta": float(theta_bytes),
        "bytes_down_params": float(down["params"]),
        "bytes_down_direction": float(down["direction"]),
        "bytes_down_theta": float(down["theta"]),
    }
