"""Round-level callbacks of :class:`~fedpac_hf.FedPACTrainer`.

- :class:`FedPACCallback`: a ``TrainerCallback`` with ``on_round_begin`` /
  ``on_round_end`` events (a round is also one ``global_step``, so the usual
  ``on_step_*``, ``on_evaluate``, ``on_save`` and ``on_log`` events fire too).
- :class:`EvaluateLastRoundCallback`: evaluate the final global model even
  with ``eval_strategy="no"`` (what ``fedpac-hf train`` reports);
- :class:`RoundProgressCallback`: the console of a federated run, a progress
  bar over rounds and one readable line per round. ``FedPACTrainer`` uses it
  in place of ``Trainer``'s ``ProgressCallback`` / ``PrinterCallback``, which
  print a dict of strings per log call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback

__all__ = [
    "EvaluateLastRoundCallback",
    "FedPACCallback",
    "RoundProgressCallback",
    "format_round_line",
]


class FedPACCallback(TrainerCallback):
    """A ``TrainerCallback`` with round-level events.

    ``FedPACTrainer`` calls ``on_round_begin`` / ``on_round_end`` on every
    callback that defines them (this class's no-op defaults included), with
    the usual ``args, state, control`` and ``round`` / ``metrics`` keywords;
    ``metrics`` holds the round's training metrics and, when the round was
    evaluated, its ``eval_*`` metrics. Setting ``control.should_training_stop``
    stops the run after the round.
    """

    def on_round_begin(self, args, state, control, **kwargs):  # noqa: D102
        return control

    def on_round_end(self, args, state, control, **kwargs):  # noqa: D102
        return control


def _megabytes(value: float) -> str:
    return f"{value / 1e6:.3g} MB"


def format_round_line(metrics: Mapping[str, Any], num_rounds: int | None = None) -> str:
    """One console line for a round: round, lr, losses, eval metrics, drift, bytes, time.

    Parameters
    ----------
    metrics:
        The round's metrics (see :data:`fedpac_hf.federated.ROUND_METRICS`),
        with any ``eval_*`` entries.
    num_rounds:
        R, shown as ``round r/R``.

    Returns
    -------
    str
        E.g. ``round 3/30 | lr 2.9e-03 | train_loss 1.234 | eval_accuracy 0.5120 |
        drift 1.2e-02 (rel 3.4e-03) | up 1.2 MB, down 3.4 MB | 2.1 s``.
    """
    parts = []
    r = int(metrics.get("round", 0))
    parts.append(f"round {r}/{num_rounds}" if num_rounds else f"round {r}")
    if "learning_rate" in metrics:
        parts.append(f"lr {metrics['learning_rate']:.2e}")
    if "train_loss" in metrics:
        parts.append(f"train_loss {metrics['train_loss']:.4f}")
    shown = [
        k
        for k in metrics
        if k.startswith("eval_")
        and not k.endswith(("_runtime", "_per_second", "_preparation_time"))
    ]
    for key in shown:
        value = metrics[key]
        if isinstance(value, int | float):
            parts.append(f"{key} {value:.4f}")
    if "drift" in metrics:
        parts.append(f"drift {metrics['drift']:.2e} (rel {metrics.get('drift_relative', 0):.2e})")
    if "bytes_up" in metrics:
        parts.append(
            f"up {_megabytes(metrics['bytes_up'])}, down {_megabytes(metrics.get('bytes_down', 0))}"
        )
    if "epsilon" in metrics:
        parts.append(f"epsilon {metrics['epsilon']:.3g}")
    dropped = int(metrics.get("num_dropped", 0))
    if dropped:
        parts.append(f"{dropped} dropped")
    if "round_time" in metrics:
        parts.append(f"{metrics['round_time']:.1f} s")
    return " | ".join(parts)


class RoundProgressCallback(FedPACCallback):
    """A progress bar over rounds and one readable line per round, on the main process.

    The bar follows ``disable_tqdm``; the lines follow ``logging_strategy``
    (``"no"`` silences them). Everything else goes to ``metrics.jsonl`` /
    ``report_to``, not to the console.
    """

    def __init__(self) -> None:
        self.bar: Any = None

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: D102
        if state.is_world_process_zero and not args.disable_tqdm:
            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc="rounds", dynamic_ncols=True
            )
        return control

    def on_round_end(self, args, state, control, **kwargs):  # noqa: D102
        if not state.is_world_process_zero:
            return control
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
        if args.logging_strategy != "no" and kwargs.get("metrics") is not None:
            line = format_round_line(kwargs["metrics"], state.max_steps)
            if self.bar is not None:
                self.bar.write(line)
            else:
                print(line, flush=True)
        return control

    def on_train_end(self, args, state, control, **kwargs):  # noqa: D102
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        return control


class EvaluateLastRoundCallback(FedPACCallback):
    """Evaluate after the last round whatever ``eval_strategy`` says.

    ``fedpac-hf train`` adds it so that the final accuracy or perplexity it
    prints is also in the last row of ``metrics.jsonl`` and in ``summary.md``.
    """

    def on_step_end(self, args, state, control, **kwargs):  # noqa: D102
        if state.global_step >= state.max_steps:
            control.should_evaluate = True
        return control
