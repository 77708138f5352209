"""The preflight (#27): setting and data errors stop a run before round 1 and before any
file is written; a run with the preflight trains exactly as one without; an error that
comes back every time a client is sampled stops the run instead of dropping it forever."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedpac_hf.federated import RoundError, simulate
from fedpac_hf.federated.preflight import PreflightError

from .trainer_fixtures import image_data, tiny_vit, vit_args


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def loaders(num_clients: int = 3) -> list[torch.utils.data.DataLoader]:
    """Shuffling loaders without their own generator: they draw from torch's global RNG."""
    g = torch.Generator().manual_seed(1)
    out = []
    for c in range(num_clients):
        x = torch.randn(24, 6, generator=g)
        y = torch.full((24,), c % 3)
        marker = torch.full((24,), float(c))
        data = torch.utils.data.TensorDataset(x, y, marker)
        out.append(torch.utils.data.DataLoader(data, batch_size=8, shuffle=True))
    return out


def ce_loss(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def run(loss_fn=ce_loss, num_rounds: int = 3, **kwargs):
    model = make_model()
    torch.manual_seed(5)  # the loaders shuffle with the global RNG
    history = simulate(
        model, loaders(), "fedpac_soap", num_rounds=num_rounds, clients_per_round=3,
        local_steps=2, loss_fn=loss_fn, lr=0.01, **kwargs,
    )  # fmt: skip
    return model, history


def test_a_run_with_the_preflight_trains_exactly_as_one_without():
    with_model, with_history = run(preflight=True)
    without_model, without_history = run(preflight=False)
    for a, b in zip(with_model.parameters(), without_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [h["train_loss"] for h in with_history] == [h["train_loss"] for h in without_history]


def test_a_loss_that_is_not_finite_at_the_initial_weights_is_a_setting_not_the_rate():
    def nan_loss(model, batch):
        return ce_loss(model, batch) * float("nan")

    with pytest.raises(PreflightError, match="not finite at the initial weights") as info:
        run(nan_loss)
    assert "learning rate plays no part" in str(info.value)
    assert isinstance(info.value, ValueError)  # the CLI's one-line, status-2 errors


def test_an_error_that_comes_back_stops_the_run_and_bad_luck_does_not():
    def broken_client_one(model, batch):
        if float(batch[2][0]) == 1.0:
            raise ValueError("client data: column 'text' holds an empty cell")
        return ce_loss(model, batch)

    with pytest.raises(RoundError, match="round 2: client 1: ValueError: client data") as info:
        run(broken_client_one)
    assert "same error as the last time" in str(info.value)

    def unlucky_client_two(model, batch):  # a non-finite loss: dropped, not a stop
        loss = ce_loss(model, batch)
        return loss * float("inf") if float(batch[2][0]) == 2.0 else loss

    _, history = run(unlucky_client_two)
    assert [h["num_dropped"] for h in history] == [1.0, 1.0, 1.0]


def test_the_trainer_preflight_changes_nothing_and_refuses_labels_outside_the_head(tmp_path):
    from fedpac_hf import FedPACTrainer

    data = image_data()
    params = []
    for flag in (True, False):
        trainer = FedPACTrainer(
            model=tiny_vit(), args=vit_args(tmp_path / str(flag), num_rounds=2, preflight=flag),
            train_dataset=data["train"], eval_dataset=data["test"],
        )  # fmt: skip
        trainer.train()
        assert (trainer.preflight_seconds is not None) == flag
        params.append(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
    assert torch.equal(params[0], params[1])

    num_labels = tiny_vit().config.num_labels
    bad = data["train"].map(lambda row, i: {"label": num_labels if i == 3 else row["label"]},
                            with_indices=True)  # fmt: skip
    out = tmp_path / "bad"
    trainer = FedPACTrainer(model=tiny_vit(), args=vit_args(out), train_dataset=bad)
    with pytest.raises(PreflightError, match=f"holds {num_labels} \\(in 1 rows\\)"):
        trainer.train()
    assert not out.exists()  # nothing was written


def test_the_cli_stops_a_batch_no_client_can_fill_before_writing(tmp_path, capsys):
    from fedpac_hf.cli import main

    from .test_cli_train import TINY_VIT, write_yaml

    out = tmp_path / "run"
    settings = {  # 100 rows per client, batches of 512, the last (only) one dropped
        **TINY_VIT, "per_device_train_batch_size": 512, "dataloader_drop_last": True,
        "output_dir": str(out),
    }  # fmt: skip
    config = write_yaml(tmp_path / "c.yaml", settings)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", config])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "preflight, one local step" in err
    assert "yielded no batch" in err
    assert not out.exists()

    # an optimizer option the optimizer cannot take is refused with the settings
    settings = {**TINY_VIT, "client_optimizer_kwargs": '{"betas": [0.9]}', "output_dir": str(out)}
    with pytest.raises(SystemExit) as exit_info:
        main(["train", write_yaml(tmp_path / "d.yaml", settings)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1
        and "client_optimizer_kwargs['betas'] of optimizer 'soap' must be a list of 2" in err
    )
    assert not out.exists()


def test_a_resume_that_changes_a_training_setting_is_refused_naming_it(tmp_path):
    from fedpac_hf import FedPACTrainer
    from fedpac_hf.rundir.output_dir import previous_run_files

    data = image_data()
    first = FedPACTrainer(
        model=tiny_vit(),
        args=vit_args(tmp_path, num_rounds=3, save_strategy="steps", save_steps=1),
        train_dataset=data["train"],
    )
    first.train()
    checkpoint = str(tmp_path / "run" / "checkpoint-round-2")
    for setting, value in (("local_steps", 7), ("learning_rate", 1e-2), ("clients_per_round", 3)):
        again = FedPACTrainer(
            model=tiny_vit(), args=vit_args(tmp_path, num_rounds=3, **{setting: value}),
            train_dataset=data["train"],
        )  # fmt: skip
        with pytest.raises(ValueError, match=f"training differs \\({setting}: checkpoint has"):
            again.train(resume_from_checkpoint=checkpoint)

    # a metrics file without a row is no run yet: its retry needs no overwrite_output_dir
    empty = tmp_path / "died"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    assert previous_run_files(empty) == []


def test_a_loss_that_runs_away_is_divergence_and_a_nan_evaluation_stops_the_run():
    from fedpac_hf.federated.client import DIVERGENCE_FACTOR

    steps_seen = {}

    def runaway_client_two(model, batch):  # finite, but 1000x its first step by the second
        loss = ce_loss(model, batch)
        if float(batch[2][0]) != 2.0:
            return loss
        key = id(model)
        steps_seen[key] = steps_seen.get(key, 0) + 1
        return loss * (1.0 if steps_seen[key] % 2 else 10 * DIVERGENCE_FACTOR)

    _, history = run(runaway_client_two, preflight=False)
    assert [h["num_dropped"] for h in history] == [1.0, 1.0, 1.0]  # dropped, not a stop

    calls = []

    def breaks_in_round_two(model):
        calls.append(1)
        return {"eval_loss": float("nan") if len(calls) == 3 else 1.0}  # preflight, 1, 2

    with pytest.raises(RoundError, match="round 2: the evaluation of the global model gave "):
        run(eval_fn=breaks_in_round_two)


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("algorithm", ["fedpac_soap", "fedpac_sophia", "fedpac_muon"])
def test_the_server_preflight_changes_nothing_on_the_global_model(tmp_path, algorithm):
    pytest.importorskip("flwr")
    from fedpac_hf.flower import FlowerServerRun

    from .trainer_fixtures import build_evaluator, flower_args

    args = flower_args(tmp_path / "run", algorithm=algorithm)
    model = tiny_vit()
    before, rng = _trainable(model), torch.get_rng_state()
    run = FlowerServerRun(args, model, build_evaluator(args))
    assert run.preflight() >= 0.0
    after = _trainable(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert torch.equal(rng, torch.get_rng_state())
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("evaluate", "words"),
    [
        (lambda m: {"eval_loss": float("nan")}, "central evaluation of the initial model"),
        (lambda m: {}["eval_accuracy"], "KeyError"),
    ],
)
def test_a_server_app_stops_before_writing_when_its_preflight_fails(tmp_path, evaluate, words):
    pytest.importorskip("flwr")
    from fedpac_hf.flower import FlowerServerRun

    from .trainer_fixtures import flower_args

    run = FlowerServerRun(flower_args(tmp_path / "run"), tiny_vit(), evaluate)
    with pytest.raises(PreflightError, match=rf"^server preflight, one evaluation: .*{words}"):
        run.run(grid=None)  # type: ignore[arg-type]  # stops before the grid is used
    assert not (tmp_path / "run").exists()


def _public_trainer(args, size: int = 16):
    """A trainer holding public rows of ``size`` x ``size`` images: the server's runs on them."""
    import datasets
    import numpy as np

    from fedpac_hf.trainer.fedpac_trainer import FedPACTrainer

    rng = np.random.default_rng(3)
    rows = datasets.Dataset.from_dict(
        {"pixel_values": rng.normal(size=(24, 1, size, size)).astype("float32"),
         "label": rng.integers(0, 4, 24)}
    ).with_format("torch")  # fmt: skip
    train = image_data(n=80)["train"]
    return FedPACTrainer(model=tiny_vit(), args=args, train_dataset=train, curvature_dataset=rows)


def test_a_server_app_preflight_runs_its_public_curvature_and_stops_on_bad_public_data(tmp_path):
    pytest.importorskip("flwr")
    from fedpac_hf.flower import FlowerServerRun

    from .trainer_fixtures import flower_args

    args = flower_args(tmp_path / "run", public_curvature=True, public_curvature_clients=2)
    trainer = _public_trainer(flower_args(tmp_path / "public", public_curvature=True))
    rounds = []

    def train_public(plan):
        rounds.append(plan.round_number)
        return trainer.train_public(plan)

    model = tiny_vit()
    before, rng = _trainable(model), torch.get_rng_state()
    assert FlowerServerRun(args, model, train_public=train_public).preflight() >= 0.0
    assert rounds == [1]  # the server's runs for round 1, once
    after = _trainable(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert torch.equal(rng, torch.get_rng_state())

    wrong = _public_trainer(flower_args(tmp_path / "public", public_curvature=True), size=12)
    run = FlowerServerRun(args, tiny_vit(), train_public=wrong.train_public)
    with pytest.raises(
        PreflightError, match=r"^server preflight, the server's runs on the public curvature data"
    ):
        run.run(grid=None)  # type: ignore[arg-type]  # stops before the grid is used
    assert not (tmp_path / "run").exists()
