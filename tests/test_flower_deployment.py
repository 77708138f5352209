"""A real local Flower deployment losing SuperNodes: SuperLink + 3 SuperNodes on 127.0.0.1.

The example app runs 5 rounds (seed 0: rounds 1..5 sample partitions [1, 2],
[1, 2], [0, 1], [1, 2], [0, 2]) while the test takes its sites down:

- round 2: partition 1's SuperNode is killed while it trains: the round
  completes with client 2, and the server log names client 1 and why;
- round 3: partition 1 has no node: it is dropped after node-wait-timeout
  and client 0 trains; then a new SuperNode for partition 1 starts;
- round 4: the new node is found and trains partition 1 again;
- round 5: the sites of both sampled partitions are gone: the round fails
  with the core's RoundError listing both clients' reasons, nothing is saved
  for it, and the run's last checkpoint is round 4's.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("flwr")

from fedpac_hf.federated import sample_clients  # noqa: E402
from fedpac_hf.rundir.checkpoint import latest_checkpoint, load_federated_checkpoint  # noqa: E402

from .flower_processes import (  # noqa: E402
    APP,
    local_superlink,
    run_id,
    run_status,
    start_supernode,
)


def training(log: str, round_number: int) -> bool:
    """Whether a SuperNode's log shows it received round ``round_number``'s train message."""
    start = log.find(f", ROUND {round_number}]")
    return start >= 0 and "Receiving: train message" in log[start:]


@pytest.mark.slow
def test_a_deployment_loses_supernodes_mid_round_and_between_rounds(tmp_path):
    assert [sample_clients(3, 2, 0, r) for r in range(5)] == [
        [1, 2],
        [1, 2],
        [0, 1],
        [1, 2],
        [0, 2],
    ]
    out = tmp_path / "out"
    processes, link = local_superlink(tmp_path)

    def supernode(name: str, partition: int) -> None:
        start_supernode(processes, name, link, partition, 3)

    def logged(text: str):
        return lambda: text in processes.text("run")

    try:
        for partition in range(3):
            supernode(f"node{partition}", partition)
        processes.start(
            "run",
            f"flwr run {APP} test --stream --run-config "
            f"\"num-rounds=5 node-wait-timeout=20 output-dir='{out}'\"",
        )
        processes.wait_until(
            lambda: training(processes.text("node1"), 2), "round 2 on node 1", watch="run"
        )
        processes.kill("node1")  # while its ClientApp trains client 1
        processes.wait_until(
            logged("round 3: dropping client 1: NotConnected"), "round 3's drop", watch="run"
        )
        supernode("node1-again", 1)  # the site comes back (a new node id)
        processes.wait_until(logged("round 4: 2/2 clients [1, 2]"), "round 4", watch="run")
        processes.kill("node0")  # round 5's sites, partitions 0 and 2, go down
        processes.kill("node2")
        processes.started["run"].wait(timeout=600)
        listing = processes.run("flwr ls test --format json")
    finally:
        processes.stop_all()

    logs = processes.text("run")
    # round 2: the node lost mid-round is named, with the SuperLink's reason
    assert "round 2: dropping client 1: NodeUnavailable: node " in logs, logs[-5000:]
    assert "Node Unavailable" in logs and "ignoring an unexpected reply" not in logs
    assert "round 2: 1/2 clients [2]" in logs
    # round 3: the same deterministic sample; the partition without a node is dropped
    assert "round 3: 1/2 clients [0]" in logs
    # round 4: the restarted node holds partition 1 again and trains it
    assert "round 4: 2/2 clients [1, 2]" in logs
    # round 5: every sampled client lost: the core's failure rule, nothing saved
    assert (
        "FedPAC run failed after 4 of 5 rounds: RoundError: round 5: only 0 of 2 client "
        "updates succeeded, fewer than min_clients_per_round=1"
    ) in logs
    failure = logs[logs.index("round 5: only 0 of 2") :]
    assert "client 0: " in failure and "client 2: " in failure
    assert "nothing was saved for this round" in failure
    assert f"its last checkpoint is {out / 'checkpoint-round-4'}" in logs
    assert 'continue the run from it with --run-config "resume-from-checkpoint=true"' in logs

    assert latest_checkpoint(out).name == "checkpoint-round-4"
    assert not (out / "checkpoint-round-5").exists()
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1.0, 2.0, 3.0, 4.0]
    _, meta = load_federated_checkpoint(out / "checkpoint-round-4")
    assert [h["num_clients"] for h in meta["history"]] == [2.0, 1.0, 1.0, 2.0]
    assert [h["num_dropped"] for h in meta["history"]] == [0.0, 1.0, 1.0, 0.0]
    # `flwr run` ended normally; the SuperLink knows the run failed
    assert run_status(listing.stdout, run_id(logs))["status"] == "finished:failed"
