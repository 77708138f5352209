"""Federated algorithms as named compositions of (base optimizer, alignment, beta).

Every method the project offers, FedPAC and its baselines alike, is one
:class:`Algorithm`: which optimizer the clients run, whether they warm-start
from the aggregated curvature (alignment), and how strongly the global
direction is blended into each local step (correction, ``beta``). The registry
maps names such as ``"fedpac_soap"`` to these records; users add their own
with :func:`register_algorithm` without editing the library.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedpac_hf.optim.options import check_options, flag

from .adaptive_beta import AUTO, AUTO_BETA_MAX, AUTO_BETA_START, parse_beta
from .state import ServerState, tensor_bytes

__all__ = [
    "Algorithm",
    "register_algorithm",
    "unregister_algorithm",
    "get_algorithm",
    "list_algorithms",
    "round_beta",
    "downlink_bytes",
    "downlink_parts",
]


@dataclass(frozen=True)
class Algorithm:
    """One federated method: the client rule's three knobs plus the optimizer.

    Parameters
    ----------
    name:
        Registry name, used in logs and checkpoints.
    optimizer:
        Base client optimizer, a name understood by
        :func:`fedpac_hf.optim.create_optimizer` (``"sgd"``, ``"adamw"``,
        ``"soap"``, ``"sophia"``, ``"muon"``).
    align:
        Warm-start every client from the server's aggregated curvature Theta
        (FedPAC's alignment). Theta is aggregated and its drift logged whenever
        the optimizer has curvature, aligned or not.
    beta:
        Correction strength in [0, 1]: the base step is scaled by ``1 - beta``
        and ``beta * lr * g_G`` (the global direction) is subtracted after it.
        0 disables the correction.
    optimizer_kwargs:
        Extra keyword arguments for the optimizer (betas, eps, ...).
    description:
        One line for tables and ``--help``.
    beta_max:
        Upper bound of the correction strength chosen by ``beta="auto"``,
        in (0, 1).
    public_curvature:
        Theta comes from the server, not from the clients: each round the
        server runs the client rule on public data from the round's state and
        its Theta is the next global Theta (``docs/privacy.md``). Clients
        send no curvature, so it costs no uplink and, under DP, no share of
        the privacy mechanism. Needs ``align``.
    """

    name: str
    optimizer: str
    align: bool = False
    beta: float | str = 0.0
    optimizer_kwargs: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    beta_max: float = AUTO_BETA_MAX
    public_curvature: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"an Algorithm's name must be a non-empty text, got {self.name!r}")
        flag().check(f"align (algorithm {self.name!r})", self.align)
        flag().check(f"public_curvature (algorithm {self.name!r})", self.public_curvature)
        if self.public_curvature and not self.align:
            raise ValueError(
                f"public_curvature needs an algorithm that aligns (warm-starts from the global "
                f"Theta); {self.name!r} does not (align=False)"
            )
        try:
            beta = parse_beta(self.beta)
        except ValueError as err:
            raise ValueError(f"{err} (algorithm {self.name!r})") from None
        object.__setattr__(self, "beta", beta)  # "0.3" -> 0.3, "AUTO" -> "auto"
        if isinstance(self.beta_max, bool) or not 0.0 < float(self.beta_max) < 1.0:
            raise ValueError(
                f"beta_max must lie in (0, 1), got {self.beta_max!r} (algorithm {self.name!r})"
            )
        try:  # the optimizer's options, against the table every door uses
            check_options(self.optimizer, self.optimizer_kwargs, setting="optimizer_kwargs")
        except ValueError as err:
            raise ValueError(f"{err} (algorithm {self.name!r})") from None

    @property
    def adaptive_beta(self) -> bool:
        """Whether the server chooses beta every round (``beta="auto"``)."""
        return self.beta == AUTO

    @property
    def correction(self) -> bool:
        """Whether the global direction is blended into local steps."""
        return self.adaptive_beta or float(self.beta) > 0.0

    @property
    def shares_curvature(self) -> bool:
        """Whether the global Theta is made of the clients' (they align, and it does not come
        from public data): under client-level DP then Theta is clipped and noised too."""
        return self.align and not self.public_curvature

    @property
    def soap_curvature(self) -> bool:
        """Whether the global Theta is SOAP's statistics, which clients align to (what
        ``dp_projection_rank`` projects on)."""
        return self.align and self.optimizer == "soap"

    @property
    def public_rule(self) -> Algorithm:
        """The client rule as the server runs it on public data (``public_curvature``): the
        same steps, but it returns its Theta."""
        return self.replace(public_curvature=False) if self.public_curvature else self

    def replace(self, **changes: Any) -> Algorithm:
        """Return a copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


_REGISTRY: dict[str, Algorithm] = {}


