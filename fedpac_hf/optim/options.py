"""What every client optimizer accepts: one table of validators, one check.

Options reach an optimizer from YAML, the command line (JSON in
``client_optimizer_kwargs``), an :class:`~fedpac_hf.federated.algorithms.Algorithm`,
the Flower run config or a direct constructor call. Each door calls
:func:`check_options` with the same table, so a value out of range (Muon's
``momentum: 2.0``, SOAP's ``betas: [0.9]``) is refused before training, in the
same words, naming the option, instead of being accepted or failing inside
torch. The table covers every keyword each optimizer's constructor takes
(``tests/test_optim_options.py`` checks that), so a new option cannot pass
unchecked. Checks that involve several options at once stay with the
optimizer (SOAP's Theta form: :func:`~fedpac_hf.optim._soap_state.check_theta_options`).

The rule builders (:func:`number`, :func:`whole`, :func:`flag`, :func:`one_of`,
:func:`numbers`, :func:`optional`) are also used for the model and LoRA
settings of ``fedpac-hf train`` (``fedpac_hf.run.config``).
"""

from __future__ import annotations

import difflib
import math
import numbers as _numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CLASS_NAMES",
    "OPTIONS",
    "Rule",
    "check_options",
    "count_or_fraction",
    "flag",
    "given_options",
    "number",
    "numbers",
    "one_of",
    "optional",
    "whole",
]


@dataclass(frozen=True)
class Rule:
    """What one setting accepts: a test and the words that describe it."""

    accepts: str
    test: Callable[[Any], bool]
    convert: Callable[[Any], Any] | None = None

    def check(self, setting: str, value: Any) -> None:
        """Raise ``ValueError`` naming ``setting`` unless ``value`` passes."""
        try:
            ok = bool(self.test(value))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{setting} must be {self.accepts}, got {value!r}")

    def read(self, setting: str, value: Any) -> Any:
        """``value`` checked and in its type (a whole number written ``3.0`` becomes ``3``)."""
        self.check(setting, value)
        return value if self.convert is None or value is None else self.convert(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, _numbers.Real) and not isinstance(value, bool)


