"""Turning run records into a report: summaries over seeds, tables, plots, kept sections.

See the package docstring (``_harness/__init__.py``) for what lives where.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .runs import Record, series

#: The environment line of every report's command block.
OFFLINE = "export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1"
#: Metrics for which lower is better (all others: higher is better).
LOWER_IS_BETTER = ("eval_loss", "eval_perplexity", "train_loss")


# ---------------------------------------------------------------- summaries


def mean_series(records: Sequence[Record], key: str) -> np.ndarray:
    """The mean of ``key`` over runs, per round (NaNs ignored), up to the shortest run."""
    n = min(len(r["history"]) for r in records)
    return np.nanmean(np.stack([series(r, key)[:n] for r in records]), axis=0)


def rounds_to(curve: np.ndarray, target: float, higher_is_better: bool = True) -> int | None:
    """First round (1-based) at which ``curve`` reaches ``target``; None if never."""
    hits = np.flatnonzero(curve >= target - 1e-12 if higher_is_better else curve <= target + 1e-12)
    return int(hits[0]) + 1 if len(hits) else None


@dataclass
class Summary:
    """One method (or arm) on one split: aggregates over its final runs, one per seed.

    ``metric`` is the quality metric (``eval_accuracy``, ``eval_perplexity``,
    ...); ``runs`` are the run records.
    """

    method: str
    metric: str
    runs: list[Record]

    @property
    def higher(self) -> bool:
        """Whether a higher ``metric`` is better."""
        return self.metric not in LOWER_IS_BETTER

    @property
    def lr(self) -> float:
        """The learning rate of the runs (the first run's; all share it)."""
        return self.runs[0]["lr"]

    @property
    def seeds(self) -> int:
        """How many runs (seeds) the summary covers."""
        return len(self.runs)

    @property
    def final(self) -> np.ndarray:
        """The metric after the last round, per seed."""
        return np.array([series(r, self.metric)[-1] for r in self.runs])

    @property
    def mean(self) -> float:
        """The mean over seeds of :attr:`final`."""
        return float(np.mean(self.final))

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (NaN for one seed)."""
        return float(np.std(self.final, ddof=1)) if self.seeds > 1 else float("nan")

    @property
    def best(self) -> np.ndarray:
        """The best round's value, per seed (on the test split: reported, never chosen)."""
        pick = np.nanmax if self.higher else np.nanmin
        return np.array([pick(series(r, self.metric)) for r in self.runs])

    def worst_last(self, last: int) -> float:
        """The worst value over the last ``last`` rounds, averaged over seeds (stability)."""
        pick = np.nanmin if self.higher else np.nanmax
        return float(np.mean([pick(series(r, self.metric)[-last:]) for r in self.runs]))

    @property
    def curve(self) -> np.ndarray:
        """The seed-mean metric per round."""
        return mean_series(self.runs, self.metric)

    @property
    def drift(self) -> float:
        """``drift_relative``, mean over rounds and seeds (NaN: no curvature)."""
        drift = [np.nanmean(series(r, "drift_relative")) for r in self.runs]
        return float(np.nanmean(drift)) if np.isfinite(drift).any() else float("nan")

    def pooled(
        self, key: str, stat: Callable[[np.ndarray], Any] = np.median, skip: int = 0
    ) -> float:
        """``stat`` of ``key`` over every round (from round ``skip + 1`` on) of every seed."""
        return float(stat(np.concatenate([series(r, key)[skip:] for r in self.runs])))


def summarise(records: Iterable[Record], metric: str) -> dict[str, Summary]:
    """The final runs of one split, grouped by ``method`` (in order of first appearance)."""
    by_method: dict[str, list[Record]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    return {m: Summary(m, metric, runs) for m, runs in by_method.items()}


def ordered(names: Iterable[str], reference: Sequence[str]) -> list[str]:
    """``names`` in the order of ``reference`` (names not in it last)."""
    return sorted(names, key=lambda m: reference.index(m) if m in reference else 99)


def best_baseline(
    summ: Mapping[str, Summary], baselines: Sequence[str], higher: bool = True
) -> tuple[str, float] | None:
    """The baseline with the best mean final value, and that value (None: no baseline ran)."""
    base = [m for m in summ if m in baselines]
    if not base:
        return None
    best = (max if higher else min)(base, key=lambda m: summ[m].mean)
    return best, summ[best].mean


# ------------------------------------------------------------------- tables


def fmt(x: float, scale: float = 100.0, digits: int = 1) -> str:
    """``x * scale`` with ``digits`` decimals (a fraction as a percentage by default)."""
    return "n/a" if not np.isfinite(x) else f"{x * scale:.{digits}f}"


def mib(x: float) -> str:
    """Bytes as MiB with two decimals."""
    return "n/a" if not np.isfinite(x) else f"{x / 2**20:.2f}"


def human(x: float) -> str:
    """Bytes as B / KiB / MiB / GiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:.0f} B"


def command_block(lines: list[str], commands: Sequence[str]) -> None:
    """The fenced shell block that made a report: the offline environment, then ``commands``."""
    lines += ["```", OFFLINE, *commands, "```\n"]


def goals_table(lines: list[str], rows: Iterable[tuple[str, str, bool]]) -> None:
    """A ``goal | measured | met?`` table of ``(goal, measured, met)`` rows."""
    lines += ["| goal | measured | met? |", "|---|---|---|"]
    for goal, measured, ok in rows:
        lines.append(f"| {goal} | {measured} | {'yes' if ok else '**no**'} |")
    lines.append("")


def chosen_cell(chosen: float | None, points: Sequence[float]) -> str:
    """The chosen rate of a tuning table: ``-`` while unknown, ``*`` at the edge of the grid."""
    if chosen is None:
        return "-"
    edge = len(points) > 1 and chosen in (points[0], points[-1])
    return f"{chosen:g}{'*' if edge else ''}"


def tuning_table(lines: list[str], title: str, rows: Iterable[tuple[str, list[str], str]]) -> None:
    """A learning-rate table: per method its ``lr: score`` cells (at least four) and the chosen rate."""
    rows = list(rows)
    width = max([4, *(len(cells) for _, cells, _ in rows)])
    lines.append(f"{title}:\n")
    lines.append("| method | " + " | ".join(["lr: score"] * width) + " | chosen lr |")
    lines.append("|---|" + "---|" * (width + 1))
    for name, cells, chosen in rows:
        cells = cells + [""] * (width - len(cells))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {chosen} |")
    lines.append("")


# -------------------------------------------------------------------- plots


def plot_curves(
    summaries: Mapping[str, Summary],
    order: Sequence[str],
    title: str,
    path: Path,
    *,
    label: Callable[[str], str] = str,
    color: Callable[[str], str | None] = lambda name: None,
    style: Callable[[str], dict[str, Any]] = lambda name: {},
    log_y: bool = False,
    ceiling: tuple[float, str] | None = None,
) -> None:
    """Seed-mean test curve per method (accuracy in %), saved to ``path``.

    ``label``, ``color`` and ``style`` map a method to its legend name, line
    colour and line style; the legend adds its rate and seed count.
    ``ceiling`` = ``(value, text)`` draws a dashed horizontal reference line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for m in ordered(summaries, order):
        s = summaries[m]
        y = s.curve * (100 if s.metric == "eval_accuracy" else 1)
        ax.plot(
            np.arange(1, len(y) + 1),
            y,
            label=f"{label(m)} (lr {s.lr:g}, n={s.seeds})",
            color=color(m),
            **style(m),
        )
    if ceiling is not None:
        value, text = ceiling
        ax.axhline(value, color="#555555", linewidth=1, linestyle=(0, (6, 3)))
        ax.annotate(text, (1, value), fontsize=7, va="bottom")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    accuracy = any(s.metric == "eval_accuracy" for s in summaries.values())
    ax.set_ylabel("test accuracy (%)" if accuracy else "test perplexity")
    if log_y:
        ax.set_yscale("log")
    finish_figure(fig, ax, title, path)


def finish_figure(fig: Any, ax: Any, title: str, path: Path) -> None:
    """Title, grid and legend of a benchmark figure, then save and close it."""
    import matplotlib.pyplot as plt

    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------- report sections

ANALYSIS_START, ANALYSIS_END = "<!-- analysis -->", "<!-- /analysis -->"


def kept_block(path: Path, start: str = ANALYSIS_START, end: str = ANALYSIS_END) -> str:
    """The hand-written text between ``start`` and ``end`` in the report at ``path``.

    Reports keep it when they rebuild their tables ("" when there is none).
    """
    if not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8")
    if start not in text or end not in text:
        return ""
    return text.split(start, 1)[1].split(end, 1)[0].strip()


def _section_markers(name: str) -> tuple[str, str]:
    return f"<!-- section:{name} -->", f"<!-- /section:{name} -->"


def write_section(path: Path, name: str, text: str) -> None:
    """Put ``text`` into the ``name`` section of the report at ``path`` (replaced if there,
    appended otherwise); a report that rebuilds the rest keeps it (:func:`kept_sections`)."""
    start, end = _section_markers(name)
    block = f"{start}\n{text.strip()}\n{end}"
    current = path.read_text(encoding="utf-8") if path.is_file() else ""
    if start in current and end in current:
        before, rest = current.split(start, 1)
        current = before + block + rest.split(end, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(current, encoding="utf-8")


def kept_sections(path: Path) -> list[str]:
    """The sections other benchmark scripts wrote into the report (see :func:`write_section`)."""
    if not path.is_file():
        return []
    text, blocks = path.read_text(encoding="utf-8"), []
    for part in text.split("<!-- section:")[1:]:
        name = part.split(" -->", 1)[0]
        start, end = _section_markers(name)
        if end in part:
            blocks.append(start + part.split(end, 1)[0].split(" -->", 1)[1] + end)
    return blocks
