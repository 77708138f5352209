"""F1 score as an ``evaluate`` metric module, shipped so that it loads offline.

Same interface as the Hub's ``evaluate-metric/f1``: ``average`` is
``"binary"`` (default, the F1 of ``pos_label``), ``"macro"``, ``"micro"`` or
``"weighted"``. Load it with :func:`fedpac_hf.metrics.load_metric`.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """F1: the harmonic mean of precision and recall, 2 * P * R / (P + R)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): ground-truth labels.
    average (str): 'binary' (default), 'macro', 'micro' or 'weighted'.
    pos_label (int): the positive class when average='binary' (default 1).
Returns:
    f1 (float): the F1 score.
Examples:
    >>> metric = evaluate.load("fedpac_hf/metrics/f1")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'f1': 0.6666666666666666}
"""

_CITATION = ""

_AVERAGES = ("binary", "macro", "micro", "weighted")


def _class_f1(predictions: np.ndarray, references: np.ndarray, label: int) -> float:
    """F1 of one class treated as positive (0 when it is never predicted nor present)."""
    true_positive = float(np.sum((predictions == label) & (references == label)))
    predicted = float(np.sum(predictions == label))
    actual = float(np.sum(references == label))
    if predicted + actual == 0:
        return 0.0
    return 2.0 * true_positive / (predicted + actual)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    """Binary or averaged multi-class F1 score."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, average="binary", pos_label=1):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if average not in _AVERAGES:
            raise ValueError(f"average must be one of {_AVERAGES}, got {average!r}")
        if average == "binary":
            return {"f1": _class_f1(predictions, references, pos_label)}
        if average == "micro":
            return {"f1": float(np.mean(predictions == references)) if predictions.size else 0.0}
        labels = np.union1d(predictions, references)
        scores = np.array([_class_f1(predictions, references, int(c)) for c in labels])
        if average == "macro":
            return {"f1": float(scores.mean()) if scores.size else 0.0}
        support = np.array([np.sum(references == c) for c in labels], dtype=np.float64)
        return {"f1": float(np.sum(scores * support) / support.sum()) if support.sum() else 0.0}