def number(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Rule:
    """A finite number in ``[low, high]`` (an end is open when ``*_open``; ``None``: no end)."""
    if low is None and high is None:
        words = "a finite number"
    elif high is None:
        words = f"a number {'>' if low_open else '>='} {low:g}"
    elif low is None:
        words = f"a number {'<' if high_open else '<='} {high:g}"
    else:
        words = (
            f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        )

    def test(value: Any) -> bool:
        if not _is_number(value) or not math.isfinite(value):
            return False
        if low is not None and (value <= low if low_open else value < low):
            return False
        return high is None or (value < high if high_open else value <= high)

    return Rule(words, test)


def whole(low: int = 1) -> Rule:
    """A whole number ``>= low`` (``3.0`` counts, ``2.5`` and ``True`` do not)."""
    return Rule(
        f"a whole number >= {low}",
        lambda v: _is_number(v) and math.isfinite(v) and float(v).is_integer() and v >= low,
        int,
    )


def count_or_fraction(unit: str) -> Rule:
    """A fraction in ``(0, 1)`` or a whole number ``>= 1`` of ``unit`` (clients, rounds)."""
    fraction = number(0.0, 1.0, low_open=True, high_open=True)
    return Rule(
        f"a fraction in (0, 1) or a whole number of {unit} >= 1",
        lambda v: fraction.test(v) or whole(1).test(v),
    )


def flag() -> Rule:
    """``True`` or ``False``."""
    return Rule("true or false", lambda v: isinstance(v, bool))


def one_of(*choices: Any) -> Rule:
    """One of ``choices``."""
    return Rule(f"one of {list(choices)}", lambda v: v in choices)


def numbers(count: int, each: Rule) -> Rule:
    """A list of ``count`` values, each passing ``each``."""

    def test(value: Any) -> bool:
        return (
            isinstance(value, (list, tuple))
            and len(value) == count
            and all(each.test(v) for v in value)
        )

    return Rule(f"a list of {count} values, each {each.accepts}", test)


def optional(rule: Rule) -> Rule:
    """``None`` or what ``rule`` accepts."""
    return Rule(f"{rule.accepts} or null", lambda v: v is None or rule.test(v), rule.convert)


_NON_NEGATIVE = number(0.0)  # a learning rate, a weight decay, an epsilon
_BETA = number(0.0, 1.0, high_open=True)
_BETAS = numbers(2, _BETA)
_TORCH_FLAGS = {
    "maximize": flag(),
    "foreach": optional(flag()),
    "differentiable": flag(),
    "fused": optional(flag()),
}

#: optimizer name -> option -> the rule its value must pass (every constructor keyword).
OPTIONS: dict[str, dict[str, Rule]] = {
    "sgd": {
        "lr": _NON_NEGATIVE,
        "weight_decay": _NON_NEGATIVE,
        "momentum": _BETA,
        "dampening": number(0.0, 1.0),
        "nesterov": flag(),
        **_TORCH_FLAGS,
    },
    "adamw": {
        "lr": _NON_NEGATIVE,
        "weight_decay": _NON_NEGATIVE,
        "betas": _BETAS,
        "eps": _NON_NEGATIVE,
        "amsgrad": flag(),
        "capturable": flag(),
        **_TORCH_FLAGS,
    },
    "soap": {
        "lr": _NON_NEGATIVE,
        "weight_decay": _NON_NEGATIVE,
        "betas": _BETAS,
        "shampoo_beta": optional(_BETA),
        "eps": _NON_NEGATIVE,
        "precondition_frequency": whole(1),
        "max_precond_dim": whole(1),
        "merge_dims": flag(),
        "precondition_1d": flag(),
        "correct_bias": flag(),
        "theta_max_dim": optional(whole(1)),
        "theta_sketch_dim": whole(0),
        "theta_diagonal": flag(),
        "theta_compact": one_of("sketch", "basis"),
        "theta_steered": optional(whole(0)),
        "first_step_updates": flag(),
        "rotation_precision": one_of(None, "highest", "high"),
    },
    "sophia": {
        "lr": _NON_NEGATIVE,
        "weight_decay": _NON_NEGATIVE,
        "betas": _BETAS,
        "rho": number(0.0, low_open=True),
        "eps": number(0.0, low_open=True),
        "hessian_update_interval": whole(1),
        "bias_correction": flag(),
    },
    "muon": {
        "lr": _NON_NEGATIVE,
        "weight_decay": _NON_NEGATIVE,
        "momentum": _BETA,
        "nesterov": flag(),
        "ns_coefficients": numbers(3, number()),
        "eps": _NON_NEGATIVE,
        "ns_steps": whole(1),
        "adjust_lr_fn": one_of(None, "original", "match_rms_adamw"),
        "adamw_lr": optional(_NON_NEGATIVE),
        "adamw_betas": _BETAS,
        "adamw_eps": _NON_NEGATIVE,
        "ns_dtype": one_of("auto", "bfloat16", "float32"),
    },
}


#: how the optimizers name themselves in a direct constructor call's errors
CLASS_NAMES = {"sgd": "SGD", "adamw": "AdamW", "soap": "SOAP", "sophia": "Sophia", "muon": "Muon"}


def given_options(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """A constructor's options from its ``locals()`` (``self``, ``params`` left out)."""
    return {k: v for k, v in arguments.items() if k not in ("self", "params", "__class__")}


def check_options(
    optimizer: str, options: Mapping[str, Any], *, setting: str | None = "client_optimizer_kwargs"
) -> None:
    """Refuse an option ``optimizer`` does not take, or a value its rule refuses.

    Parameters
    ----------
    optimizer:
        A name of :data:`OPTIONS` (case-insensitive).
    options:
        Option name -> value, as the optimizer's constructor would get them.
    setting:
        The setting that holds them, for the message (``client_optimizer_kwargs``
        for ``fedpac-hf train`` and ``FedPACArguments``, ``optimizer_kwargs``
        for an ``Algorithm``); ``None`` for a direct constructor call, whose
        errors start with the class name (``"SOAP: betas must be ..."``).

    Raises
    ------
    ValueError
        Naming the optimizer, the option and what it accepts (a misspelt
        option gets the closest valid name).
    """
    key = optimizer.lower() if isinstance(optimizer, str) else None
    if key not in OPTIONS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid names: {sorted(OPTIONS)}")
    if not isinstance(options, Mapping):
        raise ValueError(f"{setting or 'options'} must map option names to values, got {options!r}")
    rules = OPTIONS[key]
    for name, value in options.items():
        where = (
            f"{CLASS_NAMES[key]}: {name}"
            if setting is None
            else (f"{setting}[{name!r}] of optimizer {key!r}")
        )
        if name not in rules:
            close = difflib.get_close_matches(str(name), list(rules), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(
                f"{where} is not an option of {CLASS_NAMES[key]} "
                f"({hint}its options: {', '.join(sorted(rules))})"
            )
        rules[name].check(where, value)
