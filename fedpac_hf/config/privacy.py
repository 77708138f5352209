"""`PrivacyArguments`: the client-level differential-privacy settings of a run.

A dataclass mixed into :class:`~fedpac_hf.config.arguments.FedPACArguments`,
so the settings read the same from YAML, the command line and a Flower run
config (``dp-mode = "client"``). The mechanism and its accounting are in
:mod:`fedpac_hf.federated.privacy` and :mod:`fedpac_hf.federated.accounting`;
``docs/privacy.md`` is the user's guide.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedpac_hf.federated import Algorithm
from fedpac_hf.federated.privacy import DP_MODES, ClientDP
from fedpac_hf.federated.record_privacy import RecordDP

__all__ = ["DP_SETTINGS", "PrivacyArguments"]

#: The settings of this mixin (a resume must keep them).
DP_SETTINGS = (
    "dp_mode",
    "dp_clip_norm",
    "dp_theta_clip_norm",
    "dp_noise_multiplier",
    "dp_delta",
    "dp_target_epsilon",
)


@dataclass
class PrivacyArguments:
    """Client-level differential privacy (DP-FedAvg's recipe, Theta included)."""

    dp_mode: str = field(
        default="none",
        metadata={
            "help": f"Differential privacy: one of {DP_MODES}. 'client': each client's delta "
            "and Theta are clipped, clients are Poisson-sampled and the server adds Gaussian "
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

    def client_privacy(self, algorithm: Algorithm) -> ClientDP | None:
        """The DP settings checked for ``algorithm`` (``None`` with ``dp_mode: none``).

        Raises ``ValueError`` naming the setting to change.
        """
        return ClientDP.from_settings(
            str(self.dp_mode).strip().lower(),
            clip_norm=self.dp_clip_norm,
            theta_clip_norm=self.dp_theta_clip_norm,
            noise_multiplier=self.dp_noise_multiplier,
            delta=self.dp_delta,
            target_epsilon=self.dp_target_epsilon,
            share_theta=algorithm.align,
        )

    def record_privacy(self, algorithm: Algorithm | None = None) -> RecordDP | None:
        """The settings of ``dp_mode: record`` checked (``None`` in the other modes).

        With ``algorithm``, also what DP-SGD cannot cover (Sophia, gradient
        accumulation, fp16); ``ValueError`` names the setting.
        """
        if str(self.dp_mode).strip().lower() != "record":
            return None
        dp = RecordDP.from_settings(
            clip_norm=self.dp_clip_norm,
            theta_clip_norm=self.dp_theta_clip_norm,
            noise_multiplier=self.dp_noise_multiplier,
            delta=self.dp_delta,
            target_epsilon=self.dp_target_epsilon,
            noise_seed=self.dp_noise_seed,
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
        if str(self.dp_mode).strip().lower() == "none":
            return {}
        return {name: getattr(self, name) for name in DP_SETTINGS}
