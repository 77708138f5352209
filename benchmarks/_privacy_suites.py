"""The federations of ``privacy_benchmark.py`` (``--suite``): config, regime, rate grids, outputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from _harness.runs import BENCH

NUM_CLIENTS = 500


@dataclass(frozen=True)
class Suite:
    """One federation the grid runs in: config, regime, learning-rate grids, where it writes.

    ``grids`` holds the learning-rate grid of AdamW clients, then SOAP clients';
    ``setting`` is the report's one-paragraph summary of the regime;
    ``partition`` how the clients' rows are split (``fedpac-hf train`` overrides);
    ``protocol`` ``"full"`` runs every variant of ``privacy_benchmark.py``'s protocol,
    ``"goal"`` only what the goal compares (``_privacy_goal.py``).
    """

    name: str
    config: str
    clients_per_round: int
    num_rounds: int
    regime: tuple[str, ...]
    grids: tuple[tuple[float, ...], tuple[float, ...]]
    report: Path
    results: Path
    title: str
    setting: str
    partition: tuple[str, ...] = ("--partitioner", "dirichlet", "--dirichlet_alpha", "0.3")
    protocol: str = "full"

    @property
    def sample_rate(self) -> float:
        """q: the Poisson sampling rate of the clients under DP."""
        return self.clients_per_round / NUM_CLIENTS

    def overrides(self) -> list[str]:
        """The regime as ``fedpac-hf train`` overrides."""
        return [
            *self.regime,
            "--num_clients", str(NUM_CLIENTS),
            "--clients_per_round", str(self.clients_per_round),
            "--num_rounds", str(self.num_rounds),
            *self.partition,
            "--per_device_train_batch_size", "8",
        ]  # fmt: skip


SUITES: dict[str, Suite] = {
    "lora": Suite(
        name="lora",
        config="configs/vit_lora_mnist5k.yaml",
        clients_per_round=50,
        num_rounds=20,
        regime=("--lora_r", "2", "--local_steps", "5"),
        grids=((1e-3, 3e-3, 1e-2, 3e-2, 1e-1), (3e-3, 1e-2, 3e-2, 1e-1, 3e-1)),
        report=BENCH / "PRIVACY.md",
        results=BENCH / "privacy_results_lora",
        title="Client-level differential privacy at 500 clients: LoRA on a pretrained ViT",
        setting=(
            "the pretrained small ViT of `configs/vit_lora_mnist5k.yaml` (trained on digits "
            "0-4) learns digits 5-9 with rank-2 LoRA adapters on the attention query/value "
            "projections and a new head (d = {d:,} trainable parameters); MNIST-5k's training "
            "rows of those digits split over 500 clients (Dirichlet 0.3 label skew), 50 "
            "clients per round expected (Poisson sampling, q = 0.1), 5 local steps of batch 8, "
            "20 rounds"
        ),
    ),
    "lora_r4": Suite(
        name="lora_r4",
        config="configs/vit_lora_mnist5k.yaml",
        clients_per_round=50,
        num_rounds=20,
        regime=("--lora_r", "4", "--local_steps", "5"),
        # AdamW's grid up to 0.3: in the screen fedadamw's best rate was its top one (0.1)
        grids=((1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1), (3e-3, 1e-2, 3e-2, 1e-1, 3e-1)),
        report=BENCH / "PRIVACY_lora_r4.md",
        results=BENCH / "privacy_results_lora_r4",
        title="Client-level differential privacy at 500 clients: rank-4 LoRA, the goal only",
        setting=(
            "the `lora` federation of [PRIVACY.md](PRIVACY.md) with **rank-4** adapters "
            "(d = {d:,} trainable parameters): the pretrained small ViT of "
            "`configs/vit_lora_mnist5k.yaml` learns digits 5-9 with LoRA on the attention "
            "query/value projections and a new head; 500 clients (Dirichlet 0.3 label skew), "
            "50 per round expected (Poisson sampling, q = 0.1), 5 local steps of batch 8, "
            "20 rounds"
        ),
        protocol="goal",
    ),
    "vit": Suite(
        name="vit",
        config="configs/vit_mnist5k.yaml",
        clients_per_round=20,
        num_rounds=20,
        regime=(
            "--hidden_size",
            "32",
            "--num_hidden_layers",
            "2",
            "--num_attention_heads",
            "2",
            "--intermediate_size",
            "64",
            "--local_steps",
            "10",
        ),  # fmt: skip
        grids=((1e-3, 3e-3, 1e-2), (3e-3, 1e-2, 3e-2)),
        report=BENCH / "PRIVACY_full_vit.md",
        results=BENCH / "privacy_results",
        title="Client-level differential privacy at 500 clients: a small ViT trained in full",
        setting=(
            "a small ViT (d = {d:,} parameters) trained from scratch on MNIST-5k's 4,000 "
            "training rows split over 500 clients (Dirichlet 0.3 label skew), 20 clients per "
            "round expected (Poisson sampling, q = 0.04), 10 local steps of batch 8, 20 rounds"
        ),
    ),
}
