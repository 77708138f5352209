"""`PrivacyArguments`: the differential-privacy and secure-aggregation settings of a run.

A dataclass mixed into :class:`~fedpac_hf.config.arguments.FedPACArguments`,
so the settings read the same from YAML, the command line and a Flower run
config (``dp-mode = "client"``). The mechanism and its accounting are in
:mod:`fedpac_hf.federated.privacy` and :mod:`fedpac_hf.federated.accounting`;
``docs/privacy.md`` is the user's guide. Secure aggregation (Flower's
SecAgg+, Flower runs only) is described in ``docs/secure_aggregation.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedpac_hf.federated import Algorithm
from fedpac_hf.federated.privacy import DP_MODES, ClientDP
from fedpac_hf.federated.record_privacy import RecordDP
from fedpac_hf.federated.sampling import resolve_clients_per_round
from fedpac_hf.federated.secure_aggregation import HEADROOM

__all__ = ["DP_SETTINGS", "PrivacyArguments", "secagg_shares"]

#: The settings of this mixin (a resume must keep them).
DP_SETTINGS = (
    "dp_mode",
    "dp_clip_norm",
    "dp_theta_clip_norm",
    "dp_noise_multiplier",
    "dp_delta",
    "dp_target_epsilon",
    "dp_theta_share",
    "dp_clip_schedule",
    "dp_clip_quantile",
    "dp_clip_norm_lr",
    "dp_clipped_count_std",
    "dp_sampling",
    "dp_projection_rank",
)
#: Settings added after runs were saved: kept in a run's identity only when set,
#: so that those runs still resume.
_LATER_DP_SETTINGS = DP_SETTINGS[DP_SETTINGS.index("dp_theta_share") :]


@dataclass
class PrivacyArguments:
    """Client-level differential privacy (DP-FedAvg's recipe, Theta included)."""

    dp_mode: str = field(
        default="none",
        metadata={
            "help": f"Differential privacy: one of {DP_MODES}. 'client': each client's delta "
            "and Theta are clipped, clients are sampled (dp_sampling) and the server adds Gaussian "
            "noise to the sums; 'record': DP-SGD (Opacus) in every client, each example's "
            "gradient clipped and noised; epsilon is logged every round (docs/privacy.md)."
        },
    )
    dp_clip_norm: float | None = field(
        default=None,
        metadata={
            "help": "L2 bound of each client's delta per round (dp_mode: client) or of each "
            "example's gradient (dp_mode: record); needed with dp_mode."
        },
    )
    dp_theta_clip_norm: float | None = field(
        default=None,
        metadata={
            "help": "L2 bound of each client's curvature state Theta per round (needed when the "
            "algorithm shares Theta, i.e. aligns)."
        },
    )
    dp_theta_share: float | None = field(
        default=None,
        metadata={
            "help": "Theta's share s of each round's Gaussian mechanism, in (0, 1), when Theta "
            "travels: noise std z C / sqrt(1 - s) on the delta, z C_Theta / sqrt(s) on Theta; "
            "the same epsilon whatever s. Default 0.5 (sqrt(2) on both)."
        },
    )
    dp_clip_schedule: str | None = field(
        default=None,
        metadata={
            "help": "How the clip norms move over rounds (dp_mode: client): 'constant' (the "
            "default); 'learning_rate': dp_clip_norm at the peak learning_rate, scaled by "
            "each round's rate over it, so the noise shrinks with the steps; 'adaptive': "
            "dp_clip_norm and dp_theta_clip_norm start the bounds, which then track a quantile "
            "of the clients' norms through noised counts (Andrew et al. 2021). The same "
            "epsilon in all three."
        },
    )
    dp_clip_quantile: float | None = field(
        default=None,
        metadata={
            "help": "dp_clip_schedule: adaptive: the fraction of clients whose update the clip "
            "norms should leave unclipped, in (0, 1). Default 0.5 (the median norm)."
        },
    )
    dp_clip_norm_lr: float | None = field(
        default=None,
        metadata={
            "help": "dp_clip_schedule: adaptive: the geometric rate of the clip norms: a "
            "bound's log moves by it times the gap between the released unclipped fraction "
            "and dp_clip_quantile each round. Default 0.2."
        },
    )
    dp_clipped_count_std: float | None = field(
        default=None,
        metadata={
            "help": "dp_clip_schedule: adaptive: the noise std on each round's count of "
            "unclipped clients; the counts take their share of the same mechanism, so the "
            "sums get slightly more noise. Default: expected clients per round / 20."
        },
    )
    dp_sampling: str | None = field(
        default=None,
        metadata={
            "help": "How clients are sampled under dp_mode: client: 'poisson' (each client "
            "takes part with probability clients_per_round / num_clients; the default) or "
            "'fixed' (exactly clients_per_round, without replacement; the default with "
            "secure_aggregation). Fixed-size sampling is accounted under replace-one "
            "adjacency and needs more than twice the noise for the same epsilon "
            "(docs/privacy.md)."
        },
    )
    dp_projection_rank: int | None = field(
        default=None,
        metadata={
            "help": "dp_mode: client with an aligning SOAP algorithm (fedpac_soap): the server "
            "keeps the noised sum of the deltas in the k leading directions of each side of the "
            "shared curvature longer than k, removing most of the noise on long sides; "
            "post-processing, the same epsilon. Measured, it cost accuracy at every k tried "
            "(docs/privacy.md). Default: not projected."
        },
    )
    dp_noise_multiplier: float | None = field(
        default=None,
        metadata={
            "help": "Noise std over the sensitivity of a round's sum (0: clipping only, "
            "epsilon infinite). Set it or dp_target_epsilon."
        },
    )
    dp_delta: float | None = field(
        default=None,
        metadata={"help": "Delta of (epsilon, delta)-DP; default num_clients ** -1.1."},
    )
    dp_target_epsilon: float | None = field(
        default=None,
        metadata={
            "help": "Privacy budget after num_rounds: the noise multiplier is derived from it "
            "(instead of dp_noise_multiplier)."
        },
    )
    dp_noise_seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed of the server's noise, for reproducible experiments only; unset, a "
            "secret seed is drawn and kept in the server's checkpoints."
        },
    )

    secure_aggregation: bool = field(
        default=False,
        metadata={
            "help": "Aggregate the clients' deltas and Theta with Flower's SecAgg+ (Flower "
            "runs only): the server learns their weighted means, not any client's update "
            "(docs/secure_aggregation.md)."
        },
    )
    secagg_num_shares: float = field(
        default=1.0,
        metadata={
            "help": "SecAgg+: shares of each client's secret, a fraction in (0, 1] of the "
            "round's clients or a whole count >= 3."
        },
    )
    secagg_reconstruction_threshold: float = field(
        default=0.67,
        metadata={
            "help": "SecAgg+: shares needed to reconstruct a secret, a fraction in (0, 1] of "
            "the shares or a whole count; more tolerates fewer dropouts, protects more."
        },
    )
    secagg_max_weight: float | None = field(
        default=None,
        metadata={
            "help": "SecAgg+ with aggregation_weighting=num_examples: a public bound on a "
            "client's examples per round (needed then; a client above it is dropped)."
        },
    )

    secagg_headroom: float = field(
        default=HEADROOM,
        metadata={
            "help": "SecAgg+ without client-level DP: each tensor's public bound is this many "
            "times its expected largest entry; a value above its bound is clipped (counted in "
            "secagg_clipped). Larger clips less and rounds coarser (error ~ bound * 2**-21)."
        },
    )

    def secure_aggregation_settings(self, algorithm: Algorithm) -> dict[str, float] | None:
        """SecAgg+'s settings checked (``None`` without ``secure_aggregation``).

        Returns ``num_shares``, ``reconstruction_threshold`` (as Flower reads
        them: a float is a fraction, an int a count), ``max_weight`` and
        ``headroom``.
        Raises ``ValueError`` naming the setting to change.
        """
        if not self.secure_aggregation:
            return None
        client_dp = self.dp_mode == "client"
        why = {
            "beta='auto'": algorithm.adaptive_beta,
            "transport_dtype='bfloat16'": str(getattr(self, "transport_dtype", "")) == "bfloat16",
        }
        for setting, bad in why.items():
            if bad:
                raise ValueError(
                    f"secure_aggregation=true does not work with {setting}: "
                    + _SECAGG_CONFLICTS[setting.split("=")[0]]
                )
        weighting = getattr(self, "aggregation_weighting", "uniform")
        if weighting == "num_examples" and not (self.secagg_max_weight or 0) > 0:
            raise ValueError(
                "secure_aggregation=true with aggregation_weighting='num_examples' needs "
                "secagg_max_weight, a public bound on a client's examples per round"
            )
        if weighting != "num_examples" and self.secagg_max_weight is not None:
            raise ValueError(
                f"secagg_max_weight={self.secagg_max_weight} goes with "
                "aggregation_weighting='num_examples' only: with uniform weights every client "
                "weighs 1, and a larger bound would only coarsen SecAgg+'s quantization; "
                "remove it"
            )
        sampled = resolve_clients_per_round(
            int(getattr(self, "num_clients", 2)), getattr(self, "clients_per_round", 1.0)
        )
        shares = _flower_number("secagg_num_shares", self.secagg_num_shares, 3)
        threshold = _flower_number(
            "secagg_reconstruction_threshold", self.secagg_reconstruction_threshold, 1
        )
        if sampled < 2:
            raise ValueError(
                f"secure_aggregation=true needs at least 2 clients per round, got "
                f"clients_per_round={self.clients_per_round} ({sampled} client): "
                "SecAgg+ cannot hide a single client's update"
            )
        if client_dp and self.resolved_dp_sampling == "poisson":
            counts = [
                f"{name}={value}"
                for name, value in (
                    ("secagg_num_shares", shares),
                    ("secagg_reconstruction_threshold", threshold),
                )
                if isinstance(value, int)
            ]
            if counts:
                raise ValueError(
                    f"{', '.join(counts)} is a count, but under dp_sampling='poisson' the "
                    "clients per round vary: give it as a fraction in (0, 1]"
                )
        num_shares, needed = secagg_shares(sampled, shares, threshold)
        if needed > num_shares:
            raise ValueError(
                f"secagg_reconstruction_threshold={self.secagg_reconstruction_threshold} "
                f"needs {needed} shares but each secret has only {num_shares} "
                f"(secagg_num_shares={self.secagg_num_shares}, {sampled} clients per round)"
            )
        return {
            "num_shares": shares,
            "reconstruction_threshold": threshold,
            "max_weight": float(self.secagg_max_weight or 1.0),
            "headroom": float(self.secagg_headroom),
        }

    def client_privacy(self, algorithm: Algorithm) -> ClientDP | None:
        """The DP settings checked for ``algorithm`` (``None`` with ``dp_mode: none``).

        Raises ``ValueError`` naming the setting to change.
        """
        return ClientDP.from_settings(
            self.dp_mode,
            clip_norm=self.dp_clip_norm,
            theta_clip_norm=self.dp_theta_clip_norm,
            noise_multiplier=self.dp_noise_multiplier,
            delta=self.dp_delta,
            target_epsilon=self.dp_target_epsilon,
            share_theta=algorithm.shares_curvature,
            theta_share=self.dp_theta_share,
            clip_schedule=self.dp_clip_schedule,
            learning_rate=getattr(self, "learning_rate", None),
            clip_quantile=self.dp_clip_quantile,
            clip_norm_lr=self.dp_clip_norm_lr,
            clipped_count_std=self.dp_clipped_count_std,
            sampling=self.resolved_dp_sampling,
            projection_rank=self.dp_projection_rank,
            soap_curvature=algorithm.soap_curvature,
        )

    def record_privacy(self, algorithm: Algorithm | None = None) -> RecordDP | None:
        """The settings of ``dp_mode: record`` checked (``None`` in the other modes).

        With ``algorithm``, also what DP-SGD cannot cover (Sophia, gradient
        accumulation, fp16); ``ValueError`` names the setting.
        """
        if self.dp_mode != "record":
            return None
        dp = RecordDP.from_settings(
            clip_norm=self.dp_clip_norm,
            theta_clip_norm=self.dp_theta_clip_norm,
            theta_share=self.dp_theta_share,
            noise_multiplier=self.dp_noise_multiplier,
            delta=self.dp_delta,
            target_epsilon=self.dp_target_epsilon,
            noise_seed=self.dp_noise_seed,
            clip_schedule=self.dp_clip_schedule,
        )
        if algorithm is not None:
            dp.check_client(
                algorithm.optimizer,
                getattr(self, "gradient_accumulation_steps", 1),
                bool(getattr(self, "fp16", False)),
            )
        return dp

    def privacy_settings(self) -> dict[str, object]:
        """The DP settings by name, what a resume must keep (none without DP, so that a
        run without DP keeps the identity it had before these settings existed)."""
        if self.dp_mode == "none":
            return {}
        values = {name: getattr(self, name) for name in DP_SETTINGS}
        values["dp_sampling"] = self.resolved_dp_sampling  # a secure run's fixed samples too
        return {
            name: value
            for name, value in values.items()
            if name not in _LATER_DP_SETTINGS or value is not None
        }

    @property
    def resolved_dp_sampling(self) -> str | None:
        """``dp_sampling``, or ``"fixed"`` when unset under client-level DP and
        ``secure_aggregation`` (``None``: unset, Poisson sampling)."""
        if self.dp_mode != "client" or self.dp_sampling is not None:
            return self.dp_sampling
        return "fixed" if self.secure_aggregation else None


_SECAGG_CONFLICTS = {
    "beta": "the server chooses beta from the spread of single clients' updates, which "
    "secure aggregation hides; set a fixed beta",
    "transport_dtype": "SecAgg+ quantizes float32 values; use transport_dtype='float32'",
}


def _flower_number(name: str, value: float, least_count: int) -> int | float:
    """A SecAgg+ setting as Flower reads it: a fraction in (0, 1] (float), else a count (int)."""
    value = float(value)
    if 0 < value <= 1:
        return value
    if value < least_count or value != int(value):
        raise ValueError(
            f"{name} must be a fraction in (0, 1] or a whole count >= {least_count}, got {value}"
        )
    return int(value)


def secagg_shares(sampled: int, shares: int | float, threshold: int | float) -> tuple[int, int]:
    """``(num_shares, threshold)`` that Flower's SecAgg+ derives for ``sampled`` clients."""
    if isinstance(shares, float):
        count = round(shares * sampled)
        if count < sampled and count % 2 == 0:
            count += 1
        if count <= 2:
            count = sampled
    else:
        count = shares
    needed = max(round(threshold * count), 2) if isinstance(threshold, float) else threshold
    return count, needed
