"""Privacy accounting of client-level DP with Google's ``dp-accounting``.

Each round is one subsampled Gaussian mechanism (noise multiplier ``z``, see
:mod:`~fedpac_hf.federated.privacy`); ``r`` rounds compose ``r`` of them.
Epsilon at a given delta comes from an accountant of the ``dp-accounting``
package, never from a formula of this package:

- **Poisson sampling** (the default; each client takes part with probability
  ``q = clients_per_round / num_clients``): the privacy-loss-distribution
  (PLD) accountant, add-or-remove-one-client adjacency, pessimistic
  discretization (an upper bound). PLD accounting is near exact: Renyi-DP
  bounds of the same events are 15-40% higher (``tests/test_privacy.py``
  compares it with Opacus's independent PRV accountant).
- **Fixed-size sampling** (``dp_sampling: fixed``, the choice under secure
  aggregation: exactly ``m = q N`` clients, drawn without replacement): the
  Renyi-DP accountant, the one of the package that covers sampling without
  replacement, under replace-one-client adjacency. Replacing a client moves a
  round's sum by up to twice the clip bound, so the Gaussian's multiplier
  against that sensitivity is ``z / 2``: for the same epsilon fixed-size
  sampling needs about 2.6 times the noise (z 1.44 against 0.55 for epsilon 8
  at N = 500, q = 0.1, 20 rounds; docs/privacy.md). ``tests/test_dp_fixed_sampling.py``
  compares it with ``autodp``'s independent accountant.

Epsilon depends only on ``(z, q, delta, r)`` (and ``N`` for fixed-size
sampling), so a resumed run continues it exactly.

``dp-accounting`` is an optional dependency: ``pip install 'fedpac_hf[privacy]'``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

__all__ = [
    "MAX_NOISE_MULTIPLIER",
    "MIN_ACCOUNTED_NOISE",
    "MIN_NOISE_MULTIPLIER",
    "discretization",
    "epsilon_after",
    "fixed_sample_size",
    "noise_for_epsilon",
    "round_event",
]

#: The PLD accountant's grid of privacy-loss values.
DISCRETIZATION = 1e-3

#: Noise multipliers searched for a target epsilon: above the largest the model
#: learns nothing; below the smallest the accountant's grid grows large (and
#: epsilon is in the tens or more).
MIN_NOISE_MULTIPLIER = 0.3
MAX_NOISE_MULTIPLIER = 1000.0

#: Below this noise multiplier epsilon is reported as infinite, as for clipping
#: only: a Gaussian mechanism's privacy loss is about ``1 / (2 z^2)``, so epsilon
#: is in the millions whatever q, delta and the rounds, and the grid of
#: :func:`discretization` would pass the largest the accountant can represent.
MIN_ACCOUNTED_NOISE = 4e-4


def _dp_accounting() -> Any:
    try:
        import dp_accounting
    except ImportError:
        raise ImportError(
            "differential privacy (dp_mode: client) needs the dp-accounting package: "
            "pip install 'fedpac_hf[privacy]'"
        ) from None
    return dp_accounting


def discretization(noise_multiplier: float) -> float:
    """The PLD accountant's grid in the privacy loss at noise multiplier z.

    :data:`DISCRETIZATION` (epsilon within ~0.1%) from :data:`MIN_NOISE_MULTIPLIER`
    up. Below it a subsampled Gaussian's privacy loss spans about ``1 / (2 z^2)``,
    and so would the grid's size and the time of each round's epsilon (half a
    minute at z = 0.02 over 20 rounds, minutes below); there the grid widens by
    ``(MIN_NOISE_MULTIPLIER / z) ** 2``, which keeps its size bounded. Epsilon
    grows as ``1 / z^2`` too, so the wider grid moves it by the same small
    fraction (4e-5 or less at z = 0.1, 0.05 and 0.0069 over 20 rounds at q = 0.1).
    """
    return DISCRETIZATION * max(1.0, MIN_NOISE_MULTIPLIER / noise_multiplier) ** 2


def _accountant(noise_multiplier: float = MIN_NOISE_MULTIPLIER) -> Any:
    """A fresh PLD accountant with the grid of :func:`discretization`."""
    interval = discretization(noise_multiplier)
    return _dp_accounting().pld.PLDAccountant(value_discretization_interval=interval)


def _rdp_accountant(noise_multiplier: float = MIN_NOISE_MULTIPLIER) -> Any:
    """A fresh Renyi-DP accountant under replace-one adjacency (fixed-size sampling)."""
    dp = _dp_accounting()
    relation = dp.privacy_accountant.NeighboringRelation.REPLACE_ONE
    return dp.rdp.RdpAccountant(neighboring_relation=relation)


def fixed_sample_size(sample_rate: float, num_clients: int) -> int:
    """m, the clients of a fixed-size sample at rate ``q`` of ``N`` (``round(q N)``, >= 1)."""
    return max(1, int(round(float(sample_rate) * int(num_clients))))


def round_event(
    noise_multiplier: float, sample_rate: float, rounds: int = 1, num_clients: int | None = None
) -> Any:
    """The ``dp_accounting.DpEvent`` of ``rounds`` subsampled Gaussian rounds.

    Poisson sampling at rate ``sample_rate``; with ``num_clients``, fixed-size
    sampling of :func:`fixed_sample_size` of them without replacement, whose
    replace-one sensitivity is twice the clip bound (multiplier ``z / 2``).
    """
    dp = _dp_accounting()
    if num_clients is None:
        one = dp.PoissonSampledDpEvent(sample_rate, dp.GaussianDpEvent(noise_multiplier))
    else:
        one = dp.SampledWithoutReplacementDpEvent(
            int(num_clients),
            fixed_sample_size(sample_rate, num_clients),
            dp.GaussianDpEvent(noise_multiplier / 2.0),
        )
    return dp.SelfComposedDpEvent(one, int(rounds))


def _accountant_for(num_clients: int | None) -> Any:
    """The accountant factory of a sampling: PLD for Poisson, Renyi-DP for fixed-size."""
    return _accountant if num_clients is None else _rdp_accountant


@functools.lru_cache(maxsize=4096)
def epsilon_after(
    rounds: int,
    noise_multiplier: float,
    sample_rate: float,
    delta: float,
    num_clients: int | None = None,
) -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds (0 before round 1).

    ``inf`` without noise and below :data:`MIN_ACCOUNTED_NOISE`, where it is in
    the millions.

    Parameters
    ----------
    rounds:
        Rounds done.
    noise_multiplier:
        z, the noise std over the sensitivity of one round's sum.
    sample_rate:
        q, each client's probability of taking part in a round.
    delta:
        The delta of (epsilon, delta)-DP.
    num_clients:
        N for fixed-size sampling (``dp_sampling: fixed``); ``None``: Poisson sampling.
    """
    if rounds <= 0:
        return 0.0
    if noise_multiplier < MIN_ACCOUNTED_NOISE:  # 0: clipping only
        return math.inf
    accountant = _accountant_for(num_clients)(noise_multiplier)
    accountant.compose(round_event(noise_multiplier, sample_rate, rounds, num_clients))
    return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=256)
