"""What the SecAgg+ tests share: a secure Flower simulation, the same rounds run plain in
process, and the tolerances between the two (``tests/test_secagg.py`` says why they are what
they are)."""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import torch
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from fedpac_hf.federated import ServerState
from fedpac_hf.federated.secure_aggregation import CLIPPING_RANGE
from fedpac_hf.flower import run_fedpac_simulation

from .trainer_fixtures import BACKEND, build_model, build_trainer, flower_args

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

STEP = 2.0**-21  # one quantization step over the bound: 2 C / 2**22 / C
#: how far SecAgg+'s rounding can move the round's mean train_loss (bound LOSS_SCALE * C)
LOSS_ROUNDING = 32.0 * STEP


def assert_within_quantization(secure, plain, bounds, scale=1.0, slack=0.0, what=""):
    """Each tensor's error is within ``scale * sqrt(numel) * b_n * 2**-21`` (+ float32 rounding)."""
    assert set(secure) == set(plain), what
    for name, reference in plain.items():
        error = float((secure[name].double() - reference.double()).norm())
        limit = scale * math.sqrt(reference.numel()) * bounds[name] * STEP
        limit += slack * float(reference.double().abs().max()) * math.sqrt(reference.numel())
        assert error <= limit, f"{what} {name}: error {error:.3g} over {limit:.3g}"


def secagg_means(clients):
    """What SecAgg+ hands the server from each client's list of arrays: the per-array mean
    through Flower's own quantization to 2**22 levels, integer sum, dequantization and the
    offset of SecAggPlusWorkflow's unmask stage."""
    quantized = [quantize(list(arrays), CLIPPING_RANGE, 2**22) for arrays in clients]
    totals = [sum(q[i].astype(np.int64) for q in quantized) for i in range(len(quantized[0]))]
    offset = (len(clients) - 1) * CLIPPING_RANGE
    return [(d - offset) / len(clients) for d in dequantize(totals, CLIPPING_RANGE, 2**22)]


class Captured(list):
    """A round's client updates, and the engine that ran it."""

    engine = None


def plain_round(args, trainer, state, captured):
    """One plain round in process from ``state`` (the same clients as Flower's round)."""
    engine = args.round_engine(state, args.num_clients, algorithm=trainer.algorithm)
    captured.engine = engine

    def train(client, plan):
        update = trainer.train_client_by_id(
            client, plan.round_index, plan.learning_rate, plan.state
        )
        captured.append(update)
        return update

    engine.run_round(train)
    return engine.state


def secure_run(tmp_path, build=build_trainer, **settings):
    """A SecAgg+ simulation on 3 nodes (2 rounds, 2 clients per round unless ``settings`` say
    otherwise) of ``build``'s trainer, and its global state after each round."""
    states: dict[int, ServerState] = {}
    result = run_fedpac_simulation(
        build,
        flower_args(tmp_path / "secure", secure_aggregation=True, **settings),
        build_model=build_model,
        num_supernodes=3,
        backend_config=BACKEND,
        on_round_end=lambda r, state, metrics: states.__setitem__(r, copy.deepcopy(state)),
    )
    return result, states


def plain_rounds(args, states):
    """Each round of a 2-round secure run again, in process, from the same start:
    ``(round_index, start, plain state, its updates)``. One torch thread, as the
    simulation's worker (the same eigendecompositions)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = build_trainer(args)
        trainer.setup_clients()
        initial = ServerState.from_model(build_model(args))
        for round_index, start in enumerate([initial, states[1]]):
            updates = Captured()
            yield round_index, start, plain_round(args, trainer, start, updates), updates
    finally:
        torch.set_num_threads(threads)


#: Client-level DP with a fixed noise seed: the same noise in the secure and the plain rounds.
PRIVATE = dict(
    dp_mode="client", dp_clip_norm=0.05, dp_theta_clip_norm=5.0, dp_noise_multiplier=0.7,
    dp_noise_seed=3,
)  # fmt: skip


def assert_within_dp_rounding(secure, plain, bound, scale=1.0, what=""):
    """Under client-level DP a secure part differs from the plain one by SecAgg+'s rounding and
    the clients' shrink that keeps it inside the clip norm ``bound`` (:func:`within_rounding`):
    each at most ``sqrt(d) * bound * 2**-21`` over the part's ``d`` values, so the mean by
    at most twice that (times ``scale``), plus float32 rounding."""
    values = sum(t.numel() for t in plain.values())
    rounding = 2 * math.sqrt(values) * bound * STEP * scale
    floats = 1e-7 * math.sqrt(values) * max(float(t.abs().max()) for t in plain.values())
    error = math.sqrt(
        sum(float((secure[n].double() - plain[n].double()).square().sum()) for n in plain)
    )
    assert error <= rounding + floats, f"{what}: error {error:.3g} over {rounding:.3g}"
