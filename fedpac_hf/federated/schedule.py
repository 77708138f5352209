"""The local learning rate of every round: one ``transformers`` schedule over rounds.

A round is one global step, so the schedule named by ``lr_scheduler_type`` is
stepped once per round, as ``Trainer`` steps it once per optimizer step; every
client of a round trains at that round's rate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fedpac_hf.optim.options import Rule, number, one_of, optional, whole

__all__ = ["MAX_ROUNDS", "SCHEDULER_OPTIONS", "round_learning_rates"]

#: The most rounds a run plans: each round trains clients, so a million rounds is
#: already more than any run finishes; a larger num_rounds is a typo.
MAX_ROUNDS = 1_000_000

# Schedules driven by an evaluation metric, not by the round count.
_UNSCHEDULABLE = ("reduce_lr_on_plateau", "greedy")

_CYCLES = number(0.0, low_open=True)
_RATIO = number(0.0, 1.0)
#: What the scheduler options (``lr_scheduler_kwargs``) accept, per schedule (the
#: rules of :mod:`fedpac_hf.optim.options`); ``transformers`` checks none of these
#: ranges, and an option not listed is left to it.
SCHEDULER_OPTIONS: dict[str, dict[str, Rule]] = {
    "cosine": {"num_cycles": _CYCLES},
    "cosine_with_restarts": {"num_cycles": whole(1)},
    "polynomial": {"power": number(0.0, low_open=True), "lr_end": number(0.0)},
    "inverse_sqrt": {"timescale": optional(whole(1))},
    "cosine_with_min_lr": {
        "num_cycles": _CYCLES,
        "min_lr": optional(number(0.0)),
        "min_lr_rate": optional(_RATIO),
    },
    "cosine_warmup_with_min_lr": {
        "num_cycles": _CYCLES,
        "min_lr": optional(number(0.0)),
        "min_lr_rate": optional(_RATIO),
        "warmup_lr_rate": optional(_RATIO),
    },
    "warmup_stable_decay": {
        "num_decay_steps": whole(0),
        "num_stable_steps": optional(whole(0)),
        "warmup_type": one_of("linear", "cosine", "1-sqrt"),
        "decay_type": one_of("linear", "cosine", "1-sqrt"),
        "min_lr_ratio": _RATIO,
        "num_cycles": _CYCLES,
    },
}


def round_learning_rates(
    learning_rate: float,
    num_rounds: int,
    schedule: str = "cosine",
    *,
    warmup_rounds: int = 0,
    scheduler_kwargs: Mapping[str, Any] | None = None,
) -> list[float]:
    """The local learning rate eta_l of every round, from a ``transformers`` schedule.

    The schedule is stepped once per round, as ``Trainer`` steps it once per
    optimizer step: a round is one global step. ``cosine`` (the paper's
    choice) decays from ``learning_rate`` towards 0, ``linear`` likewise on a
    straight line, ``constant`` keeps it; any other name of
    ``transformers.SchedulerType`` that needs only the step count works too.
    A warm-up that would start at 0 starts at its first positive rate instead:
    a round at rate 0 would be wasted work.

    Parameters
    ----------
    learning_rate:
        Peak local learning rate.
    num_rounds:
        R, the number of rounds.
    schedule:
        A ``transformers`` scheduler name (``lr_scheduler_type``).
    warmup_rounds:
        Rounds of linear warm-up.
    scheduler_kwargs:
        Extra arguments of the scheduler (``lr_scheduler_kwargs``).

    Returns
    -------
    list of float
        ``num_rounds`` positive rates, index 0 for the first round.

    Raises
    ------
    ValueError
        For an unknown schedule, one that does not follow the step count,
        scheduler options it does not take, a round it would give a rate that
        is not positive (naming the round), a non-positive rate, or a round
        count below 1 or above :data:`MAX_ROUNDS`.
    """
    import torch
    from transformers import SchedulerType
    from transformers.optimization import get_scheduler

    if not (learning_rate > 0 and math.isfinite(learning_rate)):
        raise ValueError(f"learning_rate must be a positive number, got {learning_rate}")
    if not 1 <= num_rounds <= MAX_ROUNDS:
        raise ValueError(f"num_rounds must be in [1, {MAX_ROUNDS}], got {num_rounds}")
    names = [s.value for s in SchedulerType if s.value not in _UNSCHEDULABLE]
    name = getattr(schedule, "value", schedule)
    if name not in names:
        raise ValueError(
            f"lr_scheduler_type {name!r} cannot schedule the learning rate over rounds; "
            f"choose one of {names}"
        )
    options = dict(scheduler_kwargs or {})
    rules = SCHEDULER_OPTIONS.get(name, {})
    for option, value in options.items():
        if option in rules:
            rules[option].check(f"lr_scheduler_kwargs[{option!r}] of {name!r}", value)
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=learning_rate)
    try:
        scheduler = get_scheduler(
            name,
            dummy,
            num_warmup_steps=int(warmup_rounds),
            num_training_steps=num_rounds,
            scheduler_specific_kwargs=options,
        )
        factors = getattr(scheduler, "lr_lambdas", None)
        if factors is not None and len(factors) == 1:  # one closed form: no stepping
            rates = [learning_rate * float(factors[0](r)) for r in range(num_rounds)]
        else:
            rates = []
            for _ in range(num_rounds):
                rates.append(float(dummy.param_groups[0]["lr"]))
                dummy.step()
                scheduler.step()
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as err:
        raise ValueError(
            f"lr_scheduler_type {name!r} refuses lr_scheduler_kwargs={options}: "
            f"{' '.join(str(err).split())}"
        ) from None
    if rates[0] <= 0:  # a warm-up starting at 0: start at its first positive rate
        positive = next((r for r in rates if r > 0), None)
        rates[0] = positive if positive is not None else learning_rate
    bad = next((r for r, rate in enumerate(rates) if not (rate > 0 and math.isfinite(rate))), None)
    if bad is not None:
        raise ValueError(
            f"lr_scheduler_type {name!r} with lr_scheduler_kwargs={options} gives round "
            f"{bad + 1} of {num_rounds} the learning rate {rates[bad]:g}: a round needs a positive "
            "rate; change lr_scheduler_kwargs (e.g. num_cycles) or lr_scheduler_type"
        )
    return rates
