"""Run a small FedPACTrainer job; launched by tests with 1 or 2 processes (torchrun, gloo).

Usage: ``torchrun --nproc_per_node N -m tests.distributed_worker OUT.safetensors``
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from fedpac_hf import FedPACArguments, FedPACTrainer
from tests.trainer_fixtures import image_data, tiny_vit


def main(out: str) -> None:
    data = image_data(n=160)
    args = FedPACArguments(
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
    trainer = FedPACTrainer(model=tiny_vit(), args=args, train_dataset=data["train"])
    trainer.train()
    if trainer.is_world_process_zero():
        state = trainer.server_state
        tensors = {f"params::{k}": v for k, v in state.params.items()}
        tensors.update({f"curvature::{k}": v for k, v in (state.curvature or {}).items()})
        tensors["clients"] = torch.tensor(trainer.round_history[-1]["num_clients"])
        save_file(tensors, out)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(str(Path(sys.argv[1])))
