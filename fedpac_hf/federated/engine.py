"""The round engine: one federated round, written once.

Every way of running a federation in this package, :func:`~fedpac_hf.federated.simulate`,
:class:`~fedpac_hf.FedPACTrainer` and the Flower strategy, runs its rounds
through :class:`RoundEngine`. The engine owns what a round *is*:

1. the round's clients, ``sample_clients(num_clients, S, seed, round)``;
2. the round's local learning rate, from one schedule over rounds
   (:func:`round_learning_rates`);
3. the running sums of the client updates and the record of dropped clients
   (:class:`~fedpac_hf.federated.RoundAggregator`);
4. the failure rule: fewer than ``min_clients_per_round`` usable updates, or a
   non-finite aggregate, raise :class:`~fedpac_hf.federated.RoundError` naming
   every dropped client's reason, before any state changes;
5. the server rule and the round's metrics, under one set of names
   (:data:`~fedpac_hf.federated.round_metrics.ROUND_METRICS`).

What differs between the shells is *where clients run* and *how results
travel*; they plug that in. In-process shells call :meth:`RoundEngine.run_round`
with a function that trains one client. A shell whose clients answer
asynchronously (Flower) splits the round in two: :meth:`RoundEngine.plan_round`
before sending, :meth:`~fedpac_hf.federated.round_plan.RoundPlan.record` for
each reply or failure, and :meth:`RoundEngine.finish_round` once the replies
are in.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from fedpac_hf.optim.options import number, one_of, whole

from .algorithms import Algorithm
from .failures import (
    ClientFailure,
    RoundError,
    recurring_failures,
    require_updates,
    run_client,
)
from .privacy import ClientDP
from .privacy_noise import new_noise_seed
from .privacy_notes import describe_client_noise, describe_delta
from .round_plan import RoundPlan
from .sampling import poisson_sample_clients, resolve_clients_per_round, sample_clients
from .server import WEIGHTINGS, RoundAggregator
from .state import ClientUpdate, ServerState

__all__ = [
    "TRANSPORT_DTYPES",
    "RoundEngine",
]

logger = logging.getLogger(__name__)

TRANSPORT_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
"""What updates and global state can travel as (the server always sums in float64)."""


TrainClient = Callable[[int, RoundPlan], ClientUpdate]
"""``train(client_id, plan) -> ClientUpdate``: one client's local steps in a round."""


