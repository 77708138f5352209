"""Reading a run config: :func:`parse_run_config` and the errors of the settings stage.

:func:`parse_run_config` reads :class:`~fedpac_hf.run.config.ModelDataArguments`
and :class:`~fedpac_hf.config.arguments.FedPACArguments` from a YAML file (or a
dict) with command-line overrides on top, typing YAML values like command-line
values and naming the closest valid field for a misspelt key;
:func:`changed_training_arguments` is what a run directory's ``config.yaml``
writes back; :func:`settings_stage` turns any failure before round 1 into one
error that names the stage.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fedpac_hf.config.arguments import REPLACED_SETTINGS, FedPACArguments

from .config import ModelDataArguments

__all__ = [
    "changed_training_arguments",
    "config_parser",
    "parse_run_config",
    "settings_stage",
]


def config_parser():
    """The ``HfArgumentParser`` of a run config; raises ``ValueError`` instead of exiting.

    Returns
    -------
    transformers.HfArgumentParser
        A parser over (:class:`ModelDataArguments`, :class:`FedPACArguments`)
        whose errors are ``ValueError`` (callers print one line).
    """
    from transformers import HfArgumentParser

    class _Parser(HfArgumentParser):
        def error(self, message: str):  # type: ignore[override]
            raise ValueError(message)

    return _Parser((ModelDataArguments, FedPACArguments))


def _valid_fields() -> list[str]:
    return [
        f.name
        for cls in (ModelDataArguments, FedPACArguments)
        for f in dataclasses.fields(cls)
        if f.init
    ]


def _unknown_key_error(key: str, where: str) -> ValueError:
    if key in REPLACED_SETTINGS:
        return ValueError(f"setting {key!r} in {where} was replaced: use {REPLACED_SETTINGS[key]}")
    close = difflib.get_close_matches(key, _valid_fields(), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(
        f"unknown setting {key!r} in {where}{hint} (settings are ModelDataArguments and "
        "FedPACArguments fields; `fedpac-hf train --help` lists them)"
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    """The settings of a YAML config file; every way it can be unreadable names the file."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file: a config is YAML text") from None
    except OSError as err:
        raise ValueError(f"{path} cannot be read ({err.strerror})") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{where}: not valid YAML ({problem})") from None
    if loaded is None:
        raise ValueError(
            f"{path} holds no settings; a config is a YAML mapping such as 'num_rounds: 10' "
            "(see configs/ for complete examples)"
        )
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} must hold a mapping of settings, got {type(loaded).__name__}")
    return loaded


def parse_run_config(
    config: str | os.PathLike | dict[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> tuple[ModelDataArguments, FedPACArguments]:
    """Read run settings from a YAML file (or dict) with ``--field value`` overrides on top.

    YAML values are typed like command-line values (``learning_rate: 1e-3``
    is a float even though YAML reads it as a string); a key or option that
    is no field fails with a one-line ``ValueError`` naming the closest valid
    field.

    Parameters
    ----------
    config : str, os.PathLike or dict, optional
        Path of a YAML file of settings, or the settings themselves.
    overrides : sequence of str
        Command-line style overrides, e.g. ``["--num_rounds", "2"]``.

    Returns
    -------
    (ModelDataArguments, FedPACArguments)
        The parsed settings.
    """

    where = "the config"
    values: dict[str, Any] = {}
    if isinstance(config, dict):
        values = dict(config)
    elif config is not None:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        where = str(path)
        values = _read_yaml(path)
    valid = set(_valid_fields())
    for key in values:
        if key not in valid:
            raise _unknown_key_error(str(key), where)
    parser = config_parser()
    # argparse types string defaults like command-line values and keeps the rest as they are.
    parser.set_defaults(**values)
    if "public_curvature" not in values and _public_data(values, overrides):
        # the public data is the switch on the CLI, set before the arguments check
        # themselves (client-level DP then needs no Theta clip norm)
        parser.set_defaults(public_curvature=True)
    model_args, training_args, remaining = parser.parse_args_into_dataclasses(
        args=list(overrides), return_remaining_strings=True
    )
    if remaining:
        first = next((item for item in remaining if item.startswith("-")), remaining[0])
        raise _unknown_key_error(first.lstrip("-").split("=")[0], "the command-line options")
    return model_args, training_args


def _public_data(values: dict[str, Any], overrides: Sequence[str]) -> bool:
    """Whether the YAML values or the overrides name a ``public_curvature_dataset``."""
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--public_curvature_dataset")
    given = probe.parse_known_args(list(overrides))[0].public_curvature_dataset
    return bool(values.get("public_curvature_dataset") if given is None else given)


def changed_training_arguments(args: FedPACArguments) -> dict[str, Any]:
    """The training arguments that differ from their defaults, as plain values.

    Parameters
    ----------
    args : FedPACArguments
        The run's arguments.

    Returns
    -------
    dict
        Field name -> value for every field whose value is not the default.
    """
    default = FedPACArguments(output_dir=args.output_dir).to_dict()
    current = args.to_dict()
    changed = {key: value for key, value in current.items() if default.get(key) != value}
    changed["output_dir"] = args.output_dir
    return changed


@contextlib.contextmanager
def settings_stage(stage: str) -> Iterator[None]:
    """Turn any error of ``stage`` (reading the settings, building what they describe) into one.

    Before the first round every failure is caused by the settings or the data
    (a model config a library refuses with ``ZeroDivisionError``, a logging
    integration that is not installed, ...): it becomes a ``ValueError`` naming
    the stage, which ``fedpac-hf`` prints in one line with exit status 2. The
    original stays chained (``__cause__``) for the Python API.
    """
    try:
        yield
    except (ValueError, OSError, ImportError, KeyboardInterrupt):
        raise
    except Exception as error:  # noqa: BLE001 - every setup failure is the settings'
        message = " ".join(str(error).split()) or "(no message)"
        raise ValueError(f"{stage}: {type(error).__name__}: {message}") from error
