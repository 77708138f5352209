"""Run a small FedPACTrainer job; launched by tests with 1 or 2 processes (torchrun, gloo).

Usage: ``torchrun --nproc_per_node N -m tests.distributed_worker OUT.safetensors [dp|public]``

With ``dp``: client-level DP with the secret noise seed each process draws
(shared from process 0). With ``public``: Theta from public data at the server
(``public_curvature``, two runs per round), which every process computes. With
either, every process writes its own state (``OUT.rank<i>.safetensors``).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from fedpac_hf import FedPACArguments, FedPACTrainer
from tests.trainer_fixtures import image_data, tiny_vit


def main(out: str, mode: str = "") -> None:
    data = image_data(n=160)
    dp = {"dp_mode": "client", "dp_clip_norm": 0.05, "dp_theta_clip_norm": 5.0}
    settings = {
        "dp": {**dp, "dp_noise_multiplier": 1.0},
        "public": {"public_curvature": True, "public_curvature_clients": 2},
    }.get(mode, {})
    args = FedPACArguments(
        **settings,
        output_dir=tempfile.mkdtemp(),
        algorithm="fedpac_soap",
        num_rounds=2,
        num_clients=4,
        clients_per_round=4,
        local_steps=3,
        learning_rate=3e-3,
        per_device_train_batch_size=8,
        partitioner="dirichlet",
        dirichlet_alpha=0.5,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    public = image_data(n=48, seed=3)["train"] if mode == "public" else None
    trainer = FedPACTrainer(
        model=tiny_vit(), args=args, train_dataset=data["train"], curvature_dataset=public
    )
    trainer.train()
    if mode:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        out = str(Path(out).with_suffix(f".rank{rank}.safetensors"))
    if trainer.is_world_process_zero() or mode:
        state = trainer.server_state
        tensors = {f"params::{k}": v for k, v in state.params.items()}
        tensors.update({f"curvature::{k}": v for k, v in (state.curvature or {}).items()})
        tensors["clients"] = torch.tensor(trainer.round_history[-1]["num_clients"])
        for key in ("delta_norm_median", "theta_norm_median"):  # without DP only
            if key in trainer.round_history[-1]:
                tensors[key] = torch.tensor(trainer.round_history[-1][key], dtype=torch.float64)
        save_file(tensors, out)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(str(Path(sys.argv[1])), *sys.argv[2:3])
