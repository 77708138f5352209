"""LoRA on models as the installed transformers builds them, and the pretrained bases."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

from fedpac_hf.run import ModelDataArguments
from fedpac_hf.run.lora import apply_lora, default_lora_targets

ROOT = Path(__file__).resolve().parent.parent

MODELS = {
    "vit": lambda: ViTForImageClassification(
        ViTConfig(
            image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=64, num_labels=3,
        )
    ),
    "bert": lambda: BertForSequenceClassification(
        BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, num_labels=3,
        )
    ),
    "llama": lambda: LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2,
        )
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(MODELS))
def test_default_targets_are_the_loaded_models_query_and_value_projections(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    targets = default_lora_targets(model)
    task = {"vit": None, "bert": "SEQ_CLS", "llama": "CAUSAL_LM"}[name]
    task_name = {"vit": "image_classification", "bert": "sequence_classification"}
    margs = ModelDataArguments(task=task_name.get(name, "causal_lm"), lora_r=4)
    peft_model = apply_lora(model, margs, task_type=task)
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters()
               if ".lora_A" in n}  # fmt: skip
    assert adapted == set(targets) and len(targets) == 2
    layers = 2
    assert sum(".lora_A" in n for n, _ in peft_model.named_parameters()) == 2 * layers


def test_a_target_that_matches_nothing_names_the_models_linear_layers():
    margs = ModelDataArguments(task="image_classification", lora_r=4, lora_target_modules="qkv")
    with pytest.raises(
        ValueError, match="matches no layer of ViTForImageClassification; its linear"
    ):
        apply_lora(MODELS["vit"](), margs, task_type=None)


def test_the_readme_vit_lora_command_runs_on_a_local_vit_folder(tmp_path):
    """`examples/vit_image_classification.py --model_name_or_path <a ViT> --lora_r 16`."""
    from transformers import ViTImageProcessor

    folder = tmp_path / "my-vit"
    torch.manual_seed(0)
    ViTForImageClassification(
        ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=32,
                  num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(folder)  # fmt: skip
    ViTImageProcessor(
        do_resize=False, size={"height": 28, "width": 28}, image_mean=[0.5], image_std=[0.5]
    ).save_pretrained(folder)
    out = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable, "examples/vit_image_classification.py",
            "--model_name_or_path", str(folder), "--lora_r", "16",
            "--num_rounds", "1", "--local_steps", "1", "--num_clients", "4",
            "--clients_per_round", "2", "--max_train_examples", "200",
            "--max_eval_examples", "50", "--output_dir", str(out),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert adapter["modules_to_save"] == ["classifier"]


def test_pretrained_bases_are_built_once_reproducibly_and_load_by_name(tmp_path, monkeypatch):
    from fedpac_hf.run.bases import base_path, resolve_model_name

    monkeypatch.setenv("FEDPAC_HF_CACHE", str(tmp_path / "cache"))
    folder = base_path("vit-mnist5k-0to4")
    info = json.loads((folder / "base_info.json").read_text())
    assert info["test_accuracy_digits_0to4"] > 0.85  # it learned its half of the digits
    assert resolve_model_name("base:vit-mnist5k-0to4") == str(folder)
    again = base_path("vit-mnist5k-0to4", cache_dir=tmp_path / "other")
    from safetensors.torch import load_file

    first, second = load_file(folder / "model.safetensors"), load_file(again / "model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)  # same seed, same weights
    with pytest.raises(ValueError, match="unknown pretrained base 'vit-big'"):
        resolve_model_name("base:vit-big")


def test_soap_sends_long_sides_as_their_diagonal_and_warm_starts_from_it():
    from fedpac_hf.optim import SOAP

    torch.manual_seed(0)
    factor = torch.nn.Parameter(torch.randn(24, 4))  # a LoRA B factor: d = 24, r = 4
    opt = SOAP([("B", factor)], lr=1e-2, theta_max_dim=4)
    for _ in range(3):
        factor.grad = torch.randn(24, 4)
        opt.step()
    theta = opt.export_curvature()
    assert theta["B.L"].shape == (24,) and theta["B.R"].shape == (4, 4)
    full = SOAP([("B", torch.nn.Parameter(factor.detach().clone()))], lr=1e-2)
    for _ in range(3):
        full.param_groups[0]["params"][0].grad = torch.randn(24, 4)
        full.step()
    assert full.export_curvature()["B.L"].shape == (24, 24)

    fresh = SOAP([("B", torch.nn.Parameter(torch.zeros(24, 4)))], lr=1e-2, theta_max_dim=4)
    fresh.import_curvature(theta)
    state = fresh.state[fresh.param_groups[0]["params"][0]]
    assert torch.equal(state["GG0"], torch.diag(theta["B.L"]))  # the diagonal warm start
    assert torch.equal(state["GG1"], theta["B.R"])
    with pytest.raises(ValueError, match="has shape"):
        fresh.import_curvature(full.export_curvature())  # a d x d statistic is not expected


def test_curvature_auto_fits_the_budget_and_lora_keeps_its_earlier_form(tmp_path):
    from fedpac_hf import FedPACArguments
    from fedpac_hf.federated.theta_budget import theta_options

    from .trainer_fixtures import tiny_lora_llama, tiny_vit

    auto = theta_options(tiny_lora_llama(), "soap", "auto")
    assert auto["theta_compact"] == "basis" and auto["theta_max_dim"] >= 4  # rank 4 in full
    assert theta_options(tiny_lora_llama(), "soap", "lora") == {
        "theta_max_dim": 4,
        "theta_sketch_dim": 2,  # min(4, r - 2) at r = 4
        "theta_diagonal": True,
    }
    assert theta_options(tiny_vit(), "soap", "auto") == {}  # no adapters: full by default
    assert theta_options(tiny_vit(), "soap", "auto", 1.0)  # unless a budget is set
    assert theta_options(tiny_lora_llama(), "soap", "full") == {}
    assert theta_options(tiny_lora_llama(), "muon", "lora") == {}  # already adapter-sized
    with pytest.raises(ValueError, match="curvature='lora' sizes Theta for LoRA adapters"):
        theta_options(tiny_vit(), "soap", "lora")
    with pytest.raises(ValueError, match="curvature must be one of"):
        FedPACArguments(output_dir=str(tmp_path), curvature="tiny")


def test_a_lora_run_sends_theta_smaller_than_the_adapter_by_default(tmp_path):
    from fedpac_hf import FedPACArguments, FedPACTrainer

    from .trainer_fixtures import text_clients, tiny_lora_llama

    sent = {}
    for form in ("auto", "full"):
        args = FedPACArguments(
            output_dir=str(tmp_path / form), algorithm="fedpac_soap", curvature=form,
            num_rounds=2, local_steps=2, clients_per_round=2, learning_rate=1e-2,
            per_device_train_batch_size=8, report_to=[], disable_tqdm=True,
        )  # fmt: skip
        trainer = FedPACTrainer(model=tiny_lora_llama(), args=args, client_datasets=text_clients())
        trainer.train()
        sent[form] = trainer.round_history[-1]
    auto, full = sent["auto"], sent["full"]
    assert auto["bytes_up_delta"] == full["bytes_up_delta"]
    # theta_budget 1.0: at most as much curvature as adapter goes up, in the basis form
    # (d = 32, r = 4, k = 2: 16 + 3 * 32 floats per factor of 128), not 16 + 1024
    assert auto["bytes_up_theta"] == pytest.approx(112 / 128 * auto["bytes_up_delta"])
    assert full["bytes_up_theta"] > 5 * full["bytes_up_delta"]
    # down: the server's basis and eigenvalues and the next test matrix of each long side
    # (32 * 32 + 32 + 64 floats) beside the full rank side, against 1024 in full
    assert auto["bytes_down_theta"] == pytest.approx(
        (16 + 1024 + 32 + 64) / (16 + 1024) * full["bytes_down_theta"]
    )


def test_the_sketch_of_a_long_side_is_linear_and_rebuilds_its_leading_directions():
    from fedpac_hf.optim._theta_forms import expand, sketch

    g = torch.Generator().manual_seed(0)
    factors = [torch.randn(40, 3, generator=g) for _ in range(2)]
    stats = [f @ f.T for f in factors]  # rank-3 statistics of two clients
    mean = (stats[0] + stats[1]) / 2
    # linear: the average of the clients' sketches is the sketch of the average statistic
    torch.testing.assert_close((sketch(stats[0], 6) + sketch(stats[1], 6)) / 2, sketch(mean, 6))
    rebuilt = expand(torch.diagonal(mean), sketch(mean, 6))  # rank 6 >= rank of the mean
    torch.testing.assert_close(rebuilt, mean, rtol=1e-4, atol=1e-4)
    # too small a sketch keeps the diagonal exactly and the leading direction approximately
    small = expand(torch.diagonal(mean), sketch(mean, 2))
    torch.testing.assert_close(torch.diagonal(small), torch.diagonal(mean), rtol=1e-5, atol=1e-5)
    top = torch.linalg.eigh(mean).eigenvectors[:, -1]
    assert float(top @ small @ top) > 0.5 * float(torch.linalg.eigvalsh(mean)[-1])
    assert torch.equal(expand(torch.diagonal(mean), None), torch.diag(torch.diagonal(mean)))


def test_a_long_side_can_travel_as_its_sketch_alone_the_size_of_its_diagonal():
    from fedpac_hf.optim import SOAP
    from fedpac_hf.optim._theta_forms import expand, sketch

    torch.manual_seed(0)
    factor = torch.nn.Parameter(torch.randn(24, 4))  # a LoRA B factor: d = 24, r = 4
    opt = SOAP([("B", factor)], lr=1e-2, theta_max_dim=4, theta_sketch_dim=1, theta_diagonal=False)
    direction = torch.randn(24, 1)
    for _ in range(3):  # gradients sharing one long-side direction: a rank-1 statistic
        factor.grad = direction @ torch.randn(1, 4)
        opt.step()
    theta = opt.export_curvature()
    assert set(theta) == {"B.L.sketch", "B.R"}  # no diagonal
    assert theta["B.L.sketch"].shape == (24, 1) and theta["B.R"].shape == (4, 4)

    fresh = SOAP(
        [("B", torch.nn.Parameter(torch.zeros(24, 4)))],
        lr=1e-2, theta_max_dim=4, theta_sketch_dim=1, theta_diagonal=False,
    )  # fmt: skip
    fresh.import_curvature(theta)
    statistic = opt.state[factor]["GG0"]
    warm = fresh.state[fresh.param_groups[0]["params"][0]]["GG0"]
    torch.testing.assert_close(warm, statistic, rtol=1e-4, atol=1e-6)  # rank 1: exact
    # the same d floats as a diagonal, which loses the direction
    low_rank = statistic + 1e-3 * torch.eye(24)
    err_sketch = torch.linalg.norm(expand(None, sketch(low_rank, 1)) - low_rank)
    err_diag = torch.linalg.norm(expand(torch.diagonal(low_rank), None) - low_rank)
    assert err_sketch < 0.2 * err_diag
    with pytest.raises(ValueError, match="theta_sketch_dim >= 1"):
        SOAP([("B", factor)], theta_max_dim=4, theta_diagonal=False)
    with pytest.raises(ValueError, match="a diagonal, a sketch or both"):
        expand(None, None)
    with pytest.raises(ValueError, match="missing"):
        fresh.import_curvature({"B.L": torch.ones(24), "B.R": torch.eye(4)})


def _lora_llama(width: int, rank: int):
    from peft import LoraConfig, get_peft_model

    config = LlamaConfig(
        vocab_size=64, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"])
    return get_peft_model(LlamaForCausalLM(config), lora)


@pytest.mark.parametrize("width", [64, 256])
def test_the_default_lora_theta_is_the_basis_form_within_the_adapters_size(width, tmp_path):
    from fedpac_hf import FedPACArguments
    from fedpac_hf.optim import create_optimizer

    model = _lora_llama(width, rank=8)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sizes = {}
    for form in ("auto", "full"):
        args = FedPACArguments(output_dir=str(tmp_path), curvature=form, report_to=[])
        algorithm = args.build_algorithm(model)
        optimizer = create_optimizer("soap", model, lr=1e-2, **algorithm.optimizer_kwargs)
        theta = optimizer.export_curvature()
        sizes[form] = sum(t.numel() for t in theta.values())
        if form == "auto":
            k = algorithm.optimizer_kwargs["theta_sketch_dim"]
            sketches = [key for key in theta if key.endswith(".steered_sketch")]
            assert sketches and all(theta[key].shape == (width, k) for key in sketches)
            assert all(
                t.shape == (8, 8) for key, t in theta.items() if t.ndim == 2 and key not in sketches
            )
    # per d x 8 factor: 64 + (k + 1) d floats of 8 d, the largest k that fits
    assert sizes["auto"] <= trainable < sizes["auto"] * (1 + 1 / 7)
    assert sizes["full"] > 5 * trainable


def test_a_users_theta_options_replace_the_derived_form(tmp_path):
    from fedpac_hf import FedPACArguments

    model = _lora_llama(64, rank=8)
    args = FedPACArguments(
        output_dir=str(tmp_path),
        client_optimizer_kwargs={"theta_max_dim": 8, "theta_sketch_dim": 0},
        report_to=[],
    )
    kwargs = args.build_algorithm(model).optimizer_kwargs
    assert kwargs["theta_sketch_dim"] == 0 and kwargs["theta_max_dim"] == 8
    assert "theta_compact" not in kwargs  # nothing of the budget's form is mixed in
    args = FedPACArguments(
        output_dir=str(tmp_path), curvature="lora",
        client_optimizer_kwargs={"theta_sketch_dim": 1, "theta_diagonal": False}, report_to=[],
    )  # fmt: skip
    kwargs = args.build_algorithm(model).optimizer_kwargs
    assert kwargs["theta_sketch_dim"] == 1 and kwargs["theta_diagonal"] is False
    assert kwargs["theta_max_dim"] == 8  # curvature "lora" is overridden key by key, as before


def test_a_warm_start_from_a_sketch_alone_rotates_its_direction_and_keeps_the_axes():
    from fedpac_hf.optim import SOAP
    from fedpac_hf.optim._theta_forms import axes_completed_basis, sketch

    g = torch.Generator().manual_seed(0)
    u = torch.randn(12, 1, generator=g, dtype=torch.float64)
    u /= u.norm()
    basis = axes_completed_basis(3.0 * u @ u.T, 1)
    torch.testing.assert_close(basis.T @ basis, torch.eye(12, dtype=torch.float64))
    torch.testing.assert_close(basis[:, 0].abs(), u[:, 0].abs())  # the direction comes first
    e1 = torch.eye(12, dtype=torch.float64)[:, 0]
    axis = e1 - (u[:, 0] @ e1) * u[:, 0]  # then the first axis, made orthogonal to it
    torch.testing.assert_close(basis[:, 1].abs(), (axis / axis.norm()).abs())
    assert torch.equal(axes_completed_basis(torch.zeros(5, 5), 1), torch.eye(5))

    options = {"theta_max_dim": 4, "theta_sketch_dim": 1, "theta_diagonal": False}
    fresh = SOAP([("B", torch.nn.Parameter(torch.zeros(12, 4)))], lr=1e-2, **options)
    statistic = (u @ u.T).float()
    fresh.import_curvature({"B.L.sketch": sketch(statistic, 1), "B.R": torch.eye(4)})
    q = fresh.state[fresh.param_groups[0]["params"][0]]["Q0"]
    torch.testing.assert_close(q.abs(), basis.float().abs(), rtol=1e-4, atol=1e-5)
