"""Peak memory of a federated run with 10 versus 1,000 registered clients.

The design keeps one model in memory and builds client state only while a
client trains, so the number of *registered* clients must not change peak
memory: the same 4,000 examples are split (index-backed) over 10 or 1,000
clients, 4 clients train per round in both runs, and each run happens in a
fresh subprocess whose peak RSS is read from ``getrusage``.

Usage::

    python benchmarks/client_memory.py            # prints a table, writes client_memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(num_clients: int) -> dict[str, float]:
    """One run in this process: FedPACTrainer, fedpac_soap, tiny ViT, synthetic images."""
    import datasets
    import numpy as np
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from fedpac_hf import FedPACArguments, FedPACTrainer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n = 4000
    x = rng.normal(size=(n, 1, 16, 16)).astype("float32")
    y = rng.integers(0, 10, n)
    train = datasets.Dataset.from_dict({"pixel_values": x, "label": y}).with_format("torch")
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
    )
    model = ViTForImageClassification._from_config(config, attn_implementation="eager")
    args = FedPACArguments(
        output_dir=tempfile.mkdtemp(),
        algorithm="fedpac_soap",
        num_rounds=3,
        num_clients=num_clients,
        clients_per_round=4,
        local_steps=5,
        partitioner="iid",
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        disable_tqdm=True,
    )
    start = time.perf_counter()
    FedPACTrainer(model=model, args=args, train_dataset=train).train()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "num_clients": num_clients,
        "peak_rss_mib": peak_kib / 1024,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(HERE / "client_memory.md"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for num_clients in (10, 1000):
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(num_clients)],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    ratio = rows[1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
    lines = [
        "# Peak memory: 10 vs 1,000 registered clients",
        "",
        "Command: `python benchmarks/client_memory.py` (2-core CPU machine, one thread per run).",
        "Same 4,000 synthetic 16x16 images split IID over the clients, tiny ViT, `fedpac_soap`,",
        "4 clients per round, 5 local steps, 3 rounds; each run in a fresh process.",
        "",
        "| registered clients | peak RSS (MiB) | run time (s) |",
        "| ---: | ---: | ---: |",
        *[f"| {r['num_clients']} | {r['peak_rss_mib']:.0f} | {r['seconds']:.1f} |" for r in rows],
        "",
        f"Peak memory ratio (1,000 / 10 clients): **{ratio:.3f}** (target: within 1.10).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
