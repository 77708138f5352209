"""Client-level DP with fixed-size sampling (``dp_sampling: fixed``, the choice under SecAgg+).

Exactly ``clients_per_round`` clients per round, drawn without replacement;
epsilon from dp-accounting's Renyi-DP accountant for sampling without
replacement under replace-one adjacency, where one client's contribution
moves a round's sum by up to twice its bound. The secure run itself is in
``tests/test_secagg_dp.py``.
"""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch

from fedpac_hf import FedPACArguments
from fedpac_hf.federated.accounting import epsilon_after, noise_for_epsilon
from fedpac_hf.federated.privacy import ClientDP
from fedpac_hf.federated.sampling import sample_clients
from fedpac_hf.federated.secure_aggregation import (
    CLIPPING_RANGE,
    dp_bounds,
    scale_tensors,
    unscale_tensors,
    within_rounding,
)

from .test_privacy import _model, _private_run


def _rdp_epsilon(num_clients: int, sampled: int, z: float, rounds: int, delta: float) -> float:
    """The event built here from dp-accounting's parts: replace-one sensitivity 2 (z / 2)."""
    relation = dp_accounting.privacy_accountant.NeighboringRelation.REPLACE_ONE
    accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
    gaussian = dp_accounting.GaussianDpEvent(z / 2)
    one = dp_accounting.SampledWithoutReplacementDpEvent(num_clients, sampled, gaussian)
    accountant.compose(dp_accounting.SelfComposedDpEvent(one, rounds))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(
    ("z", "num_clients", "sampled", "rounds"), [(1.4, 500, 50, 20), (3.0, 100, 5, 50)]
)
def test_fixed_size_epsilon_is_the_rdp_accountants_for_sampling_without_replacement(
    z, num_clients, sampled, rounds
):
    delta = num_clients**-1.1
    q = sampled / num_clients
    fixed = epsilon_after(rounds, z, q, delta, num_clients)
    assert fixed == pytest.approx(_rdp_epsilon(num_clients, sampled, z, rounds, delta), rel=1e-9)
    assert fixed > epsilon_after(rounds, z, q, delta)  # replace-one costs more than Poisson's


@pytest.mark.parametrize(
    ("z", "num_clients", "sampled", "rounds"), [(1.4, 500, 50, 20), (2.0, 10, 3, 4)]
)
def test_fixed_size_epsilon_is_within_ten_percent_of_autodps(z, num_clients, sampled, rounds):
    """autodp (Wang et al.'s package, independent of dp-accounting): the Gaussian of multiplier
    z / 2 against the replace-one sensitivity, amplified by sampling without replacement."""
    pytest.importorskip("autodp")
    from autodp import mechanism_zoo, transformer_zoo

    gaussian = mechanism_zoo.GaussianMechanism(sigma=z / 2)
    gaussian.neighboring = "replace_one"
    sample = transformer_zoo.AmplificationBySampling(PoissonSampling=False)
    one = sample(gaussian, sampled / num_clients, improved_bound_flag=True)
    composed = transformer_zoo.Composition()([one], [rounds])
    delta = num_clients**-1.1
    independent = composed.get_approxDP(delta)
    q = sampled / num_clients
    assert epsilon_after(rounds, z, q, delta, num_clients) == pytest.approx(independent, rel=0.10)


def test_a_target_epsilon_under_fixed_size_sampling_needs_more_noise():
    q, delta, rounds = 0.1, 500**-1.1, 20
    z = noise_for_epsilon(8.0, delta, q, rounds, 500)
    assert epsilon_after(rounds, z, q, delta, 500) <= 8.0
    assert epsilon_after(rounds, z * 0.97, q, delta, 500) > 8.0
    assert z > 2 * noise_for_epsilon(8.0, delta, q, rounds)


def test_fixed_size_sampling_draws_exactly_the_clients_per_round_and_accounts_for_them():
    history = _private_run(10, 3, 2.0, dp_sampling="fixed", seed=5)
    delta = 10**-1.1
    for r, metrics in enumerate(history, start=1):
        assert metrics["num_clients"] == 3
        assert metrics["epsilon"] == pytest.approx(_rdp_epsilon(10, 3, 2.0, r, delta), rel=1e-9)


def test_the_rounds_clients_are_the_plain_runs_under_fixed_size_sampling():
    dp = ClientDP.from_settings("client", clip_norm=1.0, noise_multiplier=1.0, sampling="fixed")
    assert dp.sampling == "fixed" and dp.population(40) == 40
    poisson = ClientDP.from_settings("client", clip_norm=1.0, noise_multiplier=1.0)
    assert poisson.sampling == "poisson" and poisson.population(40) is None
    from fedpac_hf.federated import RoundEngine, ServerState, get_algorithm

    state = ServerState.from_model(_model())
    engine = RoundEngine(
        get_algorithm("fedavg_adamw"), state, num_clients=40, clients_per_round=6,
        learning_rates=[0.1] * 3, local_steps=1, seed=2, privacy=dp, noise_seed=0,
    )  # fmt: skip
    assert [engine.sample(r) for r in range(3)] == [sample_clients(40, 6, 2, r) for r in range(3)]


def test_bad_sampling_settings_are_refused_naming_the_setting(tmp_path):
    with pytest.raises(ValueError, match="dp_sampling"):
        FedPACArguments(
            output_dir=str(tmp_path), algorithm="fedavg_adamw", dp_mode="client",
            dp_clip_norm=1.0, dp_noise_multiplier=1.0, dp_sampling="random",
        )  # fmt: skip


