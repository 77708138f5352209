"""The server rule: aggregate client updates into the next global state.

For the sampled clients i with weights w_i (uniform, as in the paper, or
proportional to the examples seen):

- Delta = sum_i w_i Delta_i,   theta^{r+1} = theta^r + eta_g * Delta
- g_G^{r+1} = -Delta / (K * eta_l)
- Theta^{r+1} = sum_i w_i Theta_i
- the round's diagnostics: the drift of the clients' Theta around Theta^{r+1}
  and around the Theta^r they started from, the spread of their updates and
  the change of g_G (which set ``beta="auto"``, see
  :mod:`~fedpac_hf.federated.adaptive_beta`); the formulas are in
  :mod:`~fedpac_hf.federated.round_metrics`.

:class:`RoundAggregator` does this as a running sum so that the server holds
O(1) model-sized buffers whatever the number of clients, and so that partial
sums computed in several processes can simply be added together.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import torch

from fedpac_hf.optim import next_global_curvature, sent_form
from fedpac_hf.optim.base import all_finite
from fedpac_hf.optim.repair import repair_curvature

from .adaptive_beta import next_auto_beta
from .algorithms import Algorithm, downlink_parts, round_beta
from .failures import ClientFailure, RoundError, require_finite_aggregate
from .privacy import ClientDP
from .privacy_clip import CLIP_FLAGS, Reference, own_norms, public_reference
from .privacy_noise import CLIENT_NOISED, private_round
from .round_metrics import (
    byte_metrics,
    curvature_scalars,
    drift_metrics,
    norm_medians,
    update_scalars,
)
from .state import (
    ClientUpdate,
    ServerState,
    move_parts,
    move_tensors,
    sum_device,
    tensor_bytes,
)

__all__ = ["RoundAggregator", "aggregate", "WEIGHTINGS"]


Weighting = Literal["uniform", "num_examples"]
WEIGHTINGS: tuple[str, ...] = ("uniform", "num_examples")


class RoundAggregator:
    """Running weighted sums of one round's client updates.

    Accumulators are float64 so that the drift (a difference of large sums)
    keeps its precision. ``add`` every update, then ``finalize``. The sums
    live on ``device``: on the accelerator the clients train on, updates that
    stay there are summed without a host transfer, and nothing is read back
    until :meth:`finalize`, which returns the next global state on the CPU
    (float32 master weights, as checkpoints and Flower expect).

    Parameters
    ----------
    server_state:
        The state the clients started from (theta^r).
    algorithm:
        The round's algorithm: it decides which parts travel (Theta goes up
        and down only with alignment; without it Theta is still aggregated,
        as a free diagnostic of the drift, but not counted as sent).
    weighting:
        ``"uniform"`` (each sampled client counts the same, the paper's choice)
        or ``"num_examples"`` (FedAvg's weighting by examples seen).
    sent_state:
        What the clients received, when it differs from ``server_state``
        (e.g. rounded to bfloat16 for transport); it sizes the downlink.
    device:
        Where the running sums live (default: the CPU). A device without
        float64 (Apple's ``mps``) sums on the CPU instead.
    privacy:
        Client-level DP (resolved, :mod:`~fedpac_hf.federated.privacy`): the
        sums get Gaussian noise and are divided by ``expected_clients``, not by
        the count of updates; Theta is repaired after.
    expected_clients:
        q N, the fixed denominator under DP.
    lr:
        The round's local rate eta_l when known as the round starts (the round
        engine passes it): in a round without client-level DP the server then
        measures each client's own delta and Theta norms, what DP would clip
        (:func:`~fedpac_hf.federated.privacy_clip.own_norms`), and reports their
        medians (``delta_norm_median``, ``theta_norm_median``).
    """

    def __init__(
        self,
        server_state: ServerState,
        algorithm: Algorithm,
        weighting: Weighting = "uniform",
        sent_state: ServerState | None = None,
        device: torch.device | str | None = None,
        privacy: ClientDP | None = None,
        expected_clients: float | None = None,
        lr: float | None = None,
    ) -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.server_state = server_state
        self.sent_state = sent_state if sent_state is not None else server_state
        self.algorithm = algorithm
        self.weighting = weighting
        self.device = sum_device(device)
        self.delta_sum = {
            n: torch.zeros(p.shape, dtype=torch.float64, device=self.device)
            for n, p in server_state.params.items()
        }
        self.curvature_weighted_sum: dict[str, torch.Tensor] = {}
        self.curvature_sum: dict[str, torch.Tensor] = {}
        self.curvature_square_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.delta_square_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.skipped_steps = 0.0
        self.hessian_refreshes = 0.0
        self.weight_sum = 0.0
        self.num_clients = 0
        self.num_examples = 0
        self.loss_sum = 0.0
        self.losses_missing = 0  # clients that kept their train_loss to themselves
        self.delta_bytes = 0
        self.theta_bytes = 0
        self.client_ids: list[int] = []
        self.failures: list[ClientFailure] = []
        self.privacy = privacy
        self.expected_clients = expected_clients
        self.clipped = [0.0, 0.0]  # clients whose delta / Theta were clipped (DP)
        self.client_noised = False  # DP: the round's one client is asked to add the noise
        self.noised_clients = 0  # ... and those that say they did
        self.record_epsilon: float | None = None  # the largest a client reported (record DP)
        self.secure = False  # sums of a secure mean: Theta repaired, no per-client diagnostics
        self.lr = lr
        self.own_norms: list[torch.Tensor] = []  # [delta, Theta] per client, without DP
        self._reference: Reference | None = None  # the public parts own_norms leaves out
        self.public_curvature: dict[str, torch.Tensor] | None = None  # the server's own Theta
        self.public_loss: float | None = None  # and its loss on the public data

    def drop(self, failure: ClientFailure) -> None:
        """Record a client that produced no update (it is left out of the sums)."""
        self.failures.append(failure)

    def add(self, update: ClientUpdate) -> None:
        """Fold one client's update into the sums."""
        if set(update.delta) != set(self.delta_sum):
            raise ValueError(
                f"client {update.client_id} sent a delta for other parameters than the "
                "global model's"
            )
        weight = float(update.num_examples) if self.weighting == "num_examples" else 1.0
        names = list(update.delta)
        deltas = [update.delta[n].to(self.device, torch.float64) for n in names]
        torch._foreach_add_([self.delta_sum[n] for n in names], deltas, alpha=weight)
        if deltas:
            norms = torch.stack(torch._foreach_norm(deltas))
            self.delta_square_sum += weight * norms.square().sum()
        curvature = {n: t.to(self.device, torch.float64) for n, t in update.curvature.items()}
        if curvature:
            if self.num_clients and set(curvature) != set(self.curvature_sum):
                raise ValueError(
                    f"client {update.client_id} sent curvature entries that differ from the "
                    "other clients' (another optimizer or model?)"
                )
            for name, t64 in curvature.items():
                if name not in self.curvature_sum:
                    self.curvature_sum[name] = torch.zeros_like(t64)
                    self.curvature_weighted_sum[name] = torch.zeros_like(t64)
                self.curvature_sum[name].add_(t64)
                self.curvature_weighted_sum[name].add_(t64, alpha=weight)
                self.curvature_square_sum += t64.square().sum()
        if self.lr is not None and self.privacy is None:  # on the float64 copies made above
            if self._reference is None:  # the same for every client of the round (same K)
                parts = public_reference(self.sent_state, self.algorithm, self.lr, update.num_steps)
                self._reference = tuple(  # type: ignore[assignment]
                    None
                    if part is None
                    else {n: t.to(self.device, torch.float64) for n, t in part.items()}
                    for part in parts
                )
            theta = curvature if self.algorithm.align else {}
            self.own_norms.append(own_norms(dict(zip(names, deltas)), theta, self._reference))
        self.delta_bytes += tensor_bytes(update.delta)
        if self.algorithm.align:
            self.theta_bytes += tensor_bytes(update.curvature)
        self.count_client(update.client_id, update.num_examples, update.metrics, weight)

    def count_client(
        self, client_id: int, num_examples: int, metrics: Mapping[str, float], weight: float
    ) -> None:
        """Count one client's weight, examples and reported metrics (its tensors apart)."""
        self.weight_sum += weight
        self.num_clients += 1
        self.num_examples += int(num_examples)
        loss = metrics.get("train_loss")  # kept secret by a lone client under secure aggregation
        self.loss_sum += 0.0 if loss is None else float(loss) * weight
        self.losses_missing += loss is None
        self.skipped_steps += float(metrics.get("skipped_steps", 0.0))
        self.hessian_refreshes += float(metrics.get("hessian_refreshes", 0.0))
        for part, flag in enumerate(CLIP_FLAGS):
            self.clipped[part] += float(metrics.get(flag, 0.0))
        self.noised_clients += int(metrics.get(CLIENT_NOISED, 0.0) == 1.0)
        if "dp_record_epsilon" in metrics:
            self.record_epsilon = max(self.record_epsilon or 0.0, metrics["dp_record_epsilon"])
        self.client_ids.append(int(client_id))

    def finalize(
        self,
        *,
        lr: float,
        local_steps: int,
        server_lr: float = 1.0,
    ) -> tuple[ServerState, dict[str, float]]:
        """The next global state and this round's server metrics.

        In named steps: the server rule (:meth:`_server_step`, :meth:`_mean_curvature`),
        every diagnostic read back in one transfer (:meth:`_read_metrics`), the
        next round's beta (:func:`~fedpac_hf.federated.adaptive_beta.next_auto_beta`),
        the bytes that travelled (:func:`~fedpac_hf.federated.round_metrics.byte_metrics`),
        and the finiteness check before the new state moves to the CPU.

        Parameters
        ----------
        lr:
            The local learning rate eta_l the clients used this round.
        local_steps:
            K; with ``lr`` it turns the mean delta into the global direction.
        server_lr:
            eta_g, the server learning rate applied to the mean delta.

        Raises
        ------
        RoundError
            If no update was added, or the new global parameters, direction
            or curvature are not finite (never handed on, so never saved).
        """
        if self.num_clients == 0 and self.privacy is None:
            raise RoundError(
                f"round {self.server_state.round + 1}: no client update to aggregate"
                + (f" (dropped: {'; '.join(map(str, self.failures[:5]))})" if self.failures else "")
            )
        state = self.server_state
        clip_norms, dp_metrics = None, None
        if self.privacy is not None:
            self.delta_sum, self.curvature_weighted_sum, clip_norms, dp_metrics = private_round(
                self.privacy,
                state,
                self.algorithm,
                (self.delta_sum, self.curvature_weighted_sum),
                lr=lr,
                local_steps=local_steps,
                denominator=self.denominator,
                clipped=self.clipped,
                num_clients=self.num_clients,
                client_noised=self.client_noised and self.num_clients == self.noised_clients == 1,
            )
        delta, params, direction = self._server_step(lr, local_steps, server_lr)
        mean = self._mean_curvature()
        curvature = None if mean is None else self._next_curvature(mean)
        parts = {"model": params, "direction": direction, "curvature": curvature or {}}
        read, metrics = self._read_metrics(delta, direction, mean, parts, lr, local_steps)
        if dp_metrics is not None:
            metrics.update(dp_metrics)
        down = downlink_parts(self.sent_state, self.algorithm)  # bytes to one client
        metrics.update(byte_metrics(self.delta_bytes, self.theta_bytes, down, self.num_clients))
        for part, tensors in parts.items():
            if not read[part]:
                require_finite_aggregate(tensors, part, state.round + 1, server_lr)
        params, direction, curvature = move_parts([params, direction, curvature], "cpu")
        new_state = ServerState(
            params=params,
            curvature=curvature,
            direction=direction,
            round=state.round + 1,
            beta=(
                next_auto_beta(metrics, state.beta, self.algorithm.beta_max)
                if self.algorithm.adaptive_beta
                else None
            ),
            noise_seed=state.noise_seed,
            dp_clip_norms=clip_norms,
        )
        return new_state, metrics

    @property
    def denominator(self) -> float:
        """W, what the sums are divided by: the weight of the updates, or q N under DP."""
        fixed = self.privacy is not None and self.expected_clients is not None
        return float(self.expected_clients) if fixed else self.weight_sum

    def _server_step(
        self, lr: float, local_steps: int, server_lr: float
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The server rule on the parameters: mean delta, theta^{r+1}, g_G^{r+1} (on the device).

        ``Delta = sum_i w_i Delta_i / W``, ``theta^{r+1} = theta^r + eta_g Delta``,
        ``g_G^{r+1} = -Delta / (K eta_l)``.
        """
        inv_w = 1.0 / self.denominator
        master = move_tensors(self.server_state.params, self.device)
        delta = {n: (s * inv_w) for n, s in self.delta_sum.items()}
        params = {
            n: (master[n].to(torch.float64) + server_lr * delta[n]).to(torch.float32)
            for n in self.server_state.params
        }
        direction = {n: (-d / (local_steps * lr)).to(torch.float32) for n, d in delta.items()}
        return delta, params, direction

    def _mean_curvature(self) -> dict[str, torch.Tensor] | None:
        """Theta^{r+1} = sum_i w_i Theta_i / W in float64 (``None`` when no client sent Theta).

        With ``public_curvature`` set (the server's Theta from public data) that Theta instead.
        """
        if self.public_curvature is not None:
            return {n: t.to(self.device, torch.float64) for n, t in self.public_curvature.items()}
        if not self.curvature_weighted_sum:
            return None
        inv_w = 1.0 / self.denominator
        mean = {n: s * inv_w for n, s in self.curvature_weighted_sum.items()}
        return mean if self.privacy is None and not self.secure else repair_curvature(mean)

    def _next_curvature(self, mean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Theta^{r+1} as the clients will import it (float32).

        The average itself, except for long sides sent in the basis form, whose
        server-side basis turns with what the clients sent
        (:func:`~fedpac_hf.optim.next_global_curvature`). The clients built
        their compact forms on the Theta they imported: none without alignment.
        """
        previous = self.server_state.curvature if self.algorithm.align else None
        if previous:
            previous = move_tensors(previous, self.device)
        following = next_global_curvature(
            previous,
            mean,
            steered=self.algorithm.optimizer_kwargs.get("theta_steered"),
            seed=self.server_state.round + 1,
        )
        return {n: m.to(torch.float32) for n, m in following.items()}

    def _read_metrics(
        self,
        delta: dict[str, torch.Tensor],
        direction: dict[str, torch.Tensor],
        mean_curvature: dict[str, torch.Tensor] | None,
        parts: dict[str, dict[str, torch.Tensor]],
        lr: float,
        local_steps: int,
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Every device scalar of the round read back in one host sync.

        Returns the raw values (the update and curvature scalars of
        :mod:`~fedpac_hf.federated.round_metrics`, and whether each of ``parts``
        is finite) and the round's metrics derived from them.
        """
        inv_w = 1.0 / self.weight_sum if self.weight_sum else 0.0  # 0: a DP round of no client
        state = self.server_state
        scalars = update_scalars(
            delta,
            self.delta_square_sum * inv_w,
            direction,
            state.direction,
            units=1.0 / (local_steps * lr) ** 2,
        )
        if mean_curvature is not None and self.curvature_sum:
            scalars.update(
                curvature_scalars(
                    self.curvature_sum,
                    mean_curvature,
                    self.curvature_square_sum,
                    self.num_clients,
                    sent_form(state.curvature),
                )
            )
        for part, tensors in parts.items():
            scalars[part] = all_finite(tensors.values()).to(self.device, torch.float64)
        values = torch.stack([v.reshape(()) for v in scalars.values()])
        if self.own_norms:  # the clients' [delta, Theta] norms after the scalars
            values = torch.cat([values, torch.stack(self.own_norms).reshape(-1).to(values)])
        flat = values.cpu().tolist()  # one host sync for every metric
        read = dict(zip(scalars, flat))
        metrics = drift_metrics(read)
        if self.own_norms:
            theta = self.algorithm.align and bool(self.curvature_sum)
            metrics.update(norm_medians(flat[len(scalars) :], theta))
        metrics["beta"] = round_beta(self.algorithm, state)
        if not self.secure:  # it needs each client's ||Delta_i||^2
            metrics["client_dispersion"] = max(0.0, read["client_dispersion"])
        if "direction_change" in read:
            metrics["direction_change"] = read["direction_change"]
        metrics.update(
            num_clients=float(self.num_clients),
            num_examples=float(self.num_examples),
            train_loss=float("nan") if self.losses_missing else self.loss_sum * inv_w,
            update_norm=read["update_norm"],
            skipped_steps=self.skipped_steps,
            hessian_refreshes=self.hessian_refreshes,
        )
        if self.privacy is not None:
            metrics["dp_clipped_delta"] = self.clipped[0] * inv_w
            metrics["dp_clipped_theta"] = self.clipped[1] * inv_w
        return read, metrics


def aggregate(
    server_state: ServerState,
    updates: Iterable[ClientUpdate],
    algorithm: Algorithm,
    *,
    lr: float,
    local_steps: int,
    server_lr: float = 1.0,
    weighting: Weighting = "uniform",
) -> tuple[ServerState, dict[str, float]]:
    """Apply the server rule to a round's updates (see the module docstring)."""
    aggregator = RoundAggregator(server_state, algorithm, weighting, lr=lr)
    for update in updates:
        aggregator.add(update)
    return aggregator.finalize(lr=lr, local_steps=local_steps, server_lr=server_lr)
