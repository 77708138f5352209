"""What README.md and docs/ show: config snippets a run accepts, commands that print what
the docs say.

Each ``yaml`` block is pasted, as a user would, into the LoRA config of the
README (``configs/vit_lora_mnist5k.yaml``) and read by the same parser as
``fedpac-hf train``: a misspelt or renamed setting, or a value the settings'
checks refuse, fails here instead of in a user's run. docs/privacy.md's
accountant command runs as written and must print the numbers beside it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedpac_hf.run import parse_run_config

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BASE = ROOT / "configs" / "vit_lora_mnist5k.yaml"


def yaml_snippets() -> list[tuple[str, str]]:
    """Every ``yaml`` block of the docs: (where, text)."""
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for number, block in enumerate(re.findall(r"```yaml\n(.*?)```", text, flags=re.S)):
            found.append((f"{doc.relative_to(ROOT)}#{number + 1}", block))
    return found


def test_the_docs_show_config_snippets():
    assert len(yaml_snippets()) >= 3  # README's DP block and docs/privacy.md's two


@pytest.mark.parametrize(("where", "snippet"), yaml_snippets(), ids=[w for w, _ in yaml_snippets()])
def test_a_docs_snippet_pasted_into_the_lora_config_is_accepted(tmp_path, where, snippet):
    settings = yaml.safe_load(snippet)
    assert isinstance(settings, dict) and settings, f"{where} is not a mapping of settings"
    config = {**yaml.safe_load(BASE.read_text()), **settings, "output_dir": str(tmp_path / "run")}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    model_args, training_args = parse_run_config(str(path), [])
    for key, value in settings.items():
        holder = training_args if hasattr(training_args, key) else model_args
        assert getattr(holder, key) == value, f"{where}: {key}"


def test_the_privacy_docs_accountant_command_prints_what_the_docs_say():
    pytest.importorskip("dp_accounting")
    text = (ROOT / "docs" / "privacy.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    (command,) = [b.strip() for b in blocks if "noise_for_epsilon" in b]
    printed = re.search(r"prints `([^`]*)`", text.split(command, 1)[1]).group(1)
    assert command.startswith("python -c ")
    result = subprocess.run(
        ["bash", "-c", command.replace("python", sys.executable, 1)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == printed


def test_train_help_lists_every_field_as_the_readme_says():
    """``fedpac-hf train CONFIG --help`` (README) prints every field of both argument classes:
    argparse %-formats each help text, so one stray percent sign used to crash it."""
    import dataclasses
    import shutil

    from fedpac_hf import FedPACArguments
    from fedpac_hf.run import ModelDataArguments

    assert "`fedpac-hf train CONFIG --help`" in (ROOT / "README.md").read_text(encoding="utf-8")
    command = shutil.which("fedpac-hf") or pytest.fail("the fedpac-hf entry point is not installed")
    result = subprocess.run(
        [command, "train", "configs/vit_mnist5k.yaml", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    fields = dataclasses.fields(FedPACArguments) + dataclasses.fields(ModelDataArguments)
    missing = [f.name for f in fields if f.init and f"--{f.name}" not in result.stdout]
    assert not missing, missing
