"""The FedPAC ServerApp: the round engine on Flower, central evaluation, checkpoints.

The server side needs the core and the arguments, not a trainer: it builds the
global model (``build_model(args, run_config)``), optionally an evaluator
(``build_evaluator(args, run_config)``), the round engine the arguments
describe, and runs :class:`FedPACStrategy` with Flower's ``Strategy.start``.
After every round it evaluates the global model when ``eval_strategy`` asks
for it (and after the last round whenever there is an evaluator), appends
the round's metrics to ``output_dir/metrics.jsonl`` (so ``fedpac-hf report``
draws a Flower run too), and writes the same safetensors + JSON checkpoints
as an in-process run (``save_strategy="steps"``/``save_steps``, and always
after the last round).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from transformers.trainer_callback import TrainerState

from fedpac_hf.arguments import FedPACArguments
from fedpac_hf.checkpoint import CHECKPOINT_PREFIX, run_identity, save_federated_checkpoint
from fedpac_hf.evaluation import Evaluator
from fedpac_hf.federated import ServerState, load_trainable_state
from fedpac_hf.output_dir import claim_output_dir
from fedpac_hf.reporting import append_metrics

from .config import EvaluatorFactory, ModelFactory, arguments_from_run_config
from .records import tensors_to_array_record
from .strategy import FedPACStrategy

__all__ = ["FlowerServerRun", "make_server_app"]

# A child of Flower's logger: shown wherever Flower shows its logs (`flwr run --stream`).
logger = logging.getLogger("flwr").getChild(__name__)

FinishCallback = Callable[[torch.nn.Module, FedPACStrategy], None]


class FlowerServerRun:
    """One Flower run on the server: the global model, the engine, evaluation and files.

    Parameters
    ----------
    args:
        The run's arguments.
    model:
        The global model (its trainable parameters are the global ones).
    evaluate:
        ``evaluate(model) -> metrics``, or ``None`` for no central evaluation.
    **strategy_kwargs:
        Passed to :class:`FedPACStrategy` (``node_wait_timeout``, ...).
    """

    def __init__(
        self,
        args: FedPACArguments,
        model: torch.nn.Module,
        evaluate: Evaluator | None = None,
        **strategy_kwargs: Any,
    ) -> None:
        self.args = args
        self.model = model
        self.evaluate = evaluate
        engine = args.round_engine(ServerState.from_model(model), args.num_clients)
        self.strategy = FedPACStrategy(engine, **strategy_kwargs)
        self.steps = TrainerState()
        self.steps.compute_steps(
            args, args.num_rounds
        )  # eval_steps / save_steps as Trainer reads them
        self.output_dir = Path(args.output_dir)

    @property
    def engine(self) -> Any:
        """The strategy's round engine."""
        return self.strategy.engine

    def after_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's ``evaluate_fn``: evaluate, record and checkpoint after each round."""
        engine = self.engine
        if server_round == 0 or not engine.history:  # Flower's call before the first round
            return None
        done = engine.state.round
        last = done == engine.num_rounds
        result = None
        load_trainable_state(self.model, engine.state.params)
        steps_due = self.args.eval_strategy == "steps" and done % self.steps.eval_steps == 0
        if self.evaluate is not None and (last or steps_due):
            self.model.eval()
            with torch.no_grad():
                metrics = dict(self.evaluate(self.model))
            engine.history[-1].update(metrics)
            logger.info("round %d: evaluation %s", done, metrics)
            result = MetricRecord({k: float(v) for k, v in metrics.items()})
        append_metrics(self.output_dir, engine.history[-1])
        save_due = self.args.save_strategy == "steps" and done % self.steps.save_steps == 0
        if last or save_due:
            self.save_checkpoint()
        return result

    def save_checkpoint(self) -> Path:
        """Write ``output_dir/checkpoint-round-{r}``: global state, run identity, history, model."""
        engine = self.engine
        try:
            partition = self.args.build_partitioner().settings()
        except ValueError:
            partition = None
        meta = {
            "run": run_identity(
                model=self.model,
                algorithm=engine.algorithm,
                num_clients=engine.num_clients,
                seed=self.args.seed,
                partition=partition,
                params=engine.state.params,
            ),
            "history": engine.history,
        }
        target = self.output_dir / f"{CHECKPOINT_PREFIX}{engine.state.round}"
        save_model = getattr(self.model, "save_pretrained", None)
        path = save_federated_checkpoint(target, engine.state, meta, save_model)
        logger.info("global state of round %d written to %s", engine.state.round, path)
        return path

    def run(self, grid: Grid, round_timeout: float = 3600.0) -> None:
        """Run the remaining rounds with Flower's ``Strategy.start``.

        The server owns ``output_dir`` for the run (see :mod:`fedpac_hf.output_dir`).
        """
        engine = self.engine
        with claim_output_dir(self.output_dir, overwrite=self.args.overwrite_output_dir):
            self.strategy.start(
                grid,
                tensors_to_array_record(engine.state.params),
                num_rounds=engine.num_rounds - engine.state.round,
                timeout=round_timeout,
                evaluate_fn=self.after_round,
            )
        load_trainable_state(self.model, engine.state.params)


def make_server_app(
    build_model: ModelFactory,
    build_evaluator: EvaluatorFactory | None = None,
    arguments: FedPACArguments | None = None,
    *,
    app_settings: Iterable[str] = (),
    round_timeout: float = 3600.0,
    on_finish: FinishCallback | None = None,
    **strategy_kwargs: Any,
) -> ServerApp:
    """A Flower ``ServerApp`` running FedPAC on the global model ``build_model`` makes.

    Parameters
    ----------
    build_model:
        ``build_model(args, run_config) -> model``, with the same trainable
        parameters and initial weights as the clients' model.
    build_evaluator:
        ``build_evaluator(args, run_config) -> evaluate(model) -> metrics``
        (e.g. :func:`fedpac_hf.evaluation.make_evaluator`); ``None``: no
        central evaluation.
    arguments:
        Fixed arguments; default: the run config (:func:`arguments_from_run_config`).
    app_settings:
        The app's own run-config keys (e.g. ``("dataset",)``); any other key
        that is not a ``FedPACArguments`` field is refused.
    round_timeout:
        Seconds to wait for a round's replies; later ones are dropped.
    on_finish:
        Called with ``(model, strategy)`` after the last round (the model then
        holds the final global parameters).
    **strategy_kwargs:
        Passed to :class:`FedPACStrategy` (e.g. ``node_wait_timeout``).

    Returns
    -------
    ServerApp
        Runs ``args.num_rounds`` rounds (see the module docstring).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        args = arguments or arguments_from_run_config(context.run_config, app_settings)
        run_config = dict(context.run_config)
        model = build_model(args, run_config)
        evaluate = build_evaluator(args, run_config) if build_evaluator is not None else None
        run = FlowerServerRun(args, model, evaluate, **strategy_kwargs)
        run.run(grid, round_timeout)
        if on_finish is not None:
            on_finish(model, run.strategy)

    return app
