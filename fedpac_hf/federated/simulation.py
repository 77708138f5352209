"""A pure-PyTorch federated runner: rounds of sampled clients over one model.

:func:`simulate` is the shortest way to run any registered algorithm on your
own model and data loaders, without Trainer or Flower. It keeps one model in
memory whatever the number of clients: clients are loaded into it in turn.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from fedpac_hf.optim.options import Rule, flag, number, one_of, optional, whole

from .algorithms import Algorithm, get_algorithm
from .batches import cycle_batches
from .client import client_update
from .engine import TRANSPORT_DTYPES, RoundEngine
from .failures import require_finite_evaluation
from .local_step import ClientHooks, LocalSteps, LossFn
from .preflight import preflight as run_preflight
from .privacy import DP_MODES, ClientDP
from .privacy_notes import describe_record_noise
from .record_privacy import RecordDP, check_loader, record_loader
from .round_plan import RoundPlan
from .schedule import round_learning_rates
from .server import WEIGHTINGS, Weighting
from .state import ServerState, load_trainable_state
from .theta_budget import CURVATURE_FORMS, theta_options

__all__ = ["SETTINGS", "evaluation_metrics", "simulate"]

#: What each of :func:`simulate`'s settings accepts (the rules of the optimizer
#: options' table): checked on entry, whole numbers written ``3.0`` read as ``3``,
#: ``1.5`` or ``True`` refused rather than truncated.
SETTINGS: dict[str, Rule] = {
    "num_rounds": whole(1),
    "local_steps": whole(1),
    "seed": whole(0),
    "lr": number(0.0, low_open=True),
    "server_lr": number(0.0, low_open=True),
    "max_grad_norm": optional(number(0.0)),
    "min_clients_per_round": whole(1),
    "lr_schedule": Rule("a scheduler name (text)", lambda v: isinstance(v, str)),
    "weighting": one_of(*WEIGHTINGS),
    "transport_dtype": one_of(*TRANSPORT_DTYPES),
    "curvature": one_of(*CURVATURE_FORMS),
    "theta_budget": optional(number(0.0, low_open=True)),
    "public_curvature_clients": whole(1),
    "dp_mode": one_of(*DP_MODES),
    "dp_noise_seed": optional(whole(0)),
    "preflight": flag(),
    "progress": flag(),
}

logger = logging.getLogger(__name__)


def evaluation_metrics(result: Any) -> dict[str, Any]:
    """What ``eval_fn`` returned, as metrics: a dict as it is, a number as ``eval``.

    Raises
    ------
    TypeError
        For anything else, naming ``eval_fn``.
    """
    if isinstance(result, Mapping):
        return dict(result)
    if isinstance(result, bool) or not isinstance(result, (int, float, torch.Tensor)):
        raise TypeError(
            f"eval_fn must return a number or a dict of metrics, got {type(result).__name__} "
            f"{result!r:.60}"
        )
    return {"eval": float(result)}


def simulate(
    model: torch.nn.Module,
    client_loaders: Sequence[Any],
    algorithm: str | Algorithm,
    num_rounds: int,
    clients_per_round: int | float,
    local_steps: int,
    loss_fn: LossFn,
    eval_fn: Callable[[torch.nn.Module], float | dict[str, float]] | None = None,
    seed: int = 0,
    *,
    lr: float = 0.01,
    lr_schedule: str = "cosine",
    server_lr: float = 1.0,
    weighting: Weighting = "uniform",
    max_grad_norm: float | None = None,
    curvature_loss_fn: LossFn | None = None,
    min_clients_per_round: int = 1,
    transport_dtype: str = "float32",
    curvature: str = "auto",
    theta_budget: float | None = None,
    curvature_loader: Any = None,
    public_curvature_clients: int = 1,
    dp_mode: str = "none",
    dp_clip_norm: float | None = None,
    dp_theta_clip_norm: float | None = None,
    dp_theta_share: float | None = None,
    dp_clip_schedule: str | None = None,
    dp_clip_quantile: float | None = None,
    dp_clip_norm_lr: float | None = None,
    dp_clipped_count_std: float | None = None,
    dp_sampling: str | None = None,
    dp_projection_rank: int | None = None,
    dp_noise_multiplier: float | None = None,
    dp_delta: float | None = None,
    dp_target_epsilon: float | None = None,
    dp_noise_seed: int | None = None,
    preflight: bool = True,
    progress: bool = False,
    callback: Callable[[ServerState, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Run ``num_rounds`` federated rounds and return one metrics dict per round.

    Parameters
    ----------
    model:
        The model; its trainable parameters are the federated ones. At the end
        it holds the final global parameters.
    client_loaders:
        One iterable of batches per client (e.g. a ``DataLoader``).
    algorithm:
        A registered name (see :func:`fedpac_hf.federated.list_algorithms`)
        or an :class:`Algorithm`.
    num_rounds, clients_per_round, local_steps:
        R, S (count or fraction of the clients) and K.
    loss_fn:
        ``loss_fn(model, batch) -> scalar loss``.
    eval_fn:
        Called on the global model after each round; a float is logged as
        ``eval``, a dict is merged into the round's metrics.
    seed:
        Seeds client sampling (a pure function of seed and round).
    lr, lr_schedule:
        Peak local learning rate and its schedule over rounds (a
        ``transformers`` scheduler name: ``cosine``, ``linear``, ``constant``, ...;
        see :func:`~fedpac_hf.federated.round_learning_rates`).
    server_lr, weighting:
        eta_g and the aggregation weights (``uniform`` or ``num_examples``).
    max_grad_norm:
        Clip local gradients (the paper clips at 10).
    curvature_loss_fn:
        Needed by Sophia: the loss whose gradient estimates its Hessian.
    min_clients_per_round:
        A client whose update fails (any exception, or a non-finite loss or
        update) is dropped with a logged reason (see
        :func:`~fedpac_hf.federated.run_client`); fewer survivors than this
        stops the run with :class:`~fedpac_hf.federated.RoundError`.
    transport_dtype:
        ``"float32"`` or ``"bfloat16"``: what the global state and the
        clients' deltas and Theta travel as (the server sums in float64).
    curvature, theta_budget:
        The form of Theta: ``"auto"`` fits it into ``theta_budget`` times the
        trainable parameters (unset: 1.0 with LoRA adapters, full Theta
        without), ``"full"`` sends it whole (see
        :func:`~fedpac_hf.federated.theta_budget.theta_options`, which
        ``FedPACTrainer``, the CLI and the Flower apps use too). Options in
        the algorithm's ``optimizer_kwargs`` take precedence.
    curvature_loader:
        Batches of public data (an iterable read again every round): the
        server takes the global Theta from the client rule run on them from
        each round's state, and the clients send none (``public_curvature``,
        see ``docs/privacy.md``). Needs an algorithm that aligns.
    public_curvature_clients:
        How many runs of the client rule on ``curvature_loader`` (each on the
        next batches) the server's Theta averages per round.
    dp_mode, dp_clip_norm, dp_theta_clip_norm, dp_theta_share, dp_clip_schedule, \
    dp_clip_quantile, dp_clip_norm_lr, dp_clipped_count_std, dp_sampling, \
    dp_projection_rank, dp_noise_multiplier, dp_delta, dp_target_epsilon, dp_noise_seed:
        Client-level differential privacy (``dp_mode="client"``): each client's
        delta clipped to ``dp_clip_norm`` and its Theta, when it travels, to
        ``dp_theta_clip_norm``; clients Poisson-sampled (``dp_sampling="fixed"``:
        exactly ``clients_per_round`` of them, accounted as such); Gaussian noise on the
        sums with multiplier ``dp_noise_multiplier`` (or the one
        ``dp_target_epsilon`` needs after ``num_rounds``), Theta's share of the
        mechanism ``dp_theta_share`` (default 0.5); ``dp_clip_schedule="learning_rate"``
        scales the delta's bound (and noise) by each round's rate over ``lr``;
        ``dp_clip_schedule="adaptive"`` moves both bounds towards the ``dp_clip_quantile``
        of the clients' norms at rate ``dp_clip_norm_lr``, with noise
        ``dp_clipped_count_std`` on the counts
        (:mod:`~fedpac_hf.federated.privacy_adaptive`); ``dp_projection_rank`` keeps the
        noised delta in the leading directions of SOAP's shared curvature
        (:mod:`~fedpac_hf.federated.privacy_projection`); ``epsilon`` at
        ``dp_delta`` (default ``num_clients ** -1.1``) in every round's
        metrics. ``dp_noise_seed`` fixes the noise (default: a secret seed).
        See :mod:`~fedpac_hf.federated.privacy`. ``dp_mode="record"``: DP-SGD in
        every client (:mod:`~fedpac_hf.federated.record_privacy`; the loaders
        must be ``DataLoader`` s, read with Poisson-sampled batches of their
        ``batch_size`` on average).
    preflight:
        Before round 1, run one local step of client 0, one aggregation, one
        warm-started step and ``eval_fn`` once (:func:`~fedpac_hf.federated.preflight.preflight`),
        then put the model and every random stream back: a setting or data
        error stops the run here with :class:`~fedpac_hf.federated.preflight.PreflightError`,
        and the run trains exactly as without it.
    progress:
        Show a progress bar over rounds.
    callback:
        Called after each round with the new server state and its metrics.

    Raises
    ------
    ValueError
        For impossible settings (no client, a client without data, zero local
        steps, a non-positive learning rate, too many clients per round).
    RoundError
        If a round ends with fewer than ``min_clients_per_round`` usable
        updates or a non-finite global model.
    """
    arguments = locals()  # first: the arguments alone
    read = {name: rule.read(name, arguments[name]) for name, rule in SETTINGS.items()}
    num_rounds, local_steps, seed = read["num_rounds"], read["local_steps"], read["seed"]
    min_clients_per_round = read["min_clients_per_round"]
    algorithm = get_algorithm(algorithm)
    if curvature_loader is not None:
        algorithm = algorithm.replace(public_curvature=True)
    elif algorithm.public_curvature:
        raise ValueError(f"{algorithm.name} takes Theta from public data: pass curvature_loader")
    form = theta_options(
        model,
        algorithm.optimizer,
        curvature,
        theta_budget,
        algorithm.optimizer_kwargs,
        align=algorithm.align,
    )
    if form:
        algorithm = get_algorithm(
            algorithm, optimizer_kwargs={**form, **algorithm.optimizer_kwargs}
        )
    if not isinstance(client_loaders, Sequence) or isinstance(client_loaders, str):
        raise ValueError(
            "client_loaders must be a list with one iterable of batches per client (each read "
            f"again every round), got {type(client_loaders).__name__}"
        )
    if not client_loaders:
        raise ValueError("client_loaders is empty: a federation needs at least one client")
    for cid, loader in enumerate(client_loaders):
        if hasattr(loader, "__len__") and len(loader) == 0:
            raise ValueError(f"client {cid}'s loader is empty: every client needs data")
    privacy = ClientDP.from_settings(
        read["dp_mode"],
        clip_norm=dp_clip_norm,
        theta_clip_norm=dp_theta_clip_norm,
        noise_multiplier=dp_noise_multiplier,
        delta=dp_delta,
        target_epsilon=dp_target_epsilon,
        share_theta=algorithm.shares_curvature,
        theta_share=dp_theta_share,
        clip_schedule=dp_clip_schedule,
        learning_rate=lr,
        clip_quantile=dp_clip_quantile,
        clip_norm_lr=dp_clip_norm_lr,
        clipped_count_std=dp_clipped_count_std,
        sampling=dp_sampling,
        projection_rank=dp_projection_rank,
        soap_curvature=algorithm.soap_curvature,
    )
    engine = RoundEngine(
        algorithm,
        ServerState.from_model(model),
        num_clients=len(client_loaders),
        clients_per_round=clients_per_round,
        learning_rates=round_learning_rates(lr, num_rounds, lr_schedule),
        local_steps=local_steps,
        seed=seed,
        server_learning_rate=server_lr,
        weighting=weighting,
        min_clients_per_round=min_clients_per_round,
        transport_dtype=transport_dtype,
        log=logger,
        device=next(p.device for p in model.parameters() if p.requires_grad),
        privacy=privacy,
        noise_seed=read["dp_noise_seed"],
    )

    hooks = ClientHooks(loss_fn=loss_fn, curvature_loss_fn=curvature_loss_fn)
    if preflight:
        seconds = run_preflight(
            model,
            engine.algorithm,
            lambda: cycle_batches(client_loaders[0]),
            LocalSteps(lr=engine.learning_rates[0], num_steps=1, max_grad_norm=max_grad_norm),
            hooks,
            weighting=weighting,
            eval_fn=None if eval_fn is None else lambda m: evaluation_metrics(eval_fn(m)),
            public_batches=None
            if curvature_loader is None
            else (lambda: cycle_batches(curvature_loader)),
        )
        logger.info("preflight passed in %.1f s", seconds)

    record = None
    if read["dp_mode"] == "record":
        record = RecordDP.from_settings(
            clip_norm=dp_clip_norm,
            theta_clip_norm=dp_theta_clip_norm,
            theta_share=dp_theta_share,
            clip_schedule=dp_clip_schedule,
            noise_multiplier=dp_noise_multiplier,
            delta=dp_delta,
            target_epsilon=dp_target_epsilon,
            noise_seed=read["dp_noise_seed"],
        )
        record.check_client(algorithm.optimizer, 1, False)
        record.check_model(model)
        for cid, loader in enumerate(client_loaders):
            check_loader(loader, cid)
        describe_record_noise(
            record,
            sum(p.numel() for p in model.parameters() if p.requires_grad),
            [(len(loader.dataset), loader.batch_size) for loader in client_loaders],
            local_steps,
            num_rounds,
            logger,
        )

    def train_client(client_id: int, plan: RoundPlan):
        loader = client_loaders[client_id]
        privacy = engine.privacy
        if record is not None:
            privacy, loader = record_loader(
                record, loader, client_id, plan.round_index, local_steps, num_rounds
            )
        return client_update(
            model,
            plan.state,
            algorithm,
            cycle_batches(loader),
            LocalSteps(lr=plan.learning_rate, num_steps=local_steps, max_grad_norm=max_grad_norm),
            hooks,
            client_id=client_id,
            privacy=privacy,
        )

    def train_public(plan: RoundPlan):  # the server's Theta, from public data
        batches = cycle_batches(curvature_loader)
        steps = LocalSteps(
            lr=plan.learning_rate, num_steps=local_steps, max_grad_norm=max_grad_norm
        )
        return [
            client_update(
                model, plan.state, algorithm.public_rule, batches, steps, hooks, client_id=-1 - i
            )
            for i in range(read["public_curvature_clients"])
        ]

    bar = tqdm(range(num_rounds), desc=f"{algorithm.name} rounds", disable=not progress)
    for _ in bar:
        metrics = engine.run_round(train_client, train_public=train_public)
        load_trainable_state(model, engine.state.params)
        if eval_fn is not None:
            model.eval()
            with torch.no_grad():
                metrics.update(evaluation_metrics(eval_fn(model)))
            require_finite_evaluation(metrics, int(metrics["round"]))
        if callback is not None:
            callback(engine.state, metrics)
        bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("train_loss", "eval")})
    return engine.history
