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
after the last round; ``save_total_limit`` keeps the newest).

A run whose arguments set ``resume_from_checkpoint`` (a checkpoint path, or
``true`` for the latest under ``output_dir``) continues from that checkpoint
through the same resume path as ``FedPACTrainer``
(:func:`fedpac_hf.rundir.resume.load_resumable_checkpoint`): the engine is rebuilt
from the checkpoint's state and history, only the remaining rounds run, and a
checkpoint of another model, algorithm or partition is refused naming the
setting. The ServerApp logs how the run ended as its last line: the rounds
done and where the final state is, or the error, the last checkpoint and how
to resume from it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import console_handler
from flwr.serverapp import Grid, ServerApp
from transformers.trainer_callback import TrainerState

from fedpac_hf.config.arguments import FedPACArguments
from fedpac_hf.federated import ServerState, load_trainable_state
from fedpac_hf.federated.failures import non_finite_metrics, require_finite_evaluation
from fedpac_hf.federated.preflight import server_preflight
from fedpac_hf.rundir.checkpoint import (
    CHECKPOINT_PREFIX,
    latest_checkpoint,
    rotate_checkpoints,
    save_federated_checkpoint,
)
from fedpac_hf.rundir.environment import record_start
from fedpac_hf.rundir.metrics_file import append_metrics, keep_metrics_through
from fedpac_hf.rundir.output_dir import claim_output_dir, no_new_folders
from fedpac_hf.rundir.resume import load_resumable_checkpoint, run_identity
from fedpac_hf.trainer.evaluation import Evaluator
from fedpac_hf.trainer.logs import show_package_log

