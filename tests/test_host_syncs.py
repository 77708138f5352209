"""Host syncs of the client loop, counted on the CPU, and fp16 loss scaling.

Every read of a device value on the host (``item``, ``float``, ``bool``, a
boolean mask, a copy to the CPU) goes through a few ATen operations, which
:class:`fedpac_hf.trainer.host_syncs.HostSyncCounter` records; on the CPU it sees the
reads a GPU run would wait for. The claims checked here are the ones
``client_update`` documents: no sync in a local step (one with a gradient
scaler, the scaler's decision), one at the end of a client.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedpac_hf.federated import (
    ClientError,
    ClientHooks,
    LocalSteps,
    RoundAggregator,
    ServerState,
    client_update,
    cycle_batches,
    get_algorithm,
)
from fedpac_hf.federated.state import move_tensors
from fedpac_hf.optim import gnb_loss
from fedpac_hf.trainer.host_syncs import HostSyncCounter

CLIENT = "fedpac_hf/federated/client.py"


def make_model(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8, bias=bias), nn.Tanh(), nn.Linear(8, 3, bias=bias))


def batches(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(5, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen))
        for _ in range(n)
    ]


def ce_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def gnb_unmasked(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    return gnb_loss(model(batch[0]), generator=torch.Generator().manual_seed(0))


def gnb_masked(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    return gnb_loss(model(batch[0]), labels=batch[1], generator=torch.Generator().manual_seed(0))


def warm_state(model: nn.Module, algorithm: str, **kwargs) -> ServerState:
    """A second-round state: the first round's Theta and a direction."""
    state = ServerState.from_model(model)
    first = run(model, state, algorithm, 3, **kwargs)
    direction = {n: d.clone() for n, d in first.delta.items()}
    return ServerState(state.params, first.curvature or None, direction, round=1)


def run(model, state, algorithm, steps, data=None, **kwargs):
    kwargs.setdefault("curvature_loss_fn", gnb_unmasked)
    kwargs.setdefault("loss_fn", ce_loss)
    return client_update(
        model,
        state,
        get_algorithm(algorithm),
        cycle_batches(data if data is not None else batches()),
        LocalSteps(lr=1e-2, num_steps=steps, max_grad_norm=1.0),
        ClientHooks(**kwargs),
    )


def counted(model, state, algorithm, steps, **kwargs) -> HostSyncCounter:
    with HostSyncCounter() as syncs:
        run(model, state, algorithm, steps, **kwargs)
    return syncs


def test_the_counter_sees_every_kind_of_host_read_and_nothing_else():
    t = torch.randn(4)
    with HostSyncCounter() as syncs:
        (t * 2 + 1).exp().sum()  # device work only
    assert syncs.events == []
    with HostSyncCounter() as syncs:
        t.sum().item()
        float(t.max())
        bool(t.isfinite().all())
        t[t > 0]
        t.nonzero()
    ops = [e.op for e in syncs.events]
    assert ops.count("aten._local_scalar_dense.default") == 3
    assert "aten.index.Tensor" in ops and "aten.nonzero.default" in ops
    assert all(e.location.endswith(".py:" + e.location.rsplit(":", 1)[1]) for e in syncs.events)
    assert all("test_host_syncs.py" in e.location and not e.torch_location for e in syncs.events)
    with HostSyncCounter(device_type="cuda") as syncs:
        float(t.sum())  # a CPU tensor: no CUDA sync
    assert syncs.events == []


@pytest.mark.parametrize(
    "algorithm, bias",
    [
        ("fedpac_soap", True),
        ("local_soap", True),
        ("fedavg", True),
        ("fedcm", True),
        ("fedpac_sophia", True),
        ("fedpac_muon", False),  # matrices only: no AdamW part
    ],
)
def test_local_steps_never_sync_and_a_client_syncs_once_at_its_end(algorithm, bias):
    model = make_model(bias)
    state = warm_state(model, algorithm)
    short, long = counted(model, state, algorithm, 2), counted(model, state, algorithm, 12)
    assert len(long.events) == len(short.events), long.summary()  # nothing per step
    assert long.count(location_contains=CLIENT) == 1, long.summary()
    # the rest is the warm start's, once per client: checking the imported Theta,
    # and for SOAP one check of all its eigenbases
    assert len(long.events) <= 3, long.summary()


