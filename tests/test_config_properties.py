"""Property: every config either runs or fails with our own one-line message.

Random ``FedPACArguments`` (valid and invalid values mixed) train a tiny ViT
for one round; random ``fedpac-hf train`` overrides are parsed. A config may
be refused with ``ValueError``/``TypeError`` (bad input), or a round may stop
with ``RoundError`` (e.g. a learning rate so large every client diverges);
any other exception, or one raised from inside torch/transformers, fails.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpac_hf import FedPACArguments, FedPACTrainer
from fedpac_hf.federated import RoundError, list_algorithms
from fedpac_hf.run import parse_run_config

from .trainer_fixtures import image_data, tiny_vit

DATA = image_data(n=48)

FIELDS = {
    "algorithm": st.sampled_from([*list_algorithms(), "fedprox", "FedAvg", ""]),
    "client_optimizer": st.sampled_from([None, "sgd", "adamw", "soap", "muon", "adam", "lbfgs"]),
    "beta": st.one_of(st.none(), st.floats(-0.5, 1.5, allow_nan=False), st.just(float("nan"))),
    "num_clients": st.sampled_from([2, 3, 4, 1, 0, -1]),
    "clients_per_round": st.one_of(st.integers(-1, 8), st.floats(-0.5, 3.0, allow_nan=False)),
    "min_clients_per_round": st.sampled_from([1, 2, 3, 0]),
    "local_steps": st.sampled_from([1, 2, 0, -1]),
    "learning_rate": st.sampled_from([-1e-3, 0.0, 1e-3, 1e-1, 1e6, float("inf")]),
    "server_learning_rate": st.sampled_from([-1.0, 0.0, 0.5, 1.0, 1e30]),
    "per_device_train_batch_size": st.sampled_from([8, 4, 16, 0]),
    "partitioner": st.sampled_from(["iid", "dirichlet", "pathological", "quantity_skew", "bogus"]),
    "dirichlet_alpha": st.sampled_from([-1.0, 0.0, 0.05, 1.0, float("nan")]),
    "classes_per_client": st.integers(-1, 5),
    "partition_label_column": st.sampled_from(["label", "labels", "pixel_values"]),
    "aggregation_weighting": st.sampled_from(["uniform", "num_examples", "by_size"]),
    "max_grad_norm": st.sampled_from([0.0, 1.0, -1.0]),
    "client_optimizer_kwargs": st.sampled_from(
        [None, {}, {"eps": 1e-8}, {"momentum": 2}, {"no_such_option": 1}, "{not json"]
    ),
}


# In range but extreme: these configs pass validation, so they exercise the rounds
# themselves (a diverging client is dropped, a round without survivors is a RoundError).
IN_RANGE = {
    "algorithm": st.sampled_from(list_algorithms()),
    "client_optimizer": st.sampled_from([None, "sgd", "adamw", "soap", "muon", "sophia"]),
    "beta": st.one_of(st.none(), st.sampled_from([0.0, 0.5, 0.999])),
    "num_clients": st.sampled_from([2, 3, 4]),
    "clients_per_round": st.sampled_from([1, 2, 0.5, 1.0]),
    "local_steps": st.sampled_from([1, 2]),
    "learning_rate": st.sampled_from([1e-4, 1e-1, 1e3, 1e30]),
    "server_learning_rate": st.sampled_from([0.5, 1.0, 1e30]),
    "partitioner": st.sampled_from(["iid", "dirichlet", "pathological", "quantity_skew"]),
    "dirichlet_alpha": st.sampled_from([0.01, 1.0, 100.0]),
    "classes_per_client": st.sampled_from([1, 4]),
    "aggregation_weighting": st.sampled_from(["uniform", "num_examples"]),
    "max_grad_norm": st.sampled_from([0.0, 1.0]),
    "gradient_accumulation_steps": st.sampled_from([1, 2]),
}


def _raised_inside_dependencies(error: BaseException) -> str | None:
    """The torch/transformers/datasets frame an exception came from, if it did."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return None
    last = frames[-1].filename.replace("\\", "/")
    for package in ("/torch/", "/transformers/", "/datasets/", "/accelerate/"):
        if package in last and "/fedpac_hf/" not in last:
            return f"{last}:{frames[-1].lineno}"
    return None


def _check(error: BaseException) -> None:
    assert isinstance(error, (ValueError, TypeError, RoundError)), repr(error)
    assert str(error).strip(), f"{type(error).__name__} without a message"
    assert _raised_inside_dependencies(error) is None, (
        f"{type(error).__name__}: {error} comes from inside a dependency "
        f"({_raised_inside_dependencies(error)})"
    )


def _train_one_round(output_dir: Path, fields: dict) -> None:
    kwargs = {
        "output_dir": str(output_dir),
        "num_rounds": 1,
        "num_clients": 2,
        "clients_per_round": 2,
        "local_steps": 1,
        "per_device_train_batch_size": 8,
        "report_to": [],
        "disable_tqdm": True,
        **fields,
    }
    try:
        args = FedPACArguments(**kwargs)
        trainer = FedPACTrainer(model=tiny_vit(), args=args, train_dataset=DATA["train"])
        trainer.train()
    except Exception as error:  # noqa: BLE001 - the property is about which errors come out
        _check(error)


PROPERTY = settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@PROPERTY
@given(st.fixed_dictionaries({}, optional=FIELDS))
def test_every_configuration_runs_or_is_refused_with_a_message(tmp_path: Path, fields):
    _train_one_round(tmp_path / "run", fields)


@PROPERTY
@given(st.fixed_dictionaries({}, optional=IN_RANGE))
def test_every_in_range_configuration_runs_or_stops_with_a_round_error(tmp_path: Path, fields):
    _train_one_round(tmp_path / "run", fields)


OVERRIDES = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "num_rounds",
                "local_steps",
                "beta",
                "algorithm",
                "clients_per_round",
                "learning_rate",
                "num_clinets",
                "lora_r",
                "task",
                "hidden_size",
                "client_optimizer",
                "align",
            ]
        ),
        st.sampled_from(["0", "1", "-3", "0.5", "2.5", "abc", "fedpac_soap", "true", "nan", ""]),
    ),
    max_size=4,
)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(OVERRIDES)
def test_every_command_line_override_parses_or_is_refused_with_a_message(overrides):
    argv = [item for key, value in overrides for item in (f"--{key}", value)]
    try:
        parse_run_config({"output_dir": "unused", "report_to": "none"}, argv)
    except Exception as error:  # noqa: BLE001 - the property is about which errors come out
        _check(error)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--num_rounds", "abc"], "argument --num_rounds/--num-rounds: invalid int value: 'abc'"),
        (["--num_clinets", "3"], "did you mean 'num_clients'"),
        (["--beta", "2"], 'beta must be a number in \\[0, 1\\) or "auto"'),
    ],
)
def test_override_errors_are_value_errors_not_exits(argv, expected):
    with pytest.raises(ValueError, match=expected):
        parse_run_config({"output_dir": "unused"}, argv)
