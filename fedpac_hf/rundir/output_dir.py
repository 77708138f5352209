"""One owner per run directory.

A run claims its ``output_dir`` before it writes anything there:

- a lock (``.fedpac_hf.lock``, an ``flock`` the operating system releases when
  the process ends, even on ``kill -9``) refuses a second run on the same
  directory while the first one lives;
- a directory that holds another run's checkpoints (``checkpoint-round-*``) or
  metrics (``metrics.jsonl``) is refused, unless the run resumes it
  (``resume_from_checkpoint``) or replaces it (``overwrite_output_dir``, which
  deletes those files first), so that a later resume never picks up an older
  run's checkpoint and metrics of two runs never interleave;
- a directory no run has claimed before (it has no lock file and no run's
  files) that holds a file a run would write (``config.yaml``, ``README.md``,
  ``model.safetensors``, ... :data:`RUN_OUTPUTS`) is refused whatever the
  settings, naming the files: a run never replaces a file it did not write.

Claims are re-entrant within a process: ``fedpac-hf train`` claims the
directory for the whole command and the trainer's own claim inside it is a
no-op.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "LOCK_NAME",
    "RUN_OUTPUTS",
    "OutputDirClaim",
    "check_writable",
    "claim_output_dir",
    "foreign_files",
    "no_new_folders",
    "previous_run_files",
]

LOCK_NAME = ".fedpac_hf.lock"
_RUN_FILES = ("metrics.jsonl", "metrics.csv", "summary.md", "environment.jsonl")
# complete checkpoints, and the previous copy of one whose replacement was interrupted
_CHECKPOINT_GLOBS = ("checkpoint-round-*", ".old-checkpoint-round-*")

#: What a run writes at the top of its output_dir: its own files, then what
#: ``save_model`` / ``save_pretrained`` write for a model, a PEFT adapter, a
#: tokenizer or an image processor (glob patterns).
RUN_OUTPUTS = (
    "config.yaml",
    "metrics.jsonl",
    "metrics.csv",
    "summary.md",
    "environment.jsonl",
    "partition.txt",
    "*.png",
    "checkpoint-round-*",
    "base_model",
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "*.bin",
    "*.bin.index.json",
    "adapter_config.json",
    "README.md",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "chat_template.*",
    "*.model",
)

_HELD: dict[Path, list[int]] = {}  # directory -> [lock file descriptor, claims]
_HELD_LOCK = threading.Lock()


def previous_run_files(output_dir: str | os.PathLike[str]) -> list[str]:
    """Names of another run's checkpoints and metrics files in ``output_dir``.

    A ``metrics.jsonl`` without a row is no run yet (one that died before its
    first round ended): its retry starts over it without ``overwrite_output_dir``.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = sorted(p.name for g in _CHECKPOINT_GLOBS for p in root.glob(g) if p.is_dir())
    metrics = root / _RUN_FILES[0]
    if metrics.is_file() and metrics.read_text(encoding="utf-8").strip():
        found.append(metrics.name)
    return found


