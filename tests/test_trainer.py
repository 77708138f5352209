"""FedPACTrainer on tiny ViT and Llama+LoRA models, offline."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import datasets
import pytest
import torch
from transformers import HfArgumentParser

from fedpac_hf import FedPACArguments, FedPACCallback, FedPACTrainer
from fedpac_hf.rundir.checkpoint import STATE_JSON, STATE_TENSORS, load_federated_checkpoint
from fedpac_hf.trainer.evaluation import make_evaluator

from .trainer_fixtures import (
    accuracy,
    image_data,
    text_clients,
    tiny_lora_llama,
    tiny_vit,
    vit_args,
)


def trainable_vector(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])


def test_vit_rounds_log_metrics_evaluate_and_lower_the_loss(tmp_path):
    data = image_data()
    trainer = FedPACTrainer(
        model=tiny_vit(),
        args=vit_args(tmp_path, eval_strategy="steps", eval_steps=1),  # a round is a step
        train_dataset=data["train"],
        eval_dataset=data["test"],
        compute_metrics=accuracy,
    )
    before = trainer.evaluate()["eval_loss"]
    out = trainer.train()
    assert out.global_step == 3
    rounds = [h for h in trainer.state.log_history if "drift" in h]
    assert [h["round"] for h in rounds] == [1.0, 2.0, 3.0]
    for key in [
        "train_loss",
        "drift_relative",
        "bytes_up",
        "bytes_down",
        "round_time",
        "learning_rate",
        "num_clients",
    ]:
        assert key in rounds[-1]
    assert rounds[-1]["num_clients"] == 4
    # cosine over rounds, starting at the peak rate
    assert rounds[0]["learning_rate"] == pytest.approx(3e-3)
    assert rounds[2]["learning_rate"] < rounds[1]["learning_rate"] < rounds[0]["learning_rate"]
    evals = [h for h in trainer.state.log_history if "eval_accuracy" in h]
    assert len(evals) == 3  # one per round (train() starts a fresh log, as Trainer does)
    assert trainer.round_history[-1]["eval_loss"] < before


def test_lora_llama_trains_only_adapters_and_saves_a_loadable_adapter(tmp_path):
    from peft import PeftModel

    model = tiny_lora_llama()
    base_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad
    }
    clients = text_clients()
    eval_ds = datasets.concatenate_datasets([c.select(range(8)) for c in clients])
    args = vit_args(
        tmp_path,
        algorithm="fedpac_soap",
        clients_per_round=2,
        learning_rate=1e-2,
        eval_strategy="steps",
        eval_steps=3,  # evaluate after the last round
    )
    trainer = FedPACTrainer(model=model, args=args, client_datasets=clients, eval_dataset=eval_ds)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.round_history[-1]
    assert after["eval_loss"] < before
    assert after["eval_perplexity"] == pytest.approx(torch.tensor(after["eval_loss"]).exp().item())
    assert all("lora_" in n for n in trainer.server_state.params)
    assert all("lora_" in k for k in trainer.server_state.curvature)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base_before[n]), n

    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    from .trainer_fixtures import tiny_llama

    reloaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))
    ids = clients[0][0:2]["input_ids"]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize(
    ("beta", "budget"), [(None, None), ("auto", None), (None, 1.0)], ids=["full", "auto", "basis"]
)
def test_resume_from_a_checkpoint_reproduces_an_uninterrupted_run(tmp_path, beta, budget):
    """Bit-identical, whatever the global state holds (theta_budget 1.0: the server's bases)."""
    data = image_data()
    full = FedPACTrainer(
        model=tiny_vit(),
        args=vit_args(tmp_path / "a", num_rounds=4, beta=beta, theta_budget=budget),
        train_dataset=data["train"],
    )
    full.train()

    first = FedPACTrainer(
        model=tiny_vit(),
        args=vit_args(
            tmp_path / "b",
            num_rounds=4,
            save_strategy="steps",
            save_steps=2,
            beta=beta,
            theta_budget=budget,
        ),
        train_dataset=data["train"],
    )
    first.train()
    ckpt = tmp_path / "b" / "run" / "checkpoint-round-2"
    assert (ckpt / STATE_TENSORS).is_file() and (ckpt / STATE_JSON).is_file()
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "config.json").is_file()
    state, meta = load_federated_checkpoint(ckpt)
    assert state.round == 2 and len(meta["history"]) == 2
    assert all(t.dtype == torch.float32 for t in state.curvature.values())
    assert any(n.endswith(".basis") for n in state.curvature) == (budget is not None)
    if beta == "auto":  # the server's choice for round 3 is part of the saved state
        assert 0.0 <= state.beta <= 0.75
        assert [h["beta"] for h in full.round_history][2] == state.beta

    resumed = FedPACTrainer(
        model=tiny_vit(seed=123),  # other init: everything must come from the checkpoint
        args=vit_args(tmp_path / "b", num_rounds=4, beta=beta, theta_budget=budget),
        train_dataset=data["train"],
    )
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert [h["round"] for h in resumed.round_history] == [1.0, 2.0, 3.0, 4.0]
    torch.testing.assert_close(
        trainable_vector(resumed.model), trainable_vector(full.model), rtol=0, atol=0
    )


