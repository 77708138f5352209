"""The config snippets that README.md and docs/ show are settings a run accepts.

Each ``yaml`` block is pasted, as a user would, into the LoRA config of the
README (``configs/vit_lora_mnist5k.yaml``) and read by the same parser as
``fedpac-hf train``: a misspelt or renamed setting, or a value the settings'
checks refuse, fails here instead of in a user's run.
"""

from __future__ import annotations

import re
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