class RoundEngine:
    """Rounds of a federation: sampling, schedule, aggregation, failures, metrics.

    Parameters
    ----------
    algorithm:
        The federated method.
    state:
        The global state to continue from (``state.round`` rounds done).
    num_clients:
        Clients in the federation.
    clients_per_round:
        S, a count or a fraction in (0, 1] of ``num_clients``.
    learning_rates:
        eta_l of every round (:func:`round_learning_rates`); their number is
        the number of rounds R.
    local_steps:
        K, the clients' optimizer steps per round.
    seed:
        Seeds the client sampling (a pure function of seed and round).
    server_learning_rate:
        eta_g applied to the mean delta.
    weighting:
        ``"uniform"`` or ``"num_examples"`` weights of the client updates.
    min_clients_per_round:
        A round with fewer usable updates fails with ``RoundError``.
    transport_dtype:
        ``"float32"`` or ``"bfloat16"``: what the global state and the
        clients' deltas and Theta travel as (counted in the bytes metrics);
        the server keeps float32 parameters and sums in float64.
    history:
        Metrics of the rounds already done (when resuming).
    log:
        Where dropped clients are logged (default: this module's logger).
    privacy:
        Client-level differential privacy (:class:`~fedpac_hf.federated.privacy.ClientDP`):
        clients are Poisson-sampled at rate ``clients_per_round / num_clients``
        (or exactly ``clients_per_round`` of them with ``sampling="fixed"``),
        the sums are noised, epsilon is accounted. Needs uniform weighting,
        float32 transport and a fixed beta.
    noise_seed:
        Under DP, the seed of the server's noise when the state has none yet
        (default: drawn from the OS's entropy).
    device:
        Where in-process clients train (the model's device): each round's
        global state is copied there once for all its clients, and the
        server's float64 sums live there (:class:`RoundAggregator`), so no
        client waits for a host transfer. ``None``: the CPU (Flower's server).
        The global state between rounds stays on the CPU.

    Attributes
    ----------
    state:
        The global state after the last completed round.
    history:
        One metrics dict per completed round (see
        :data:`~fedpac_hf.federated.round_metrics.ROUND_METRICS`).
    """

    def __init__(
        self,
        algorithm: Algorithm,
        state: ServerState,
        *,
        num_clients: int,
        clients_per_round: int | float,
        learning_rates: Sequence[float],
        local_steps: int,
        seed: int = 0,
        server_learning_rate: float = 1.0,
        weighting: str = "uniform",
        min_clients_per_round: int = 1,
        transport_dtype: str = "float32",
        history: Sequence[Mapping[str, float]] = (),
        log: logging.Logger | None = None,
        device: torch.device | str | None = None,
        privacy: ClientDP | None = None,
        noise_seed: int | None = None,
    ) -> None:
        whole(1).check("num_clients", num_clients)
        whole(1).check("local_steps", local_steps)
        rates = [float(lr) for lr in learning_rates]
        if not rates or not all(lr > 0 and math.isfinite(lr) for lr in rates):
            raise ValueError("learning_rates needs one positive, finite local rate per round")
        number(0.0, low_open=True).check("server_learning_rate", server_learning_rate)
        one_of(*WEIGHTINGS).check("weighting", weighting)
        one_of(*TRANSPORT_DTYPES).check("transport_dtype", transport_dtype)
        self.clients_per_round = resolve_clients_per_round(num_clients, clients_per_round)
        if not 1 <= min_clients_per_round <= self.clients_per_round:
            raise ValueError(
                f"min_clients_per_round must lie in [1, clients per round = "
                f"{self.clients_per_round}], got {min_clients_per_round}"
            )
        if state.round > len(rates):
            raise ValueError(
                f"the state is at round {state.round}, past the {len(rates)} rounds of this run"
            )
        self.algorithm = algorithm
        self.state = state
        self.num_clients = int(num_clients)
        self.learning_rates = rates
        # each client's last failure, to tell an error that comes back from bad luck
        self.last_failures: dict[int, ClientFailure] = {}
        self.local_steps = int(local_steps)
        self.seed = int(seed)
        self.server_learning_rate = float(server_learning_rate)
        self.weighting = weighting
        self.min_clients_per_round = int(min_clients_per_round)
        self.transport_dtype = getattr(torch, transport_dtype)
        self.history: list[dict[str, float]] = [dict(h) for h in history]
        self.log = log or logger
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.privacy = None if privacy is None else self._private(privacy, noise_seed)

    def _private(self, privacy: ClientDP, noise_seed: int | None) -> ClientDP:
        """``privacy`` resolved for this federation; the state gets its noise seed."""
        privacy.check_round(
            str(self.weighting),
            str(self.transport_dtype).removeprefix("torch."),
            self.algorithm.adaptive_beta,
        )
        resolved = privacy.resolve(self.num_clients, self.sample_rate, self.num_rounds)
        if self.state.noise_seed is None:
            seed = new_noise_seed() if noise_seed is None else int(noise_seed)
            self.state = dataclasses.replace(self.state, noise_seed=seed)
        floats = sum(p.numel() for p in self.state.params.values())
        describe_client_noise(
            resolved, floats, self.clients_per_round, self.sample_rate, self.num_rounds, self.log
        )
        describe_delta(resolved.delta, privacy.delta is None, self.num_clients, self.log)
        return resolved

    @property
    def sample_rate(self) -> float:
        """q, a client's chance of taking part in a round (S / N)."""
        return self.clients_per_round / self.num_clients

    def epsilon(self, rounds: int | None = None) -> float | None:
        """Epsilon at the run's delta after ``rounds`` (default: those done); ``None`` without DP."""
        if self.privacy is None:
            return None
        from .accounting import epsilon_after

        dp = self.privacy
        done = self.state.round if rounds is None else rounds
        population = dp.population(self.num_clients)
        return epsilon_after(done, dp.noise_multiplier, self.sample_rate, dp.delta, population)

    @property
    def num_rounds(self) -> int:
        """R, the rounds of the run."""
        return len(self.learning_rates)

    @property
    def finished(self) -> bool:
        """Whether every round of the run is done."""
        return self.state.round >= self.num_rounds

    def sample(self, round_index: int) -> list[int]:
        """The clients of round ``round_index`` (0-based), the same in every shell.

        Under DP, Poisson sampling (the number of clients varies, may be 0)
        unless ``dp_sampling`` is ``fixed``.
        """
        if self.privacy is not None and self.privacy.sampling == "poisson":
            return poisson_sample_clients(
                self.num_clients, self.sample_rate, self.seed, round_index
            )
        return sample_clients(self.num_clients, self.clients_per_round, self.seed, round_index)

    def plan_round(self) -> RoundPlan:
        """Start the next round: its clients, its learning rate, empty sums."""
        r = self.state.round
        if r >= self.num_rounds:
            raise ValueError(f"all {self.num_rounds} rounds are done; nothing left to plan")
        sent = self.state.cast(self.transport_dtype)
        aggregator = RoundAggregator(
            self.state,
            self.algorithm,
            self.weighting,  # type: ignore[arg-type]
            sent,
            device=self.device,
            privacy=self.privacy,
            expected_clients=self.clients_per_round,
            lr=self.learning_rates[r],
        )
        return RoundPlan(
            round_index=r,
            clients=self.sample(r),
            learning_rate=self.learning_rates[r],
            aggregator=aggregator,
            state=sent.to(self.device),
            transport_dtype=self.transport_dtype,
            log=self.log,
        )

    def finish_round(
        self, plan: RoundPlan, *, reduce: Callable[[RoundAggregator], None] | None = None
    ) -> dict[str, float]:
        """Apply the server rule to the recorded updates; return the round's metrics.

        Parameters
        ----------
        plan:
            The round from :meth:`plan_round`, with every result recorded.
        reduce:
            Combines partial sums first, e.g. ``fedpac_hf.federated.distributed.all_reduce``
            when clients are spread over processes.

        Raises
        ------
        RoundError
            Too few usable updates (the message lists why the others were
            dropped) or a non-finite aggregate; the state is left unchanged.
        """
        if plan.round_index != self.state.round:
            raise ValueError(
                f"round {plan.round_number} is not the next round ({self.state.round + 1})"
            )
        aggregator = plan.aggregator
        if self.algorithm.public_curvature and aggregator.public_curvature is None:
            raise ValueError(
                f"round {plan.round_number}: {self.algorithm.name} takes Theta from public data "
                "but the server trained none this round (RoundPlan.use_public_curvature)"
            )
        if reduce is not None:
            reduce(aggregator)
        self._stop_on_recurring(aggregator, plan.round_number)
        # Poisson sampling under DP may sample fewer clients than the minimum: fine
        least = min(self.min_clients_per_round, len(plan.clients))
        require_updates(aggregator.num_clients, aggregator.failures, least, plan.round_number)
        state, server_metrics = aggregator.finalize(
            lr=plan.learning_rate,
            local_steps=self.local_steps,
            server_lr=self.server_learning_rate,
        )
        self.state = state
        metrics = {
            "round": float(plan.round_number),
            "learning_rate": plan.learning_rate,
            **server_metrics,
            "num_dropped": float(len(aggregator.failures)),
            "round_time": time.perf_counter() - plan.started,
        }
        if aggregator.public_loss is not None:
            metrics["public_train_loss"] = aggregator.public_loss
        if self.privacy is not None:
            metrics["epsilon"], metrics["dp_delta"] = self.epsilon(), self.privacy.delta
        elif aggregator.record_epsilon is not None:  # record DP: the worst client's so far
            before = [h["epsilon"] for h in self.history if "epsilon" in h]
            metrics["epsilon"] = max([aggregator.record_epsilon, *before])
        self.history.append(metrics)
        return metrics

    def _stop_on_recurring(self, aggregator: RoundAggregator, round_number: int) -> None:
        """Raise :class:`RoundError` when a client fails again exactly as it last failed."""
        repeated = recurring_failures(self.last_failures, aggregator.failures)
        for client_id in aggregator.client_ids:
            self.last_failures.pop(client_id, None)
        self.last_failures.update({f.client_id: f for f in aggregator.failures})
        if repeated:
            causes = "; ".join(str(f) for f in repeated[:3])
            raise RoundError(
                f"round {round_number}: {causes}; the same error as the last time this client "
                "was sampled, so it is a setting or data error that will come back, not bad "
                "luck: the run stops (nothing was saved for this round; fix the cause and "
                "resume from the last checkpoint)"
            )

    def run_round(
        self,
        train_client: TrainClient,
        *,
        share: Callable[[list[int]], Sequence[int]] | None = None,
        reduce: Callable[[RoundAggregator], None] | None = None,
        train_public: Callable[[RoundPlan], ClientUpdate | Sequence[ClientUpdate]] | None = None,
    ) -> dict[str, float]:
        """Run the next round in this process; return its metrics.

        Each sampled client is trained with ``train_client(client_id, plan)``
        through :func:`~fedpac_hf.federated.run_client`, so any exception
        drops only that client, with a logged reason.

        Parameters
        ----------
        train_client:
            Runs one client's local steps (see :data:`TrainClient`).
        share:
            Which of the sampled clients this process trains (default: all),
            e.g. ``lambda ids: ids[rank::world]``.
        reduce:
            See :meth:`finish_round`.
        train_public:
            ``train_public(plan)``: the client rule on the server's public data
            (one update or several), for algorithms with ``public_curvature``
            (:meth:`RoundPlan.use_public_curvature`). It runs in every process
            (the same updates everywhere); an error in it stops the round.
        """
        plan = self.plan_round()
        if self.algorithm.public_curvature:
            if train_public is None:
                raise ValueError(
                    f"{self.algorithm.name} takes Theta from public data: give the server "
                    "public data (curvature_dataset)"
                )
            plan.use_public_curvature(train_public(plan))
        clients = plan.clients if share is None else share(plan.clients)
        for client_id in clients:
            train = functools.partial(train_client, client_id, plan)
            plan.record(run_client(train, client_id, plan.round_number, self.log))
        return self.finish_round(plan, reduce=reduce)
