"""The table of what every client optimizer accepts (``fedpac_hf.optim.options``).

Every door that hands options to an optimizer (a direct constructor call,
``create_optimizer``, an ``Algorithm``, ``FedPACArguments`` and the command
line) refuses the same bad value naming the option, before training.
"""

from __future__ import annotations

import inspect
import json
import re

import pytest
import torch

from fedpac_hf.federated.algorithms import Algorithm
from fedpac_hf.optim import OPTIMIZERS, create_optimizer
from fedpac_hf.optim.options import CLASS_NAMES, OPTIONS, check_options


def constructor_keywords(cls: type) -> set[str]:
    """The keywords ``cls`` takes (its torch parent's when it forwards ``**kwargs``)."""
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(klass.__init__).parameters.values()
        if any(p.kind is p.VAR_KEYWORD for p in parameters):
            continue
        return {p.name for p in parameters if p.name not in ("self", "params")}
    return set()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_the_table_covers_every_option_of_every_optimizer(name):
    # a new constructor keyword without a rule would pass unchecked
    assert set(OPTIONS[name]) == constructor_keywords(OPTIMIZERS[name])


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_default_passes_its_rule(name):
    for option, parameter in inspect.signature(OPTIMIZERS[name].__init__).parameters.items():
        if option in OPTIONS[name] and parameter.default is not inspect.Parameter.empty:
            OPTIONS[name][option].check(option, parameter.default)


# (optimizer, option, bad value, what the message says it accepts)
BAD = [
    ("muon", "momentum", 2.0, "in [0, 1)"),
    ("muon", "ns_steps", 2.5, "whole number >= 1"),
    ("muon", "adjust_lr_fn", "rms", "one of"),
    ("soap", "betas", [0.9], "list of 2 values"),
    ("soap", "precondition_frequency", 0, "whole number >= 1"),
    ("soap", "theta_compact", "sketchy", "one of"),
    ("sophia", "rho", 0.0, "> 0"),
    ("sgd", "momentum", 1.5, "in [0, 1)"),
    ("adamw", "eps", float("nan"), ">= 0"),
    ("adamw", "amsgrad", "yes", "true or false"),
]


def _weight() -> list[tuple[str, torch.nn.Parameter]]:
    return [("layer.weight", torch.nn.Parameter(torch.zeros(4, 4)))]


@pytest.mark.parametrize(("optimizer", "option", "value", "accepts"), BAD)
def test_every_door_refuses_the_same_value_naming_the_option(optimizer, option, value, accepts):
    accepts = re.escape(accepts)
    with pytest.raises(ValueError, match=rf"^{CLASS_NAMES[optimizer]}: {option} .*{accepts}"):
        OPTIMIZERS[optimizer](_weight(), **{option: value})
    with pytest.raises(ValueError, match=rf"optimizer_kwargs\['{option}'\].*{accepts}"):
        create_optimizer(optimizer, _weight(), lr=1e-3, **{option: value})
    with pytest.raises(ValueError, match=rf"optimizer_kwargs\['{option}'\].*{accepts}.*'mine'"):
        Algorithm("mine", optimizer, optimizer_kwargs={option: value})


def test_a_misspelt_option_gets_the_closest_name():
    with pytest.raises(ValueError, match="did you mean 'precondition_frequency'"):
        check_options("soap", {"precondition_freq": 10})
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        check_options("adam", {})


def test_whole_numbers_written_as_floats_pass_and_booleans_are_not_numbers():
    check_options("soap", {"precondition_frequency": 10.0, "betas": (0.9, 0.95)})
    with pytest.raises(ValueError, match="whole number"):
        check_options("soap", {"precondition_frequency": True})


def test_the_cli_refuses_an_out_of_range_option_in_one_line_before_writing(tmp_path, capsys):
    from fedpac_hf.cli import main
    from tests.test_cli_train import TINY_VIT, write_yaml

    out = tmp_path / "run"
    settings = {
        **TINY_VIT,
        "algorithm": "fedpac_muon",
        "client_optimizer_kwargs": json.dumps({"momentum": 2.0}),
        "output_dir": str(out),
    }
    with pytest.raises(SystemExit) as exit_info:
        main(["train", write_yaml(tmp_path / "c.yaml", settings)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "client_optimizer_kwargs['momentum'] of optimizer 'muon'" in err and "[0, 1)" in err
    assert not out.exists()