def test_torch_adamw_reads_only_its_host_step_counter():
    # torch keeps AdamW's step count on the host (a CPU tensor even for CUDA
    # parameters), so its reads are no device sync; on the CPU they show up
    # inside torch.optim, and nothing else syncs per step.
    model = make_model()
    state = warm_state(model, "fedavg_adamw")
    short, long = (counted(model, state, "fedavg_adamw", k) for k in (2, 12))
    assert long.count(in_torch=False) == short.count(in_torch=False), long.summary()
    assert long.count(in_torch=True) > short.count(in_torch=True)  # the step-counter reads
    assert all("torch/optim/" in e.torch_location for e in long.events if e.torch_location)


def test_sophia_refresh_on_a_masked_batch_costs_one_sync():
    model = make_model()
    state = warm_state(model, "fedpac_sophia")
    algorithm = get_algorithm("fedpac_sophia", optimizer_kwargs={"hessian_update_interval": 2})
    counts = []
    for steps in (2, 10):  # 1 and 5 refreshes
        with HostSyncCounter() as syncs:
            client_update(
                model,
                state,
                algorithm,
                cycle_batches(batches()),
                LocalSteps(lr=1e-2, num_steps=steps),
                ClientHooks(loss_fn=ce_loss, curvature_loss_fn=gnb_masked),
            )
        counts.append(syncs.count(location_contains="fedpac_hf/optim/sophia.py"))
    assert counts[1] - counts[0] == 4


def overflowing_scaler() -> torch.amp.GradScaler:
    """A scaler at scale 2**127, backing off to 2**27 after an overflow."""
    return torch.amp.GradScaler(
        "cpu", init_scale=2.0**127, backoff_factor=2.0**-100, growth_interval=10**6
    )


