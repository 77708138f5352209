"""One run of the privacy benchmark: its ``fedpac-hf train`` overrides, training, its record.

``privacy_benchmark.py`` (its docstring is the protocol) plans the runs and
``_privacy_tuning.py`` defines them; here one :class:`~_privacy_tuning.Run`
becomes a command line, is trained through the harness (the code path of
``fedpac-hf train``) and becomes a JSON record: for a non-private tuning run
with the clients' norms that set the clip norms (:class:`NormRecorder`), for
a DP run with the noise the package resolved (:func:`resolved_privacy`).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from _harness.runs import (
    CACHE,
    KEPT_KEYS,
    Record,
    machine,
    show_output_dir,
    train_once,
    validation_dataset,
)
from _privacy_suites import NUM_CLIENTS, Suite
from _privacy_tuning import (
    PUBLIC_CURVATURE,
    PUBLIC_DATA,
    PUBLIC_RUNS,
    Run,
    algorithm_of,
    aligns,
)

KEYS = (
    *KEPT_KEYS,
    "epsilon",
    "dp_clipped_delta",
    "dp_clipped_theta",
    "dp_clip_norm",
    "dp_theta_clip_norm",
    "public_train_loss",
    "dp_projection_kept",
)


def optimizer_kwargs(run: Run) -> dict[str, object]:
    """``client_optimizer_kwargs`` of ``run``: its curvature decay and SOAP's eps, if any."""
    kwargs: dict[str, object] = {"eps": float(run.eps)} if run.eps else {}
    if run.decay and "soap" in run.method:
        kwargs["shampoo_beta"] = float(run.decay)
    elif run.decay:
        kwargs["betas"] = [0.9, float(run.decay)]  # AdamW's defaults but the second rate
    return kwargs


def overrides(suite: Suite, run: Run, run_dir: Path) -> list[str]:
    """The ``fedpac-hf train`` overrides of one run (after its config file)."""
    over = [*suite.overrides(), "--algorithm", algorithm_of(run.method)]
    if run.method in PUBLIC_CURVATURE:
        over += ["--public_curvature_dataset", PUBLIC_DATA]
        over += ["--public_curvature_clients", str(PUBLIC_RUNS)]
    over += ["--learning_rate", f"{run.lr:g}", "--seed", str(run.seed)]
    if run.privacy != "nodp":
        over += ["--dp_mode", "client", "--dp_clip_norm", run.clip]
        if run.theta_clip:
            over += ["--dp_theta_clip_norm", run.theta_clip]
        if run.theta_share:
            over += ["--dp_theta_share", run.theta_share]
        if run.clip_schedule:
            over += ["--dp_clip_schedule", run.clip_schedule]
        if run.sampling:
            over += ["--dp_sampling", run.sampling]
        if run.projection:
            over += ["--dp_projection_rank", run.projection]
        # run.clip_quantile only says where run.clip and run.theta_clip came from
        over += list(noise_setting(suite, run))
        over += ["--dp_noise_seed", str(run.seed)]
    if run.decay or run.eps:
        over += ["--client_optimizer_kwargs", json.dumps(optimizer_kwargs(run))]
    if run.budget:
        over += ["--theta_budget", run.budget]
    if run.beta:
        over += ["--beta", run.beta]
    if run.stage != "final":
        over += ["--dataset", str(validation_dataset("vit"))]
    return [*over, "--num_threads", "1", "--output_dir", str(run_dir)]


def resolved_privacy(suite: Suite, run: Run) -> dict[str, float]:
    """The noise multiplier z and delta a DP run trains with (the package's own resolution).

    ``ClientDP.resolve`` is what the run engine calls: the default delta
    ``num_clients ** -1.1`` and, for a target epsilon, the calibrated z.
    """
    from fedpac_hf.federated.privacy import ClientDP

    flag, value = noise_setting(suite, run)
    z = float(value) if flag == "--dp_noise_multiplier" else None
    target = float(value) if flag == "--dp_target_epsilon" else None
    dp = ClientDP.from_settings(
        "client",
        clip_norm=float(run.clip),
        theta_clip_norm=float(run.theta_clip) if run.theta_clip else None,
        noise_multiplier=z,
        target_epsilon=target,
        share_theta=aligns(run.method),
        theta_share=float(run.theta_share) if run.theta_share else None,
        clip_schedule=run.clip_schedule or None,
        learning_rate=run.lr,
        sampling=run.sampling or None,
    ).resolve(NUM_CLIENTS, suite.sample_rate, suite.num_rounds)
    return {
        "noise_multiplier": float(dp.noise_multiplier or 0.0),
        "value_noise_multiplier": dp.sums_noise_multiplier,
        "noise_scale": dp.noise_scale,
        "theta_noise_scale": dp.theta_noise_scale,
        "delta": float(dp.delta or 0.0),
    }


