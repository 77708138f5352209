"""The federated core in plain PyTorch: client rule, server rule, round engine, algorithms.

Testable on a 10-line model; the HF trainer and the Flower apps are thin
shells around it.
"""

from .adaptive_beta import AUTO_BETA_MAX, AUTO_BETA_START, auto_beta, parse_beta
from .algorithms import (
    Algorithm,
    downlink_bytes,
    downlink_parts,
    get_algorithm,
    list_algorithms,
    register_algorithm,
    round_beta,
    unregister_algorithm,
)
from .batches import batch_size, cycle_batches
from .client import client_update
from .engine import TRANSPORT_DTYPES, RoundEngine
from .failures import ClientError, ClientFailure, RoundError, run_client
from .local_step import ClientHooks, LocalSteps
from .round_metrics import ROUND_METRICS
from .round_plan import RoundPlan
from .sampling import resolve_clients_per_round, sample_clients
from .schedule import round_learning_rates
from .server import (
    WEIGHTINGS,
    RoundAggregator,
    aggregate,
)
from .simulation import simulate
from .state import (
    ClientUpdate,
    ServerState,
    get_trainable_state,
    load_trainable_state,
    tensor_bytes,
    trainable_parameters,
)

__all__ = [
    "AUTO_BETA_MAX",
    "AUTO_BETA_START",
    "Algorithm",
    "ClientError",
    "ClientHooks",
    "ClientFailure",
    "ClientUpdate",
    "LocalSteps",
    "ROUND_METRICS",
    "TRANSPORT_DTYPES",
    "RoundAggregator",
    "RoundEngine",
    "RoundError",
    "RoundPlan",
    "ServerState",
    "WEIGHTINGS",
    "aggregate",
    "auto_beta",
    "batch_size",
    "client_update",
    "cycle_batches",
    "downlink_bytes",
    "downlink_parts",
    "get_algorithm",
    "get_trainable_state",
    "list_algorithms",
    "load_trainable_state",
    "parse_beta",
    "register_algorithm",
    "resolve_clients_per_round",
    "round_beta",
    "round_learning_rates",
    "run_client",
    "sample_clients",
    "simulate",
    "tensor_bytes",
    "unregister_algorithm",
    "trainable_parameters",
]
