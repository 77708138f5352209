"""docs/bad_inputs.md is what the code really says for each bad input."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "docs" / "make_bad_inputs_table.py"


def load_script():
    spec = importlib.util.spec_from_file_location("make_bad_inputs_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_bad_input_gets_a_message_and_the_doc_is_current():
    script = load_script()
    rows = script.collect()
    for case, outcome, message in rows:
        assert outcome != "no error", f"{case.mistake} ({case.where}) was accepted"
        assert message.strip(), f"{case.mistake} ({case.where}) gave no message"
        assert "Traceback" not in message
        if case.where.startswith("`fedpac-hf "):  # a user error: one line, status 2
            command = case.where.strip("`")
            assert outcome == "exit status 2", f"{case.mistake}: {outcome} {message}"
            assert message.startswith(f"{command}: error: "), message
    assert script.DOC.read_text(encoding="utf-8") == script.render(rows), (
        "docs/bad_inputs.md is stale: run python docs/make_bad_inputs_table.py"
    )


def test_a_broken_install_is_not_written_into_the_table():
    script = load_script()

    def missing_module(out):
        import importlib

        importlib.import_module("fedpac_hf_module_that_does_not_exist")

    case = script.Case("a mistake", "`somewhere`", missing_module)
    with pytest.raises(RuntimeError, match="reinstall the package"):
        script.run_case(case)
    ok = script.Case("a mistake", "`somewhere`", lambda out: int("x"))
    assert script.run_case(ok)[0] == "`ValueError`"
