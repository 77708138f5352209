"""Global federated state and the moving of trainable parameters in and out of a model.

Only trainable parameters (``requires_grad``) take part in federation: with
PEFT that is the adapters and ``modules_to_save``. Frozen weights are never
copied per client or sent. The global copy is kept in float32 ("master
weights") whatever the model dtype, so that deltas of bf16 models do not lose
their low bits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = [
    "ServerState",
    "trainable_parameters",
    "get_trainable_state",
    "load_trainable_state",
    "tensor_bytes",
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
        p.copy_(src)


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
    """

    params: dict[str, torch.Tensor]
    curvature: dict[str, torch.Tensor] | None = None
    direction: dict[str, torch.Tensor] | None = None
    round: int = 0

    def cast(self, dtype: torch.dtype) -> ServerState:
        """This state with every tensor in ``dtype`` (what travels with reduced-precision transport)."""
        if dtype == torch.float32:
            return self

        def convert(tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
            return None if tensors is None else {n: t.to(dtype) for n, t in tensors.items()}

        return ServerState(
            params=convert(self.params),
            curvature=convert(self.curvature),
            direction=convert(self.direction),
            round=self.round,
        )

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> ServerState:
        """Initial state: the model's trainable parameters, no curvature, no direction."""
        return cls(params=get_trainable_state(model))
