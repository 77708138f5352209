"""The privacy benchmark's grid: methods, privacy levels, runs, and what is tuned.

``privacy_benchmark.py`` (its docstring is the protocol in full) queues and
trains these runs; ``_privacy_report.py`` reports them. Here: which rates,
clip norms, Theta shares and clip schedules each method gets, from the
tuning runs' records (``done``, keyed by :attr:`Run.key`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from _harness.runs import Record, best_of, scores_at, tune_score
from _privacy_suites import Suite

#: method -> (algorithm, what the server receives besides the delta)
METHODS: dict[str, tuple[str, str]] = {
    "fedavg_adamw": ("fedavg_adamw", "nothing"),
    "fedadamw": ("fedadamw", "AdamW's second moments"),
    "fedpac_soap": ("fedpac_soap", "SOAP's Kronecker statistics"),
    "fedpac_correct_soap": ("fedpac_correct_soap", "nothing (Theta never shared)"),
}
FIRST_ORDER = ("fedavg_adamw", "fedadamw")
#: privacy levels of the final runs: "nodp" is dp_mode none, "inf" clipping only
EPSILONS = ("inf", "8", "2")
NODP_METHOD = "fedpac_soap"
SEEDS = 3
#: seeds of the cells the goal compares (eps = inf, and eps = 8 at the DP-tuned settings;
#: fedpac_soap and the first-order methods): the seed spread is as large as the lead
#: (5 at first; 10 once the 5-seed lead at eps = 8, -0.3 points, was inside its standard error)
GOAL_SEEDS = 10
#: the goal's seeds before seeds 5 to 9 were added (the report gives the goal with these too)
FIRST_GOAL_SEEDS = 5
#: levels whose rate is tuned again under DP (validation split, seed 0), on the
#: non-private choice and the grid's next rates below it (noise favours smaller steps)
DP_TUNED = ("8", "2")
#: (3 at first; 4 once every method picked the lowest of 3 somewhere with the clip schedule)
DP_GRID_POINTS = 4
#: Theta's shares of the mechanism (``dp_theta_share``) tried under DP besides the
#: default 0.5, for the methods that send Theta, at their DP-tuned rate
THETA_SHARES = ("0.2", "0.1")
#: ``dp_clip_schedule`` tried under DP at every rate of the DP grid, with the chosen share
CLIP_SCHEDULE = "learning_rate"
#: quantiles of the clients' non-private norms tried as clip norms under DP besides the
#: median, at the rate, share and schedule chosen (delta and Theta at the same quantile)
CLIP_QUANTILES = ("0.25", "0.75", "0.9")
#: the curvature's decay per local step (its memory, over which the noise on the shared
#: Theta averages) tried under DP at :data:`CURVATURE_LEVEL` for the methods that send Theta:
#: SOAP's ``shampoo_beta`` (default 0.95), AdamW's second-moment rate (default 0.999)
CURVATURE_DECAYS: dict[str, tuple[str, ...]] = {
    "fedpac_soap": ("0.99", "0.999"),
    "fedadamw": ("0.99", "0.9999"),
}
#: Theta's size (``theta_budget``, 1.0 with adapters: the basis form) tried under DP at
#: :data:`CURVATURE_LEVEL` after the decay, for the methods with a compact Theta (added after
#: the decay's 10-seed results): 0.5 sends each long side's diagonal alone (about half the
#: floats), 0.25 only the short sides (LoRA's rank side, the head's classes; 4 % of the
#: floats); the same clipped norm spread over fewer floats stands further above the noise
THETA_BUDGETS: dict[str, tuple[str, ...]] = {"fedpac_soap": ("0.5", "0.25")}
#: the privacy level at which the curvature's decay and size are tuned
CURVATURE_LEVEL = "8"
#: the methods that align again, with Theta from public data at the server
#: (``public_curvature``; a sixth variant, added after the fifth's 10-seed results): clients
#: send no Theta, so the delta gets the whole mechanism. Each is tuned like a method of its
#: own, at eps = inf and :data:`CURVATURE_LEVEL` only (rate without DP; rate and clip
#: schedule under DP)
PUBLIC_CURVATURE: dict[str, str] = {
    "fedpac_soap_public": "fedpac_soap",
    "fedadamw_public": "fedadamw",
}
#: the server's public data: scikit-learn's 8x8 digits (``digits``, its training split's
#: digits 5-9, 717 images resized to 28 x 28), a dataset apart from MNIST-5k
PUBLIC_DATA = "digits"
#: runs of the client rule on it that the server's Theta averages per round
#: (``public_curvature_clients``): 400 of the 717 images at 5 steps of batch 8, where the
#: clients' Theta averages over the round's about 50 clients (50 runs would repeat images
#: and double the run time on this machine)
PUBLIC_RUNS = 10


def lr_grid(suite: Suite, method: str) -> tuple[float, ...]:
    """The learning-rate grid of ``method`` (AdamW clients prefer smaller rates)."""
    return suite.grids[0] if "adamw" in method else suite.grids[1]


def algorithm_of(method: str) -> str:
    """The registered algorithm ``method`` runs (a public-curvature variant: its base's)."""
    return METHODS[PUBLIC_CURVATURE.get(method, method)][0]


def aligns(method: str) -> bool:
    """Whether ``method``'s clients send Theta (so it needs ``dp_theta_clip_norm``): its
    algorithm aligns and Theta does not come from public data."""
    from fedpac_hf.federated import get_algorithm

    public = True if method in PUBLIC_CURVATURE else None
    return get_algorithm(algorithm_of(method), public_curvature=public).shares_curvature


@dataclass(frozen=True)
class Run:
    """One training run: a non-private tuning run (validation) or a final run (test).

    ``privacy`` is ``"nodp"`` (``dp_mode: none``), ``"inf"`` (clipping only)
    or a target epsilon; ``clip`` and ``theta_clip`` are the clip norms as
    passed on the command line (``""`` when unused). Stage ``"dptune"`` is a
    tuning run under DP (validation split); ``tuned`` says where a final run's
    rate was tuned (``"nodp"``, ``"dp"``, or ``"dpfixed"``: under DP with
    fixed-size samples, :mod:`_privacy_sampling`); ``theta_share`` is
    ``dp_theta_share`` as passed (``""``: the default 0.5); ``clip_schedule`` is
    ``dp_clip_schedule`` as passed (``""``: constant); ``clip_quantile`` the
    quantile of the non-private norms the clip norms are (``""``: the median);
    ``decay`` the curvature's decay (:data:`CURVATURE_DECAYS`; ``""``: the
    optimizer's default); ``budget`` Theta's size (:data:`THETA_BUDGETS`; ``""``:
    the default ``theta_budget``); ``beta`` the correction strength as passed
    (``""``: the algorithm's); ``population`` how many times larger the federation
    whose noise at epsilon ``privacy`` the run emulates (``_privacy_population.py``;
    ``""``: this one's); ``eps`` SOAP's Adam eps (``""``: its default); ``sampling``
    ``dp_sampling`` as passed (``""``: Poisson, the default); ``projection``
    ``dp_projection_rank`` as passed (``""``: not projected, :mod:`_privacy_projection`).
    """

    stage: str
    method: str
    privacy: str
    seed: int
    lr: float
    clip: str = ""
    theta_clip: str = ""
    tuned: str = "nodp"
    theta_share: str = ""
    clip_schedule: str = ""
    clip_quantile: str = ""
    decay: str = ""
    budget: str = ""
    beta: str = ""
    population: str = ""
    eps: str = ""
    sampling: str = ""
    projection: str = ""

    @property
    def key(self) -> str:
        curvature = f"_decay{self.decay}" if self.decay else ""
        curvature += f"_budget{self.budget}" if self.budget else ""
        settings = f"_share{self.theta_share}" if self.theta_share else ""
        settings += {"": "", "adaptive": "_adaclip"}.get(self.clip_schedule, "_lrclip")
        settings += f"_q{self.clip_quantile}" if self.clip_quantile else ""
        settings += curvature
        settings += f"_beta{self.beta}" if self.beta else ""
        settings += f"_pop{self.population}" if self.population else ""
        settings += f"_eps{self.eps}" if self.eps else ""
        settings += f"_{self.sampling}" if self.sampling else ""
        settings += f"_proj{self.projection}" if self.projection else ""
        if self.stage == "tune":
            return f"tune_{self.method}_lr{self.lr:g}{curvature}_s{self.seed}"
        if self.stage == "dptune":
            return f"dptune_{self.method}_eps-{self.privacy}_lr{self.lr:g}{settings}_s{self.seed}"
        suffix = {"dp": "_dptuned", "dpfixed": "_dptunedfixed"}.get(self.tuned, "")
        return f"final_{self.method}_eps-{self.privacy}_s{self.seed}{suffix}{settings}"


def tune_key(method: str, lr: float, **curvature: str) -> str:
    """The cache key of ``method``'s tuning run at ``lr`` (and the curvature's ``decay`` and
    ``budget``, where given)."""
    return Run("tune", method, "nodp", 0, lr, **curvature).key


def chosen(suite: Suite, method: str, done: dict[str, Record]) -> tuple[float, str, str] | None:
    """``method``'s tuned rate and clip norms (None while a tuning run is missing).

    Returns
    -------
    tuple
        ``(lr, dp_clip_norm, dp_theta_clip_norm)``; the norms are the medians
        of the clients' delta and Theta norms in the tuning run at ``lr``,
        written with 4 significant digits (``""``: Theta does not travel).
    """
    scores = scores_at(lr_grid(suite, method), lambda lr: tune_key(method, lr), done)
    if scores is None:
        return None
    lr = best_of(scores)
    return (lr, *clip_norms(method, lr, done))


def clip_norms(
    method: str, lr: float, done: dict[str, Record], quantile: str = "", **curvature: str
) -> tuple[str, str]:
    """``(dp_clip_norm, dp_theta_clip_norm)`` at ``lr``: medians (or the ``quantile``) of that
    tuning run's clients (the run at the curvature's ``decay`` and ``budget``)."""
    norms = done[tune_key(method, lr, **curvature)]["client_norms"]
    clip = f"{_quantile(norms['delta'], quantile):.4g}"
    theta = f"{_quantile(norms['theta'], quantile):.4g}" if aligns(method) else ""
    return clip, theta


def _quantile(values: object, quantile: str) -> float:
    """The median of ``values`` (``quantile`` ``""``) or that quantile."""
    return float(np.quantile(values, float(quantile)) if quantile else np.median(values))


def scheduled_clip_norm(
    method: str, lr: float, done: dict[str, Record], quantile: str = "", **curvature: str
) -> str:
    """``dp_clip_norm`` for ``dp_clip_schedule: learning_rate`` at peak rate ``lr``: the median
    (or the ``quantile``) of that tuning run's delta norms, each divided by its round's rate
    over ``lr``."""
    record = done[tune_key(method, lr, **curvature)]
    ratios = np.repeat(  # the round's rate, once per recorded client (a diverged one: no norm)
        [lr / h["learning_rate"] for h in record["history"]],
        [int(h["num_clients"]) for h in record["history"]],
    )
    return f"{_quantile(np.asarray(record['client_norms']['delta']) * ratios, quantile):.4g}"


def dp_grid(suite: Suite, method: str, done: dict[str, Record]) -> tuple[float, ...] | None:
    """The rates tried under DP: the non-private choice and up to three grid rates below it."""
    picked = chosen(suite, method, done)
    if picked is None:
        return None
    grid = lr_grid(suite, method)
    at = grid.index(picked[0])
    return grid[max(0, at - DP_GRID_POINTS + 1) : at + 1]


def dp_rate_runs(
    suite: Suite, method: str, level: str, done: dict[str, Record]
) -> tuple[list[Run], int]:
    """The DP tuning runs of ``method``'s rate at ``level`` (constant clip norm, the default
    share) whose non-private runs are done, then, for a method that sends Theta, the other
    shares at the best of them; and how many of the rates wait for their non-private run."""
    grid = dp_grid(suite, method, done) or ()
    ready = [lr for lr in grid if tune_key(method, lr) in done]
    waiting = (DP_GRID_POINTS if not grid else len(grid)) - len(ready)
    runs = [Run("dptune", method, level, 0, lr, *clip_norms(method, lr, done)) for lr in ready]
    lr = dp_rate(suite, method, level, done)
    if aligns(method) and lr is not None:
        norms = clip_norms(method, lr, done)
        runs += [
            Run("dptune", method, level, 0, lr, *norms, theta_share=share) for share in THETA_SHARES
        ]
    return runs, waiting


def dp_rate(suite: Suite, method: str, level: str, done: dict[str, Record]) -> float | None:
    """``method``'s rate tuned under DP at ``level`` (default share; None: runs missing)."""
    grid = dp_grid(suite, method, done)
    if grid is None:
        return None
    scores = scores_at(grid, lambda lr: Run("dptune", method, level, 0, lr).key, done)
    return None if scores is None else best_of(scores)


def dp_chosen(suite: Suite, method: str, level: str, done: dict[str, Record]) -> Run | None:
    """The final run (seed 0) of ``method`` at ``level`` with what was tuned under DP: the
    rate and Theta's share (:func:`dp_constant`), then the clip norm following the rate
    (:func:`schedule_runs`; the constant clip norm on a tie). None while a tuning run is
    missing."""
    pick = dp_constant(suite, method, level, done)
    return None if pick is None else best_tried(pick, schedule_runs(suite, pick, done), done)


def best_tried(pick: Run, runs: list[Run], done: dict[str, Record]) -> Run | None:
    """``pick``, or the DP tuning run of ``runs`` that scored best on the validation split
    as a final run tuned under DP (``pick`` on a tie); None while one of ``runs`` is not
    done (or is still a non-private tuning run)."""
    tried = {pick: done[dp_tune_run(pick).key]}
    for run in runs:
        if run.stage != "dptune" or run.key not in done:
            return None
        tried[replace(run, stage="final", tuned="dp")] = done[run.key]
    return max(tried, key=lambda r: (tune_score(tried[r]), r is pick))


def dp_tune_run(pick: Run) -> Run:
    """The DP tuning run (validation, seed 0) behind the final run ``pick``."""
    return replace(pick, stage="dptune", seed=0, tuned="nodp")


def schedule_runs(suite: Suite, pick: Run, done: dict[str, Record]) -> list[Run]:
    """The DP tuning runs with the clip norm following the rate: at every rate of the DP
    grid with ``pick``'s share (each rate's clip norm from its non-private run); once those
    are done, for a method that sends Theta, the other shares at the best of them."""
    grid = dp_grid(suite, pick.method, done) or ()
    runs = [
        replace(
            dp_tune_run(pick),
            lr=lr,
            clip=scheduled_clip_norm(pick.method, lr, done),
            theta_clip=clip_norms(pick.method, lr, done)[1],
            clip_schedule=CLIP_SCHEDULE,
        )
        for lr in grid
    ]
    if not aligns(pick.method) or not all(run.key in done for run in runs):
        return runs
    best = max(runs, key=lambda run: tune_score(done[run.key]))
    others = [share for share in ("", *THETA_SHARES) if share != pick.theta_share]
    return runs + [replace(best, theta_share=share) for share in others]


def dp_constant(suite: Suite, method: str, level: str, done: dict[str, Record]) -> Run | None:
    """The final run (seed 0) of ``method`` at ``level`` with the rate tuned under DP, then,
    for a method that sends Theta, Theta's share at that rate (the default on a tie); a
    constant clip norm. None while a tuning run is missing."""
    lr = dp_rate(suite, method, level, done)
    if lr is None:
        return None
    pick = Run("final", method, level, 0, lr, *clip_norms(method, lr, done), tuned="dp")
    if aligns(method):
        shares = {"": done[Run("dptune", method, level, 0, lr).key]}
        for share in THETA_SHARES:
            record = done.get(Run("dptune", method, level, 0, lr, theta_share=share).key)
            if record is None:
                return None
            shares[share] = record
        best = max(shares, key=lambda share: (tune_score(shares[share]), share == ""))
        pick = replace(pick, theta_share=best)
    plain = chosen(suite, method, done)
    if plain is not None and (lr, pick.theta_share) == (plain[0], ""):
        pick = replace(pick, tuned="nodp")  # the first protocol's runs
    return pick


def quantile_runs(pick: Run, done: dict[str, Record]) -> list[Run]:
    """The DP tuning runs with the clip norms at the other quantiles (:data:`CLIP_QUANTILES`) of
    the non-private norms, at ``pick``'s rate, share and clip schedule."""
    return [
        replace(dp_tune_run(pick), **pick_clip_norms(pick, done, quantile), clip_quantile=quantile)
        for quantile in CLIP_QUANTILES
    ]


def pick_clip_norms(
    pick: Run, done: dict[str, Record], quantile: str, **curvature: str
) -> dict[str, str]:
    """``clip`` and ``theta_clip`` for ``pick``'s method, rate and clip schedule at
    ``quantile`` of the non-private run (at the curvature's ``decay`` and ``budget``)."""
    clip, theta = clip_norms(pick.method, pick.lr, done, quantile, **curvature)
    if pick.clip_schedule:
        clip = scheduled_clip_norm(pick.method, pick.lr, done, quantile, **curvature)
    return {"clip": clip, "theta_clip": theta}


def dp_final(suite: Suite, method: str, level: str, done: dict[str, Record]) -> Run | None:
    """As :func:`dp_chosen`, then the clip norms' quantile (:func:`quantile_runs`; the median
    on a tie). None while a tuning run is missing."""
    pick = dp_chosen(suite, method, level, done)
    return None if pick is None else best_tried(pick, quantile_runs(pick, done), done)


def curvature_runs(
    pick: Run, done: dict[str, Record], field: str, values: tuple[str, ...]
) -> list[Run]:
    """At ``pick``'s settings with its curvature ``field`` (``"decay"`` or ``"budget"``) at each
    of ``values``: the non-private tuning run at its rate (its clip norms), then the DP tuning
    run with them."""
    runs = []
    for value in values:
        curvature = {"decay": pick.decay, "budget": pick.budget, field: value}
        plain = Run("tune", pick.method, "nodp", 0, pick.lr, **curvature)
        if plain.key not in done:
            runs.append(plain)
            continue
        norms = pick_clip_norms(pick, done, pick.clip_quantile, **curvature)
        runs.append(replace(dp_tune_run(pick), **norms, **curvature))
    return runs


def decay_runs(pick: Run, done: dict[str, Record]) -> list[Run]:
    """:func:`curvature_runs` for the decays of ``pick``'s method (:data:`CURVATURE_DECAYS`)."""
    return curvature_runs(pick, done, "decay", CURVATURE_DECAYS.get(pick.method, ()))


def budget_runs(pick: Run, done: dict[str, Record]) -> list[Run]:
    """:func:`curvature_runs` for Theta's sizes of ``pick``'s method (:data:`THETA_BUDGETS`)."""
    return curvature_runs(pick, done, "budget", THETA_BUDGETS.get(pick.method, ()))


def dp_decayed(suite: Suite, method: str, level: str, done: dict[str, Record]) -> Run | None:
    """As :func:`dp_final`, then, at :data:`CURVATURE_LEVEL` for the methods of
    :data:`CURVATURE_DECAYS`, the curvature's decay (the default on a tie). None while a
    tuning run is missing."""
    pick = dp_final(suite, method, level, done)
    if pick is None or level != CURVATURE_LEVEL or method not in CURVATURE_DECAYS:
        return pick
    return best_tried(pick, decay_runs(pick, done), done)


def dp_budgeted(suite: Suite, method: str, level: str, done: dict[str, Record]) -> Run | None:
    """As :func:`dp_decayed`, then, at :data:`CURVATURE_LEVEL` for the methods of
    :data:`THETA_BUDGETS`, Theta's size (the default on a tie). None while a tuning run is
    missing."""
    pick = dp_decayed(suite, method, level, done)
    if pick is None or level != CURVATURE_LEVEL or method not in THETA_BUDGETS:
        return pick
    return best_tried(pick, budget_runs(pick, done), done)
