"""The ``lora_r4`` goal's fifth row: the noised delta projected on the shared curvature.

Why (decided after the four rows and the sections at scale missed, before any
of these runs): at 500 clients the noise on the delta is what costs
fedpac_soap its lead (6.5 points at eps = 8, the first-order methods 0.3 to
1.8), and it is isotropic: every float of the mean delta gets the same noise.
SOAP's shared statistics say where the clients' gradients have their energy,
so the server could keep only the part of the noised mean in each long side's
``k`` leading eigenvectors (``dp_projection_rank``,
:mod:`fedpac_hf.federated.privacy_projection`; post-processing of released
values, so epsilon is unchanged). On a LoRA factor (``64 x 4``) or the head
(``10 x 64``) that keeps about ``k / 64`` of the noise's energy.

One measurement came before this hypothesis was written, and argues against
it: a 3-round clipping-only run (the training split, seed 0, fedpac_soap at
its non-private rate 0.1, ``dp_projection_rank`` 8) logged
``dp_projection_kept`` 0.174 and 0.180 in rounds 2 and 3: k = 8 kept 17-18 %
of the clients' mean delta's energy, against about 8 / 64 = 12.5 % of
isotropic noise. SOAP's update is Adam's in its eigenbasis, whitened, so it
spreads over all directions of a side, not only the leading ones.

Hypothesis, written before any of these runs: with ``dp_projection_rank`` tuned
on the validation split (seed 0) over :data:`RANKS` at eps = 8 and fedpac_soap's
first-row settings (:func:`~_privacy_tuning.dp_chosen`), no k scores above the
unprojected run (76.7 %) by more than one seed spread (1.3 points), and if one
is chosen (the best, unprojected on a tie), fedpac_soap's test lead at it (10
seeds) over the best first-order method stays below half its clip-only lead
(+2.2 points). The goal row is made only if a k is chosen; the first-order
methods have no SOAP curvature to project on, so they keep their first-row
runs.
"""

from __future__ import annotations

from _harness.reporting import fmt
from _harness.runs import Record, tune_score
from _privacy_suites import Suite
from _privacy_tuning import algorithm_of
from _privacy_variant import TunedSetting

#: the projection ranks tried under DP (every side of 64 floats is projected; the head's
#: class side, 10, at 8 only; the adapters' rank side, 4, never)
RANKS = ("8", "16", "32")
#: the privacy level they are tried at
LEVEL = "8"


def projects(method: str) -> bool:
    """Whether ``method``'s clients align to SOAP's statistics (so the server can project)."""
    from fedpac_hf.federated import get_algorithm

    return get_algorithm(algorithm_of(method)).soap_curvature


#: the fifth row: the projection's rank tuned under DP ("<method>, projected" at its choice)
PROJECTION = TunedSetting(
    "projection",
    RANKS,
    projects,
    ", projected",
    " (the noised delta projected on the shared curvature's leading directions, the rank "
    "tuned under DP at the first row's other settings; eps = inf: the first row's "
    "clip-only runs)",
    LEVEL,
)


def projection_section(
    lines: list[str],
    suite: Suite,
    methods: tuple[str, ...],
    done: dict[str, Record],
) -> None:
    """The projection's tuning runs: validation accuracy and the energy each rank kept."""
    if not PROJECTION.started(suite, methods, done):
        return
    projecting = [m for m in methods if projects(m)]
    lines += [
        "## The noised delta projected on the shared curvature (the fifth row)",
        "",
        "Validation accuracy (%, mean of the last 3 rounds) at eps = 8, seed 0, at the first "
        "row's rate, Theta's share and clip schedule, by `dp_projection_rank` k (not "
        "projected: the first row's run); in brackets the mean over rounds 2-20 of "
        "`dp_projection_kept`, the fraction of the noised sum's squared norm the projection "
        "kept:",
        "",
        "| method | not projected | " + " | ".join(f"k = {k}" for k in RANKS) + " | chosen |",
        "|---|" + "---|" * (len(RANKS) + 2),
    ]
    for method in projecting:
        cells = [_tuning_cell(done.get(run.key)) for run in PROJECTION.tried(suite, method, done)]
        pick = PROJECTION.chosen(suite, method, LEVEL, done)
        chosen = "-" if pick is None else (pick.projection or "not projected")
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {chosen} |")
    picks = [PROJECTION.chosen(suite, m, LEVEL, done) for m in projecting]
    if picks and all(pick is not None and not pick.projection for pick in picks):
        outcome = "No rank scored above the unprojected run, so none runs on the test split "
        outcome += "and the goal has no fifth row. "
    else:
        outcome = "The goal's fifth row, when a rank is chosen, compares fedpac_soap at it "
        outcome += "with the first-order methods' first-row runs. "
    lines += [
        "",
        outcome + "A first-order method has no SOAP curvature to project on (`fedadamw` "
        "shares only a diagonal).",
        "",
    ]


def _tuning_cell(record: Record | None) -> str:
    """A tuning run's score, with the mean energy its projection kept (``-``: not run)."""
    if record is None:
        return "-"
    kept = [h["dp_projection_kept"] for h in record["history"][1:] if "dp_projection_kept" in h]
    return fmt(tune_score(record)) + (f" ({sum(kept) / len(kept):.3f})" if kept else "")