from .config import (
    EvaluatorFactory,
    ModelFactory,
    PublicCurvatureFactory,
    arguments_from_run_config,
    flower_setting,
)
from .records import tensors_to_array_record
from .strategy import FedPACStrategy
from .strategy.secure import SecureFedPACStrategy

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
        # the model sizes Theta's form (theta_budget) exactly as on the clients
        engine = args.round_engine(
            ServerState.from_model(model), args.num_clients, algorithm=args.build_algorithm(model)
        )
        secagg = args.secure_aggregation_settings(engine.algorithm)
        if secagg is not None:  # Flower's SecAgg+ sums the updates (docs/secure_aggregation.md)
            target = args.dp_target_epsilon if args.dp_mode == "record" else None
            self.strategy = SecureFedPACStrategy(
                engine, secagg=secagg, record_target_epsilon=target, **strategy_kwargs
            )
        else:
            self.strategy = FedPACStrategy(engine, **strategy_kwargs)
        self.steps = TrainerState()
        # eval_steps / save_steps as Trainer reads them
        self.steps.compute_steps(args, args.num_rounds)
        self.output_dir = Path(args.output_dir)
        self.resumed_from: Path | None = None

    @property
    def engine(self) -> Any:
        """The strategy's round engine."""
        return self.strategy.engine

    def identity(self) -> dict[str, Any]:
        """The run's identity (what a checkpoint must match to be resumed by this run)."""
        try:
            partition = self.args.build_partitioner().settings()
        except ValueError:
            partition = None
        return run_identity(
            model=self.model,
            algorithm=self.engine.algorithm,
            num_clients=self.engine.num_clients,
            seed=self.args.seed,
            partition=partition,
            params=self.engine.state.params,
            training=self.args.training_settings(self.engine.algorithm),
        )

    def resume(self, checkpoint: str | bool) -> Path:
        """Continue the run from ``checkpoint`` (a path, or true for the latest under output_dir).

        The engine is rebuilt from the checkpoint's state and history, the
        model takes its global parameters, and metrics rows of rounds after
        it are dropped from ``metrics.jsonl``.

        Raises
        ------
        FileNotFoundError
            If there is no such checkpoint.
        ValueError
            If it is corrupt, past ``num_rounds`` or from another run (naming the setting).
        """
        path, state, meta = load_resumable_checkpoint(
            checkpoint,
            self.output_dir,
            identity=self.identity(),
            num_rounds=self.args.num_rounds,
            setting_names=self.args.partition_setting_names(),
        )
        self.strategy.engine = self.args.round_engine(
            state,
            self.engine.num_clients,
            history=meta.get("history", []),
            algorithm=self.engine.algorithm,
        )
        load_trainable_state(self.model, state.params)
        keep_metrics_through(self.output_dir, state.round)
        self.resumed_from = path
        logger.info(
            "resumed from %s: %d of %d rounds done", path, state.round, self.engine.num_rounds
        )
        return path

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
            require_finite_evaluation(metrics, done)  # a diverged global model stops the run
            result = MetricRecord({k: float(v) for k, v in metrics.items()})
        append_metrics(self.output_dir, engine.history[-1])
        save_due = self.args.save_strategy == "steps" and done % self.steps.save_steps == 0
        if last or save_due:
            self.save_checkpoint()
        return result

    def save_checkpoint(self) -> Path:
        """Write ``output_dir/checkpoint-round-{r}``: global state, run identity, history, model."""
        engine = self.engine
        meta = {"run": self.identity(), "history": engine.history}
        target = self.output_dir / f"{CHECKPOINT_PREFIX}{engine.state.round}"
        save_model = getattr(self.model, "save_pretrained", None)
        path = save_federated_checkpoint(target, engine.state, meta, save_model)
        logger.info("global state of round %d written to %s", engine.state.round, path)
        rotate_checkpoints(self.output_dir, self.args.save_total_limit)
        return path

    def preflight(self) -> float:
        """The server's preflight (:func:`~fedpac_hf.federated.preflight.server_preflight`).

        The client optimizer, Theta's form, the aggregation and the warm start
        on the global model, with a synthetic loss (the server has no training
        data), and one central evaluation of the initial weights, which must be
        finite. With ``public_curvature``, the server's runs on its public data
        (the strategy's ``train_public``) for the first round, whose Theta must be
        finite. Each ClientApp runs its own preflight on its data at its first
        message. Returns its time in seconds.
        """

        def evaluate_once(model: torch.nn.Module) -> None:
            assert self.evaluate is not None
            metrics = dict(self.evaluate(model))
            bad = non_finite_metrics(metrics)
            if bad:
                raise ValueError(
                    f"the central evaluation of the initial model gave {bad}: check the "
                    "evaluator and its data (the learning rate plays no part yet)"
                )

        steps = self.args.local_step_settings(self.args.round_learning_rates()[0], 1)
        train_public = self.strategy.train_public

        def public_theta() -> dict[str, torch.Tensor]:
            plan = self.engine.plan_round()  # the first round's; nothing is recorded in it
            plan.use_public_curvature(train_public(plan))
            return plan.aggregator.public_curvature

        with no_new_folders(self.output_dir):  # an evaluator's Trainer makes output_dir
            seconds = server_preflight(
                self.model,
                self.engine.algorithm,
                steps,
                weighting=self.args.aggregation_weighting,
                eval_fn=evaluate_once if self.evaluate is not None else None,
                public_theta=public_theta if train_public is not None else None,
            )
        logger.info("server preflight passed in %.1f s (preflight=false skips it)", seconds)
        return seconds

    def run(self, grid: Grid, round_timeout: float = 3600.0) -> None:
        """Run the remaining rounds with Flower's ``Strategy.start``.

        The server owns ``output_dir`` for the run (see :mod:`fedpac_hf.rundir.output_dir`);
        with ``resume_from_checkpoint`` it first resumes (:meth:`resume`).
        """
        resume = self.args.resume_from_checkpoint
        if self.args.preflight:  # before the server writes anything
            self.preflight()
        with claim_output_dir(
            self.output_dir, resume=bool(resume), overwrite=self.args.overwrite_output_dir
        ):
            if resume:
                self.resume(resume)
            engine = self.engine
            record_start(self.output_dir, engine.state.round)
            if isinstance(self.strategy, SecureFedPACStrategy):
                self.strategy.secagg_timeout = round_timeout  # each of SecAgg+'s exchanges
            self.strategy.start(
                grid,
                tensors_to_array_record(engine.state.params),
                num_rounds=engine.num_rounds - engine.state.round,
                timeout=round_timeout,
                evaluate_fn=self.after_round,
            )
        load_trainable_state(self.model, self.engine.state.params)

    def report_end(self, error: BaseException | None = None) -> None:
        """Log how the run ended (the ServerApp's last line): done, or why not and how to resume."""
        engine = self.engine
        if error is None:
            logger.info(
                "FedPAC run finished: %d of %d rounds done; final global state in %s; "
                "peak memory of the ServerApp process %s",
                engine.state.round,
                engine.num_rounds,
                self.output_dir / f"{CHECKPOINT_PREFIX}{engine.state.round}",
                _peak_memory(),
            )
            return
        logger.error(
            "FedPAC run failed after %d of %d rounds: %s: %s",
            engine.state.round,
            engine.num_rounds,
            type(error).__name__,
            error,
        )
        if isinstance(error, ValueError | FileNotFoundError):  # a setting to change, not a crash
            return
        last = latest_checkpoint(self.output_dir)
        if last is not None:
            logger.error(
                "its last checkpoint is %s; continue the run from it with "
                '--run-config "resume-from-checkpoint=true"',
                last,
            )
        elif engine.state.round:
            logger.error(
                "no checkpoint to resume from (save_strategy=%r, save_steps=%s); set "
                "save-strategy='steps' and save-steps=1 to checkpoint every round",
                str(getattr(self.args.save_strategy, "value", self.args.save_strategy)),
                self.args.save_steps,
            )


