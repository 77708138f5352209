"""Record-level DP under secure aggregation: the round's largest epsilon from a secure histogram.

With ``dp_mode: record`` each client reports the epsilon of its examples, and
the round logs the largest (:mod:`fedpac_hf.federated.record_privacy`). That
epsilon depends on the client's number of examples (its sampling rate
``q_i = B / n_i``), so sent in the clear it gives the number away, which
SecAgg+ otherwise hides under uniform weighting. SecAgg+ only sums, and a sum
has no maximum; a histogram does. Each client sends a one-hot vector over
:data:`EPSILON_BINS` bins, summed with its update: 16 bins per doubling, each
holding the epsilons in ``(2**((k - 1) / 16), 2**(k / 16)]`` for an integer
``k``, from the bin whose upper edge is ``2**-7`` (smaller epsilons fall in it
too) to the one whose edge is ``2**13``, then a last bin for anything larger,
infinite or NaN. The server learns how many of the round's clients fall in
each bin, not which, and logs the upper edge of the highest bin that holds
one: an upper bound of the largest epsilon, at most ``2**(1/16)`` (4.4 %)
above it.

The ones are summed unscaled, as the clip flags are: SecAgg+ rounds the sum
of the clients' unit entries to within a small fraction of a count, so the
rounded counts are exact (:func:`largest_epsilon` checks that they are counts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "EPSILON_BINS",
    "EPSILON_STEPS_PER_DOUBLING",
    "bin_edge",
    "epsilon_bin",
    "epsilon_histogram",
    "largest_epsilon",
]

EPSILON_STEPS_PER_DOUBLING = 16
"""Bins per doubling of epsilon: the logged bound is at most ``2**(1/16)`` times the largest."""

_FIRST = -7 * EPSILON_STEPS_PER_DOUBLING  # the first bin's upper edge: 2**-7
_LAST = 13 * EPSILON_STEPS_PER_DOUBLING  # the last finite bin's upper edge: 2**13

EPSILON_BINS = _LAST - _FIRST + 2
"""The histogram's length: the finite bins up to ``2**13``, then one for larger epsilons."""


def epsilon_bin(epsilon: float) -> int:
    """The bin of ``epsilon``: the least ``j`` with ``epsilon <= 2**((j + FIRST) / 16)``.

    Epsilons below the first edge (``2**-7``) fall in bin 0; those above the
    last finite edge (``2**13``), infinite or NaN, in the last bin.
    """
    if not math.isfinite(epsilon) or epsilon > 2.0 ** (_LAST / EPSILON_STEPS_PER_DOUBLING):
        return EPSILON_BINS - 1
    if epsilon <= 0.0:
        return 0
    step = math.ceil(EPSILON_STEPS_PER_DOUBLING * math.log2(epsilon))
    while step > _FIRST and 2.0 ** ((step - 1) / EPSILON_STEPS_PER_DOUBLING) >= epsilon:
        step -= 1  # log2's rounding put it one bin high
    while 2.0 ** (step / EPSILON_STEPS_PER_DOUBLING) < epsilon:
        step += 1  # ... or one low
    return min(max(step, _FIRST), _LAST) - _FIRST


def bin_edge(index: int) -> float:
    """The upper edge of bin ``index`` (``inf`` for the last)."""
    if index >= EPSILON_BINS - 1:
        return math.inf
    return 2.0 ** ((index + _FIRST) / EPSILON_STEPS_PER_DOUBLING)


def epsilon_histogram(epsilon: float) -> list[float]:
    """One client's vector: 1.0 in the bin of its ``epsilon``, 0.0 elsewhere."""
    ones = [0.0] * EPSILON_BINS
    ones[epsilon_bin(float(epsilon))] = 1.0
    return ones


def largest_epsilon(mean: torch.Tensor | Sequence[float], num_clients: int) -> float:
    """The upper edge of the highest occupied bin, from the mean of ``num_clients`` histograms.

    Raises
    ------
    ValueError
        If the histogram's length is not :data:`EPSILON_BINS`, its counts are
        not whole (the vectors were weighted or scaled), or no bin is occupied.
    """
    totals = torch.as_tensor(mean, dtype=torch.float64).flatten() * int(num_clients)
    counts = totals.round()
    if len(counts) != EPSILON_BINS or float((totals - counts).abs().max()) > 1e-3:
        raise ValueError(
            f"the secure sum of {num_clients} clients' epsilon histograms is not one count "
            f"per bin ({len(counts)} values, {EPSILON_BINS} bins; every client must weigh 1)"
        )
    occupied = torch.nonzero(counts > 0).flatten()
    if not len(occupied):
        raise ValueError("no client's epsilon is in the secure sum of the epsilon histograms")
    return bin_edge(int(occupied[-1]))
