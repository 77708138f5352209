"""SecAgg+ on a real local Flower deployment: SuperLink + 3 SuperNodes on 127.0.0.1.

The example app runs 2 rounds with ``secure-aggregation=true``: round 1 with
a calibration pass and an aggregation pass, round 2 with one pass, through
the SuperLink's gRPC grid and the SuperNodes' own node state (which keeps
``secaggplus_mod``'s keys and the client's update between messages).
"""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")

from fedpac_hf.rundir.checkpoint import latest_checkpoint  # noqa: E402

from .flower_processes import APP, local_superlink, start_supernode  # noqa: E402


@pytest.mark.slow
def test_secagg_runs_on_a_local_deployment(tmp_path):
    out = tmp_path / "out"
    processes, link = local_superlink(tmp_path)
    try:
        for partition in range(3):
            start_supernode(processes, f"node{partition}", link, partition, 3)
        processes.start(
            "run",
            f"flwr run {APP} test --stream --run-config "
            f"\"num-rounds=2 secure-aggregation=true output-dir='{out}'\"",
        )
        processes.started["run"].wait(timeout=600)
    finally:
        processes.stop_all()
    logs = processes.text("run")
    assert "FedPAC run finished: 2 of 2 rounds done" in logs, logs[-5000:]
    assert "round 1: SecAgg+ calibrate pass" in logs
    assert "round 2: SecAgg+ aggregate pass" in logs
    assert "Secure aggregation completed" in logs
    assert latest_checkpoint(out).name == "checkpoint-round-2"