def test_resume_with_another_algorithm_or_partition_is_refused(tmp_path):
    data = image_data()
    FedPACTrainer(
        model=tiny_vit(),
        args=vit_args(tmp_path, num_rounds=1, save_strategy="steps", save_steps=1),
        train_dataset=data["train"],
    ).train()
    ckpt = str(tmp_path / "run" / "checkpoint-round-1")
    other = FedPACTrainer(
        model=tiny_vit(),
        args=vit_args(tmp_path, algorithm="local_soap"),
        train_dataset=data["train"],
    )
    with pytest.raises(ValueError, match="algorithm differs"):
        other.train(resume_from_checkpoint=ckpt)
    other = FedPACTrainer(
        model=tiny_vit(), args=vit_args(tmp_path, dirichlet_alpha=5.0), train_dataset=data["train"]
    )
    with pytest.raises(ValueError, match="partition differs"):
        other.train(resume_from_checkpoint=True)


def test_bf16_autocast_keeps_curvature_float32(tmp_path):
    data = image_data(n=160)
    trainer = FedPACTrainer(
        model=tiny_vit(),
        args=vit_args(
            tmp_path, bf16=True, use_cpu=True, num_rounds=2, num_clients=4, clients_per_round=2
        ),
        train_dataset=data["train"],
    )
    trainer.train()
    assert trainer.accelerator.mixed_precision == "bf16"
    assert trainer.server_state.curvature
    assert all(t.dtype == torch.float32 for t in trainer.server_state.curvature.values())
    assert all(torch.isfinite(t).all() for t in trainer.server_state.params.values())


def test_round_callbacks_fire_and_can_stop_training(tmp_path):
    seen = []

    class StopAfterTwo(FedPACCallback):
        def on_round_end(self, args, state, control, **kwargs):
            seen.append((kwargs["round"], "train_loss" in kwargs["metrics"]))
            if kwargs["round"] == 2:
                control.should_training_stop = True
            return control

    data = image_data(n=160)
    trainer = FedPACTrainer(
        model=tiny_vit(),
        args=vit_args(tmp_path, num_rounds=5, num_clients=4),
        train_dataset=data["train"],
        callbacks=[StopAfterTwo()],
    )
    out = trainer.train()
    assert seen == [(1, True), (2, True)]
    assert out.global_step == 2


