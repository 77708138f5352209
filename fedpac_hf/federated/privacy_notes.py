"""What a run says about its DP noise before round 1.

Whether differential privacy leaves anything to learn depends on how large the
noise is next to what it is added to, and a noise multiplier alone does not
say: client-level DP adds ``z k C`` to every float of a round's sum of deltas
and divides by ``q N``; record-level DP (DP-SGD) adds ``z C`` to every float of
a step's sum of clipped gradients and divides by the batch size ``B``. Both
notes give that noise's root-mean-square L2 norm in units of the clip norm
(``z k sqrt(d) / (q N)`` and ``z sqrt(d) / B``, ``d`` the trainable floats):
at INFO below 1, and as a warning from 1 up, where the noise is at least as
large as the largest update or gradient it is added to, naming the settings
that make it smaller. Client-level DP also warns when its delta is above
:data:`LARGE_DELTA` (the default ``num_clients ** -1.1`` is, below 66 clients).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from .accounting import MIN_ACCOUNTED_NOISE
from .privacy import ClientDP
from .privacy_noise import noise_norm_ratio
from .record_privacy import RecordDP

__all__ = ["LARGE_DELTA", "describe_client_noise", "describe_delta", "describe_record_noise"]

LARGE_DELTA = 0.01
"""A client-level ``dp_delta`` above this draws a warning before round 1."""


def _log(log: logging.Logger, note: str, ratio: float, remedy: str) -> None:
    if ratio < 1.0:
        log.info(note)
    else:
        log.warning(f"{note}: {remedy}")


def _sampling(dp: ClientDP, sample_rate: float) -> str:
    if dp.sampling == "fixed":
        return f"fixed-size samples at q = {sample_rate:.3g}, replace-one accounting"
    return f"Poisson sampling at q = {sample_rate:.3g}"


def describe_client_noise(
    dp: ClientDP,
    num_floats: int,
    clients_per_round: float,
    sample_rate: float,
    num_rounds: int,
    log: logging.Logger,
) -> float:
    """Log client-level DP's resolved z and its noise on a round's mean delta.

    Parameters
    ----------
    dp : ClientDP
        The resolved settings (:meth:`ClientDP.resolve`).
    num_floats : int
        d, the floats of the delta (the trainable parameters).
    clients_per_round : float
        q N, what the sums are divided by.
    sample_rate : float
        q, each client's chance of taking part in a round (named in the note).
    num_rounds : int
        The rounds the run plans (named in the note).
    log : logging.Logger
        Where the note goes.

    Returns
    -------
    float
        The noise's L2 norm over the clip norm (0 for clipping only).
    """
    if not dp.noise_multiplier:
        log.info("client-level DP: clipping only (dp_noise_multiplier 0), no noise")
        return 0.0
    ratio = noise_norm_ratio(dp, num_floats, clients_per_round)
    target = f"epsilon {dp.target_epsilon:g} at " if dp.target_epsilon is not None else ""
    note = (
        f"client-level DP: noise multiplier {dp.noise_multiplier:.4g} ({target}delta "
        f"{dp.delta:.3g} after {num_rounds} rounds, {_sampling(dp, sample_rate)}); the noise on a "
        f"round's mean delta has L2 norm {ratio:.3g} x dp_clip_norm (z k sqrt(d) / (q N), "
        f"d = {num_floats:,} floats; logged as dp_noise_norm)"
    )
    if dp.noise_multiplier < MIN_ACCOUNTED_NOISE:
        note += (
            f"; below z = {MIN_ACCOUNTED_NOISE:g} epsilon is in the millions and is logged as inf"
        )
    remedy = (
        "as large as a whole clipped client update, so each round's mean update will be "
        "mostly noise. More clients per round (clients_per_round), fewer trainable parameters "
        "or a larger dp_target_epsilon make it smaller"
    )
    _log(log, note, ratio, remedy)
    return ratio


def describe_delta(delta: float, default: bool, num_clients: int, log: logging.Logger) -> bool:
    """Warn when client-level DP's delta is above :data:`LARGE_DELTA`.

    (epsilon, delta)-DP lets a client's privacy loss exceed epsilon with
    probability up to delta, so a large delta empties a small epsilon: with
    10 clients the default delta is 0.079, at which 2 rounds of 3 clients
    (Poisson, q = 0.3) reach epsilon 0.001 with z = 2.1. Returns whether it
    warned.
    """
    if delta <= LARGE_DELTA:
        return False
    origin = (
        f"num_clients ** -1.1, the default for {num_clients} clients" if default else "dp_delta"
    )
    log.warning(
        f"client-level DP at delta {delta:.3g} ({origin}): a client's privacy loss may exceed "
        f"the logged epsilon with probability up to {delta:.1%}, however small epsilon is; set "
        "dp_delta lower (e.g. 1e-5; the same epsilon then needs more noise)"
    )
    return True


def describe_record_noise(
    dp: RecordDP,
    num_floats: int,
    clients: Sequence[tuple[int, int]],
    local_steps: int,
    num_rounds: int,
    log: logging.Logger,
) -> float:
    """Log record-level DP's z and its noise on a step's mean clipped gradient.

    With ``dp_target_epsilon`` each client derives its own z from its sampling
    rate ``q_i = B / n_i``; the note gives the range, from the clients with
    the smallest and the largest rate.

    Parameters
    ----------
    dp : RecordDP
        The run's settings.
    num_floats : int
        d, the floats of the gradient (the trainable parameters).
    clients : sequence of (int, int)
        Each client's examples ``n_i`` and batch size ``B``.
    local_steps, num_rounds : int
        The steps of a client's round and the rounds the run plans (with a
        target epsilon they decide z).
    log : logging.Logger
        Where the note goes.

    Returns
    -------
    float
        The largest noise norm over the clip norm among those clients.
    """
    if not clients:
        return 0.0
    by_rate = sorted(clients, key=lambda c: dp.sample_rate(c[1], c[0]))
    ends = [by_rate[0], by_rate[-1]]
    zs = [dp.client_noise(dp.sample_rate(b, n), local_steps, num_rounds) for n, b in ends]
    ratio = max(z * math.sqrt(num_floats) / b for z, (_, b) in zip(zs, ends))
    if dp.target_epsilon is None:
        how = f"noise multiplier {zs[0]:.4g}"
    else:
        low, high = f"{min(zs):.4g}", f"{max(zs):.4g}"
        spread = f"{low} for every client" if low == high else f"{low} to {high} over the clients"
        how = (
            f"noise multiplier {spread} (epsilon "
            f"{dp.target_epsilon:g} at delta {dp.delta:.3g} after {num_rounds} rounds)"
        )
    batches = sorted({batch for _, batch in ends})
    note = (
        f"record-level DP: {how}; the noise on each step's mean clipped gradient has L2 norm "
        f"up to {ratio:.3g} x dp_clip_norm (z sqrt(d) / B, d = {num_floats:,} floats, B = "
        + " to ".join(map(str, batches))
        + ")"
    )
    remedy = (
        "at least as large as the largest mean clipped gradient, so every local step will be "
        "mostly noise. A larger per_device_train_batch_size (DP-SGD's usual lever), fewer "
        "trainable parameters or a larger dp_target_epsilon make it smaller"
    )
    _log(log, note, ratio, remedy)
    return ratio
