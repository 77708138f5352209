"""Dirichlet label skew, in the two flavours found in the literature."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np

from fedpac_hf.partition.base import (
    Partitioner,
    check_enough_examples,
    check_min_examples,
    check_num_clients,
    check_positive,
    encode_labels,
    group_by_client,
    read_column,
)

if TYPE_CHECKING:  # datasets is needed only by whoever passes a Dataset
    from datasets import Dataset

_ALPHA_HINT = " Use e.g. 0.05-0.1 for strong label skew, 0.6 for mild skew, 100 for near-IID."


class DirichletPartitioner(Partitioner):
    """Label-skewed clients whose class mix is drawn from a Dirichlet distribution.

    Smaller ``alpha`` means more skew: at ``alpha=0.05`` most clients see one
    or two classes, at ``alpha=100`` every client looks like the whole data.

    Two schemes are offered:

    ``scheme="client"`` (default; the FedPAC / FedMuon protocol)
        Every client has the same size ``n // num_clients`` and its own class
        proportions ``p_i ~ Dir(alpha * 1_C)``. Client ``i`` draws its
        examples according to ``p_i``, without replacement, from per-class
        pools; when a class runs out its share is renormalised over the classes
        that still have examples. The ``n % num_clients`` examples left over
        belong to no client (so this scheme covers all but at most
        ``num_clients - 1`` examples).
    ``scheme="class"`` (Hsu et al. 2019; Flower's ``DirichletPartitioner``)
        Every class is spread over the clients with proportions
        ``q_k ~ Dir(alpha * 1_K)``; client sizes vary. The draw is repeated
        until every client has at least ``min_examples_per_client`` examples
        (at most ``max_tries`` times). Every example is assigned.

    Parameters
    ----------
    num_clients : int
        Number of clients.
    alpha : float
        Dirichlet concentration, > 0.
    label_column : str
        Column holding the class label.
    scheme : {"client", "class"}
        Which Dirichlet scheme, see above.
    min_examples_per_client : int
        Smallest allowed client (>= 1). For ``"client"`` it is checked against
        the equal client size; for ``"class"`` the draw is resampled.
    max_tries : int
        Resampling budget of the ``"class"`` scheme.
    seed : int
        Seed of every random draw.
    """

    name = "dirichlet"

    def __init__(
        self,
        num_clients: int,
        alpha: float,
        label_column: str = "label",
        scheme: Literal["client", "class"] = "client",
        min_examples_per_client: int = 1,
        max_tries: int = 100,
        seed: int = 0,
    ) -> None:
        self.num_clients = check_num_clients(num_clients)
        self.alpha = check_positive("alpha", alpha, _ALPHA_HINT)
        if scheme not in ("client", "class"):
            raise ValueError(
                f"scheme must be 'client' (equal-size clients, FedPAC) or 'class' "
                f"(per-class proportions, Hsu et al.); got {scheme!r}."
            )
        self.label_column = label_column
        self.scheme = scheme
        self.min_examples_per_client = check_min_examples(min_examples_per_client)
        if int(max_tries) < 1:
            raise ValueError(f"max_tries must be >= 1 (got {max_tries!r}).")
        self.max_tries = int(max_tries)
        self.seed = seed

    def assign(self, dataset: Dataset) -> list[np.ndarray]:
        """Draw the Dirichlet mixes and hand out examples accordingly."""
        labels = read_column(dataset, self.label_column)
        _, codes = encode_labels(labels)
        check_enough_examples(len(codes), self.num_clients, self.min_examples_per_client)
        rng = np.random.default_rng(self.seed)
        if self.scheme == "client":
            client_of = self._assign_client_scheme(codes, rng)
        else:
            client_of = self._assign_class_scheme(codes, rng)
        return group_by_client(client_of, self.num_clients)

    def _class_pools(self, codes: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        """Shuffled row indices of every class."""
        order = np.argsort(codes, kind="stable")
        counts = np.bincount(codes)
        pools = np.split(order, np.cumsum(counts)[:-1])
        return [rng.permutation(pool) for pool in pools]

    def _assign_client_scheme(self, codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n = len(codes)
        per_client = n // self.num_clients
        pools = self._class_pools(codes, rng)
        num_classes = len(pools)
        remaining = np.array([len(pool) for pool in pools], dtype=np.int64)
        proportions = rng.dirichlet(np.full(num_classes, self.alpha), size=self.num_clients)
        take = np.zeros((self.num_clients, num_classes), dtype=np.int64)
        for client in range(self.num_clients):
            need = per_client
            counts = take[client]
            while need > 0:
                available = remaining > counts
                weights = proportions[client] * available
                total = weights.sum()
                if not total > 0:
                    # The client's mass sits on exhausted classes only (or underflowed
                    # to zero): fall back to the classes that are left, by size.
                    weights = (remaining - counts).astype(np.float64)
                    total = weights.sum()
                draw = rng.multinomial(need, weights / total)
                draw = np.minimum(draw, remaining - counts)
                counts += draw
                need -= int(draw.sum())
            remaining -= counts
        client_of = np.full(n, -1, dtype=np.int64)
        for k, pool in enumerate(pools):
            owners = np.repeat(np.arange(self.num_clients), take[:, k])
            client_of[pool[: len(owners)]] = owners
        return client_of

    def _assign_class_scheme(self, codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        pools = self._class_pools(codes, rng)
        for _ in range(self.max_tries):
            counts = np.empty((len(pools), self.num_clients), dtype=np.int64)
            for k, pool in enumerate(pools):
                q = rng.dirichlet(np.full(self.num_clients, self.alpha))
                bounds = np.floor(np.cumsum(q) * len(pool)).astype(np.int64)
                np.minimum(bounds, len(pool), out=bounds)
                bounds[-1] = len(pool)
                counts[k] = np.diff(bounds, prepend=0)
            sizes = counts.sum(axis=0)
            if sizes.min() >= self.min_examples_per_client:
                break
        else:
            raise ValueError(
                f"scheme='class' could not give every client at least "
                f"min_examples_per_client={self.min_examples_per_client} examples in "
                f"max_tries={self.max_tries} draws (alpha={self.alpha}, "
                f"num_clients={self.num_clients}); raise alpha, lower num_clients or "
                "min_examples_per_client, raise max_tries, or use scheme='client'."
            )
        client_of = np.empty(len(codes), dtype=np.int64)
        for k, pool in enumerate(pools):
            client_of[pool] = np.repeat(np.arange(self.num_clients), counts[k])
        return client_of
