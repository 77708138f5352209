"""Global federated state and the moving of trainable parameters in and out of a model.

Only trainable parameters (``requires_grad``) take part in federation: with
PEFT that is the adapters and ``modules_to_save``. Frozen weights are never
copied per client or sent. The global copy is kept in float32 ("master
weights") whatever the model dtype, so that deltas of bf16 models do not lose
their low bits.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

import torch

__all__ = [
    "ClientUpdate",
    "ServerState",
    "trainable_parameters",
    "get_trainable_state",
    "load_trainable_state",
    "mean_curvature",
    "move_parts",
    "move_tensors",
    "sum_device",
    "tensor_bytes",
]

K = TypeVar("K", bound=Hashable)


def sum_device(device: torch.device | str | None) -> torch.device:
    """Where a :class:`~fedpac_hf.federated.server.RoundAggregator` keeps its float64 sums for updates made on
    ``device``: that device, or the CPU for ``None`` and for devices without
    float64 (Apple's ``mps``)."""
    if device is None:
        return torch.device("cpu")
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device


def move_tensors(
    tensors: Mapping[K, torch.Tensor], device: torch.device | str
) -> dict[K, torch.Tensor]:
    """``tensors`` on ``device``, moved with one copy per dtype instead of one per tensor.

    Tensors already on ``device`` are returned as they are. The others are
    concatenated into one flat buffer per dtype and copied at once: from the
    CPU to a CUDA device through pinned memory without blocking the host, to
    the CPU in one transfer (one host sync) and split into tensors that own
    their memory (so they can be saved). Tensors moved to an accelerator are
    views into one buffer per dtype.

    Parameters
    ----------
    tensors:
        Tensors by any key.
    device:
        Where they should be.

    Returns
    -------
    dict
        The same keys, in the same order, with the tensors on ``device``.
    """
    device = torch.device(device)
    out: dict[K, torch.Tensor] = {}
    groups: dict[tuple[torch.device, torch.dtype], list[K]] = {}
    for key, t in tensors.items():
        if t.device == device or (device.index is None and t.device.type == device.type):
            out[key] = t
        else:
            groups.setdefault((t.device, t.dtype), []).append(key)
    for (_, _), keys in groups.items():
        parts = [tensors[k] for k in keys]
        flat = torch.cat([t.reshape(-1) for t in parts])
        if device.type == "cuda" and flat.device.type == "cpu":
            moved = flat.pin_memory().to(device, non_blocking=True)
        else:
            moved = flat.to(device)
        own = moved.device.type == "cpu"
        for key, t, chunk in zip(keys, parts, moved.split([t.numel() for t in parts])):
            chunk = chunk.view(t.shape)
            out[key] = chunk.clone() if own else chunk
    return {key: out[key] for key in tensors}


def move_parts(
    parts: Sequence[Mapping[str, torch.Tensor] | None], device: torch.device | str
) -> list[dict[str, torch.Tensor] | None]:
    """Several dicts of tensors moved together, one copy per dtype over all of them
    (:func:`move_tensors`); ``None`` stays ``None``."""
    flat = {(i, n): t for i, part in enumerate(parts) for n, t in (part or {}).items()}
    moved = move_tensors(flat, device)
    return [
        None if part is None else {n: moved[(i, n)] for n in part} for i, part in enumerate(parts)
    ]


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters that federation trains and sends, by name."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(
            "the model has no trainable parameter (requires_grad=True); "
            "with PEFT, check that the adapter is attached and not frozen"
        )
    return params


def get_trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A float32 CPU copy of the trainable parameters, keyed by parameter name."""
    return {
        n: p.detach().to(device="cpu", dtype=torch.float32, copy=True)
        for n, p in trainable_parameters(model).items()
    }


@torch.no_grad()
def load_trainable_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's trainable parameters (cast to their dtype/device).

    Raises ``ValueError`` naming the difference when the keys do not match the
    model's trainable parameters (a state from another model or adapter).
    """
    params = trainable_parameters(model)
    if set(params) != set(state):
        missing = sorted(set(params) - set(state))[:5]
        unexpected = sorted(set(state) - set(params))[:5]
        raise ValueError(
            "global parameters do not match the model's trainable parameters: "
            f"missing {missing}, unexpected {unexpected}"
        )
    for name, p in params.items():
        src = state[name]
        if src.shape != p.shape:
            raise ValueError(
                f"global parameter {name!r} has shape {tuple(src.shape)}, "
                f"the model's has {tuple(p.shape)}"
            )
    devices = {p.device for p in params.values()}
    if len(devices) == 1:  # one copy per dtype rather than one per parameter
        state = move_tensors({n: state[n] for n in params}, devices.pop())
    for name, p in params.items():
        p.copy_(state[name])


