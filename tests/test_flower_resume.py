"""A Flower run resumes from its checkpoints like an in-process run, through the same path."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")

import torch  # noqa: E402

from fedpac_hf.flower import FlowerServerRun, run_fedpac_simulation  # noqa: E402
from fedpac_hf.flower.config import arguments_from_run_config, flower_setting  # noqa: E402
from fedpac_hf.rundir.checkpoint import latest_checkpoint, load_federated_checkpoint  # noqa: E402
from fedpac_hf.rundir.environment import read_starts  # noqa: E402
from fedpac_hf.rundir.output_dir import claim_output_dir  # noqa: E402

from .trainer_fixtures import (  # noqa: E402
    BACKEND,
    build_model,
    build_trainer,
    flower_args,
    tiny_vit,
)


class ServerStoppedError(Exception):
    """The server process going away in the middle of a round."""


def stop_in_round(number: int):
    """An ``on_round_end`` callback that stops the server once round ``number`` is aggregated."""

    def callback(round_number: int, state, metrics) -> None:
        if round_number == number:
            raise ServerStoppedError(f"server stopped in round {round_number}")

    return callback


def saving_args(output_dir, **overrides):
    """The simulation tests' arguments, 3 rounds, a checkpoint after every round."""
    settings = {"num_rounds": 3, "save_strategy": "steps", "save_steps": 1, **overrides}
    return flower_args(output_dir, **settings)


def simulate(args, **server_kwargs):
    return run_fedpac_simulation(
        build_trainer,
        args,
        build_model=build_model,
        num_supernodes=3,
        backend_config=BACKEND,
        **server_kwargs,
    )


@pytest.mark.slow  # three Flower simulations (~40 s), the default suite's longest test
def test_a_simulation_stopped_in_round_two_resumes_to_the_uninterrupted_parameters(tmp_path):
    full = simulate(saving_args(tmp_path / "full"))

    stopped = tmp_path / "stopped"
    with pytest.raises(ServerStoppedError):
        simulate(saving_args(stopped), on_round_end=stop_in_round(2))
    # round 2 was aggregated but never saved: the run's last state is round 1's
    assert latest_checkpoint(stopped).name == "checkpoint-round-1"
    (stopped / "metrics.jsonl").write_text(
        (stopped / "metrics.jsonl").read_text() + json.dumps({"round": 2.0}) + "\n"
    )  # a row the dead server logged after its last checkpoint

    resumed = simulate(saving_args(stopped, resume_from_checkpoint="true"))

    assert [h["round"] for h in resumed.history] == [1.0, 2.0, 3.0]
    assert resumed.server_state.round == full.server_state.round == 3
    for part in ("params", "curvature", "direction"):
        mine, reference = getattr(resumed.server_state, part), getattr(full.server_state, part)
        assert set(mine) == set(reference), part
        for name in reference:
            # same clients (seed, round), same seeds, same schedule: bit for bit
            assert torch.equal(mine[name], reference[name]), (part, name)
    for key in ("train_loss", "drift", "learning_rate"):
        assert resumed.history[-1][key] == full.history[-1][key], key
    rows = [json.loads(r) for r in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1.0, 2.0, 3.0]  # the dead server's row 2 was replaced
    assert rows[1]["train_loss"] == full.history[1]["train_loss"]
    assert [s["start_round"] for s in read_starts(stopped)] == [0, 1]  # the resume's start too
    _, meta = load_federated_checkpoint(stopped / "checkpoint-round-3")
    assert [h["round"] for h in meta["history"]] == [1.0, 2.0, 3.0]


def finished_run(tmp_path, rounds: int = 1):
    """A finished run's directory with its last checkpoint, made without Flower's engine."""
    args = saving_args(tmp_path / "run", num_rounds=rounds)
    run = FlowerServerRun(args, tiny_vit())
    run.engine.history.extend({"round": float(r)} for r in range(1, rounds + 1))
    run.engine.state.round = rounds
    run.save_checkpoint()
    return args


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"algorithm": "local_soap"}, "algorithm differs"),
        ({"dirichlet_alpha": 0.3}, "dirichlet_alpha: checkpoint has 0.5, this run has 0.3"),
        ({"num_clients": 4}, "num_clients differs"),
        ({"seed": 8}, "seed differs"),
    ],
)
def test_resuming_another_run_is_refused_naming_the_setting(tmp_path, change, named):
    args = finished_run(tmp_path)
    other = saving_args(args.output_dir, num_rounds=2, resume_from_checkpoint="true", **change)
    run = FlowerServerRun(other, tiny_vit())
    with pytest.raises(ValueError, match="cannot resume from") as info:
        run.resume(other.resume_from_checkpoint)
    assert named in str(info.value)
    assert run.engine.state.round == 0  # nothing was taken from the refused checkpoint


def test_resuming_with_another_model_is_refused_naming_the_parameter(tmp_path):
    args = finished_run(tmp_path)
    model = tiny_vit()
    model.classifier = torch.nn.Linear(32, 3)  # a head for 3 labels instead of the run's
    run = FlowerServerRun(saving_args(args.output_dir, resume_from_checkpoint="true"), model)
    with pytest.raises(ValueError, match="param_shapes differs") as info:
        run.resume(True)
    assert "parameter 'classifier.bias' has shape" in str(info.value)


def test_resume_finds_the_latest_checkpoint_and_refuses_what_it_cannot_continue(tmp_path):
    args = finished_run(tmp_path, rounds=2)
    longer = saving_args(args.output_dir, num_rounds=3, resume_from_checkpoint="true")
    run = FlowerServerRun(longer, tiny_vit())
    assert run.resume(True).name == "checkpoint-round-2"
    assert run.engine.state.round == 2 and len(run.engine.history) == 2
    assert run.engine.num_rounds == 3  # one round left to run

    with pytest.raises(FileNotFoundError, match="holds no checkpoint-round-"):
        FlowerServerRun(saving_args(tmp_path / "empty"), tiny_vit()).resume(True)
    with pytest.raises(ValueError, match="past num_rounds=1; raise num_rounds"):
        FlowerServerRun(saving_args(args.output_dir, num_rounds=1), tiny_vit()).resume(True)
    # a fresh run into the directory is refused unless it resumes or overwrites
    with pytest.raises(ValueError, match="resume_from_checkpoint=true to continue it"):
        claim_output_dir(args.output_dir)


def test_the_run_config_reads_resume_and_the_flower_timeouts():
    args = arguments_from_run_config(
        {"resume-from-checkpoint": True, "node-wait-timeout": 10.0, "round-timeout": 60}
    )
    assert args.resume_from_checkpoint == "true"
    assert (
        arguments_from_run_config({"resume-from-checkpoint": False}).resume_from_checkpoint is None
    )
    path = arguments_from_run_config({"resume-from-checkpoint": "out/checkpoint-round-2"})
    assert path.resume_from_checkpoint == "out/checkpoint-round-2"
    assert flower_setting({"node-wait-timeout": 10}, "node-wait-timeout") == 10.0
    assert flower_setting({}, "round-timeout") == 3600.0
    with pytest.raises(ValueError, match="'round-timeout' must be a positive number"):
        flower_setting({"round-timeout": -1}, "round-timeout")