def _peak_memory() -> str:
    """The peak resident memory of this process so far, e.g. ``"612 MiB"``."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return "unknown"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return f"{peak / (2**20 if sys.platform == 'darwin' else 2**10):.0f} MiB"


def make_server_app(
    build_model: ModelFactory,
    build_evaluator: EvaluatorFactory | None = None,
    arguments: FedPACArguments | None = None,
    *,
    app_settings: Iterable[str] = (),
    round_timeout: float = 3600.0,
    on_finish: FinishCallback | None = None,
    build_public_curvature: PublicCurvatureFactory | None = None,
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
        (e.g. :func:`fedpac_hf.trainer.evaluation.make_evaluator`); ``None``: no
        central evaluation.
    arguments:
        Fixed arguments; default: the run config (:func:`arguments_from_run_config`).
    app_settings:
        The app's own run-config keys (e.g. ``("dataset",)``); any other key
        that is not a ``FedPACArguments`` field or one of
        :data:`~fedpac_hf.flower.config.FLOWER_SETTINGS` is refused.
    round_timeout:
        Seconds to wait for a round's replies; later ones are dropped. The
        run-config key ``round-timeout`` (and ``node-wait-timeout`` for the
        strategy's ``node_wait_timeout``) overrides it.
    on_finish:
        Called with ``(model, strategy)`` after the last round (the model then
        holds the final global parameters).
    build_public_curvature:
        The server's public data for ``public_curvature`` runs (see
        :data:`~fedpac_hf.flower.config.PublicCurvatureFactory`); called only
        when the run sets ``public-curvature``.
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
        run_config = dict(context.run_config)
        args = arguments or arguments_from_run_config(run_config, app_settings)
        show_package_log(args, console_handler)  # e.g. the DP noise note, in Flower's log
        model = build_model(args, run_config)
        evaluate = build_evaluator(args, run_config) if build_evaluator is not None else None
        kwargs = dict(strategy_kwargs)  # the run config's timeouts come first
        kwargs["node_wait_timeout"] = flower_setting(
            run_config, "node-wait-timeout", kwargs.get("node_wait_timeout")
        )
        timeout = flower_setting(run_config, "round-timeout", round_timeout)
        if args.public_curvature and build_public_curvature is not None:
            kwargs["train_public"] = build_public_curvature(args, run_config)
        run = FlowerServerRun(args, model, evaluate, **kwargs)
        try:
            run.run(grid, timeout)
        except Exception as err:
            run.report_end(err)
            raise
        run.report_end()
        if on_finish is not None:
            on_finish(model, run.strategy)

    return app