def overflowing_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches whose first one's gradients overflow at scale 2**127 (its inputs are
    flagged by a label of -1; :func:`flagged_loss` makes their loss 1e6 times larger)."""
    data = batches()
    data[0] = (data[0][0], torch.full_like(data[0][1], -1))
    return data


def flagged_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    if bool((y < 0).all()):  # the host reads the batch's labels, not a device value
        return nn.functional.cross_entropy(model(x), torch.zeros_like(y)) * 1e6
    return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("algorithm", ["fedpac_soap", "fedavg_adamw", "fedcm"])
def test_an_overflowing_fp16_step_is_skipped_counted_and_training_goes_on(algorithm):
    model = make_model()
    state = warm_state(model, algorithm)
    data = overflowing_batches()

    scaler = overflowing_scaler
    only_skipped = run(
        model, state, algorithm, 1, data=data, grad_scaler=scaler(), loss_fn=flagged_loss
    )
    assert only_skipped.metrics["skipped_steps"] == 1.0
    assert all(torch.equal(d, torch.zeros_like(d)) for d in only_skipped.delta.values())

    scaled = run(model, state, algorithm, 3, data=data, grad_scaler=scaler(), loss_fn=flagged_loss)
    assert scaled.metrics["skipped_steps"] == 1.0
    # the two steps taken are those of an unscaled client on the batches after the
    # skipped one (a power-of-two scale is exact), so nothing of the skipped step remains
    plain = run(model, state, algorithm, 2, data=data[1:] + data[:1], loss_fn=flagged_loss)
    assert plain.metrics["skipped_steps"] == 0.0
    for name in plain.delta:
        torch.testing.assert_close(scaled.delta[name], plain.delta[name], rtol=0, atol=0)
    for name in plain.curvature:
        torch.testing.assert_close(scaled.curvature[name], plain.curvature[name], rtol=0, atol=0)


def test_a_gradient_scaler_costs_one_sync_per_step():
    model = make_model()
    state = warm_state(model, "fedpac_soap")

    def scaled(steps: int) -> HostSyncCounter:
        return counted(model, state, "fedpac_soap", steps, grad_scaler=torch.amp.GradScaler("cpu"))

    short, long = scaled(2), scaled(12)
    assert len(long.events) - len(short.events) == 10, long.summary()
    assert long.count(in_torch=False) == short.count(in_torch=False), long.summary()
    assert all("torch/amp/" in e.torch_location for e in long.events if e.torch_location)


def test_a_diverged_client_is_detected_at_the_end_of_its_steps():
    model = make_model()
    state = ServerState.from_model(model)
    data = batches()
    data[1] = (torch.full_like(data[1][0], float("nan")), data[1][1])
    for algorithm in ("fedpac_soap", "fedavg_adamw", "fedavg", "fedpac_sophia"):
        with pytest.raises(ClientError, match="non-finite training loss nan"):
            run(model, state, algorithm, 4, data=data)
    # a finite loss whose one step makes the parameters infinite
    with pytest.raises(ClientError, match="the parameter update is not finite"):
        client_update(
            model,
            state,
            get_algorithm("fedavg"),
            cycle_batches(batches()),
            LocalSteps(lr=1e30, num_steps=1),
            ClientHooks(loss_fn=lambda m, b: (m[0].weight * 1e30).sum()),
        )


def test_skipped_steps_are_summed_over_the_round_and_the_sums_follow_their_device():
    model = make_model()
    state = ServerState.from_model(model)
    algorithm = get_algorithm("fedavg")
    aggregator = RoundAggregator(state, algorithm, device="cpu")
    for _ in range(2):
        update = run(
            model,
            state,
            "fedavg",
            2,
            data=overflowing_batches(),
            grad_scaler=overflowing_scaler(),
            loss_fn=flagged_loss,
        )
        aggregator.add(update)
    new_state, metrics = aggregator.finalize(lr=1e-2, local_steps=2)
    assert metrics["skipped_steps"] == 2.0
    assert all(
        t.device.type == "cpu" and t.dtype == torch.float32 for t in new_state.params.values()
    )
    assert aggregator.delta_sum["0.weight"].dtype == torch.float64


def test_move_tensors_keeps_tensors_in_place_and_owns_copies():
    tensors = {"a": torch.randn(2, 3), "b": torch.arange(4.0)}
    moved = move_tensors(tensors, "cpu")
    assert all(moved[k] is tensors[k] for k in tensors)
    assert list(moved) == ["a", "b"]
    state = ServerState(params=tensors)
    assert state.to("cpu") is state


def test_trainer_fp16_scales_each_client_afresh_and_counts_skipped_steps(tmp_path, monkeypatch):
    from fedpac_hf import FedPACArguments, FedPACTrainer

    from .trainer_fixtures import image_data, tiny_vit

    args = FedPACArguments(
        output_dir=str(tmp_path / "run"),
        algorithm="fedpac_soap",
        num_rounds=2,
        num_clients=4,
        clients_per_round=2,
        local_steps=3,
        learning_rate=3e-3,
        per_device_train_batch_size=16,
        partitioner="iid",
        fp16=True,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
        preflight=False,  # its own scaler would be one more here
    )
    trainer = FedPACTrainer(model=tiny_vit(), args=args, train_dataset=image_data(n=160)["train"])
    scalers: list[torch.amp.GradScaler] = []
    default = trainer.client_grad_scaler

    def fresh_scaler() -> torch.amp.GradScaler:
        scaler = default()
        assert scaler is not None and scaler.get_scale() == 65536.0  # torch's default, fresh
        # the first step of every client overflows, the others run at a scale of about 0.1
        scaler = torch.amp.GradScaler("cpu", init_scale=3e38, backoff_factor=2.0**-131)
        scalers.append(scaler)
        return scaler

    monkeypatch.setattr(trainer, "client_grad_scaler", fresh_scaler)
    trainer.train()
    assert len(scalers) == 4 and len({id(s) for s in scalers}) == 4  # 2 clients x 2 rounds
    assert [h["skipped_steps"] for h in trainer.round_history] == [2.0, 2.0]
    assert all(t.dtype == torch.float32 for t in trainer.server_state.curvature.values())
    assert all(torch.isfinite(t).all() for t in trainer.server_state.params.values())
    moved = [h["update_norm"] for h in trainer.round_history]
    assert all(m > 0 for m in moved)  # the steps after the skipped one trained
