"""The federated core in plain PyTorch: client rule, server rule, algorithms.

Testable on a 10-line model; the HF trainer and the Flower apps are thin
shells around it.
"""

from .algorithms import (
    Algorithm,
    get_algorithm,
    list_algorithms,
    register_algorithm,
    unregister_algorithm,
)
from .client import (
    ClientError,
    ClientFailure,
    ClientUpdate,
    batch_size,
    client_update,
    cycle_batches,
    run_client,
)
from .sampling import resolve_clients_per_round, sample_clients
from .server import WEIGHTINGS, RoundAggregator, RoundError, aggregate, downlink_bytes
from .simulation import LR_SCHEDULES, round_learning_rate, simulate
from .state import (
    ServerState,
    get_trainable_state,
    load_trainable_state,
    tensor_bytes,
    trainable_parameters,
)

__all__ = [
    "Algorithm",
    "ClientError",
    "ClientFailure",
    "ClientUpdate",
    "LR_SCHEDULES",
    "RoundAggregator",
    "RoundError",
    "ServerState",
    "WEIGHTINGS",
    "aggregate",
    "batch_size",
    "client_update",
    "cycle_batches",
    "downlink_bytes",
    "get_algorithm",
    "get_trainable_state",
    "list_algorithms",
    "load_trainable_state",
    "register_algorithm",
    "resolve_clients_per_round",
    "round_learning_rate",
    "run_client",
    "sample_clients",
    "simulate",
    "tensor_bytes",
    "unregister_algorithm",
    "trainable_parameters",
]
