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
    from fedpac_hf.bases import base_path, resolve_model_name

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
