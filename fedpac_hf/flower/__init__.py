"""Run FedPAC (and every registered baseline) on Flower.

When a federation outgrows one process or one machine, the same algorithmic
core (:mod:`fedpac_hf.federated`) runs on Flower's simulation engine or on a
real SuperLink/SuperNode deployment:

- :class:`FedPACStrategy` (``fedpac_hf.flower.strategy``) is a Flower
  message-API ``Strategy`` that runs the core's round engine
  (:class:`~fedpac_hf.federated.RoundEngine`: sampling, schedule, server rule,
  failures) inside Flower's ``Strategy.start`` loop;
- :func:`make_server_app` (``fedpac_hf.flower.serverapp``) builds the
  ``ServerApp`` from a model factory (and optionally an evaluator factory):
  it drives the strategy, evaluates centrally and checkpoints, with no
  trainer and no training data on the server;
- :func:`make_client_app` (``fedpac_hf.flower.clientapp``) builds a
  ``ClientApp`` whose local steps are the trainer's client step;
- :func:`run_fedpac_simulation` (``fedpac_hf.flower.simulation``) runs both on
  Flower's simulation engine from Python.

Both apps read :class:`~fedpac_hf.FedPACArguments` (given directly or from
Flower's run config); their factories are called with ``(args, run_config)``.

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

import importlib
from typing import Any

# Imported on first use, so that the server side (strategy, ServerApp) loads
# without the client side's trainer.
_LAZY = {
    "FedPACClient": ".clientapp",
    "make_client_app": ".clientapp",
    "EvaluatorFactory": ".config",
    "ModelFactory": ".config",
    "TrainerFactory": ".config",
    "arguments_from_run_config": ".config",
    "array_record_to_tensors": ".records",
    "client_update_from_content": ".records",
    "client_update_to_content": ".records",
    "server_state_from_content": ".records",
    "server_state_to_content": ".records",
    "tensors_to_array_record": ".records",
    "FlowerServerRun": ".serverapp",
    "make_server_app": ".serverapp",
    "SimulationResult": ".simulation",
    "run_fedpac_simulation": ".simulation",
    "FedPACStrategy": ".strategy",
    "PartitionStrategy": ".strategy",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'fedpac_hf.flower' has no attribute {name!r}")