class OutputDirClaim:
    """A held claim on a run directory; :meth:`release` it (or use it as a context manager)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._released = False

    def release(self) -> None:
        """Give the claim back; the lock goes when the last claim of this process does."""
        if self._released:
            return
        self._released = True
        with _HELD_LOCK:
            held = _HELD.get(self.path)
            if held is None:
                return
            held[1] -= 1
            if held[1] == 0:
                os.close(held[0])  # closing the descriptor drops the flock
                del _HELD[self.path]

    def __enter__(self) -> OutputDirClaim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim_output_dir(
    output_dir: str | os.PathLike[str], *, resume: bool = False, overwrite: bool = False
) -> OutputDirClaim:
    """Lock ``output_dir`` for this process and refuse to start over another run's files.

    Parameters
    ----------
    output_dir:
        The run directory (created if missing).
    resume:
        The run continues from a checkpoint in the directory: its files stay.
    overwrite:
        Delete another run's checkpoints and metrics files and start afresh.

    Returns
    -------
    OutputDirClaim
        Release it when the run ends.

    Raises
    ------
    ValueError
        If the directory cannot be written, another live process holds it, or
        it holds another run's files and neither ``resume`` nor ``overwrite``
        is set; the message says which setting to change.
    """
    path = Path(output_dir).resolve()
    with _HELD_LOCK:
        if path in _HELD:
            _HELD[path][1] += 1
            return OutputDirClaim(path)
        # a run directory: claimed before (the lock stays), or holding a run's files
        run_dir = (path / LOCK_NAME).exists() or bool(previous_run_files(path))
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ValueError(
                f"output_dir={str(output_dir)!r} cannot be written ({err.strerror}); choose "
                "another output_dir"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(
                f"output_dir={str(output_dir)!r} is in use by another run (process {owner}); "
                "wait for it to finish or choose another output_dir"
            ) from None
        try:
            if not run_dir:
                _check_foreign_files(path, output_dir)
            _check_previous_run(path, output_dir, resume=resume, overwrite=overwrite)
        except BaseException:
            os.close(fd)
            if not run_dir:  # leave the folder as it was found
                (path / LOCK_NAME).unlink(missing_ok=True)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[path] = [fd, 1]
    return OutputDirClaim(path)


def foreign_files(output_dir: str | os.PathLike[str]) -> list[str]:
    """Names at the top of ``output_dir`` that a run would write (:data:`RUN_OUTPUTS`)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return sorted(
        entry.name
        for entry in root.iterdir()
        if any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in RUN_OUTPUTS)
    )


def _check_foreign_files(path: Path, output_dir: object) -> None:
    found = foreign_files(path)
    if found:
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise ValueError(
            f"output_dir={str(output_dir)!r} holds {shown}, which no fedpac-hf run wrote and a "
            "run would replace; move them away or choose another output_dir "
            "(overwrite_output_dir replaces a previous run's files only)"
        )


def _check_previous_run(path: Path, output_dir: object, *, resume: bool, overwrite: bool) -> None:
    previous = previous_run_files(path)
    if not previous or resume:
        return
    if not overwrite:
        shown = ", ".join(previous[:4]) + (", ..." if len(previous) > 4 else "")
        raise ValueError(
            f"output_dir={str(output_dir)!r} holds another run ({shown}); set "
            "resume_from_checkpoint=true to continue it, overwrite_output_dir=true to replace "
            "it, or choose another output_dir"
        )
    for pattern in _CHECKPOINT_GLOBS:
        for old in path.glob(pattern):
            shutil.rmtree(old, ignore_errors=True)
    for name in _RUN_FILES:
        (path / name).unlink(missing_ok=True)


def check_writable(output_dir: str | os.PathLike[str]) -> None:
    """Refuse an ``output_dir`` that cannot be created or written, naming the setting.

    Looks at the nearest folder that exists on the way to it; creates nothing.
    """
    folder = Path(output_dir).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        reason = "Not a directory"
    elif not os.access(folder, os.W_OK | os.X_OK):
        reason = "Permission denied"
    else:
        return
    raise ValueError(
        f"output_dir={str(output_dir)!r} cannot be written ({reason}: {folder}); choose "
        "another output_dir"
    )


@contextlib.contextmanager
def no_new_folders(path: str | os.PathLike[str] | None) -> Iterator[None]:
    """Remove, on exit, the folders of ``path`` that did not exist on entry and stayed empty.

    ``transformers.Trainer`` creates its ``output_dir`` when it is built; a
    run that then fails its preflight must leave no trace (the claim creates
    the folder when the run starts).
    """
    missing: list[str] = []
    folder = os.fspath(path) if path is not None else ""
    while folder and not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder.rstrip(os.sep))
    try:
        yield
    finally:
        for made in missing:  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(made)