def test_arguments_read_from_yaml_and_command_line(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "output_dir: out\nalgorithm: fedpac_muon\nnum_rounds: 7\nbeta: 0.3\n"
        "client_optimizer_kwargs: {momentum: 0.9}\nclients_per_round: 0.2\n"
    )
    parser = HfArgumentParser(FedPACArguments)
    (args,) = parser.parse_yaml_file(str(cfg))
    assert (
        args.num_rounds == 7
        and args.beta == 0.3
        and args.client_optimizer_kwargs == {"momentum": 0.9}
    )
    algo = args.build_algorithm()
    assert algo.optimizer == "muon" and algo.beta == 0.3 and algo.align
    assert algo.optimizer_kwargs["momentum"] == 0.9
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            "o",
            "--algorithm",
            "local_soap",
            "--local_steps",
            "50",
            "--client_optimizer_kwargs",
            json.dumps({"precondition_frequency": 5}),
        ]
    )
    assert args.local_steps == 50 and args.client_optimizer_kwargs == {"precondition_frequency": 5}
    assert args.lr_scheduler_type == "cosine"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"algorithm": "fedprox"}, "unknown algorithm"),
        ({"beta": 1.5}, "beta"),
        ({"local_steps": 0}, "local_steps"),
        ({"num_rounds": 0}, "num_rounds"),
        ({"aggregation_weighting": "by_size"}, "aggregation_weighting"),
        ({"partitioner": "random"}, "partitioner"),
        ({"fsdp": "full_shard"}, "FSDP"),
        ({"client_optimizer_kwargs": "{not json"}, "JSON"),
    ],
)
def test_bad_arguments_are_refused_with_a_message(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        vit_args(tmp_path, **overrides)


def test_trainer_refuses_fixed_optimizers_and_impossible_participation(tmp_path):
    data = image_data(n=80)
    model = tiny_vit()
    with pytest.raises(ValueError, match="optimizer"):
        FedPACTrainer(
            model=model,
            args=vit_args(tmp_path),
            train_dataset=data["train"],
            optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
        )
    trainer = FedPACTrainer(
        model=model,
        args=vit_args(tmp_path, num_clients=4, clients_per_round=5),
        train_dataset=data["train"],
    )
    with pytest.raises(ValueError, match="more than the 4 clients"):
        trainer.train()


def _distributed_worker(*args: str, processes: int = 1, port: int = 29533) -> None:
    """Run ``tests.distributed_worker`` with ``args`` in 1 process, or under torchrun."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    launch = [sys.executable, "-m"]
    if processes > 1:
        launch += ["torch.distributed.run", "--nproc_per_node", str(processes)]
        launch += ["--master_port", str(port), "-m"]
    run = subprocess.run(
        [*launch, "tests.distributed_worker", *args],
        cwd=root,
        env=env,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]


def test_two_processes_give_the_same_result_as_one(tmp_path):
    """Clients spread over 2 gloo processes (torchrun) equal a 1-process run."""
    from safetensors.torch import load_file

    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    _distributed_worker(str(one))
    _distributed_worker(str(two), processes=2)
    a, b = load_file(str(one)), load_file(str(two))
    assert set(a) == set(b) and any(k.startswith("curvature::") for k in a)
    assert {"delta_norm_median", "theta_norm_median"} <= set(a)  # gathered over processes
    assert a["clients"] == b["clients"] == 4
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_two_processes_under_dp_add_the_same_secret_noise(tmp_path):
    """Each process draws a secret noise seed; process 0's is shared, so they stay equal."""
    from safetensors.torch import load_file

    _distributed_worker(str(tmp_path / "dp.safetensors"), "dp", processes=2, port=29534)
    a = load_file(str(tmp_path / "dp.rank0.safetensors"))
    b = load_file(str(tmp_path / "dp.rank1.safetensors"))
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_two_processes_compute_the_same_public_curvature_as_one(tmp_path):
    """With public_curvature every process runs the server's steps: the same Theta as 1 process."""
    from safetensors.torch import load_file

    _distributed_worker(str(tmp_path / "one.safetensors"), "public", port=29535)
    _distributed_worker(str(tmp_path / "two.safetensors"), "public", processes=2, port=29535)
    one = load_file(str(tmp_path / "one.rank0.safetensors"))
    ranks = [load_file(str(tmp_path / f"two.rank{i}.safetensors")) for i in (0, 1)]
    assert set(one) == set(ranks[0]) == set(ranks[1])
    assert any(k.startswith("curvature::") for k in one)
    for key in one:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        torch.testing.assert_close(one[key], ranks[0][key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("algorithm", ["fedpac_sophia", "fedpac_muon"])
def test_sophia_and_muon_clients_run_and_send_real_curvature(tmp_path, algorithm):
    """Sophia's Hessian estimate is really refreshed (the reference code left it at zero)."""
    data = image_data(n=160)
    trainer = FedPACTrainer(
        model=tiny_vit(),
        args=vit_args(
            tmp_path,
            algorithm=algorithm,
            num_rounds=2,
            num_clients=4,
            clients_per_round=2,
            local_steps=4,
            client_optimizer_kwargs={"hessian_update_interval": 2}
            if algorithm == "fedpac_sophia"
            else None,
        ),
        train_dataset=data["train"],
    )
    trainer.train()
    theta = trainer.server_state.curvature
    assert theta and all(t.dtype == torch.float32 for t in theta.values())
    assert sum(float(t.abs().sum()) for t in theta.values()) > 0
    assert all(torch.isfinite(t).all() for t in trainer.server_state.params.values())


def test_early_stopping_and_best_model_work_as_in_trainer(tmp_path):
    """A round is one global step: EarlyStoppingCallback stops a run that does not improve."""
    from transformers import EarlyStoppingCallback

    data = image_data(n=160)
    trainer = FedPACTrainer(
        model=tiny_vit(),
        args=vit_args(
            tmp_path,
            num_rounds=8,
            num_clients=4,
            learning_rate=1e-12,  # the model cannot change: accuracy never improves
            eval_strategy="steps",
            eval_steps=1,
            save_strategy="steps",
            save_steps=1,
            metric_for_best_model="accuracy",
            load_best_model_at_end=True,
        ),
        train_dataset=data["train"],
        eval_dataset=data["test"],
        compute_metrics=accuracy,
        callbacks=[EarlyStoppingCallback(early_stopping_patience=1)],
    )
    out = trainer.train()
    assert out.global_step == 2  # round 2 did not beat round 1: stop
    first = trainer.round_history[0]["eval_accuracy"]
    assert trainer.state.best_metric == first
    assert trainer.state.best_model_checkpoint == str(tmp_path / "run" / "checkpoint-round-1")


def test_load_best_model_at_end_restores_the_best_rounds_parameters(tmp_path):
    data = image_data(n=160)
    args = vit_args(
        tmp_path,
        num_rounds=3,
        num_clients=4,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=1,
        metric_for_best_model="loss",
        greater_is_better=True,  # the highest loss is "best": round 1 of a run that learns
        load_best_model_at_end=True,
    )
    trainer = FedPACTrainer(
        model=tiny_vit(), args=args, train_dataset=data["train"], eval_dataset=data["test"]
    )
    trainer.train()
    losses = [h["eval_loss"] for h in trainer.round_history]
    assert losses[0] > losses[-1] and trainer.state.best_metric == losses[0]
    run = tmp_path / "run"
    # the newest checkpoint is rotated in, the best one is kept beside it
    assert sorted(p.name for p in run.glob("checkpoint-round-*")) == [
        "checkpoint-round-1",
        "checkpoint-round-3",
    ]
    best, _ = load_federated_checkpoint(run / "checkpoint-round-1")
    final = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    for name, tensor in best.params.items():
        assert torch.equal(final[name].detach(), tensor), name
    assert not torch.equal(trainer.server_state.params[name], best.params[name])


def test_the_console_shows_one_line_per_round_and_no_dicts(tmp_path, capsys):
    data = image_data(n=160)
    trainer = FedPACTrainer(
        model=tiny_vit(),
        args=vit_args(tmp_path, num_rounds=2, num_clients=4, eval_strategy="steps", eval_steps=1),
        train_dataset=data["train"],
        eval_dataset=data["test"],
        compute_metrics=accuracy,
    )
    trainer.train()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [line.split(" | ")[0] for line in lines] == ["round 1/2", "round 2/2"]
    assert "eval_accuracy" in lines[1] and "MB" in lines[1] and "drift" in lines[1]
    assert not any(line.startswith("{") for line in lines)


def test_the_central_evaluator_keeps_the_runs_dataloader_settings(tmp_path):
    """make_evaluator (the Flower ServerApp's evaluation) builds its own Trainer: it
    must not pin memory where the run's arguments turned pinning off (no accelerator)."""
    args = vit_args(tmp_path)
    evaluate = make_evaluator(
        args, image_data(n=64)["test"].rename_column("label", "labels"), compute_metrics=accuracy
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = evaluate(tiny_vit())
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["eval_loss"] > 0
    if not torch.cuda.is_available():
        assert not [w for w in caught if "pin_memory" in str(w.message)]
