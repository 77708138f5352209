"""Why a client produced no update, and the one place that decides it (:func:`run_client`);
why a round produced no global model (:class:`RoundError`).

The in-process trainer, :func:`~fedpac_hf.federated.simulate` and the Flower
client all turn a failing client into a logged :class:`ClientFailure` here;
:func:`recurring_failures` tells a client's bad luck from an error that will
come back every time it is sampled.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .state import ClientUpdate

__all__ = [
    "PROGRAMMING_ERRORS",
    "ClientError",
    "ClientFailure",
    "RoundError",
    "TRANSIENT_ERRORS",
    "recurring_failures",
    "require_finite_aggregate",
    "require_updates",
    "non_finite_metrics",
    "require_finite_evaluation",
    "run_client",
]

# the logger the drops were always logged under, before this module was split out
logger = logging.getLogger("fedpac_hf.federated.client")


PROGRAMMING_ERRORS: tuple[type[BaseException], ...] = (
    TypeError,
    AttributeError,
    NameError,
    NotImplementedError,
)
"""Exceptions that mean the training code is wrong (loss function, model, collator).

Every client would fail the same way, so :func:`run_client` stops the run
with them instead of dropping the client.
"""


class ClientError(RuntimeError):
    """A client could not produce a usable update (non-finite loss or update).

    The server drops such a client from the round's aggregation.
    """


@dataclass(frozen=True)
class ClientFailure:
    """Why one client produced no update in one round (see :func:`run_client`).

    Attributes
    ----------
    client_id:
        Index of the client in the federation.
    round_number:
        The round, counted from 1.
    error_type:
        Name of the exception's class, e.g. ``"FloatingPointError"``.
    message:
        The exception's message.
    """

    client_id: int
    round_number: int
    error_type: str
    message: str

    def __str__(self) -> str:
        return f"client {self.client_id}: {self.error_type}: {self.message}"


def run_client(
    train: Callable[[], ClientUpdate],
    client_id: int,
    round_number: int,
    log: logging.Logger | None = None,
) -> ClientUpdate | ClientFailure:
    """Run one client's local training, turning any failure into a logged drop.

    The one place where the in-process trainer, :func:`~fedpac_hf.federated.simulate`
    and the Flower client decide what a failing client is: any ``Exception``
    from its local training (a data error, an optimizer's
    ``FloatingPointError``, :class:`ClientError` for a non-finite loss or
    update) is logged as a warning naming the round, the client, the
    exception type and its message, and returned as a :class:`ClientFailure`
    for the caller to leave out of the round's aggregation.
    ``KeyboardInterrupt``, ``SystemExit`` and other non-``Exception`` errors are not caught.
    Neither are :data:`PROGRAMMING_ERRORS` (``TypeError``, ``AttributeError``,
    ...): a loss function that returns a tuple, or a model called with a
    wrong argument, is a bug in the training code, reported once (logged as an
    error, then raised with its traceback) rather than as every client dropped.

    Parameters
    ----------
    train:
        Runs the client's local steps and returns its update (e.g. a closure
        over :func:`client_update`).
    client_id:
        The client's index, for the log and the failure record.
    round_number:
        The round, counted from 1, for the log.
    log:
        Where to log the drop (default: this module's logger).

    Returns
    -------
    ClientUpdate or ClientFailure
        The update, or why there is none.
    """
    try:
        return train()
    except PROGRAMMING_ERRORS as error:
        (log or logger).error(
            "round %d, client %d: %s: %s; this is a bug in the training code (the loss "
            "function, the model or the data collator), not a failing client: the run stops",
            round_number,
            client_id,
            type(error).__name__,
            " ".join(str(error).split()),
        )
        raise
    except Exception as error:  # noqa: BLE001 - any client failure drops only that client
        message = " ".join(str(error).split()) or "(no message)"
        prefix = f"client {client_id}: "
        message = message.removeprefix(prefix)
        failure = ClientFailure(int(client_id), int(round_number), type(error).__name__, message)
        (log or logger).warning("round %d: dropping %s", round_number, failure)
        return failure


TRANSIENT_ERRORS: tuple[str, ...] = (
    "ClientError",
    "FloatingPointError",
    "NotConnected",
    "NodeUnavailable",
    "NoReply",
)
"""Failures that can pass: a non-finite loss or update, a node that is away."""


def recurring_failures(
    last: Mapping[int, ClientFailure], failures: Sequence[ClientFailure]
) -> list[ClientFailure]:
    """The failures of this round that repeat the same client's last failure exactly.

    The same exception type with the same message from the same client, the
    last time it was sampled and again now, is an error that will come back
    every time (a label outside the model's head in its data, a setting its
    data cannot meet), not bad luck; :data:`TRANSIENT_ERRORS` never count.
    """
    return [
        f
        for f in failures
        if _cause(f) not in TRANSIENT_ERRORS
        and (previous := last.get(f.client_id)) is not None
        and (previous.error_type, previous.message) == (f.error_type, f.message)
    ]


def _cause(failure: ClientFailure) -> str:
    """The exception type behind a failure (a Flower reply's error names the client's inside)."""
    inner = re.search(r"client \d+: (\w+): ", failure.message)
    return (
        inner.group(1) if inner and failure.error_type == "ClientAppError" else failure.error_type
    )


class RoundError(RuntimeError):
    """A round produced no usable global model: too few clients succeeded, or it is not finite.

    Raised before anything is saved, so the last checkpoint stays the last
    good state; the message says why and what to change.
    """


def require_updates(
    num_updates: int, failures: Sequence[ClientFailure], min_clients: int, round_number: int
) -> None:
    """Raise :class:`RoundError` if fewer than ``min_clients`` of a round's updates arrived.

    ``failures`` are the round's dropped clients; the message lists why they failed.
    """
    if num_updates >= min_clients:
        return
    total = num_updates + len(failures)
    reasons = "; ".join(str(f) for f in failures[:5])
    if len(failures) > 5:
        reasons += f"; and {len(failures) - 5} more"
    raise RoundError(
        f"round {round_number}: only {num_updates} of {total} client updates "
        f"succeeded, fewer than min_clients_per_round={min_clients}"
        + (f" (dropped: {reasons})" if reasons else "")
        + "; nothing was saved for this round, the last checkpoint is intact"
        + (
            ". Non-finite losses or updates usually mean too large a learning_rate: lower "
            "it or clip with max_grad_norm"
            if any("non-finite" in f.message for f in failures)
            else ""
        )
    )


def require_finite_aggregate(
    tensors: dict[str, torch.Tensor], part: str, round_number: int, server_lr: float
) -> None:
    """Refuse a non-finite aggregate (e.g. float32 overflow of finite client updates)."""
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise RoundError(
                f"round {round_number}: the aggregated global {part} has inf/nan entries "
                f"({name!r}) although every client update was finite; the global model is "
                "neither updated nor saved. Lower learning_rate or server_learning_rate "
                f"(now {server_lr:g}), or clip with max_grad_norm"
            )


def non_finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The entries of ``metrics`` that are numbers but not finite (NaN, inf)."""
    return {
        k: v
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and not math.isfinite(v)
    }


def require_finite_evaluation(metrics: Mapping[str, Any], round_number: int) -> None:
    """Raise :class:`RoundError` when an evaluation of the global model is not finite.

    A NaN loss or metric of the global model means it diverged: the run stops
    naming it instead of logging the NaN and training on.
    """
    bad = non_finite_metrics(metrics)
    if bad:
        shown = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise RoundError(
            f"round {round_number}: the evaluation of the global model gave {shown}: it "
            "diverged; lower learning_rate (or server_learning_rate) or clip with max_grad_norm, "
            "and resume from the last checkpoint"
        )