def test_dp_sampling_belongs_to_client_level_dp(tmp_path):
    for mode in ("none", "record"):
        with pytest.raises(ValueError, match="dp_sampling|set dp_mode: client"):
            FedPACArguments(
                output_dir=str(tmp_path), dp_mode=mode, dp_sampling="fixed",
                **({"dp_clip_norm": 1.0, "dp_noise_multiplier": 1.0} if mode == "record" else {}),
            )  # fmt: skip


def test_secure_aggregation_samples_a_fixed_number_of_clients_by_default(tmp_path):
    args = FedPACArguments(
        output_dir=str(tmp_path), algorithm="fedavg_adamw", num_clients=10, clients_per_round=3,
        dp_mode="client", dp_clip_norm=1.0, dp_noise_multiplier=1.0, secure_aggregation=True,
    )  # fmt: skip
    assert args.client_privacy(args.build_algorithm()).sampling == "fixed"
    plain = FedPACArguments(
        output_dir=str(tmp_path), algorithm="fedavg_adamw", dp_mode="client", dp_clip_norm=1.0,
        dp_noise_multiplier=1.0,
    )  # fmt: skip
    assert plain.client_privacy(plain.build_algorithm()).sampling == "poisson"


def test_the_bounds_are_the_clip_norms_and_secaggs_rounding_stays_inside_them():
    """Under DP each part is scaled by its clip norm; shrunk by within_rounding, the part that
    Flower's stochastic rounding returns has L2 norm at most the clip norm, always."""
    pytest.importorskip("flwr")
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    delta_bounds, theta_bounds = dp_bounds((0.5, 2.0), ["a", "b"], ["a.L"])
    assert delta_bounds == {"a": 0.5, "b": 0.5} and theta_bounds == {"a.L": 2.0}
    gen = torch.Generator().manual_seed(0)
    part = {"a": torch.randn(300, 200, generator=gen), "b": torch.randn(5000, generator=gen)}
    norm = math.sqrt(sum(float(t.square().sum()) for t in part.values()))
    part = {n: t * (0.5 / norm) for n, t in part.items()}  # clipped: norm exactly C
    inside = within_rounding(part, 0.5)
    numel = 300 * 200 + 5000
    shrunk = math.sqrt(sum(float(t.double().square().sum()) for t in inside.values()))
    assert shrunk == pytest.approx(0.5 * (1 - math.sqrt(numel) * 2.0**-21), rel=1e-6)
    for _ in range(5):
        scaled = [t.numpy() for t in scale_tensors(inside, delta_bounds).values()]
        assert max(abs(a).max() for a in scaled) <= CLIPPING_RANGE  # nothing clipped
        back = dequantize(quantize(scaled, CLIPPING_RANGE, 2**22), CLIPPING_RANGE, 2**22)
        rounded = unscale_tensors([torch.from_numpy(a) for a in back], delta_bounds)
        assert math.sqrt(sum(float(t.square().sum()) for t in rounded.values())) <= 0.5
    small = {"a": torch.full((4,), 0.01)}
    assert torch.equal(within_rounding(small, 0.5)["a"], small["a"])  # well inside: unchanged


def test_a_secure_runs_fixed_samples_are_part_of_what_a_resume_must_keep(tmp_path):
    """A resume without secure_aggregation would sample (and account) by Poisson draws: the
    identity names the fixed samples; runs saved before dp_sampling existed keep theirs."""
    common = dict(output_dir=str(tmp_path), algorithm="fedavg_adamw", dp_clip_norm=1.0)
    secure = FedPACArguments(
        **common, dp_mode="client", dp_noise_multiplier=1.0, num_clients=10, clients_per_round=3,
        secure_aggregation=True,
    )  # fmt: skip
    assert secure.privacy_settings()["dp_sampling"] == "fixed"
    plain = FedPACArguments(**common, dp_mode="client", dp_noise_multiplier=1.0)
    assert "dp_sampling" not in plain.privacy_settings()
    record = FedPACArguments(
        **common, dp_mode="record", dp_noise_multiplier=1.0, num_clients=10, clients_per_round=3,
        secure_aggregation=True,
    )  # fmt: skip
    assert "dp_sampling" not in record.privacy_settings()


def test_a_resumed_fixed_sampling_run_continues_exactly_and_the_summary_names_it(tmp_path):
    import yaml

    from fedpac_hf.rundir.metrics_file import append_metrics
    from fedpac_hf.rundir.reporting import write_report

    from .trainer_fixtures import trained_and_resumed

    dp = dict(
        dp_mode="client", dp_clip_norm=0.05, dp_theta_clip_norm=5.0, dp_noise_multiplier=1.0,
        dp_sampling="fixed",
    )  # fmt: skip
    first, resumed = trained_and_resumed(tmp_path, 3, **dp)
    assert {h["num_clients"] for h in first.round_history} == {first.engine.clients_per_round}
    assert [h["epsilon"] for h in resumed.round_history] == [
        h["epsilon"] for h in first.round_history
    ]
    for a, b in zip(resumed.model.parameters(), first.model.parameters()):
        assert torch.equal(a, b)

    report = tmp_path / "report"  # what `fedpac-hf report` writes from a run's files
    report.mkdir()
    (report / "config.yaml").write_text(yaml.safe_dump(first.args.to_dict()))
    for row in first.round_history:
        append_metrics(report, row)
    write_report(report, title="fixed")
    summary = (report / "summary.md").read_text()
    assert "| dp_sampling | fixed |" in summary
    epsilon = first.round_history[-1]["epsilon"]
    delta = first.args.num_clients**-1.1  # the default, which config.yaml does not hold
    assert "dp_delta" not in first.args.to_dict() or first.args.dp_delta is None
    assert f"epsilon {epsilon:.3g} at delta {delta:.3g} after 3 rounds" in summary
