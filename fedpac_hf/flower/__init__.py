"""Run FedPAC (and every registered baseline) on Flower.

When a federation outgrows one process or one machine, the same algorithmic
core (:mod:`fedpac_hf.federated`) runs on Flower's simulation engine or on a
real SuperLink/SuperNode deployment:

- :class:`FedPACStrategy` (``fedpac_hf.flower.strategy``) is a Flower
  message-API ``Strategy`` that applies the core's server rule
  (:class:`~fedpac_hf.federated.RoundAggregator`) each round;
- :func:`make_client_app` (``fedpac_hf.flower.clientapp``) builds a
  ``ClientApp`` whose local steps are :meth:`FedPACTrainer.train_client`;
- :func:`make_server_app` (``fedpac_hf.flower.serverapp``) builds the
  ``ServerApp`` that drives the strategy, evaluates and checkpoints;
- :func:`run_fedpac_simulation` (``fedpac_hf.flower.simulation``) runs both on
  Flower's simulation engine from Python.

Both apps are configured like :class:`~fedpac_hf.FedPACTrainer`: a
:class:`~fedpac_hf.FedPACArguments` (given directly or read from Flower's run
config) and a callable that builds the trainer (model + data) from it.

Needs the ``flower`` extra: ``pip install "fedpac_hf[flower]"`` (and
``flwr[simulation]`` for the simulation engine, which runs on Ray).
"""

from __future__ import annotations

try:
    import flwr  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fedpac_hf.flower needs Flower: install it with pip install 'fedpac_hf[flower]' "
        "(and 'flwr[simulation]' to use the simulation engine)"
    ) from err

from .clientapp import FedPACClient, make_client_app
from .config import TrainerFactory, arguments_from_run_config
from .records import (
    array_record_to_tensors,
    client_update_from_content,
    client_update_to_content,
    server_state_from_content,
    server_state_to_content,
    tensors_to_array_record,
)
from .serverapp import make_server_app
from .simulation import SimulationResult, run_fedpac_simulation
from .strategy import FedPACStrategy, PartitionStrategy

__all__ = [
    "FedPACClient",
    "FedPACStrategy",
    "PartitionStrategy",
    "SimulationResult",
    "TrainerFactory",
    "array_record_to_tensors",
    "arguments_from_run_config",
    "client_update_from_content",
    "client_update_to_content",
    "make_client_app",
    "make_server_app",
    "run_fedpac_simulation",
    "server_state_from_content",
    "server_state_to_content",
    "tensors_to_array_record",
]
