"""The clients' half of client-level DP: the public reference and the clip.

:mod:`fedpac_hf.federated.privacy` holds the settings
(:class:`~fedpac_hf.federated.privacy.ClientDP`) and the mechanism in full;
:mod:`fedpac_hf.federated.privacy_noise` the server's half. Here: what every
client's delta and Theta contain that is public (:func:`public_reference`),
what is the client's own (:func:`own_part`, its norms :func:`own_norms`), and
the clip that bounds it before anything leaves the client (:func:`clip_update`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch

from fedpac_hf.optim import curvature_retention, sent_form

from .algorithms import Algorithm, round_beta
from .privacy import ClientDP
from .state import ClientUpdate, ServerState

__all__ = [
    "CLIP_FLAGS",
    "Reference",
    "clip_update",
    "own_norms",
    "own_part",
    "public_reference",
    "with_reference",
]


CLIP_FLAGS = ("dp_clipped_delta", "dp_clipped_theta")
"""A client's metrics under client-level DP: 1.0 when its delta (Theta) was clipped."""


def _global_norm(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    values = [t.to(torch.float32) for t in tensors.values()]
    if not values:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(values)))


def _clipped(
    tensors: Mapping[str, torch.Tensor], bound: float
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``tensors`` scaled to global L2 norm at most ``bound``, and whether they were scaled."""
    norm = _global_norm(tensors)
    scale = torch.clamp(bound / torch.clamp(norm, min=torch.finfo(torch.float32).tiny), max=1.0)
    clipped = {n: t * scale.to(t.device, t.dtype) for n, t in tensors.items()}
    return clipped, norm > bound


Reference = tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]


def public_reference(
    state: ServerState, algorithm: Algorithm, lr: float, local_steps: int
) -> Reference:
    """What every client's delta and Theta contain that is public, so it is not clipped.

    The delta holds the correction steps, ``-K beta eta_l g_G`` in all (from
    the global direction every client received). Theta starts from the global
    Theta it imported (alignment), and after ``K`` local steps still holds
    ``r`` times it, in the form clients send it up: ``r`` is the optimizer's
    :func:`~fedpac_hf.optim.curvature_retention` (``beta2**K`` for AdamW's
    second moments, ``shampoo_beta**K`` for SOAP's statistics, ...), from the
    algorithm's optimizer options, which server and clients share. A client
    clips and sends only what its data adds (its part minus the reference);
    the server adds the reference back to the noised mean. Both are
    functions of the released global state, so the sensitivity and the
    accounting are unchanged and no client's own signal is clipped away with
    the previous round's noise, which the correction and the imported Theta
    carry. ``(None, None)`` in round 1.
    """
    delta_ref = theta_ref = None
    beta = round_beta(algorithm, state)
    if algorithm.correction and state.direction is not None and beta:
        scale = -local_steps * beta * lr
        delta_ref = {n: d.to(torch.float32) * scale for n, d in state.direction.items()}
    if algorithm.align and state.curvature:
        kept = curvature_retention(algorithm.optimizer, algorithm.optimizer_kwargs, local_steps)
        theta_ref = {
            n: t.to(torch.float32) * kept for n, t in (sent_form(state.curvature) or {}).items()
        }
    return delta_ref, theta_ref


def own_part(
    update: ClientUpdate, reference: Reference = (None, None)
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The client's delta and Theta minus their public parts: what :func:`clip_update` bounds.

    Parameters
    ----------
    update:
        The client's unclipped update.
    reference:
        The round's public parts, from :func:`public_reference`.

    Returns
    -------
    tuple
        ``(delta, curvature)``, each ``update``'s part minus its reference
        where the reference has the entry.
    """
    return (
        with_reference(dict(update.delta), reference[0], -1.0),
        with_reference(dict(update.curvature), reference[1], -1.0),
    )


def own_norms(
    delta: Mapping[str, torch.Tensor],
    curvature: Mapping[str, torch.Tensor],
    reference: Reference = (None, None),
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The L2 norms of a client's own delta and Theta (:func:`own_part`), as ``[delta, Theta]``.

    What :func:`clip_update` would compare with ``dp_clip_norm`` and
    ``dp_theta_clip_norm``, computed one entry at a time (no copy of the whole
    update) in ``dtype``, on the device of ``delta``, without a host sync.
    Theta's norm is 0 when ``curvature`` is empty.
    """

    def norm(tensors: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor] | None):
        squares = [
            torch.linalg.vector_norm(
                t - ref[n].to(t.device, t.dtype) if ref and n in ref else t, dtype=dtype
            )
            .square()
            .to(device)
            for n, t in tensors.items()
        ]
        return torch.stack(squares).sum().sqrt() if squares else torch.zeros((), dtype=dtype)

    device = next(iter(delta.values())).device if delta else torch.device("cpu")
    return torch.stack(
        [norm(delta, reference[0]).to(device), norm(curvature, reference[1]).to(device)]
    )


def clip_update(
    update: ClientUpdate, dp: ClientDP, reference: Reference = (None, None)
) -> ClientUpdate:
    """What leaves a client under client-level DP: its delta clipped, Theta clipped or kept.

    The delta minus its public part (``reference``, see :func:`public_reference`)
    is scaled to L2 norm at most ``dp.clip_norm``; Theta minus what is left of the
    imported global Theta to ``dp.theta_clip_norm`` when it is shared
    (``dp.share_theta``), else it is dropped (the server never sees it).
    ``metrics`` gains ``dp_clipped_delta`` and ``dp_clipped_theta`` (1.0 when
    that part was scaled down).
    """
    own_delta, own_theta = own_part(update, reference)
    delta, delta_clipped = _clipped(own_delta, dp.clip_norm)
    curvature: dict[str, torch.Tensor] = {}
    theta_clipped = torch.zeros((), dtype=torch.bool)
    if dp.share_theta and update.curvature:
        curvature, theta_clipped = _clipped(own_theta, float(dp.theta_clip_norm or 0.0))
    flags = torch.stack([delta_clipped.cpu(), theta_clipped.cpu()]).tolist()
    metrics = dict(update.metrics)
    metrics.update(zip(CLIP_FLAGS, map(float, flags)))
    return replace(update, delta=delta, curvature=curvature, metrics=metrics)


def with_reference(
    sums: dict[str, torch.Tensor], reference: Mapping[str, torch.Tensor] | None, times: float
) -> dict[str, torch.Tensor]:
    """``sums`` plus ``times`` the reference where it has the entry (``sums`` itself without one).

    Clients subtract the public reference (``times = -1``, :func:`own_part`); the
    server adds it back to the noised sums (``times`` = the denominator,
    :func:`~fedpac_hf.federated.privacy_noise.noised_round`).
    """
    if not reference:
        return sums
    return {
        n: s + reference[n].to(s.device, s.dtype) * times if n in reference else s
        for n, s in sums.items()
    }
