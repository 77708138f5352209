"""Accuracy as an ``evaluate`` metric module, shipped so that it loads offline.

The same computation as the Hub's ``evaluate-metric/accuracy``: the share of
predictions equal to their reference, optionally weighted, or the count when
``normalize=False``. Load it with ``evaluate.load(<path of this folder>)`` or
:func:`fedpac_hf.metrics.load_metric`.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Accuracy: the proportion of correct predictions among all predictions."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): ground-truth labels.
    normalize (bool): return the fraction (True, default) or the count of correct predictions.
    sample_weight (list of float): optional weight of every example.
Returns:
    accuracy (float): the fraction (or count) of correct predictions.
Examples:
    >>> metric = evaluate.load("fedpac_hf/metrics/accuracy")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """The share of predictions that equal their reference."""

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

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(
                f"predictions {predictions.shape} and references {references.shape} differ in shape"
            )
        correct = (predictions == references).astype(np.float64)
        if sample_weight is not None:
            correct = correct * np.asarray(sample_weight, dtype=np.float64)
        if not normalize:
            return {"accuracy": float(correct.sum())}
        total = float(np.sum(sample_weight)) if sample_weight is not None else float(correct.size)
        return {"accuracy": float(correct.sum() / total) if total else float("nan")}
