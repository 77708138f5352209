"""Record-level differential privacy: DP-SGD inside each client, through Opacus.

With ``dp_mode: record`` each client protects each of its *examples*: every
local step is Opacus's DP-SGD step. Opacus's ``GradSampleModule`` computes
per-example gradients of the trainable parameters, its ``DPOptimizer`` clips
each to L2 norm ``C`` (``dp_clip_norm``), sums them, adds Gaussian noise of
std ``z C`` and divides by the expected batch size; the client's own optimizer
(SOAP, AdamW, Muon) then steps on that privatized gradient. Batches are
Poisson-sampled (Opacus's ``UniformWithReplacementSampler``, each example with
probability ``q_i = B / n_i``), the sampling its accountant assumes.

Theta stays private because it is computed from the privatized gradients
only: SOAP's Kronecker statistics and AdamW's second moments are running
averages of the gradients the optimizer stepped on, so the delta, Theta and
everything the client sends are post-processing of DP-SGD's outputs. Sophia
is refused: its curvature refresh is an extra backward pass on raw data.

Accounting, per client, by ``dp-accounting``'s PLD accountant: one round of a
client is ``K`` Poisson-sampled Gaussian steps (rate ``q_i``, multiplier
``z``). A client reports the epsilon of its examples after the current round
*as if it had taken part in every round so far* (no credit for being sampled
rarely: an upper bound), and the server logs the largest epsilon any client
reported (:class:`RecordDP`). With ``dp_target_epsilon`` each client derives its
own z, the least that keeps its examples within the target after all rounds
(a client with less data adds more noise).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .privacy import DP_RULES
from .privacy_noise import new_noise_seed, seeded_generator

__all__ = [
    "RECORD_DELTA",
    "RecordClient",
    "RecordDP",
    "check_loader",
    "poisson_batch_sampler",
    "poisson_loader",
    "record_loader",
    "record_steps",
]


RECORD_DELTA = 1e-5
"""``dp_delta``'s default under record-level DP: the delta of each example's guarantee."""


@dataclass(frozen=True)
class RecordDP:
    """Record-level DP settings (DP-SGD in every client).

    Attributes
    ----------
    clip_norm:
        C, the L2 bound of each example's gradient.
    noise_multiplier:
        z (``None``: each client derives it from ``target_epsilon``).
    delta:
        The delta of each example's (epsilon, delta)-DP; default 1e-5.
    target_epsilon:
        The budget of each example after all rounds (instead of z).
    noise_seed:
        Fixes the clients' noise (reproducible experiments only; default: each
        client draws a secret seed every round).
    """

    clip_norm: float
    noise_multiplier: float | None = None
    delta: float = RECORD_DELTA
    target_epsilon: float | None = None
    noise_seed: int | None = None

    @classmethod
    def from_settings(
        cls,
        *,
        clip_norm: float | None,
        theta_clip_norm: float | None = None,
        theta_share: float | None = None,
        noise_multiplier: float | None = None,
        delta: float | None = None,
        target_epsilon: float | None = None,
        noise_seed: int | None = None,
        clip_schedule: str | None = None,
    ) -> RecordDP:
        """The settings of ``dp_mode: record`` checked (``ValueError`` names the setting)."""
        if clip_norm is None:
            raise ValueError(
                "dp_mode: record needs dp_clip_norm, the L2 bound of each example's gradient"
            )
        for setting, value in (
            ("dp_theta_clip_norm", theta_clip_norm),
            ("dp_theta_share", theta_share),
        ):
            if value is not None:
                raise ValueError(
                    f"{setting} is for dp_mode: client; with dp_mode: record Theta is computed "
                    "from privatized gradients only and needs no clip or noise of its own"
                )
        if clip_schedule is not None:
            raise ValueError(
                "dp_clip_schedule is for dp_mode: client; with dp_mode: record dp_clip_norm "
                "bounds each example's gradient, which does not scale with the learning rate"
            )
        given = {
            "dp_clip_norm": clip_norm,
            "dp_noise_multiplier": noise_multiplier,
            "dp_delta": delta,
            "dp_target_epsilon": target_epsilon,
        }
        for setting, value in given.items():
            DP_RULES[setting].check(setting, value)
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ValueError(
                "dp_mode: record needs exactly one of dp_noise_multiplier and "
                "dp_target_epsilon" + (", not both" if noise_multiplier is not None else "")
            )
        return cls(
            clip_norm=float(clip_norm),
            noise_multiplier=None if noise_multiplier is None else float(noise_multiplier),
            delta=RECORD_DELTA if delta is None else float(delta),
            target_epsilon=None if target_epsilon is None else float(target_epsilon),
            noise_seed=noise_seed,
        )

    @staticmethod
    def check_client(optimizer: str, gradient_accumulation_steps: int, fp16: bool) -> None:
        """Refuse what DP-SGD through Opacus does not cover, naming the setting."""
        if optimizer == "sophia":
            raise ValueError(
                "dp_mode: record cannot cover Sophia: its curvature refresh is an extra "
                "backward pass on the raw data; use soap, adamw or muon"
            )
        if gradient_accumulation_steps != 1:
            raise ValueError(
                "dp_mode: record needs gradient_accumulation_steps: 1 (Opacus clips each "
                "example's gradient of one Poisson-sampled batch)"
            )
        if fp16:
            raise ValueError(
                "dp_mode: record needs fp16: false (a scaled loss scales the per-example "
                "gradients before they are clipped)"
            )

    @staticmethod
    def check_model(model: torch.nn.Module) -> None:
        """Refuse, before round 1, a model with a trainable layer Opacus cannot cover."""
        from opacus import GradSampleModule

        errors = GradSampleModule.validate(model, strict=False)
        if errors:
            raise ValueError(
                f"dp_mode: record: Opacus cannot compute per-example gradients for this model "
                f"({'; '.join(str(e) for e in errors)}); train adapters only (LoRA) or use "
                "dp_mode: client"
            )

    def sample_rate(self, batch_size: int, num_examples: int) -> float:
        """q_i = B / n_i, each example's chance of being in a batch (at most 1)."""
        return min(1.0, batch_size / max(1, num_examples))

    def client_noise(self, sample_rate: float, steps_per_round: int, num_rounds: int) -> float:
        """z of a client: the setting, or the least that meets the target after all rounds."""
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        from .accounting import noise_for_epsilon

        return noise_for_epsilon(
            self.target_epsilon, self.delta, sample_rate, steps_per_round * num_rounds
        )

    def client_epsilon(
        self, noise_multiplier: float, sample_rate: float, steps_per_round: int, rounds: int
    ) -> float:
        """Epsilon of a client's examples after ``rounds`` rounds, as if it took part in each."""
        from .accounting import epsilon_after

        return epsilon_after(steps_per_round * rounds, noise_multiplier, sample_rate, self.delta)

    def generator(self, round_index: int, client_id: int) -> torch.Generator:
        """The client's noise generator: from ``noise_seed`` when set, else a secret seed."""
        if self.noise_seed is None:
            return torch.Generator().manual_seed(new_noise_seed())
        return seeded_generator(self.noise_seed, round_index, client_id * 104_729)

    def for_client(
        self,
        *,
        client_id: int,
        round_index: int,
        num_examples: int,
        batch_size: int,
        local_steps: int,
        num_rounds: int,
    ) -> RecordClient:
        """What one client needs for one round: q_i, z_i, its epsilon after it, generators."""
        q = self.sample_rate(batch_size, num_examples)
        z = self.client_noise(q, local_steps, num_rounds)
        return RecordClient(
            dp=self,
            sample_rate=q,
            noise_multiplier=z,
            batch_size=batch_size,
            epsilon=self.client_epsilon(z, q, local_steps, round_index + 1),
            noise=self.generator(round_index, client_id),
            sampling=self.generator(round_index, client_id + 1_000_000_007),
        )