def noise_for_epsilon(
    target_epsilon: float | None,
    delta: float,
    sample_rate: float,
    rounds: int,
    num_clients: int | None = None,
) -> float:
    """The smallest noise multiplier z with epsilon at ``delta`` after ``rounds`` within the target.

    At least :data:`MIN_NOISE_MULTIPLIER`. ``num_clients``: fixed-size
    sampling of that population (:func:`epsilon_after`).

    Cached (a pure function of its arguments; each client of a record-level
    run asks for its own). Raises ``ValueError`` naming ``dp_target_epsilon`` when even
    :data:`MAX_NOISE_MULTIPLIER` does not reach it.
    """
    if target_epsilon is None:
        raise ValueError("dp_target_epsilon is not set")
    dp = _dp_accounting()
    reachable = epsilon_after(rounds, MAX_NOISE_MULTIPLIER, sample_rate, delta, num_clients)
    if reachable > target_epsilon:
        raise ValueError(
            f"dp_target_epsilon={target_epsilon:g} is not reachable in {rounds} "
            f"round{'' if rounds == 1 else 's'} at "
            f"dp_delta={delta:g} with clients sampled at rate {sample_rate:.4g}: even noise "
            f"multiplier {MAX_NOISE_MULTIPLIER:g} gives epsilon {reachable:.3g}; raise the "
            "target or dp_delta, or train fewer rounds or sample fewer clients per round"
        )
    tol = 1e-4
    if (
        epsilon_after(rounds, MIN_NOISE_MULTIPLIER, sample_rate, delta, num_clients)
        <= target_epsilon
    ):
        return MIN_NOISE_MULTIPLIER  # a target this large: the least noise searched
    z = dp.mechanism_calibration.calibrate_dp_mechanism(
        _accountant_for(num_clients),
        lambda z: round_event(z, sample_rate, rounds, num_clients),
        target_epsilon,
        delta,
        bracket_interval=dp.mechanism_calibration.ExplicitBracketInterval(
            MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER
        ),
        tol=tol,
    )
    z = float(z) + tol  # the calibration is within tol either side: stay on the safe one
    return z
