"""README.md's commands, run as written (slow): the ``fedpac-hf train`` block and the CPU
``torchrun`` line.

They run through the installed ``fedpac-hf`` entry point (or ``torchrun``) in a folder that
holds a copy of ``configs/``, as a user's clone does, so the runs land in its ``runs/``. Not
run here: the two set-up commands (CI runs the test command; the main command is the first
line below), the Hub example (``google/vit-base-patch16-224-in21k``: no Hub here) and the two
``accelerate launch`` lines (a GPU).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .doc_commands import bash_blocks

ROOT = Path(__file__).resolve().parent.parent

#: The README's `fedpac-hf train` block, in order.
TRAIN_COMMANDS = [
    "fedpac-hf train configs/vit_mnist5k.yaml",
    "fedpac-hf train configs/vit_mnist5k.yaml --algorithm local_soap --output_dir runs/local_soap",
    "fedpac-hf train configs/vit_lora_mnist5k.yaml",
    "fedpac-hf train configs/causal_lm_shakespeare.yaml",
    "fedpac-hf train configs/sequence_classification_shakespeare.yaml",
    "fedpac-hf report runs/vit_mnist5k",
]
TORCHRUN = "torchrun --nproc_per_node 2 -m fedpac_hf.cli train configs/vit_mnist5k.yaml"
NOT_RUN = [
    "python examples/vit_image_classification.py --model_name_or_path "
    "google/vit-base-patch16-224-in21k --dataset uoft-cs/cifar10 --lora_r 16 "
    "--learning_rate 1e-3 --output_dir runs/vit_b16_cifar10",
    "accelerate launch --config_file configs/accelerate/one_gpu_bf16.yaml -m fedpac_hf.cli "
    "train configs/vit_cifar100_paper.yaml",
    "accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes 4 -m "
    "fedpac_hf.cli train configs/vit_cifar100_paper.yaml",
]


def test_these_tests_know_every_command_of_the_readme():
    setup, tests, train, hub, launch = bash_blocks(ROOT / "README.md")
    assert len(setup) == len(tests) == 1 and setup[0].endswith(TRAIN_COMMANDS[0])
    assert train == TRAIN_COMMANDS
    assert [*hub, *launch] == [*NOT_RUN, TORCHRUN], (
        "README.md's commands changed: update tests/test_readme_commands.py"
    )


def _run(command: str, cwd: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=1200
    )
    assert result.returncode == 0, (command, result.stderr[-3000:])
    return result.stdout


def _final(out: str, rounds: int) -> float:
    found = re.search(rf"^final (?:accuracy|perplexity) after {rounds} rounds: ([\d.]+)", out, re.M)
    assert found, out[-2000:]
    return float(found.group(1))


@pytest.mark.slow  # the five runs and the report take about 9 minutes on a 2-core CPU
def test_the_readme_train_commands_run_as_written(tmp_path):
    assert shutil.which("fedpac-hf"), "the fedpac-hf entry point is not installed"
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    main, local, lora, causal, classify, report = (_run(c, tmp_path) for c in TRAIN_COMMANDS)
    assert _final(main, 30) > 0.8  # README: 0.8740 or 0.8560, by the machine (0.8480 forced)
    assert 0 < _final(local, 30) < 1 and 0 < _final(lora, 30) < 1
    assert _final(causal, 15) > 1 and 0 < _final(classify, 6) < 1
    for run, algorithm in (("vit_mnist5k", "fedpac_soap"), ("local_soap", "local_soap")):
        summary = (tmp_path / "runs" / run / "summary.md").read_text()
        assert f"| algorithm | {algorithm} |" in summary
    assert "final eval_accuracy" in report
    assert (
        tmp_path / "runs" / "sequence_classification_shakespeare" / "adapter_model.safetensors"
    ).is_file()


@pytest.mark.slow  # 30 rounds in two processes, about a minute and a quarter
def test_the_readme_torchrun_line_trains_in_two_cpu_processes(tmp_path):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    out = _run(TORCHRUN, tmp_path)
    assert _final(out, 30) > 0.8
    rows = (tmp_path / "runs" / "vit_mnist5k" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["round"] for row in rows] == [float(r) for r in range(1, 31)]