def register_algorithm(algorithm: Algorithm, *, overwrite: bool = False) -> Algorithm:
    """Add ``algorithm`` to the registry under ``algorithm.name``.

    Raises ``ValueError`` if the name is taken, unless ``overwrite=True``.
    """
    if not isinstance(algorithm, Algorithm):
        raise ValueError(
            f"register_algorithm takes an Algorithm (e.g. Algorithm('mine', 'soap', align=True)), "
            f"got {type(algorithm).__name__}"
        )
    if algorithm.name in _REGISTRY and not overwrite:
        raise ValueError(
            f"an algorithm named {algorithm.name!r} is already registered; "
            "pass overwrite=True to replace it"
        )
    _REGISTRY[algorithm.name] = algorithm
    return algorithm


def unregister_algorithm(name: str) -> Algorithm:
    """Remove a registered algorithm and return it (``ValueError`` if it is not there)."""
    try:
        return _REGISTRY.pop(name)
    except KeyError:
        raise ValueError(f"no algorithm named {name!r} is registered") from None


def list_algorithms() -> list[str]:
    """Names of all registered algorithms, sorted."""
    return sorted(_REGISTRY)


def get_algorithm(name: str | Algorithm, **overrides: Any) -> Algorithm:
    """Look up an algorithm by name, optionally overriding fields.

    Example: ``get_algorithm("fedpac_soap", beta=0.3)`` or
    ``get_algorithm("fedavg", optimizer="adamw")``.
    """
    if isinstance(name, Algorithm):
        algorithm = name
    elif not isinstance(name, str):
        raise ValueError(
            f"algorithm must be a registered name or an Algorithm, got a "
            f"{type(name).__name__}: {name!r}; valid names: {', '.join(list_algorithms())}"
        )
    else:
        key = name.strip()
        if key not in _REGISTRY and key.lower() in _REGISTRY:  # FEDPAC_SOAP, fedpac_soap
            key = key.lower()
        try:
            algorithm = _REGISTRY[key]
        except KeyError:
            raise ValueError(
                f"unknown algorithm {name!r}; valid names: {', '.join(list_algorithms())}"
            ) from None
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Algorithm)}
    if unknown:
        raise ValueError(
            f"unknown algorithm field(s) {sorted(unknown)}; valid fields: "
            f"{[f.name for f in dataclasses.fields(Algorithm)]}"
        )
    return algorithm.replace(**overrides) if overrides else algorithm


def _register_builtins() -> None:
    builtins = [
        Algorithm("fedavg", "sgd", description="FedAvg with SGD clients"),
        Algorithm("fedavg_adamw", "adamw", description="FedAvg with AdamW clients"),
        Algorithm(
            "fedcm", "sgd", beta=0.5, description="SGD clients + global-direction correction"
        ),
        Algorithm(
            "fedadamw",
            "adamw",
            align=True,
            beta=0.5,
            description="AdamW clients, aggregated second moments + correction",
        ),
    ]
    for opt in ("soap", "sophia", "muon"):
        builtins += [
            Algorithm(
                f"local_{opt}",
                opt,
                description=f"naive local {opt.upper()}: plain averaging, no alignment/correction",
            ),
            Algorithm(
                f"fedpac_{opt}",
                opt,
                align=True,
                beta=0.5,
                description=f"FedPAC with {opt.upper()} clients: alignment + correction",
            ),
            Algorithm(
                f"fedpac_align_{opt}",
                opt,
                align=True,
                description=f"ablation: {opt.upper()} with alignment only (beta = 0)",
            ),
            Algorithm(
                f"fedpac_correct_{opt}",
                opt,
                beta=0.5,
                description=f"ablation: {opt.upper()} with correction only (no warm start)",
            ),
        ]
    builtins += [
        Algorithm(
            "fedpac_align", "soap", align=True, description="ablation: alignment only (SOAP)"
        ),
        Algorithm(
            "fedpac_correct", "soap", beta=0.5, description="ablation: correction only (SOAP)"
        ),
    ]
    for algorithm in builtins:
        register_algorithm(algorithm)


_register_builtins()


def round_beta(algorithm: Algorithm, state: ServerState) -> float:
    """The beta the clients use in the round that starts from ``state``.

    A fixed ``algorithm.beta`` as it is; with ``"auto"`` the value the server
    chose at the end of the last round (``state.beta``), or
    :data:`AUTO_BETA_START` (at most ``beta_max``) before it has one.
    """
    if algorithm.beta != AUTO:
        return float(algorithm.beta)
    if state.beta is not None:
        return float(state.beta)
    return min(AUTO_BETA_START, algorithm.beta_max)


def downlink_parts(server_state: ServerState, algorithm: Algorithm) -> dict[str, int]:
    """Bytes the server sends to one client, by part: params, direction g_G, Theta.

    Theta goes down only when the algorithm aligns and g_G only when it
    corrects; tensors count at their dtype's size (2 bytes with bfloat16
    transport).
    """
    return {
        "params": tensor_bytes(server_state.params),
        "direction": tensor_bytes(server_state.direction) if algorithm.correction else 0,
        "theta": tensor_bytes(server_state.curvature) if algorithm.align else 0,
    }


def downlink_bytes(server_state: ServerState, algorithm: Algorithm) -> int:
    """Bytes the server sends to one client: params, plus Theta and g_G when used."""
    return sum(downlink_parts(server_state, algorithm).values())
