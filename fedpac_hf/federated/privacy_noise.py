"""The server's half of client-level DP: Gaussian noise on a round's sums.

:mod:`fedpac_hf.federated.privacy` holds the settings
(:class:`~fedpac_hf.federated.privacy.ClientDP`),
:mod:`fedpac_hf.federated.privacy_clip` the clients' half (the clip and the
public reference). The noise is drawn from generators seeded by
the server's secret ``noise_seed`` and the round, on the CPU in a fixed order,
so that a resumed run adds the noise the uninterrupted run would on any device.
Record-level DP (:mod:`~fedpac_hf.federated.record_privacy`) draws its
per-client noise from the same seeded generators. Under ``dp_clip_schedule:
adaptive`` the server also moves the bounds with noised counts of unclipped
clients (:func:`adapted_clip_norms`, :mod:`~fedpac_hf.federated.privacy_adaptive`).
"""

from __future__ import annotations

import math
import secrets
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch

from fedpac_hf.optim import sent_form

from .algorithms import Algorithm
from .privacy import ClientDP
from .privacy_clip import Reference, public_reference, with_reference
from .privacy_projection import PROJECTION_KEPT, leading_directions, projected
from .state import ClientUpdate, ServerState

__all__ = [
    "CLIENT_NOISED",
    "adapted_clip_norms",
    "client_noised_update",
    "new_noise_seed",
    "noise_generator",
    "noised_round",
    "noised_sums",
    "noise_norm_ratio",
    "private_round",
    "privacy_metrics",
    "seeded_generator",
]


CLIENT_NOISED = "dp_client_noised"
"""Client metric: 1.0 when the client added the round's noise itself
(:func:`client_noised_update`)."""


def new_noise_seed() -> int:
    """A 63-bit seed from the operating system's entropy (the server's secret)."""
    return secrets.randbits(63)


