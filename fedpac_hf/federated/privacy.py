"""Client-level differential privacy of a federated round: clip, sample, noise.

The mechanism is DP-FedAvg's (McMahan et al., 2018) extended to the second
channel FedPAC has, the curvature state Theta, which is a function of the
client's data as much as its delta is:

1. **clip** (on the client, before anything leaves it,
   :func:`~fedpac_hf.federated.privacy_clip.clip_update`):
   the delta to L2 norm ``C`` (``dp_clip_norm``) and, when Theta travels
   (alignment on), Theta to ``C_Theta`` (``dp_theta_clip_norm``); without
   alignment Theta does not leave the client at all;
2. **sample** clients by Poisson sampling: each client takes part in a round
   independently with probability ``q = clients_per_round / num_clients``
   (:func:`~fedpac_hf.federated.sampling.poisson_sample_clients`), the
   sampling the accountant assumes; or, with ``dp_sampling: fixed`` (the
   choice under secure aggregation, which cannot aggregate rounds of 0 or 1
   client), exactly ``q N`` clients without replacement
   (:func:`~fedpac_hf.federated.sampling.sample_clients`), accounted for
   as such (:mod:`~fedpac_hf.federated.accounting`);
3. **noise** (on the server, :mod:`~fedpac_hf.federated.privacy_noise`):
   Gaussian noise on the sums, std ``z k C`` on the delta's and
   ``z k_Theta C_Theta`` on Theta's, with ``z = dp_noise_multiplier``,
   ``k = 1 / sqrt(1 - s)`` and ``k_Theta = 1 / sqrt(s)`` when both parts
   travel (``s = dp_theta_share``, default 1/2: ``k = k_Theta = sqrt(2)``;
   ``k = 1`` otherwise); the sums are divided by the *expected* number of
   clients ``q N`` (a fixed denominator, so one client changes the mean by at
   most its clipped contribution over ``q N``);
4. **repair** Theta (:func:`~fedpac_hf.optim.repair.repair_curvature`):
   non-negative where the optimizer needs it, PSD statistics; post-processing,
   no privacy cost.

Why these ``k``: scale each client's contribution to ``(sqrt(1 - s) Delta / C,
sqrt(s) Theta / C_Theta)``; its norm is at most ``sqrt((1 - s) + s) = 1``, and
noise of std ``z`` on every entry of the scaled sum is std ``z C / sqrt(1 - s)``
on the delta's and ``z C_Theta / sqrt(s)`` on Theta's, so each round is one
Gaussian mechanism with noise multiplier ``z`` on a vector of sensitivity 1
(add or remove one client), whatever ``s``. ``s`` is Theta's share of that
budget: at the even split (1/2) sharing Theta costs the delta ``sqrt(2)`` more
noise than DP-FedAvg without Theta; a smaller share gives the delta less noise
and Theta more (benchmarks/PRIVACY.md measures both).

With ``dp_clip_schedule: adaptive`` the bounds ``C`` and ``C_Theta`` follow a
quantile of the clients' norms from round to round, through noised counts
that take a share of the same mechanism
(:mod:`~fedpac_hf.federated.privacy_adaptive`).

The accountant (:mod:`~fedpac_hf.federated.accounting`) composes one
subsampled Gaussian event per round (Poisson or fixed-size sampling). The
noise is drawn from a generator seeded by ``noise_seed`` and the round: the
seed is the server's secret
(drawn from the OS's entropy unless ``dp_noise_seed`` is set, kept in the
server's checkpoints so a resumed run adds the noise the uninterrupted run
would). Round metrics computed from single clients (``train_loss``,
``drift``, ``client_dispersion``, ``dp_clipped_*``) are diagnostics outside
the guarantee: only the model, the global direction and Theta are private.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from fedpac_hf.optim.options import number, one_of, optional, whole

from .privacy_adaptive import AdaptiveClip

__all__ = [
    "DP_MODES",
    "DP_RULES",
    "CLIP_SCHEDULES",
    "SAMPLINGS",
    "ClientDP",
]

DP_MODES: tuple[str, ...] = ("none", "client", "record")
"""``dp_mode`` choices: no privacy, client-level (user-level) DP, or record-level DP
(DP-SGD in each client, :mod:`~fedpac_hf.federated.record_privacy`)."""

SAMPLINGS: tuple[str, ...] = ("poisson", "fixed")
"""``dp_sampling`` choices: Poisson sampling (a varying number of clients per round,
PLD accounting) or fixed-size sampling without replacement (exactly
``clients_per_round``; Renyi-DP accounting under replace-one adjacency, more
than twice the noise for the same epsilon)."""

CLIP_SCHEDULES: tuple[str, ...] = ("constant", "learning_rate", "adaptive")
"""``dp_clip_schedule`` choices: the delta's clip norm the same every round,
following the round's learning rate (``dp_clip_norm`` at the peak rate), or
adaptive (both clip norms track a quantile of the clients' norms, privately:
:mod:`~fedpac_hf.federated.privacy_adaptive`)."""

_POSITIVE = number(0.0, low_open=True)
#: What each ``dp_*`` number accepts, in both modes (``client`` and ``record``).
DP_RULES = {
    "dp_clip_norm": _POSITIVE,
    "dp_theta_clip_norm": optional(_POSITIVE),
    "dp_noise_multiplier": optional(number(0.0)),
    "dp_delta": optional(number(0.0, 1.0, low_open=True, high_open=True)),
    "dp_target_epsilon": optional(_POSITIVE),
    "dp_theta_share": optional(number(0.0, 1.0, low_open=True, high_open=True)),
    "dp_clip_schedule": optional(one_of(*CLIP_SCHEDULES)),
    "dp_sampling": optional(one_of(*SAMPLINGS)),
    "dp_projection_rank": optional(whole(1)),
}


@dataclass(frozen=True)
class ClientDP:
    """Client-level DP settings of a run, resolved against its federation.

    Build it with :meth:`from_settings` (which checks every value and names
    the setting to change); :meth:`resolve` fixes what depends on the
    federation (``delta``'s default, the noise multiplier a target epsilon
    needs).

    Attributes
    ----------
    clip_norm:
        C, the L2 bound of each client's delta.
    theta_clip_norm:
        C_Theta, the L2 bound of each client's Theta (needed when Theta travels).
    noise_multiplier:
        z; ``None`` until resolved from ``target_epsilon``. 0: clipping only
        (epsilon is infinite).
    delta:
        The delta of (epsilon, delta)-DP; default ``num_clients ** -1.1``.
    target_epsilon:
        When set, z is the smallest noise that keeps epsilon at ``delta``
        within it after all rounds.
    share_theta:
        Whether Theta leaves the clients (the algorithm aligns).
    theta_share:
        s, Theta's share of the mechanism's budget when it travels, in (0, 1):
        the noise stds are ``z C / sqrt(1 - s)`` on the delta and
        ``z C_Theta / sqrt(s)`` on Theta.
    clip_lr:
        With ``dp_clip_schedule: learning_rate``, the rate at which ``clip_norm``
        holds (the schedule's peak, ``learning_rate``): a round at rate ``lr``
        bounds the delta by ``clip_norm * lr / clip_lr`` (:meth:`at_rate`).
        ``None``: the same bound every round.
    adaptive:
        With ``dp_clip_schedule: adaptive``, how the bounds follow the
        clients' norms (``clip_norm`` and ``theta_clip_norm`` are round 1's;
        later rounds' travel with the global state); ``None`` otherwise.
    sampling:
        ``"poisson"`` or ``"fixed"`` (:data:`SAMPLINGS`): how the round's
        clients are drawn, and so how epsilon is accounted.
    projection_rank:
        k of ``dp_projection_rank``: the server keeps the noised sum of the
        deltas in the k leading directions of the shared curvature's sides
        (:mod:`~fedpac_hf.federated.privacy_projection`); ``None``: not projected.
    """

    clip_norm: float
    theta_clip_norm: float | None = None
    noise_multiplier: float | None = None
    delta: float | None = None
    target_epsilon: float | None = None
    share_theta: bool = False
    theta_share: float = 0.5
    clip_lr: float | None = None
    adaptive: AdaptiveClip | None = None
    sampling: str = "poisson"
    projection_rank: int | None = None

    @classmethod
    def from_settings(
        cls,
        mode: str,
        *,
        clip_norm: float | None = None,
        theta_clip_norm: float | None = None,
        noise_multiplier: float | None = None,
        delta: float | None = None,
        target_epsilon: float | None = None,
        share_theta: bool = False,
        theta_share: float | None = None,
        clip_schedule: str | None = None,
        learning_rate: float | None = None,
        clip_quantile: float | None = None,
        clip_norm_lr: float | None = None,
        clipped_count_std: float | None = None,
        sampling: str | None = None,
        projection_rank: int | None = None,
        soap_curvature: bool = False,
    ) -> ClientDP | None:
        """The settings of ``dp_mode: client`` checked, or ``None`` for the other modes
        (``record``'s are :class:`~fedpac_hf.federated.record_privacy.RecordDP`'s).

        Raises ``ValueError`` naming the setting for a bad value or combination:
        noise or a target without ``dp_clip_norm``, both ``dp_noise_multiplier``
        and ``dp_target_epsilon``, neither, or Theta shared without
        ``dp_theta_clip_norm``. ``learning_rate`` (the schedule's peak) is
        needed with ``clip_schedule="learning_rate"``; ``clip_quantile``,
        ``clip_norm_lr`` and ``clipped_count_std`` go with ``clip_schedule="adaptive"``
        (:class:`~fedpac_hf.federated.privacy_adaptive.AdaptiveClip`).
        ``sampling`` is ``dp_sampling`` (default ``"poisson"``). ``projection_rank``
        (``dp_projection_rank``) needs ``soap_curvature``: the clients align to SOAP's
        global statistics, which the projection reads.
        """
        one_of(*DP_MODES).check("dp_mode", mode)
        given = {
            "dp_clip_norm": clip_norm,
            "dp_theta_clip_norm": theta_clip_norm,
            "dp_noise_multiplier": noise_multiplier,
            "dp_delta": delta,
            "dp_target_epsilon": target_epsilon,
            "dp_theta_share": theta_share,
            "dp_clip_schedule": clip_schedule,
            "dp_sampling": sampling,
            "dp_projection_rank": projection_rank,
        }
        adaptive = {
            "dp_clip_quantile": clip_quantile,
            "dp_clip_norm_lr": clip_norm_lr,
            "dp_clipped_count_std": clipped_count_std,
        }
        stray = [k for k, v in adaptive.items() if v is not None]
        if stray and (mode != "client" or clip_schedule != "adaptive"):
            raise ValueError(
                f"{', '.join(stray)} set without adaptive clipping: they go with dp_mode: client "
                "and dp_clip_schedule: adaptive (remove them, or set both)"
            )
        if mode == "none":
            set_ = [k for k, v in given.items() if v is not None]
            if set_:
                raise ValueError(
                    f"{', '.join(set_)} set with dp_mode: none; set dp_mode: client to train "
                    "with differential privacy, or remove them"
                )
            return None
        if mode == "record":
            if projection_rank is not None:
                raise ValueError(
                    "dp_projection_rank is for dp_mode: client (it projects the server's noise "
                    "on the sum of the deltas); dp_mode: record noises each example: remove it"
                )
            if sampling is not None:
                raise ValueError(
                    "dp_sampling is for dp_mode: client (how clients are drawn for the "
                    "server's noise); dp_mode: record samples each client's examples: remove it"
                )
            return None
        if clip_norm is None:
            raise ValueError(
                "dp_mode: client needs dp_clip_norm, the L2 bound of each client's delta "
                "(noise without clipping bounds nothing; a run without DP reports the "
                "clients' delta_norm_median)"
            )
        for setting, value in given.items():
            DP_RULES[setting].check(setting, value)
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ValueError(
                "dp_mode: client needs exactly one of dp_noise_multiplier (the noise) and "
                "dp_target_epsilon (the noise derived from the privacy budget and the rounds)"
                + (", not both" if noise_multiplier is not None else "")
            )
        if projection_rank is not None and not soap_curvature:
            raise ValueError(
                "dp_projection_rank projects the noised delta on the leading directions of "
                "SOAP's shared curvature: it needs an algorithm whose SOAP clients align (such "
                "as fedpac_soap); remove it"
            )
        if share_theta and theta_clip_norm is None:
            raise ValueError(
                "the algorithm shares the curvature state Theta (alignment), which depends on "
                "the client's data too: set dp_theta_clip_norm, the L2 bound of each client's "
                "Theta (a run without DP reports the clients' theta_norm_median), or align: "
                "false to keep Theta on the clients"
            )
        return cls(
            clip_norm=float(clip_norm),
            theta_clip_norm=None if theta_clip_norm is None else float(theta_clip_norm),
            noise_multiplier=None if noise_multiplier is None else float(noise_multiplier),
            delta=None if delta is None else float(delta),
            target_epsilon=None if target_epsilon is None else float(target_epsilon),
            share_theta=bool(share_theta),
            theta_share=0.5 if theta_share is None else float(theta_share),
            clip_lr=_clip_lr(clip_schedule, learning_rate),
            adaptive=(
                AdaptiveClip.from_settings(adaptive) if clip_schedule == "adaptive" else None
            ),
            sampling=sampling or "poisson",
            projection_rank=None if projection_rank is None else int(projection_rank),
        )

    def resolve(self, num_clients: int, sample_rate: float, num_rounds: int) -> ClientDP:
        """These settings with ``delta`` and ``noise_multiplier`` fixed for a federation.

        Raises ``ValueError`` when ``dp_delta >= 1 / num_clients`` (it would
        allow publishing one client's data outright), when the target
        epsilon is not reachable in ``num_rounds``, or when adaptive clipping's
        count noise is too small for the mechanism (``dp_clipped_count_std``).
        """
        from .accounting import noise_for_epsilon

        delta = self.delta if self.delta is not None else float(num_clients) ** -1.1
        if delta >= 1.0 / num_clients:
            raise ValueError(
                f"dp_delta={delta:g} is not below 1 / num_clients = {1.0 / num_clients:g}: "
                "a delta that large allows revealing a client outright; use at most "
                f"{num_clients**-1.1:.3g} (num_clients ** -1.1, the default)"
            )
        z = self.noise_multiplier
        if z is None:
            population = self.population(num_clients)
            z = noise_for_epsilon(self.target_epsilon, delta, sample_rate, num_rounds, population)
        adaptive = self.adaptive
        if adaptive is not None:
            adaptive = adaptive.resolve(sample_rate * num_clients)
            adaptive.value_multiplier(z, self.adapted_parts)  # raises for too little count noise
        return replace(self, delta=delta, noise_multiplier=z, adaptive=adaptive)

    def at_rate(self, lr: float, clip_norms: tuple[float, float | None] | None = None) -> ClientDP:
        """The settings of a round at learning rate ``lr``: with ``dp_clip_schedule:
        learning_rate`` the delta's bound is ``clip_norm * lr / clip_lr`` (and its noise
        follows it); with ``adaptive`` the bounds are ``clip_norms``, the global
        state's (:attr:`~fedpac_hf.federated.state.ServerState.dp_clip_norms`;
        ``None`` in round 1: the settings'); else these settings as they are.

        Every round stays one Gaussian mechanism with multiplier ``z`` on a
        contribution of sensitivity 1 (the bound and the noise scale
        together), so the accounting is the same; the bound is public (the
        schedule, or the released counts, decide it), so clients and server
        agree on it.
        """
        if self.adaptive is not None and clip_norms is not None:
            theta = self.theta_clip_norm if clip_norms[1] is None else float(clip_norms[1])
            return replace(self, clip_norm=float(clip_norms[0]), theta_clip_norm=theta)
        if self.clip_lr is None:
            return self
        return replace(self, clip_norm=self.clip_norm * float(lr) / self.clip_lr, clip_lr=None)

    def population(self, num_clients: int) -> int | None:
        """N for the accountant of fixed-size sampling, ``None`` under Poisson sampling
        (:func:`~fedpac_hf.federated.accounting.epsilon_after`)."""
        return int(num_clients) if self.sampling == "fixed" else None

    @property
    def adapted_parts(self) -> int:
        """m, the clip norms that adaptive clipping moves (and counts it noises): 2 with
        Theta, 1 without, 0 with another schedule."""
        if self.adaptive is None:
            return 0
        return 2 if self.share_theta else 1

    @staticmethod
    def check_round(weighting: str, transport_dtype: str, adaptive_beta: bool) -> None:
        """Refuse round settings the mechanism does not cover, naming the setting."""
        for setting, value, needed in (
            ("aggregation_weighting (simulate's weighting)", weighting, "uniform"),
            ("transport_dtype", transport_dtype, "float32"),
        ):
            if value != needed:
                raise ValueError(
                    f"dp_mode: client needs {setting}: {needed} (the noise is sized for "
                    f"clipped updates summed as they are), got {value!r}"
                )
        if adaptive_beta:
            raise ValueError(
                "beta: auto reads the spread of single clients' updates, which the noise does "
                "not cover: set a fixed beta with dp_mode: client"
            )

    @property
    def noise_scale(self) -> float:
        """k, the delta's noise std over ``z C``: ``1 / sqrt(1 - s)`` when Delta and Theta
        share the mechanism (sqrt(2) at the even split), else 1."""
        return math.sqrt(1.0 / (1.0 - self.theta_share)) if self.share_theta else 1.0

    @property
    def theta_noise_scale(self) -> float:
        """k_Theta, Theta's noise std over ``z C_Theta``: ``1 / sqrt(s)`` (0 when Theta
        stays on the clients)."""
        return math.sqrt(1.0 / self.theta_share) if self.share_theta else 0.0

    @property
    def sums_noise_multiplier(self) -> float:
        """The noise multiplier of the sums (resolved settings): z, or with adaptive clipping
        z_v, above z, because the noised counts take their part of the round's mechanism
        (:meth:`~fedpac_hf.federated.privacy_adaptive.AdaptiveClip.value_multiplier`)."""
        if self.noise_multiplier is None:
            raise ValueError("the DP settings are not resolved (call resolve first)")
        if self.adaptive is None:
            return self.noise_multiplier
        return self.adaptive.value_multiplier(self.noise_multiplier, self.adapted_parts)

    def noise_stds(self) -> tuple[float, float]:
        """Std of the noise on the delta sum and on the Theta sum (resolved settings)."""
        z = self.sums_noise_multiplier
        return (
            z * self.noise_scale * self.clip_norm,
            z * self.theta_noise_scale * (self.theta_clip_norm or 0.0),
        )


def _clip_lr(schedule: str | None, learning_rate: float | None) -> float | None:
    """The rate at which ``dp_clip_norm`` holds (``None``: a constant bound)."""
    if schedule in (None, "constant", "adaptive"):
        return None
    if learning_rate is None or not float(learning_rate) > 0.0:
        raise ValueError(
            "dp_clip_schedule: learning_rate scales the clip norm by the round's rate over "
            f"the peak learning_rate, which must be positive (got {learning_rate!r})"
        )
    return float(learning_rate)
