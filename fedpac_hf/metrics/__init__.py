"""Evaluation metrics as ``evaluate`` modules that work without the Hub.

``evaluate.load("accuracy")`` downloads its script from the Hub. This package
ships the metrics the examples use (``accuracy``, ``f1``) as local
``evaluate.Metric`` modules; :func:`load_metric` loads the Hub version when
the Hub may be used and the shipped one otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

import evaluate

__all__ = ["SHIPPED_METRICS", "load_metric", "metric_path"]

_ROOT = Path(__file__).resolve().parent
SHIPPED_METRICS: tuple[str, ...] = tuple(
    sorted(p.name for p in _ROOT.iterdir() if (p / f"{p.name}.py").is_file())
)


def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.strip().lower() not in ("", "0", "false", "no", "off")


def metric_path(name: str) -> str:
    """The folder of the shipped metric module ``name`` (what ``evaluate.load`` accepts).

    Parameters
    ----------
    name : str
        One of :data:`SHIPPED_METRICS`.

    Returns
    -------
    str
        Path of ``fedpac_hf/metrics/<name>/``.
    """
    if name not in SHIPPED_METRICS:
        raise ValueError(
            f"no shipped metric {name!r}; shipped metrics: {', '.join(SHIPPED_METRICS)}"
        )
    return str(_ROOT / name)


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """Load an ``evaluate`` metric that works offline.

    When ``HF_HUB_OFFLINE`` is unset (or false) the Hub's ``name`` is tried
    first and the shipped module is the fallback if the Hub cannot be reached;
    offline, the shipped module is used directly (names that are not shipped
    then fail with a ``ValueError`` listing those that are).

    Parameters
    ----------
    name : str
        Metric name, e.g. ``"accuracy"`` or ``"f1"``.
    **kwargs
        Passed to :func:`evaluate.load`.

    Returns
    -------
    evaluate.EvaluationModule
        The metric; call ``compute(predictions=..., references=...)``.
    """
    if not _offline():
        try:
            return evaluate.load(name, **kwargs)
        except (ConnectionError, FileNotFoundError, OSError):
            if name not in SHIPPED_METRICS:
                raise
    return evaluate.load(metric_path(name), **kwargs)
