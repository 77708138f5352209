"""The project's install commands that the docs show alone on a line, run as written (slow).

Each runs from the root of a copy of the repository, into a fresh virtual environment that
sees this one's packages (torch, which README.md installs first, among them;
:func:`venv_over_this_environment`), so pip builds and installs this fedpac_hf and resolves
its extras against the package index. README.md's two set-up lines, which install torch
first and then run more, are CI's (``.ci/run``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from .doc_commands import bash_blocks

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "flower_app"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), APP / "README.md"]

#: Each install command of the docs, and the requirements it must then have met besides its
#: own (the Flower app's pyproject dependencies: what the README installs them for).
INSTALLS = {
    'pip install -e ".[flower,data]"': APP / "pyproject.toml",
    'pip install -e ".[privacy]"': None,
}

#: Run in the new environment: the path of the fedpac_hf it imports, then each requirement
#: given (and each of its extras' requirements) that the installed version does not meet.
UNMET = """
import importlib.metadata as metadata, sys
from packaging.requirements import Requirement
import fedpac_hf
print(fedpac_hf.__file__)
wanted = [Requirement(r) for r in sys.argv[1:]]
for r in list(wanted):
    for extra in r.extras:
        marker = f'extra == "{extra}"'
        wanted += [Requirement(d.split(";")[0]) for d in metadata.requires(r.name) if marker in d]
for r in wanted:
    if not r.specifier.contains(metadata.version(r.name), prereleases=True):
        print(r)
"""


def test_these_tests_know_every_install_command_of_the_docs():
    shown = {
        command
        for doc in DOCS
        for block in bash_blocks(doc)
        for command in block
        if command.startswith("pip install") and "&&" not in command
    }
    assert shown == set(INSTALLS), "the docs' install commands changed: update INSTALLS"


def repository_copy(destination: Path) -> Path:
    """The repository's tracked files, copied to ``destination``."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    for name in filter(None, files.stdout.decode().split("\0")):
        (destination / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, destination / name)
    return destination


def venv_over_this_environment(venv: Path) -> Path:
    """A new virtual environment at ``venv`` that also sees this environment's packages.

    A ``.pth`` file names this environment's site-packages after the venv's own, so the new
    Python sees what this one has installed (the test command's packages in CI), not what the
    base interpreter it was made from has, as ``--system-site-packages`` would.
    """
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    python = venv / "bin" / "python"
    inner = subprocess.run([python, "-c", where], capture_output=True, text=True, check=True)
    outer = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (Path(inner.stdout.strip()) / "_this_environment.pth").write_text("\n".join(outer) + "\n")
    return venv


@pytest.mark.slow  # needs the package index (pip builds the project; ~15 s each)
@pytest.mark.parametrize("command", sorted(INSTALLS))
def test_an_install_command_of_the_docs_runs_as_written(tmp_path, command):
    """It installs this fedpac_hf (editable, from the copy), every extra it names exists, and
    the extras' requirements, and those of what it installs for, are then met."""
    repo = repository_copy(tmp_path / "repo")
    venv = venv_over_this_environment(tmp_path / "venv")
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        command, shell=True, cwd=repo, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "does not provide the extra" not in done.stdout + done.stderr
    needs = ["fedpac_hf" + command.split('"')[1].lstrip(".")]  # fedpac_hf[extras]
    if INSTALLS[command] is not None:
        tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
        needs += tomllib.loads(INSTALLS[command].read_text())["project"]["dependencies"]
    shown = subprocess.run(
        [venv / "bin" / "python", "-c", UNMET, *needs],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert Path(shown[0]).is_relative_to(repo)  # this copy, installed editable
    assert shown[1:] == [], f"not met after {command}: {shown[1:]}"
