"""Failing clients, non-finite models, corrupt checkpoints and refused resumes."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from fedpac_hf import FedPACArguments, FedPACCallback, FedPACTrainer
from fedpac_hf.federated import (
    ClientFailure,
    ClientUpdate,
    RoundError,
    ServerState,
    aggregate,
    get_algorithm,
    run_client,
    simulate,
)
from fedpac_hf.rundir.checkpoint import (
    STATE_JSON,
    STATE_TENSORS,
    latest_checkpoint,
    load_federated_checkpoint,
    save_federated_checkpoint,
)

from .test_federated import ce_loss, make_clients, make_model
from .trainer_fixtures import image_data, tiny_vit

ROOT = Path(__file__).resolve().parent.parent


class FlakyImages(torch.utils.data.Dataset):
    """A client's images whose reading fails (a broken disk) while ``broken`` is set."""

    def __init__(self, rows: datasets.Dataset, broken: bool = True) -> None:
        self.rows = rows
        self.broken = broken

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.broken:
            raise OSError(f"cannot read image {index}: input/output error")
        return self.rows[index]


def tiny_args(tmp_path: Path, **overrides) -> FedPACArguments:
    kwargs = dict(
        output_dir=str(tmp_path / "run"),
        algorithm="fedpac_soap",
        num_rounds=2,
        local_steps=2,
        clients_per_round=4,
        learning_rate=3e-3,
        per_device_train_batch_size=8,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return FedPACArguments(**kwargs)


def four_clients(n: int = 128) -> list[datasets.Dataset]:
    train = image_data(n=n)["train"]
    return [train.shard(4, i, contiguous=True) for i in range(4)]


def nan_images(rows: datasets.Dataset) -> datasets.Dataset:
    def poison(batch):
        return {"pixel_values": torch.full_like(batch["pixel_values"], float("nan"))}

    return rows.map(poison, batched=True)


# ------------------------------------------------------------------ clients


def test_run_client_turns_any_exception_into_a_logged_failure(caplog):
    def broken() -> ClientUpdate:
        raise FloatingPointError("SOAP: non-finite gradient in 'weight'")

    with caplog.at_level(logging.WARNING):
        failure = run_client(broken, client_id=7, round_number=3)
    assert failure == ClientFailure(
        7, 3, "FloatingPointError", "SOAP: non-finite gradient in 'weight'"
    )
    assert (
        "round 3: dropping client 7: FloatingPointError: SOAP: non-finite gradient" in caplog.text
    )

    def interrupted() -> ClientUpdate:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # the user's Ctrl-C is not a client failure
        run_client(interrupted, client_id=0, round_number=1)


class RaisingLoader:
    """Batches of one client whose data source fails after the first batch."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        yield self.batches[0]
        raise KeyError("label column missing in shard 3")


def test_simulate_drops_a_raising_and_a_nan_client_and_logs_why(caplog):
    clients = make_clients(4)
    nan = [(torch.full_like(x, float("nan")), y) for x, y in clients[2]]
    loaders = [clients[0], RaisingLoader(clients[1]), nan, clients[3]]
    history = []
    with caplog.at_level(logging.WARNING), pytest.raises(RoundError) as info:
        simulate(
            make_model(), loaders, "fedpac_soap", 2, 4, 3, ce_loss, lr=0.05, max_grad_norm=10.0,
            callback=lambda state, metrics: history.append(metrics),
        )  # fmt: skip
    assert [h["num_clients"] for h in history] == [2.0]
    assert [h["num_dropped"] for h in history] == [2.0]
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in history)
    assert "round 1: dropping client 1: KeyError: 'label column missing in shard 3'" in caplog.text
    assert "round 1: dropping client 2: ClientError: non-finite training loss nan" in caplog.text
    # round 2: the same KeyError again stops the run; the non-finite client is only dropped
    assert "round 2: client 1: KeyError: 'label column missing in shard 3'" in str(info.value)
    assert "client 2" not in str(info.value) and "not bad luck" in str(info.value)

    with pytest.raises(RoundError, match="only 2 of 4 client updates") as info:
        simulate(make_model(), loaders, "fedavg", 1, 4, 2, ce_loss, min_clients_per_round=3)
    assert "client 1: KeyError" in str(info.value) and "client 2: ClientError" in str(info.value)


def test_trainer_drops_a_raising_and_a_nan_client_and_logs_why(tmp_path, caplog):
    clients = four_clients()
    clients[1] = FlakyImages(clients[1])
    clients[2] = nan_images(clients[2])
    trainer = FedPACTrainer(
        model=tiny_vit(),
        args=tiny_args(tmp_path, save_strategy="steps", save_steps=1),
        client_datasets=clients,
    )
    with caplog.at_level(logging.WARNING, logger="fedpac_hf"):
        trainer.train()
    assert [h["num_clients"] for h in trainer.round_history] == [2.0, 2.0]
    assert [h["num_dropped"] for h in trainer.round_history] == [2.0, 2.0]
    assert "round 1: dropping client 1: OSError: cannot read image" in caplog.text
    assert "round 1: dropping client 2: ClientError: non-finite training loss nan" in caplog.text
    assert all(torch.isfinite(p).all() for p in trainer.server_state.params.values())
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-round-2"


def test_a_failed_round_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    clients = [FlakyImages(c, broken=False) for c in four_clients()]

    class BreakAfterFirstRound(FedPACCallback):
        def on_round_end(self, args, state, control, **kwargs):
            for client in clients[1:]:
                client.broken = True
            return control

    trainer = FedPACTrainer(
        model=tiny_vit(),
        args=tiny_args(
            tmp_path, num_rounds=3, save_strategy="steps", save_steps=1, min_clients_per_round=2
        ),
        client_datasets=clients,
        callbacks=[BreakAfterFirstRound()],
    )
    with pytest.raises(RoundError, match="round 2: only 1 of 4 client updates") as info:
        trainer.train()
    assert "min_clients_per_round=2" in str(info.value)
    assert "client 1: OSError: cannot read image" in str(info.value)
    run = tmp_path / "run"
    assert latest_checkpoint(run).name == "checkpoint-round-1"
    assert not list(run.glob(".tmp-*"))
    state, meta = load_federated_checkpoint(run / "checkpoint-round-1")
    assert state.round == 1 and len(meta["history"]) == 1


# ------------------------------------------------------------- global model


def test_a_non_finite_aggregate_is_refused_and_never_saved(tmp_path):
    big = torch.full((2,), 3e38)
    state = ServerState(params={"w": torch.zeros(2)})
    updates = [ClientUpdate(i, {"w": big}, {}, 1, 1) for i in range(2)]
    fedavg = get_algorithm("fedavg")
    # float64 sums are finite, but the new float32 model overflows with server_lr = 2
    with pytest.raises(RoundError, match="global model has inf/nan entries \\('w'\\)"):
        aggregate(state, updates, fedavg, lr=1.0, local_steps=1, server_lr=2.0)

    good = save_federated_checkpoint(tmp_path / "checkpoint-round-1", state, {})
    bad = ServerState(params={"w": torch.tensor([0.0, float("inf")])}, round=2)
    with pytest.raises(ValueError, match="refusing to save round 2: its global params 'w'"):
        save_federated_checkpoint(tmp_path / "checkpoint-round-1", bad, {})
    with pytest.raises(ValueError, match="refusing to save"):
        save_federated_checkpoint(tmp_path / "checkpoint-round-2", bad, {})
    assert latest_checkpoint(tmp_path) == good
    torch.testing.assert_close(load_federated_checkpoint(good)[0].params["w"], torch.zeros(2))


# ---------------------------------------------------------------- checkpoints


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    state = ServerState(
        params={"w": torch.randn(3, 4)},
        curvature={"w::exp_avg_sq": torch.rand(3, 4)},
        direction={"w": torch.randn(3, 4)},
        round=2,
    )
    return save_federated_checkpoint(tmp_path / "checkpoint-round-2", state, {"run": {}})


def test_a_truncated_safetensors_file_is_named(checkpoint):
    path = checkpoint / STATE_TENSORS
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match=f"{path}.* is corrupt or truncated"):
        load_federated_checkpoint(checkpoint)
    path.write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match=f"{path}.* is corrupt or truncated"):
        load_federated_checkpoint(checkpoint)


def test_a_corrupt_json_file_is_named(checkpoint):
    path = checkpoint / STATE_JSON
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=f"{path}.* is corrupt or truncated"):
        load_federated_checkpoint(checkpoint)
    doc = json.loads(text)
    path.write_text(json.dumps({**doc, "round": "two"}))
    with pytest.raises(ValueError, match=f"{path}.* 'round' is 'two'"):
        load_federated_checkpoint(checkpoint)
    path.write_text(json.dumps({**doc, "format_version": 99}))
    with pytest.raises(ValueError, match="not a fedpac_hf checkpoint of format 1"):
        load_federated_checkpoint(checkpoint)


@pytest.mark.parametrize("name", [STATE_JSON, STATE_TENSORS])
def test_a_missing_file_is_named(checkpoint, name):
    (checkpoint / name).unlink()
    with pytest.raises(FileNotFoundError, match=f"{checkpoint / name} not found"):
        load_federated_checkpoint(checkpoint)


def test_a_kill_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path):
    """SIGKILL inside save_model (the model files half written): the last checkpoint stays."""
    script = f"""
import os, signal, sys, torch
sys.path.insert(0, {str(ROOT)!r})
from fedpac_hf.rundir.checkpoint import save_federated_checkpoint
from fedpac_hf.federated import ServerState

def save_model(directory):
    with open(os.path.join(directory, "model.safetensors"), "wb") as f:
        f.write(b"half a model")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

root = {str(tmp_path)!r}
save_federated_checkpoint(root + "/checkpoint-round-1", ServerState({{"w": torch.ones(2)}}, round=1), {{}})
save_federated_checkpoint(root + "/checkpoint-round-2", ServerState({{"w": torch.ones(2) * 2}}, round=2), {{}}, save_model)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()[-2000:]
    assert list(tmp_path.glob(".tmp-checkpoint-round-*"))  # the half-written save is there
    found = latest_checkpoint(tmp_path)
    assert found == tmp_path / "checkpoint-round-1"
    state, _ = load_federated_checkpoint(found)
    assert state.round == 1 and torch.equal(state.params["w"], torch.ones(2))
    # the next save removes what the killed one left behind
    save_federated_checkpoint(
        tmp_path / "checkpoint-round-2", ServerState({"w": torch.ones(2)}), {}
    )
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_kill_between_the_renames_of_a_replaced_checkpoint_keeps_the_old_copy(tmp_path):
    old = save_federated_checkpoint(
        tmp_path / "checkpoint-round-3", ServerState({"w": torch.ones(1)}), {}
    )
    # the state a kill leaves between `final -> .old-final` and `tmp -> final`
    os.replace(old, tmp_path / ".old-checkpoint-round-3")
    found = latest_checkpoint(tmp_path)
    assert found == tmp_path / ".old-checkpoint-round-3"
    assert load_federated_checkpoint(found)[0].params["w"].item() == 1.0


def test_resume_with_another_model_names_the_parameter(tmp_path):
    clients = four_clients(n=64)
    FedPACTrainer(
        model=tiny_vit(),
        args=tiny_args(tmp_path, num_rounds=1, save_strategy="steps", save_steps=1),
        client_datasets=clients,
    ).train()
    from transformers import ViTConfig, ViTForImageClassification

    other = tiny_vit()
    config = ViTConfig(**{**other.config.to_dict(), "intermediate_size": 48})
    wider = ViTForImageClassification._from_config(config, attn_implementation="eager")
    trainer = FedPACTrainer(model=wider, args=tiny_args(tmp_path), client_datasets=clients)
    with pytest.raises(
        ValueError,
        match=r"param_shapes differs \(parameter 'vit.layers.0.mlp.fc1.bias' has shape \[64\] in "
        r"the checkpoint and \[48\] in this model\)",
    ):
        trainer.train(resume_from_checkpoint=True)

    from .trainer_fixtures import text_clients, tiny_lora_llama

    trainer = FedPACTrainer(
        model=tiny_lora_llama(), args=tiny_args(tmp_path), client_datasets=text_clients()
    )
    with pytest.raises(
        ValueError, match="model differs .*'ViTForImageClassification'.*'LlamaForCausalLM'"
    ):
        trainer.train(resume_from_checkpoint="true")


def test_resume_from_a_corrupt_checkpoint_names_the_file(tmp_path):
    clients = four_clients(n=64)
    FedPACTrainer(
        model=tiny_vit(),
        args=tiny_args(tmp_path, num_rounds=1, save_strategy="steps", save_steps=1),
        client_datasets=clients,
    ).train()
    path = tmp_path / "run" / "checkpoint-round-1" / STATE_TENSORS
    path.write_bytes(path.read_bytes()[:100])
    trainer = FedPACTrainer(model=tiny_vit(), args=tiny_args(tmp_path), client_datasets=clients)
    with pytest.raises(ValueError, match=f"{path}.* is corrupt or truncated"):
        trainer.train(resume_from_checkpoint=True)


def test_the_package_never_unpickles():
    """Everything read back is safetensors or JSON: no torch.load / pickle in the package."""
    sources = {p: p.read_text() for p in (ROOT / "fedpac_hf").rglob("*.py")}
    for path, text in sources.items():
        for forbidden in ("pickle.load", "torch.load(", "yaml.load(", "trust_remote_code=True"):
            assert forbidden not in text or "weights_only=True" in text, (path, forbidden)
