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

from fedpac_hf.config.arguments import FedPACArguments
from fedpac_hf.federated import Algorithm, ServerState
from fedpac_hf.rundir.checkpoint import CHECKPOINT_PREFIX

from .clientapp import make_client_app
from .config import EvaluatorFactory, ModelFactory, TrainerFactory
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
    algorithm:
        The algorithm the ServerApp ran, with the client options that give
        Theta its form (``curvature``, ``theta_budget``).
    """

    server_state: ServerState
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint: Path | None = None
    algorithm: Algorithm | None = None


def run_fedpac_simulation(
    build_trainer: TrainerFactory,
    arguments: FedPACArguments,
    *,
    build_model: ModelFactory,
    build_evaluator: EvaluatorFactory | None = None,
    run_config: dict[str, Any] | None = None,
    num_supernodes: int | None = None,
    backend_config: dict[str, Any] | None = None,
    verbose_logging: bool = False,
    **server_kwargs: Any,
) -> SimulationResult:
    """Run ``arguments.num_rounds`` FedPAC rounds on Flower's simulation engine.

    Parameters
    ----------
    build_trainer:
        ``build_trainer(args, run_config) -> FedPACTrainer`` (model + data),
        called once in every simulation worker (the clients).
    arguments:
        The run's arguments, as for ``FedPACTrainer``; with
        ``resume_from_checkpoint`` (a checkpoint path, or ``"true"`` for the
        latest in ``output_dir``) the ServerApp continues that run.
    build_model:
        ``build_model(args, run_config) -> model``: the server's global model.
    build_evaluator:
        ``build_evaluator(args, run_config) -> evaluate(model)``: central
        evaluation on the server (optional).
    run_config:
        The app's own settings, handed to the factories (default ``{}``).
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
        If the ServerApp did not finish its rounds (e.g. a round had fewer
        than ``min_clients_per_round`` usable updates: Flower logs the
        ServerApp's ``RoundError`` naming why each client was dropped).
    """
    captured: dict[str, Any] = {}
    config = dict(run_config or {})

    def finish(model: Any, strategy: Any) -> None:
        captured["state"] = strategy.server_state
        captured["history"] = list(strategy.history)
        captured["algorithm"] = strategy.engine.algorithm

    def model_factory(args: FedPACArguments, _: Any) -> Any:
        return build_model(args, config)

    def evaluator_factory(args: FedPACArguments, _: Any) -> Any:
        return build_evaluator(args, config) if build_evaluator is not None else None

    def trainer_factory(args: FedPACArguments, _: Any) -> Any:
        return build_trainer(args, config)

    trainer_factory.__qualname__ = f"simulation:{getattr(build_trainer, '__qualname__', '')}"
    server_app = make_server_app(
        model_factory, evaluator_factory, arguments, on_finish=finish, **server_kwargs
    )
    client_app = make_client_app(trainer_factory, arguments)
    backend = backend_config or {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.simulation import run_simulation

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_supernodes or arguments.num_clients,
        backend_config=backend,
        verbose_logging=verbose_logging,
    )
    if "state" not in captured:
        raise RuntimeError("the Flower simulation ended before the ServerApp finished its rounds")
    final = Path(arguments.output_dir) / f"{CHECKPOINT_PREFIX}{captured['state'].round}"
    return SimulationResult(
        server_state=captured["state"],
        history=captured["history"],
        algorithm=captured["algorithm"],
        checkpoint=final if final.is_dir() else None,
    )
