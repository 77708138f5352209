"""The FedPAC ServerApp: drives :class:`FedPACStrategy` with a trainer's configuration.

The ServerApp builds the same :class:`~fedpac_hf.FedPACTrainer` as the
clients (``build_trainer(args)``) and uses it as the server's shell: its
model gives the initial global parameters, ``round_learning_rates()`` the
schedule, ``evaluate()`` the centralised evaluation of the global model,
``log()`` the round metrics (so ``report_to`` integrations work), and
``save_federated_checkpoint()`` the same safetensors + JSON checkpoints as an
in-process run, written to ``output_dir``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedpac_hf.arguments import FedPACArguments
from fedpac_hf.federated import ServerState, load_trainable_state
from fedpac_hf.trainer import FedPACTrainer

from .config import TrainerFactory, arguments_from_run_config
from .records import array_record_to_tensors, tensors_to_array_record
from .strategy import FedPACStrategy

__all__ = ["make_server_app"]

# A child of Flower's logger: shown wherever Flower shows its logs (`flwr run --stream`).
logger = logging.getLogger("flwr").getChild(__name__)

FinishCallback = Callable[[FedPACTrainer, FedPACStrategy], None]


def _evaluate_fn(trainer: FedPACTrainer) -> Callable[[int, ArrayRecord], MetricRecord | None]:
    args = trainer.args

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        last = server_round == args.num_rounds
        due = bool(args.eval_every_rounds) and server_round % args.eval_every_rounds == 0
        if server_round == 0 or not (last or due):
            return None
        load_trainable_state(trainer.model, array_record_to_tensors(arrays))
        metrics = trainer.evaluate()
        return MetricRecord(
            {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        )

    return evaluate


def make_server_app(
    build_trainer: TrainerFactory,
    arguments: FedPACArguments | None = None,
    *,
    round_timeout: float = 3600.0,
    on_finish: FinishCallback | None = None,
    **strategy_kwargs: Any,
) -> ServerApp:
    """A Flower ``ServerApp`` running FedPAC with ``build_trainer``'s model and arguments.

    Parameters
    ----------
    build_trainer:
        ``build_trainer(args) -> FedPACTrainer``, the callable the ClientApp uses.
    arguments:
        Fixed arguments; default: the run config (:func:`arguments_from_run_config`).
    round_timeout:
        Seconds to wait for a round's replies; later ones are dropped.
    on_finish:
        Called with ``(trainer, strategy)`` after the last round (the trainer's
        model then holds the final global parameters).
    **strategy_kwargs:
        Overrides of :class:`FedPACStrategy`'s arguments (e.g. ``node_wait_timeout``).

    Returns
    -------
    ServerApp
        Runs ``args.num_rounds`` rounds, evaluates the global model on the
        trainer's ``eval_dataset`` every ``eval_every_rounds`` rounds, logs
        every round through ``trainer.log`` and writes the final federated
        checkpoint (and ``save_every_rounds`` ones) under ``output_dir``.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        args = arguments or arguments_from_run_config(context.run_config)
        trainer = build_trainer(args)
        trainer.model.to(trainer.args.device)
        state = ServerState.from_model(trainer.model)
        trainer.server_state = state
        trainer.round_history = []

        def round_end(server_round: int, new_state: ServerState, metrics: dict) -> None:
            trainer.server_state = new_state
            trainer.state.global_step = server_round
            trainer.round_history.append(dict(metrics))
            trainer.log(dict(metrics))
            every = args.save_every_rounds
            if every and server_round % every == 0 and server_round != args.num_rounds:
                trainer.save_federated_checkpoint()

        strategy = FedPACStrategy.from_trainer(
            trainer,
            trainer.setup_clients(),
            initial_state=state,
            on_round_end=round_end,
            **strategy_kwargs,
        )
        evaluate = _evaluate_fn(trainer) if trainer.eval_dataset is not None else None

        def evaluate_and_record(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            result = evaluate(server_round, arrays) if evaluate is not None else None
            if result is not None and trainer.round_history:
                trainer.round_history[-1].update(dict(result))
            return result

        strategy.start(
            grid,
            tensors_to_array_record(state.params),
            num_rounds=args.num_rounds,
            timeout=round_timeout,
            evaluate_fn=evaluate_and_record,
        )
        load_trainable_state(trainer.model, strategy.server_state.params)
        path = trainer.save_federated_checkpoint()
        if path is not None:
            logger.info("final global state written to %s", path)
        if on_finish is not None:
            on_finish(trainer, strategy)

    return app
