"""``dp_clip_schedule: adaptive``: clip norms that follow a quantile of the clients' norms.

Adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy, "Differentially
private learning with adaptive clipping", NeurIPS 2021), applied to each part
that client-level DP clips (the delta, and Theta when it travels). With
``C_t`` the round's bound of a part, every sampled client knows whether its
own part (:func:`~fedpac_hf.federated.privacy_clip.own_part`) was left
unclipped, ``b_i = [||u_i|| <= C_t]``. The server releases

    b_hat = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / (q N) + 1/2,
    C_{t+1} = C_t exp(-eta_C (b_hat - gamma)),

with ``gamma`` the quantile to track (``dp_clip_quantile``: the fraction of
clients left unclipped, 0.5 the median), ``eta_C`` its rate
(``dp_clip_norm_lr``) and ``sigma_b`` the noise on the count
(``dp_clipped_count_std``, default ``q N / 20`` as the paper suggests); ``q N``
is ``clients_per_round``. Adding or removing a client moves ``sum_i (b_i -
1/2)`` by at most 1/2, so a round now releases two Gaussian queries of the
same sampled clients: the sums (sensitivity 1 in units of the clip norms,
noise multiplier ``z_v``) and ``m`` counts (``m`` = the parts adapted,
sensitivity 1/2 each, noise ``sigma_b``). Together they are one Gaussian
mechanism of multiplier ``z`` with

    z^-2 = z_v^-2 + m (2 sigma_b)^-2,

so the sums get the larger ``z_v = (z^-2 - m / (2 sigma_b)^2)^-1/2`` and the
accountant composes the very events it composes without adaptive clipping
(multiplier ``z``, from ``dp_noise_multiplier`` or ``dp_target_epsilon``).
Under fixed-size sampling (``dp_sampling: fixed``, replace-one adjacency)
replacing a client moves the sums by 2 and each count by 1: both
sensitivities double, ``(2 / z_v)^2 + m / sigma_b^2 = (2 / z)^2`` is the same
equation, and the accountant's multiplier ``z / 2`` covers the round as well.
Under secure aggregation the flags ``1 - b_i`` are summed with the updates
(:func:`~fedpac_hf.federated.secure_aggregation.clip_flags`), so the server
needs only the count.
The bounds are functions of released values only (public), so clients and
server agree on them; they travel with the global state and are saved in
checkpoints. The count noise is drawn from the server's seeded generators, so
a resumed run adapts the bounds as the uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from fedpac_hf.optim.options import number, optional

__all__ = ["ADAPTIVE_RULES", "AdaptiveClip", "DEFAULT_COUNT_STD_SHARE"]

#: The paper's default count noise: the expected clients per round over this.
DEFAULT_COUNT_STD_SHARE = 20.0

#: What each adaptive-clipping setting accepts, by the setting's name.
ADAPTIVE_RULES = {
    "dp_clip_quantile": optional(number(0.0, 1.0, low_open=True, high_open=True)),
    "dp_clip_norm_lr": optional(number(0.0, low_open=True)),
    "dp_clipped_count_std": optional(number(0.0, low_open=True)),
}


@dataclass(frozen=True)
class AdaptiveClip:
    """How the clip norms adapt (``dp_clip_schedule: adaptive``).

    Attributes
    ----------
    quantile:
        gamma, the fraction of clients whose part the bound should leave
        unclipped (0.5: the bound tracks the median norm).
    norm_lr:
        eta_C, the geometric rate of the bound: its log moves by ``eta_C``
        times the gap between the released unclipped fraction and ``quantile``
        (it grows by ``exp(eta_C * quantile)`` in a round where every client
        was clipped and as many came as expected, before the count's noise).
    count_std:
        sigma_b, the std of the noise on the count of unclipped clients;
        ``None`` until :meth:`resolve` (default: expected clients / 20).
    """

    quantile: float = 0.5
    norm_lr: float = 0.2
    count_std: float | None = None

    @classmethod
    def from_settings(cls, settings: Mapping[str, float | None]) -> AdaptiveClip:
        """``settings`` (:data:`ADAPTIVE_RULES`' names -> value or ``None`` for the default)
        checked; ``ValueError`` names a bad one."""
        fields = dict(zip(ADAPTIVE_RULES, ("quantile", "norm_lr", "count_std"), strict=True))
        for setting, value in settings.items():
            ADAPTIVE_RULES[setting].check(setting, value)
        return cls(**{fields[s]: float(v) for s, v in settings.items() if v is not None})

    def resolve(self, expected_clients: float) -> AdaptiveClip:
        """These settings with the count noise's default fixed for ``expected_clients`` (q N)."""
        if self.count_std is not None:
            return self
        return replace(self, count_std=float(expected_clients) / DEFAULT_COUNT_STD_SHARE)

    def value_multiplier(self, noise_multiplier: float, parts: int) -> float:
        """z_v, the sums' noise multiplier that leaves the round's mechanism at ``z``.

        ``parts`` is m, the number of bounds adapted (1, or 2 with Theta).
        Clipping only (``z = 0``): 0, and the counts carry no noise either.
        Raises ``ValueError`` naming ``dp_clipped_count_std`` when the counts
        alone would need more than the whole mechanism.
        """
        z = float(noise_multiplier)
        if z == 0.0:
            return 0.0
        sigma = float(self.count_std or 0.0)
        rest = z**-2 - parts / (2.0 * sigma) ** 2
        least = math.sqrt(parts) * z / 2.0  # rest <= 0 exactly when sigma <= least
        if rest <= 0.0:
            raise ValueError(
                f"dp_clipped_count_std={sigma:.4g} is too small for noise multiplier {z:.4g}: "
                f"the {parts} noised count(s) of unclipped clients would need more than the "
                f"whole mechanism; use well above {least:.3g} (e.g. {4 * least:.3g}, which "
                f"costs the sums {100 * (1 / math.sqrt(1 - 1 / 16) - 1):.0f} % more noise)"
            )
        return rest**-0.5

    def next_norm(
        self,
        norm: float,
        clipped: float,
        num_clients: int,
        expected_clients: float,
        noise: float,
    ) -> float:
        """C_{t+1} from C_t, the round's count of clipped clients and one N(0, 1) draw.

        ``noise`` is scaled by ``count_std`` here (``0`` for clipping only).
        """
        centered = (num_clients - clipped) - num_clients / 2.0  # sum_i (b_i - 1/2)
        unclipped = (centered + float(self.count_std or 0.0) * noise) / expected_clients + 0.5
        return float(norm) * math.exp(-self.norm_lr * (unclipped - self.quantile))
