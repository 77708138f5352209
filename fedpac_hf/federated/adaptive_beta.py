"""``beta="auto"``: a correction strength that follows what the server measures.

A FedPAC client's local step blends its own preconditioned direction with the
global direction of the last round (see :func:`~fedpac_hf.federated.client_update`):

    d_i = (1 - beta) u_i + beta g_G.

Write the direction the round should follow as g, a client's own direction
as u_i = g + e_i (its data pulls it away from g by e_i) and the global
direction as g_G = g + eps (it is one round old and averaged over a sample of
clients). Then E||d_i - g||^2 = (1 - beta)^2 sigma^2 + beta^2 tau^2 with
sigma^2 = E||e_i||^2 and tau^2 = E||eps||^2, which is smallest at

    beta* = sigma^2 / (sigma^2 + tau^2).

Clients that disagree (label skew: sigma^2 large) should lean on the global
direction; a global direction that moves fast between rounds (tau^2 large)
should be trusted less. The server estimates both from what it already sums,
in the units of g_G (a delta divided by K * eta_l, so that the decaying
learning rate does not count as change):

- sigma^2 ~ ``client_dispersion`` = sum_i w_i ||Delta_i - Delta||^2 / (W (K eta_l)^2),
  the weighted spread of the round's client updates around their mean;
- tau^2 ~ ``direction_change`` = ||g_G^{r+1} - g_G^r||^2, how far the global
  direction moved in the round (it includes the sampling noise of both
  estimates, so it errs towards a weaker correction).

The next round's beta is beta* clipped to [0, ``beta_max``]. Round 1 and
round 2 (no previous direction to compare with yet) use
:data:`AUTO_BETA_START`, the paper's fixed value. The value travels with the
global state (:attr:`~fedpac_hf.federated.ServerState.beta`), so it is
checkpointed, resumed and sent to Flower clients with it; the beta each round
used is logged as the ``beta`` metric.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "AUTO",
    "AUTO_BETA_MAX",
    "AUTO_BETA_START",
    "auto_beta",
    "next_auto_beta",
    "parse_beta",
]

AUTO = "auto"
"""The ``beta`` value that asks for :func:`auto_beta`."""

AUTO_BETA_START = 0.5
"""beta of the rounds before the rule has its measurements (rounds 1 and 2)."""

AUTO_BETA_MAX = 0.75
"""Default upper bound of ``beta="auto"``: a quarter of every local step stays the client's."""


def parse_beta(value: Any, name: str = "beta") -> float | str:
    """``value`` as a correction strength: a number in [0, 1) or ``"auto"``.

    Numbers may come as text (``"0.3"``, from YAML, the command line or a
    Flower run config).

    Raises
    ------
    ValueError
        Naming the accepted values, for anything else (1 included: it would
        leave no local step).
    """
    accepted = f'{name} must be a number in [0, 1) or "{AUTO}"'
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == AUTO:
            return AUTO
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{accepted}, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{accepted}, got {value!r}")
    number = float(value)
    if not (math.isfinite(number) and 0.0 <= number < 1.0):
        hint = " (1 leaves no local step)" if number == 1.0 else ""
        raise ValueError(f"{accepted}, got {value!r}{hint}")
    return number


def auto_beta(client_dispersion: float, direction_change: float, beta_max: float) -> float:
    """beta* = sigma^2 / (sigma^2 + tau^2) clipped to [0, beta_max] (see the module docstring).

    Parameters
    ----------
    client_dispersion:
        sigma^2, the spread of the round's client updates in direction units.
    direction_change:
        tau^2, ||g_G^{r+1} - g_G^r||^2.
    beta_max:
        Upper bound.
    """
    sigma2, tau2 = max(float(client_dispersion), 0.0), max(float(direction_change), 0.0)
    if not (math.isfinite(sigma2) and math.isfinite(tau2)) or sigma2 + tau2 == 0.0:
        return min(AUTO_BETA_START, beta_max)
    return min(sigma2 / (sigma2 + tau2), beta_max)


def next_auto_beta(
    metrics: Mapping[str, float], current: float | None, beta_max: float
) -> float | None:
    """The next round's beta under ``beta="auto"``: :func:`auto_beta` of the round's
    ``client_dispersion`` and ``direction_change``, or ``current`` when the round measured
    no direction change (the first round)."""
    if "direction_change" not in metrics:
        return current
    return auto_beta(metrics["client_dispersion"], metrics["direction_change"], beta_max)