def tensor_bytes(tensors: Mapping[str, torch.Tensor] | None) -> int:
    """Bytes needed to send ``tensors`` as they are (element size of their dtype)."""
    if not tensors:
        return 0
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class ServerState:
    """What the server holds between rounds.

    Attributes
    ----------
    params:
        Global trainable parameters theta^r, float32 CPU, by name.
    curvature:
        Global preconditioner state Theta^r (aggregated from the clients), or
        ``None`` before the first round / for optimizers without curvature.
    direction:
        Global direction g_G^r = -Delta^{r-1} / (K * lr), or ``None`` at r = 0
        (the paper's zero direction).
    round:
        Number of completed rounds.
    beta:
        The correction strength the server chose for the next round when the
        algorithm's beta is ``"auto"`` (None: not chosen yet, or a fixed beta);
        see :func:`~fedpac_hf.federated.round_beta`.
    noise_seed:
        Under client-level differential privacy, the server's secret seed of
        the noise it adds (:mod:`~fedpac_hf.federated.privacy`); saved in
        checkpoints, never sent to clients. ``None`` without DP.
    dp_clip_norms:
        Under client-level DP with ``dp_clip_schedule: adaptive``, the bounds
        of the next round's deltas and Theta (``None`` for Theta's when it
        stays on the clients), chosen by the server from the noised counts of
        unclipped clients (:mod:`~fedpac_hf.federated.privacy_adaptive`);
        public, sent to clients and saved in checkpoints. ``None`` otherwise
        and before round 1 (the settings' bounds hold).
    """

    params: dict[str, torch.Tensor]
    curvature: dict[str, torch.Tensor] | None = None
    direction: dict[str, torch.Tensor] | None = None
    round: int = 0
    beta: float | None = None
    noise_seed: int | None = None
    dp_clip_norms: tuple[float, float | None] | None = None

    def cast(self, dtype: torch.dtype) -> ServerState:
        """This state with every tensor in ``dtype`` (what travels with reduced-precision transport)."""
        if dtype == torch.float32:
            return self

        def convert(tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
            return None if tensors is None else {n: t.to(dtype) for n, t in tensors.items()}

        return replace(
            self,
            params=convert(self.params),
            curvature=convert(self.curvature),
            direction=convert(self.direction),
        )

    def to(self, device: torch.device | str) -> ServerState:
        """This state with every tensor on ``device`` (one copy per dtype, see
        :func:`move_tensors`); ``self`` when it is there already."""
        parts = {"params": self.params, "curvature": self.curvature, "direction": self.direction}
        flat = {(part, n): t for part, ts in parts.items() for n, t in (ts or {}).items()}
        moved = move_tensors(flat, device)
        if all(moved[k] is flat[k] for k in flat):
            return self

        def part_of(part: str) -> dict[str, torch.Tensor] | None:
            if parts[part] is None:
                return None
            return {n: moved[(part, n)] for n in parts[part]}

        return replace(
            self,
            params=part_of("params"),  # type: ignore[arg-type]
            curvature=part_of("curvature"),
            direction=part_of("direction"),
        )

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> ServerState:
        """Initial state: the model's trainable parameters, no curvature, no direction."""
        return cls(params=get_trainable_state(model))


@dataclass
class ClientUpdate:
    """What one client sends back after its local steps.

    Attributes
    ----------
    client_id:
        Index of the client in the federation.
    delta:
        ``theta_i - theta^r`` per trainable parameter, float32, on the device
        the client trained on (:func:`~fedpac_hf.federated.client.client_update` leaves it there; the
        server sums it where it is, Flower copies it to the CPU to send it).
    curvature:
        The client's Theta after its local steps (``{}`` for SGD), float32,
        on the same device.
    num_examples:
        Training examples seen in the local steps (for example weighting).
    num_steps:
        Local optimizer steps taken (K).
    metrics:
        ``train_loss`` (mean over the local steps), ``skipped_steps`` (steps an
        fp16 gradient scaler skipped for overflowing) and friends.
    """

    client_id: int
    delta: dict[str, torch.Tensor]
    curvature: dict[str, torch.Tensor]
    num_examples: int
    num_steps: int
    metrics: dict[str, float] = field(default_factory=dict)

    def cast(self, dtype: torch.dtype) -> ClientUpdate:
        """This update with its delta and Theta in ``dtype`` (reduced-precision transport)."""
        if dtype == torch.float32:
            return self
        return ClientUpdate(
            client_id=self.client_id,
            delta={n: t.to(dtype) for n, t in self.delta.items()},
            curvature={n: t.to(dtype) for n, t in self.curvature.items()},
            num_examples=self.num_examples,
            num_steps=self.num_steps,
            metrics=dict(self.metrics),
        )


def mean_curvature(updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
    """The plain mean of the updates' Theta, summed in float64 (float32 out)."""
    names = updates[0].curvature
    if any(set(update.curvature) != set(names) for update in updates):
        raise ValueError("the updates' curvature states have different entries")
    return {
        name: (sum(u.curvature[name].double() for u in updates) / len(updates)).float()
        for name in names
    }
