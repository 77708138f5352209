"""What SecAgg+ costs a FedPAC round: plain versus secure aggregation at 5, 10 and 20 clients.

The example app (``examples/flower_app``, its default synthetic data and small
ViT, ``fedpac_soap``) runs on Flower's simulation engine with ``flwr run``, as
a user runs it, once with plain aggregation and once with
``secure-aggregation=true`` (Flower's ``SecAggPlusWorkflow`` and
``secaggplus_mod``, ``docs/secure_aggregation.md``), for each number of
virtual SuperNodes; every client takes part in every round, 3 rounds. From the
run's ``metrics.jsonl``: the mean round time of rounds 2..3 (round 1 of a
secure run adds the calibration pass and both include Ray's warm-up), the
bytes each client sent and received per round on the wire (``wire_bytes_up`` /
``wire_bytes_down`` over the clients), and the final accuracy of the global
model on the server's evaluation set.

Usage::

    python benchmarks/secagg_cost.py        # prints the table, writes secagg_cost.md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flower_scale import machine, run_once  # noqa: E402

HERE = Path(__file__).resolve().parent


def measure(clients: int, rounds: int, secure: bool, workdir: Path) -> dict[str, float]:
    """One ``flwr run`` of the example; its round time, bytes per client and accuracy."""
    folder = workdir / f"{'secure' if secure else 'plain'}_{clients}"
    folder.mkdir()
    extra = "secure-aggregation=true" if secure else "secure-aggregation=false"
    run_once(clients, clients, rounds, folder, dataset="synthetic", extra=extra)
    rows = [
        json.loads(line)
        for line in (folder / f"out_{clients}" / "metrics.jsonl").read_text().splitlines()
    ]
    later = rows[1:] or rows
    return {
        "clients": clients,
        "secure": secure,
        "round_s": sum(r["round_time"] for r in later) / len(later),
        "up_per_client": sum(r["wire_bytes_up"] for r in later) / len(later) / clients,
        "down_per_client": sum(r["wire_bytes_down"] for r in later) / len(later) / clients,
        "accuracy": float(rows[-1].get("eval_accuracy", float("nan"))),
    }


def render(rows: list[dict[str, float]], rounds: int, command: str) -> str:
    """The report: one line per run, then the secure / plain ratios per client count."""
    import flwr

    lines = [
        "# SecAgg+ cost of a FedPAC round",
        "",
        f"Command: `{command}` on {machine()} (shared with other jobs); flwr {flwr.__version__}.",
        "",
        "`flwr run examples/flower_app` on Flower's simulation engine, the app's synthetic data",
        f"and small ViT, `fedpac_soap`, every client in every round, {rounds} rounds. Round",
        "time: mean of rounds 2..end from `metrics.jsonl` (round 1 of a secure run adds its",
        "calibration pass). Bytes: wire bytes per client and round (`wire_bytes_up` /",
        "`wire_bytes_down` over the clients), SecAgg+'s key exchange included.",
        "",
        "| clients | aggregation | round time (s) | bytes up / client | bytes down / client | final accuracy |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {'SecAgg+' if r['secure'] else 'plain'} | {r['round_s']:.2f} | "
            f"{r['up_per_client']:,.0f} | {r['down_per_client']:,.0f} | {r['accuracy']:.3f} |"
        )
    lines += ["", "| clients | round time, SecAgg+ / plain | accuracy, SecAgg+ - plain (points) |"]
    lines += ["| ---: | ---: | ---: |"]
    by_key = {(r["clients"], r["secure"]): r for r in rows}
    for clients in sorted({r["clients"] for r in rows}):
        plain, secure = by_key.get((clients, False)), by_key.get((clients, True))
        if plain and secure:
            lines.append(
                f"| {clients} | {secure['round_s'] / plain['round_s']:.2f} | "
                f"{100 * (secure['accuracy'] - plain['accuracy']):+.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default=str(HERE / "secagg_cost.md"))
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="secagg_cost_") as tmp:
        for clients in args.clients:
            for secure in (False, True):
                rows.append(measure(clients, args.rounds, secure, Path(tmp)))
                print(rows[-1], flush=True)
    command = " ".join(
        ["python benchmarks/secagg_cost.py", *(argv if argv is not None else sys.argv[1:])]
    )
    text = render(rows, args.rounds, command)
    print(text)
    Path(args.output).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
