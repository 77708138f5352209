"""Record-level DP under SecAgg+: the round's largest epsilon from the clients' summed histograms.

A client's epsilon depends on its number of examples (q_i = B / n_i), so under uniform
weighting, where SecAgg+ hides each client's examples, it travels as a one-hot histogram
inside the secure sum; the server logs the upper edge of the highest occupied bin.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedpac_hf.federated import RoundAggregator, ServerState, get_algorithm
from fedpac_hf.federated.secure_aggregation import (
    add_secure_mean,
    read_secure_metrics,
    secure_metrics,
)
from fedpac_hf.federated.secure_epsilon import (
    EPSILON_BINS,
    EPSILON_STEPS_PER_DOUBLING,
    bin_edge,
    epsilon_bin,
    epsilon_histogram,
    largest_epsilon,
)

STEP = 2.0 ** (1 / EPSILON_STEPS_PER_DOUBLING)  # how far above an epsilon its bin's edge may lie


def test_an_epsilons_bin_edge_bounds_it_from_above_within_one_step():
    """Epsilons across the range, the bin edges themselves included: edge / epsilon is in
    [1, 2**(1/16)), and the bins grow with epsilon."""
    edges = [2.0 ** (k / 16) for k in range(-112, 209)]
    epsilons = sorted([*np.geomspace(2.0**-7, 2.0**13, 997).tolist(), *edges])
    bins = [epsilon_bin(e) for e in epsilons]
    for epsilon, index in zip(epsilons, bins):
        assert epsilon <= bin_edge(index) < epsilon * STEP, epsilon
    assert bins == sorted(bins) and [epsilon_bin(e) for e in edges] == list(range(len(edges)))


@pytest.mark.parametrize(
    ("epsilon", "edge"),
    [(0.0, 2.0**-7), (1e-9, 2.0**-7), (2.0**13 * 1.0001, math.inf), (math.inf, math.inf),
     (math.nan, math.inf), (1e6, math.inf)],
)  # fmt: skip
def test_epsilons_outside_the_bins_range_are_bounded_by_its_ends(epsilon, edge):
    """Below 2**-7 the first bin's edge bounds them; above 2**13 (or not finite) only inf does."""
    assert bin_edge(epsilon_bin(epsilon)) == edge
    assert epsilon_histogram(epsilon).count(1.0) == 1 and len(epsilon_histogram(epsilon)) == (
        EPSILON_BINS
    )


@pytest.mark.parametrize("num_clients", [3, 200])
def test_the_server_reads_the_largest_epsilon_from_quantized_secure_sums(num_clients):
    """Clients with different epsilons through secure_metrics, Flower's quantization and
    masking offset, read_secure_metrics and add_secure_mean: the round's epsilon is the largest
    client's bin edge, none of them sends its epsilon in the clear, and the other counts stay
    exact."""
    pytest.importorskip("flwr")
    from .secagg_fixtures import secagg_means

    generator = np.random.default_rng(num_clients)
    epsilons = generator.uniform(0.5, 4.0, num_clients).tolist()
    examples = generator.integers(5, 500, num_clients).tolist()
    sent = [
        secure_metrics({"train_loss": 1.0, "dp_record_epsilon": e}, False, n)
        for e, n in zip(epsilons, examples)
    ]
    assert all("dp_record_epsilon" not in clear for _, clear, _ in sent)
    (mean,) = secagg_means([[np.asarray(s)] for s, _, _ in sent])
    summed = read_secure_metrics(torch.from_numpy(mean), num_clients, False, counts=True)
    largest = max(epsilons)
    assert summed.record_epsilon == bin_edge(epsilon_bin(largest))
    assert largest <= summed.record_epsilon < largest * STEP
    assert summed.counts["num_examples"] == sum(examples)

    state = ServerState(params={"w": torch.zeros(2)}, round=0)
    aggregator = RoundAggregator(state, get_algorithm("fedpac_soap"))
    clients = [(i, 0, clear) for i, (_, clear, _) in enumerate(sent)]
    add_secure_mean(aggregator, {"w": torch.zeros(2)}, None, clients, summed)
    assert aggregator.record_epsilon == summed.record_epsilon


def test_without_record_dp_or_with_num_examples_weighting_no_histogram_is_summed():
    """No epsilon: nothing after the counts. num_examples weighting: the epsilon travels in the
    clear with the examples it depends on (a weighted histogram would not count clients)."""
    plain, _, _ = secure_metrics({"train_loss": 1.0}, False, 10)
    weighted, clear, _ = secure_metrics({"train_loss": 1.0, "dp_record_epsilon": 2.0}, False)
    assert len(plain) == 5 and weighted == [0.25] and clear == {"dp_record_epsilon": 2.0}
    assert read_secure_metrics(torch.tensor(plain), 1, False, counts=True).record_epsilon is None


def test_a_histogram_that_is_not_one_count_per_client_is_refused():
    """Weighted or scaled vectors, a wrong length or an empty histogram are errors, not a bound."""
    two = torch.tensor([a + b for a, b in zip(epsilon_histogram(1.0), epsilon_histogram(8.0))])
    assert largest_epsilon(two / 2, 2) == 8.0
    with pytest.raises(ValueError, match="not one count per bin"):
        largest_epsilon(two / 2 * 0.7, 2)
    with pytest.raises(ValueError, match="not one count per bin"):
        largest_epsilon(two[:-1] / 2, 2)
    with pytest.raises(ValueError, match="no client's epsilon"):
        largest_epsilon(torch.zeros(EPSILON_BINS), 2)


def test_the_docs_describe_the_bins_the_code_uses():
    """docs/secure_aggregation.md gives the number of bins, their range and the bound's slack."""
    from pathlib import Path

    text = " ".join(
        (Path(__file__).parents[1] / "docs" / "secure_aggregation.md").read_text().split()
    )
    assert f"each of {EPSILON_BINS} bins" in text and f"({EPSILON_BINS} values more" in text
    assert f"{EPSILON_STEPS_PER_DOUBLING} bins per doubling from 2^-7 to 2^13" in text
    assert (bin_edge(0), bin_edge(EPSILON_BINS - 2)) == (2.0**-7, 2.0**13)
    assert f"({100 * (STEP - 1):.1f} %)" in text
