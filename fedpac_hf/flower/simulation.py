"""Run a FedPAC federation on Flower's simulation engine from Python.

:func:`run_fedpac_simulation` wires :func:`make_server_app` and
:func:`make_client_app` to :func:`flwr.simulation.run_simulation`: one
virtual SuperNode per client (its node config carries ``partition-id``), the
ClientApps run in Ray actors, the ServerApp in this process. The command-line
equivalent is ``flwr run`` on an app such as ``examples/flower_app``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpac_hf.arguments import FedPACArguments
from fedpac_hf.checkpoint import CHECKPOINT_PREFIX
from fedpac_hf.federated import ServerState

from .clientapp import make_client_app
from .config import TrainerFactory
from .serverapp import make_server_app

__all__ = ["SimulationResult", "run_fedpac_simulation"]


@dataclass
class SimulationResult:
    """What a simulated run leaves behind.

    Attributes
    ----------
    server_state:
        Final global parameters, Theta and direction.
    history:
        One dict of metrics per round (drift, bytes, loss, evaluation, ...).
    checkpoint:
        Directory of the final federated checkpoint (``None`` if not saved).
    """

    server_state: ServerState
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint: Path | None = None


def run_fedpac_simulation(
    build_trainer: TrainerFactory,
    arguments: FedPACArguments,
    *,
    num_supernodes: int | None = None,
    backend_config: dict[str, Any] | None = None,
    verbose_logging: bool = False,
    **server_kwargs: Any,
) -> SimulationResult:
    """Run ``arguments.num_rounds`` FedPAC rounds on Flower's simulation engine.

    Parameters
    ----------
    build_trainer:
        ``build_trainer(args) -> FedPACTrainer`` (model + data), called once by
        the ServerApp and once in every simulation worker.
    arguments:
        The run's arguments, as for ``FedPACTrainer``.
    num_supernodes:
        Virtual SuperNodes, one per client; default ``arguments.num_clients``.
    backend_config:
        Flower's backend config; default one CPU per client
        (``{"client_resources": {"num_cpus": 1, "num_gpus": 0}}``), ``init_args``
        go to ``ray.init`` (e.g. ``{"num_cpus": 2}`` caps the workers).
    verbose_logging:
        Flower's debug logs.
    **server_kwargs:
        Passed to :func:`make_server_app` (``round_timeout``, strategy overrides).

    Returns
    -------
    SimulationResult
        The final state and the per-round metrics.

    Raises
    ------
    RuntimeError
        If a round has fewer than ``min_clients_per_round`` usable updates
        (the ServerApp's error is re-raised).
    """
    captured: dict[str, Any] = {}

    def finish(trainer: Any, strategy: Any) -> None:
        captured["state"] = strategy.server_state
        captured["history"] = list(trainer.round_history)

    server_app = make_server_app(build_trainer, arguments, on_finish=finish, **server_kwargs)
    client_app = make_client_app(build_trainer, arguments)
    config = backend_config or {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.simulation import run_simulation

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_supernodes or arguments.num_clients,
        backend_config=config,
        verbose_logging=verbose_logging,
    )
    if "state" not in captured:
        raise RuntimeError("the Flower simulation ended before the ServerApp finished its rounds")
    final = Path(arguments.output_dir) / f"{CHECKPOINT_PREFIX}{captured['state'].round}"
    return SimulationResult(
        server_state=captured["state"],
        history=captured["history"],
        checkpoint=final if final.is_dir() else None,
    )