def noise_setting(suite: Suite, run: Run) -> tuple[str, str]:
    """The DP run's noise as a ``fedpac-hf train`` flag and value: no noise at epsilon = inf,
    the larger federation's multiplier for an emulated ``population``, else the target."""
    if run.privacy == "inf":
        return "--dp_noise_multiplier", "0"
    if run.population:
        z = population_noise_multiplier(suite, run.population, run.privacy)
        return "--dp_noise_multiplier", f"{z:.6g}"
    return "--dp_target_epsilon", run.privacy


def population_noise_multiplier(suite: Suite, population: str, level: str = "8") -> float:
    """The noise multiplier that gives this federation's means the noise of one ``population``
    times larger (clients and clients per round, the same q and rounds) at epsilon ``level``:
    ``z_m / m``, ``z_m`` the package's calibration there at delta ``(m N) ** -1.1``."""
    from fedpac_hf.federated.privacy import ClientDP

    m = int(population)
    dp = ClientDP.from_settings(
        "client", clip_norm=1.0, target_epsilon=float(level), share_theta=False
    ).resolve(m * NUM_CLIENTS, suite.sample_rate, suite.num_rounds)
    return float(dp.noise_multiplier) / m


class NormRecorder:
    """Records the L2 norms of what client-level DP would clip, for every client, while installed.

    Wraps ``client_update`` where the trainer calls it
    (``fedpac_hf.trainer.client_steps``); the server's own run on public data
    (client id -1, ``public_curvature``) is not a client and is not recorded. In a run without DP the update it
    returns is the unclipped one; what :func:`clip_update` bounds is that
    update minus its public part (:func:`public_reference`: the correction
    steps in the delta, the imported global Theta), so that is what is
    recorded.
    """

    def __init__(self) -> None:
        self.delta: list[float] = []
        self.theta: list[float] = []

    def __enter__(self) -> NormRecorder:
        import torch

        from fedpac_hf.federated.privacy_clip import own_part, public_reference
        from fedpac_hf.trainer import client_steps

        self._module = client_steps
        self._original = original = client_steps.client_update

        def norm(tensors: dict[str, Any]) -> float:
            values = [t.detach().double().norm() for t in tensors.values()]
            return float(torch.stack(values).norm()) if values else 0.0

        def wrapped(
            model: Any, state: Any, algorithm: Any, batches: Any, steps: Any, *rest: Any, **kw: Any
        ) -> Any:
            update = original(model, state, algorithm, batches, steps, *rest, **kw)
            if update.client_id < 0:  # the server's public curvature run
                return update
            delta, theta = own_part(
                update, public_reference(state, algorithm, steps.lr, steps.num_steps)
            )
            self.delta.append(norm(delta))
            self.theta.append(norm(theta))
            return update

        client_steps.client_update = wrapped
        return self

    def __exit__(self, *exc: object) -> None:
        self._module.client_update = self._original


def run_one(suite: Suite, run: Run) -> Record:
    """Train one run and return its JSON record."""
    run_dir = CACHE / "runs" / f"privacy_{suite.name}_{run.key}"
    extra: dict[str, Any] = {}
    over = overrides(suite, run, run_dir)
    if run.stage == "tune":
        with NormRecorder() as norms:
            record = train_once(suite.config, over, run_dir, KEYS, allow_divergence=True)
        extra["client_norms"] = {"delta": norms.delta, "theta": norms.theta}
    else:
        record = train_once(suite.config, over, run_dir, KEYS)
        if run.privacy != "nodp":
            extra.update(resolved_privacy(suite, run))
    show_output_dir(record, f"runs/privacy_{suite.name}/{run.key}")
    # "suite" is the harness's task family (ViT: scored by accuracy); "federation" the Suite
    record = {**asdict(run), "suite": "vit", "federation": suite.name, **record, **extra}
    return {**record, "machine": machine()}