def noised_round(
    dp: ClientDP,
    delta_sum: dict[str, torch.Tensor],
    theta_sum: dict[str, torch.Tensor],
    theta_keys: Mapping[str, torch.Tensor] | None,
    noise_seed: int | None,
    round_index: int,
    reference: Reference = (None, None),
    denominator: float = 1.0,
    client_noised: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A round's delta and Theta sums with the mechanism's Gaussian noise.

    ``theta_keys`` (the global Theta in its sent-up form) names Theta's
    entries when no client sent any this round, so that the round still
    releases noise on them. Theta is noised only when it is shared. The
    public ``reference`` the clients left out
    (:func:`~fedpac_hf.federated.privacy_clip.public_reference`) is
    added back, ``denominator`` times, so that the sums over the denominator
    are the mean of what the clients added plus the reference.
    ``client_noised``: the round's one client added the noise itself
    (:func:`client_noised_update`); only the reference is added.
    """
    if noise_seed is None:
        raise ValueError("a DP round needs the server's noise seed (ServerState.noise_seed)")
    std_delta, std_theta = dp.noise_stds()
    if not client_noised:
        generator = noise_generator(noise_seed, round_index, "delta")
        delta_sum = noised_sums(delta_sum, std_delta, generator)
    delta_sum = with_reference(delta_sum, reference[0], denominator)
    if not dp.share_theta:
        return delta_sum, theta_sum
    if not client_noised:
        if not theta_sum and theta_keys:  # no client this round
            device = next(iter(delta_sum.values())).device
            theta_sum = {
                n: torch.zeros(t.shape, dtype=torch.float64, device=device)
                for n, t in theta_keys.items()
            }
        generator = noise_generator(noise_seed, round_index, "theta")
        theta_sum = noised_sums(theta_sum, std_theta, generator)
    return delta_sum, with_reference(theta_sum, reference[1], denominator)


def private_round(
    dp: ClientDP,
    state: ServerState,
    algorithm: Algorithm,
    sums: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
    *,
    lr: float,
    local_steps: int,
    denominator: float,
    clipped: Sequence[float],
    num_clients: int,
    client_noised: bool = False,
) -> tuple[
    dict[str, torch.Tensor],
    dict[str, torch.Tensor],
    tuple[float, float | None] | None,
    dict[str, float],
]:
    """The server's half of one client-level DP round.

    Parameters
    ----------
    dp:
        The run's resolved settings.
    state:
        The state the round's clients started from (its bounds, noise seed, round,
        global Theta and direction).
    algorithm:
        The round's algorithm (what the public reference holds).
    sums:
        The clipped sums of the clients' deltas and Theta.
    lr, local_steps:
        The round's eta_l and K (the public reference, the bounds that follow the rate).
    denominator:
        q N, what the sums are divided by.
    clipped, num_clients:
        How many clients had their delta and their Theta clipped, of how many.
    client_noised:
        The sums are one client's update that already carries the round's
        noise (:func:`client_noised_update`).

    Returns
    -------
    tuple
        The noised delta and Theta sums with the public reference added back
        (:func:`noised_round`; the delta's first projected with ``dp_projection_rank``,
        :mod:`~fedpac_hf.federated.privacy_projection`), the next round's bounds
        (:func:`adapted_clip_norms`, ``None`` unless they adapt), and the round's
        privacy metrics (:func:`privacy_metrics` at the round's bounds,
        :meth:`ClientDP.at_rate`; with the projection, :data:`PROJECTION_KEPT`).
    """
    dp_round = dp.at_rate(lr, state.dp_clip_norms)
    reference = public_reference(state, algorithm, lr, local_steps)
    delta_sum, theta_sum = noised_round(
        dp_round,
        sums[0],
        sums[1],
        sent_form(state.curvature),
        state.noise_seed,
        state.round,
        (None, reference[1]),
        denominator,
        client_noised,
    )
    metrics = privacy_metrics(dp_round, delta_sum, denominator)
    if dp_round.projection_rank is not None:
        shapes = {name: total.shape for name, total in delta_sum.items()}
        directions = leading_directions(state.curvature, shapes, dp_round.projection_rank)
        delta_sum, metrics[PROJECTION_KEPT] = projected(delta_sum, directions)
    delta_sum = with_reference(delta_sum, reference[0], denominator)
    bounds = adapted_clip_norms(
        dp_round, clipped, num_clients, denominator, state.noise_seed, state.round
    )
    return delta_sum, theta_sum, bounds, metrics


def adapted_clip_norms(
    dp: ClientDP,
    clipped: Sequence[float],
    num_clients: int,
    expected_clients: float,
    noise_seed: int | None,
    round_index: int,
) -> tuple[float, float | None] | None:
    """The next round's bounds ``(C, C_Theta)`` under adaptive clipping; ``None`` otherwise.

    Parameters
    ----------
    dp:
        The round's resolved settings, at the round's bounds (:meth:`ClientDP.at_rate`).
    clipped:
        How many of the round's clients had their delta and their Theta clipped.
    num_clients:
        The round's clients (Poisson-sampled: their count is released with the sums anyway).
    expected_clients:
        q N, the fixed denominator of the released fractions.
    noise_seed, round_index:
        The server's secret seed and the round: the counts' noise comes from
        their own stream (``"count"``), so a resumed run draws the same.
    """
    if dp.adaptive is None:
        return None
    if noise_seed is None:
        raise ValueError("a DP round needs the server's noise seed (ServerState.noise_seed)")
    generator = noise_generator(noise_seed, round_index, "count")
    draws = torch.randn(dp.adapted_parts, dtype=torch.float64, generator=generator).tolist()
    if not dp.noise_multiplier:  # clipping only: nothing is private, nothing noised
        draws = [0.0] * len(draws)
    norms = [dp.clip_norm, dp.theta_clip_norm]
    new = [
        dp.adaptive.next_norm(
            float(norms[part] or 0.0), clipped[part], num_clients, expected_clients, draw
        )
        for part, draw in enumerate(draws)
    ]
    return new[0], (new[1] if len(new) > 1 else None)


def client_noised_update(
    update: ClientUpdate,
    stds: Sequence[float],
    round_index: int,
    noise_seed: int | None = None,
) -> ClientUpdate:
    """A client's clipped update with the round's noise, drawn by the client itself.

    For a round whose only client cannot be hidden by secure aggregation: the
    client adds ``N(0, stds[0]^2)`` to each value of its clipped delta and
    ``N(0, stds[1]^2)`` to its Theta (when it has one), the noise the server
    would add to the round's sums, and the server adds none
    (:func:`noised_round`'s ``client_noised``). The release has the
    distribution of the server's mechanism, so the accounting is unchanged,
    and the server sees no more than the release: the client's ``train_loss``
    is left out of its metrics too (the round reports none). The update's
    metrics say so (:data:`CLIENT_NOISED`); a server that asked for it and
    gets an update without it adds the noise itself.

    The noise comes from a secret seed drawn here, or from ``noise_seed``
    (``dp_noise_seed``: reproducible experiments), the round and the client.
    """
    if noise_seed is None:
        noise_seed = new_noise_seed()
    salt = f"client {int(update.client_id)}"
    delta = noised_sums(
        update.delta, float(stds[0]), noise_generator(noise_seed, round_index, salt + " delta")
    )
    curvature = update.curvature
    if curvature:
        generator = noise_generator(noise_seed, round_index, salt + " theta")
        curvature = noised_sums(curvature, float(stds[1]), generator)
    metrics = {k: v for k, v in update.metrics.items() if k != "train_loss"}
    metrics[CLIENT_NOISED] = 1.0
    return replace(update, delta=delta, curvature=curvature, metrics=metrics)


def noise_norm_ratio(dp: ClientDP, num_floats: int, denominator: float) -> float:
    """The noise on a round's mean delta, as a multiple of the delta's clip norm.

    The server adds ``N(0, (z k C)^2)`` to each of the ``d`` floats of the
    delta sum and divides by ``q N``, so the noise on the mean delta has
    root-mean-square L2 norm ``z k C sqrt(d) / (q N)``; this returns that over
    ``C``: ``z k sqrt(d) / (q N)``. At 1 or more, one round's noise is as large
    as a whole clipped client update, and far larger than their mean.

    Parameters
    ----------
    dp:
        The resolved settings (:meth:`ClientDP.resolve`).
    num_floats:
        d, the floats of the delta (the trainable parameters).
    denominator:
        q N, what the sums are divided by.
    """
    return dp.noise_stds()[0] / float(dp.clip_norm) * math.sqrt(num_floats) / denominator


def privacy_metrics(
    dp: ClientDP, delta: Mapping[str, torch.Tensor], denominator: float
) -> dict[str, float]:
    """A DP round's own metrics: its clip norms (``dp_clip_norm``, and ``dp_theta_clip_norm``
    when Theta travels) and ``dp_noise_norm``, the root-mean-square L2 norm of the noise on
    its mean ``delta`` (:func:`noise_norm_ratio` times ``dp_clip_norm``, over ``delta``'s
    floats; compare it with ``update_norm``, the mean delta the round applied, noise
    included)."""
    num_floats = sum(t.numel() for t in delta.values())
    metrics = {"dp_clip_norm": float(dp.clip_norm)}
    if dp.share_theta and dp.theta_clip_norm is not None:
        metrics["dp_theta_clip_norm"] = float(dp.theta_clip_norm)
    metrics["dp_noise_norm"] = noise_norm_ratio(dp, num_floats, denominator) * float(dp.clip_norm)
    return metrics


def seeded_generator(seed: int, round_index: int, salt: int) -> torch.Generator:
    """A CPU generator for one stream of one round, mixed from a secret ``seed``."""
    mixed = int(seed) * 1_000_003 + int(round_index) * 7919 + int(salt)
    return torch.Generator().manual_seed(mixed % (2**63))


def noise_generator(noise_seed: int, round_index: int, part: str) -> torch.Generator:
    """The CPU generator of one round's noise on one part (``"delta"`` or ``"theta"``)."""
    return seeded_generator(noise_seed, round_index, zlib.crc32(part.encode()))


def noised_sums(
    sums: Mapping[str, torch.Tensor], std: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """``sums`` plus independent N(0, std^2) noise per entry, drawn in float64 on the CPU.

    The noise is drawn on the CPU in the sorted order of the names (the same
    noise whatever the dict's order, which differs between a fresh state and
    one loaded from a checkpoint, and on any device) and added where the sums
    live.
    """
    noised = {}
    for name in sorted(sums):
        total = sums[name]
        noise = torch.randn(total.shape, dtype=torch.float64, generator=generator) * std
        noised[name] = total + noise.to(total.device, total.dtype)
    return {name: noised[name] for name in sums}
