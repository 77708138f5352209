"""One setting tuned under DP at the first row's other settings: a goal row's variant.

The ``lora_r4`` goal's fourth and fifth rows (:mod:`_privacy_beta`,
:mod:`_privacy_projection`) follow one protocol: for each method the setting
applies to, the first row's final run at eps = 8 (:func:`~_privacy_tuning.dp_chosen`)
is tried on the validation split (seed 0) at each of the setting's values; the
best (the first row's own on a tie, :func:`~_privacy_tuning.best_tried`) gets
the goal's test seeds where it is not the first row's; the goal row compares
fedpac_soap at its choice with the best first-order method at either
(:func:`~_privacy_results.variant_goal`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from _harness.reporting import Summary
from _harness.runs import Record
from _privacy_results import dp_tuned_levels, variant_goal, with_variant
from _privacy_suites import Suite
from _privacy_tuning import Run, best_tried, dp_chosen, dp_tune_run


@dataclass(frozen=True)
class TunedSetting:
    """A :class:`~_privacy_tuning.Run` field tuned under DP at ``level``.

    Attributes
    ----------
    field:
        The run's field (``"beta"``, ``"projection"``), as passed on the command line.
    values:
        The values tried besides the first row's (``""``).
    applies:
        Whether a method has the setting at all.
    suffix:
        Name suffix of a method's summary at its choice (``"<method><suffix>"``).
    protocol:
        The goal row's description.
    level:
        The privacy level it is tuned at.
    """

    field: str
    values: tuple[str, ...]
    applies: Callable[[str], bool]
    suffix: str
    protocol: str
    level: str = "8"

    def runs(self, suite: Suite, method: str, done: dict[str, Record]) -> list[Run]:
        """``method``'s DP tuning runs (none where the setting does not apply or before the
        first row's settings are chosen)."""
        base = dp_chosen(suite, method, self.level, done)
        if base is None or not self.applies(method):
            return []
        return [replace(dp_tune_run(base), **{self.field: value}) for value in self.values]

    def tried(self, suite: Suite, method: str, done: dict[str, Record]) -> list[Run]:
        """The first row's tuning run, then :meth:`runs` (the rows of a tuning table)."""
        base = dp_chosen(suite, method, self.level, done)
        return [dp_tune_run(base), *self.runs(suite, method, done)] if base else []

    def started(self, suite: Suite, methods: tuple[str, ...], done: dict[str, Record]) -> bool:
        """Whether any of the tuning runs of ``methods`` is done (so a report shows them)."""
        return any(
            run.key in done
            for method in filter(self.applies, methods)
            for run in self.runs(suite, method, done)
        )

    def chosen(self, suite: Suite, method: str, level: str, done: dict[str, Record]) -> Run | None:
        """The first row's final run (seed 0) at ``level``, with the setting tuned at
        :attr:`level` (None while a tuning run is missing)."""
        base = dp_chosen(suite, method, level, done)
        if base is None or level != self.level or not self.applies(method):
            return base
        return best_tried(base, self.runs(suite, method, done), done)

    def finals(
        self, suite: Suite, methods: tuple[str, ...], done: dict[str, Record], seeds: int
    ) -> tuple[list[Run], int]:
        """The runs in priority order (tuning, then finals seed-major where the choice is not
        the first row's) and how many wait for others."""
        runs = [run for method in methods for run in self.runs(suite, method, done)]
        waiting = 0
        for seed in range(seeds):
            for method in filter(self.applies, methods):
                pick = self.chosen(suite, method, self.level, done)
                if pick is None:
                    waiting += 1
                elif getattr(pick, self.field):
                    runs.append(replace(pick, seed=seed))
        return runs, waiting

    def levels(
        self,
        suite: Suite,
        finals: list[Record],
        levels: dict[str, dict[str, Summary]],
        done: dict[str, Record],
    ) -> dict[str, dict[str, Summary]]:
        """``levels`` (the first row's) plus every method at its choice
        (:func:`~_privacy_results.with_variant`)."""
        tuned = dp_tuned_levels(suite, finals, done, self.chosen)
        return with_variant(levels, tuned[self.level], self.suffix, self.level)

    def goal(
        self,
        suite: Suite,
        finals: list[Record],
        levels: dict[str, dict[str, Summary]],
        done: dict[str, Record],
    ) -> list[tuple[str, str, bool]]:
        """The goal row (none before a final run at a value other than the first row's)."""
        if not any(r.get(self.field) for r in finals):
            return []
        both = self.levels(suite, finals, levels, done)
        return variant_goal(both, self.suffix, self.protocol, self.level)
