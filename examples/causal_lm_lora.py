"""Causal language modelling with LoRA adapters only, on a pretrained base, offline:
the small Llama `base:llama-shakespeare` (trained centrally on the Shakespeare
plays no client holds; built once and cached) adapts to five other plays, one
client per speaker, adapters on the attention query/value projections (the
default); the trainer logs eval_perplexity. With --model_name_or_path any Hub
causal LM (AutoModelForCausalLM + AutoTokenizer)::

    python examples/causal_lm_lora.py
    python examples/causal_lm_lora.py --model_name_or_path HuggingFaceTB/SmolLM2-135M --lora_r 16

Settings come from ``configs/causal_lm_shakespeare.yaml``; pass another YAML file first
to replace it, and ``--field value`` for any ModelDataArguments or
FedPACArguments field. The script is the same code path as
``fedpac-hf train configs/causal_lm_shakespeare.yaml``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedpac_hf.run import run_example

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "causal_lm_shakespeare.yaml"


def main(argv: Sequence[str] | None = None) -> dict:
    """Train with the default config and ``argv`` overrides; return the final metrics."""
    return run_example(DEFAULT_CONFIG, argv)


if __name__ == "__main__":
    main()