@dataclass
class RecordClient:
    """One client's DP-SGD for one round (:meth:`RecordDP.for_client`).

    Attributes
    ----------
    dp:
        The run's settings.
    sample_rate:
        q_i = B / n_i.
    noise_multiplier:
        z_i.
    batch_size:
        B, the expected batch size (the divisor of the noised gradient sum).
    epsilon:
        Epsilon of the client's examples after this round (every round counted).
    noise, sampling:
        The generators of the gradient noise and of the Poisson batches.
    """

    dp: RecordDP
    sample_rate: float
    noise_multiplier: float
    batch_size: int
    epsilon: float
    noise: torch.Generator
    sampling: torch.Generator

    def steps(
        self, model: torch.nn.Module, params: list[torch.Tensor]
    ) -> contextlib.AbstractContextManager[Callable[[], None]]:
        """:func:`record_steps` for this client."""
        return record_steps(
            model, params, self.dp, self.noise_multiplier, self.batch_size, self.noise
        )

    def metrics(self) -> dict[str, float]:
        """What the client reports: its examples' epsilon, q_i and z_i."""
        return {
            "dp_record_epsilon": self.epsilon,
            "dp_sample_rate": self.sample_rate,
            "dp_noise_multiplier": self.noise_multiplier,
        }


def poisson_batch_sampler(
    num_examples: int, sample_rate: float, steps: int, generator: torch.Generator
) -> Any:
    """Opacus's Poisson batch sampler: ``steps`` batches, example i in each w.p. ``sample_rate``.

    A ``DataLoader(dataset, batch_sampler=...)`` over it yields Poisson-sampled
    batches; each pass draws new ones.
    """
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    return UniformWithReplacementSampler(
        num_samples=num_examples, sample_rate=sample_rate, generator=generator, steps=steps
    )


