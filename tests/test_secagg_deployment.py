"""SecAgg+ on a real local Flower deployment: SuperLink + 3 SuperNodes on 127.0.0.1.

The example app runs 2 rounds with ``secure-aggregation=true`` (and again with
client-level DP on top): round 1 with a calibration pass and an aggregation
pass, round 2 with one pass, through the SuperLink's gRPC grid and the
SuperNodes' own node state (which keeps ``secaggplus_mod``'s keys and the
client's update between messages).
"""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("flwr")

from fedpac_hf.rundir.checkpoint import latest_checkpoint  # noqa: E402

from .flower_processes import APP, local_superlink, start_supernode  # noqa: E402

#: Client-level DP on top, as the app's README says: keys added to its run config (Flower's
#: --run-config overrides only keys the app's config has). Fixed-size samples, noise on the
#: secure sum.
CLIENT_DP = """
dp-mode = "client"
dp-clip-norm = 0.5
dp-theta-clip-norm = 5.0
dp-target-epsilon = 8.0
"""

#: And with Poisson sampling: seed 8 draws partitions 0 and 1, then partition 1 alone, whose
#: round skips SecAgg+ (the client adds the round's noise itself).
POISSON = CLIENT_DP + 'dp-sampling = "poisson"\n'


@pytest.mark.slow
@pytest.mark.parametrize(
    "privacy", ["", CLIENT_DP, POISSON], ids=["plain", "client_dp", "client_dp_poisson"]
)
def test_secagg_runs_on_a_local_deployment(tmp_path, privacy):
    out, app = tmp_path / "out", APP
    if privacy:  # a copy of the app with the keys at the end of [tool.flwr.app.config]
        app = tmp_path / "app"
        shutil.copytree(APP, app, ignore=shutil.ignore_patterns("fedpac_flower_output", "flwr_*"))
        config = app / "pyproject.toml"
        assert config.read_text().rstrip().splitlines()[-1].startswith("secure-aggregation")
        config.write_text(config.read_text() + privacy)
    processes, link = local_superlink(tmp_path)
    try:
        for partition in range(3):
            start_supernode(processes, f"node{partition}", link, partition, 3)
        processes.start(
            "run",
            f"flwr run {app} test --stream --run-config "
            f"\"num-rounds=2 secure-aggregation=true output-dir='{out}'"
            + (' seed=8"' if privacy is POISSON else '"'),
        )
        processes.started["run"].wait(timeout=600)
    finally:
        processes.stop_all()
    logs = processes.text("run")
    assert "FedPAC run finished: 2 of 2 rounds done" in logs, logs[-5000:]
    assert "round 1: SecAgg+ calibrate pass" in logs
    assert "Secure aggregation completed" in logs
    assert latest_checkpoint(out).name == "checkpoint-round-2"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if privacy is POISSON:  # round 2's only client noises its update itself
        assert "round 2: one client, which adds the round's noise itself" in logs
        assert "round 2: SecAgg+" not in logs
        assert [row["num_clients"] for row in rows] == [2, 1]
    else:
        assert "round 2: SecAgg+ aggregate pass" in logs
        assert [row["num_clients"] for row in rows] == [2, 2]
    if privacy:  # the package's DP note reaches Flower's log
        sampling = "Poisson sampling" if privacy is POISSON else "fixed-size samples"
        assert f"{sampling} at q = 0.667" in logs
        assert 0 < rows[0]["epsilon"] < rows[1]["epsilon"] <= 8.0