#: the start of torch's warning that a full backward hook fired on a layer's output gradients
_OUTPUT_HOOK_WARNING = "Full backward hook is firing when gradients are computed with respect to"


@contextlib.contextmanager
def record_steps(
    model: torch.nn.Module,
    params: list[torch.Tensor],
    dp: RecordDP,
    noise_multiplier: float,
    batch_size: int,
    generator: torch.Generator,
) -> Iterator[Callable[[], None]]:
    """Per-example gradients on ``model`` for the ``with`` block; yields ``privatize()``.

    ``privatize()`` runs after the backward of a step: Opacus clips each
    example's gradient to ``dp.clip_norm``, sums, adds noise of std
    ``noise_multiplier * clip_norm`` and divides by ``batch_size``; the result
    is left in ``p.grad`` and the per-example state is cleared for the next
    step. After a step whose batch was empty (no backward), ``p.grad`` is the
    noise alone, as the mechanism requires. The hooks are removed on exit.

    Raises ``ValueError`` naming ``dp_mode`` when Opacus cannot compute
    per-example gradients for a trainable layer of the model.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    # simulate, the trainer and the Flower ClientApp check before round 1; this covers
    # a direct client_update call
    RecordDP.check_model(model)
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    optimizer = DPOptimizer(
        torch.optim.SGD(params, lr=0.0),
        noise_multiplier=noise_multiplier,
        max_grad_norm=dp.clip_norm,
        expected_batch_size=batch_size,
        generator=generator,
    )

    def privatize() -> None:
        if all(getattr(p, "grad_sample", None) is None for p in params):  # an empty batch
            for p in params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        optimizer.pre_step()
        grads = [p.grad for p in params]
        optimizer.zero_grad(set_to_none=True)  # clears the per-example state
        for p, g in zip(params, grads):
            p.grad = g

    try:
        with warnings.catch_warnings():
            # Opacus's hooks read the gradient of a layer's output, which is where torch fires
            # them when the layer's inputs need no gradient (the first layer, a frozen base's
            # LoRA adapters); torch >= 2.8 warns about that on every such run
            warnings.filterwarnings("ignore", message=_OUTPUT_HOOK_WARNING, category=UserWarning)
            yield privatize
    finally:
        wrapped._close()


def record_loader(
    dp: RecordDP,
    loader: Any,
    client_id: int,
    round_index: int,
    local_steps: int,
    num_rounds: int,
) -> tuple[RecordClient, Any]:
    """A client's DP-SGD round and its ``DataLoader`` redrawn with Poisson batches.

    The loader's dataset, collate function and ``batch_size`` (the expected
    batch size) are kept; an empty batch is ``{}``. Raises ``ValueError`` for
    a loader that is not a batched ``torch.utils.data.DataLoader``.
    """
    check_loader(loader, client_id)
    client = dp.for_client(
        client_id=client_id,
        round_index=round_index,
        num_examples=len(loader.dataset),
        batch_size=loader.batch_size,
        local_steps=local_steps,
        num_rounds=num_rounds,
    )
    return client, poisson_loader(loader.dataset, client, local_steps, loader.collate_fn)


def check_loader(loader: Any, client_id: int) -> None:
    """Refuse a client loader whose batches cannot be redrawn by Poisson sampling."""
    from torch.utils.data import DataLoader

    if not isinstance(loader, DataLoader) or not loader.batch_size:
        raise ValueError(
            f"dp_mode: record needs each client's loader to be a torch DataLoader with a "
            f"batch_size (its batches are redrawn by Poisson sampling); client {client_id}'s "
            f"is a {type(loader).__name__}"
        )


def poisson_loader(
    dataset: Any, client: RecordClient, steps: int, collate: Callable[[list[Any]], Any], **kwargs
) -> Any:
    """A ``DataLoader`` of ``steps`` Poisson-sampled batches per pass over ``dataset``
    (:func:`poisson_batch_sampler` with the client's rate and sampling generator; an
    empty batch is ``{}``); ``kwargs`` go to the ``DataLoader``."""
    from torch.utils.data import DataLoader

    sampler = poisson_batch_sampler(len(dataset), client.sample_rate, steps, client.sampling)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=lambda rows: collate(rows) if rows else {},
        **kwargs,
    )
