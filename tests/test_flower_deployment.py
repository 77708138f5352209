"""A real local Flower deployment: SuperLink + 2 SuperNodes on 127.0.0.1, `flwr run` the example."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from fedpac_hf.checkpoint import load_federated_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "examples" / "flower_app"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited early:\n{log.read_text()[-3000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    """End a process we started and the children it started (its own process group)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    for _ in range(20):  # children (superexec, apps) leave when their parent is gone
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)


@pytest.mark.slow
def test_flwr_run_on_a_local_superlink_with_two_supernodes(tmp_path):
    home, out = tmp_path / "flwr_home", tmp_path / "out"
    home.mkdir()
    link = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
        f'address = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    processes: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [str(BIN / args[0]), *args[1:]],
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        processes.append(process)
        return process, log

    try:
        superlink, link_log = start(
            "superlink",
            "flower-superlink",
            "--insecure",
            "--port",
            str(link),
            "--health-server-address",
            f"127.0.0.1:{free_port()}",
            "--disable-runtime-dependency-installation",
            "--database",
            str(tmp_path / "state.db"),
        )
        wait_for_port(link, superlink, link_log)
        for partition in (0, 1):
            node, node_log = start(
                f"supernode{partition}",
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{link}",
                "--port",
                str(free_port()),
                "--health-server-address",
                f"127.0.0.1:{free_port()}",
                "--node-config",
                f"partition-id={partition} num-partitions=2",
            )
        run = subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                str(APP),
                "test",
                "--stream",
                "--run-config",
                f"num-clients=2 clients-per-round=2 num-rounds=1 local-steps=2 output-dir='{out}'",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=420,
        )
        logs = run.stdout + run.stderr
        assert run.returncode == 0, logs[-4000:]
        state, meta = load_federated_checkpoint(out / "checkpoint-round-1")
        assert state.round == 1 and state.curvature and state.direction
        (round_one,) = meta["history"]
        assert round_one["num_clients"] == 2 and round_one["num_dropped"] == 0
        assert round_one["drift_relative"] > 0 and "eval_accuracy" in round_one
        assert "round 1: 2/2 clients [0, 1]" in logs
    finally:
        for process in reversed(processes):
            stop(process)
    assert all(p.poll() is not None for p in processes)


def _processes_mentioning(text: str) -> list[int]:
    """Ids of processes whose command line mentions ``text`` (a path unique to this test)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.slow
def test_flwr_run_the_example_on_the_simulation_engine(tmp_path):
    pytest.importorskip("ray")
    home, out = tmp_path / "flwr_home", tmp_path / "out"
    home.mkdir()
    (home / "config.toml").write_text((APP / "flower_config.toml").read_text())
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    try:
        run = subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                str(APP),
                "fedpac-simulation",
                "--stream",
                "--run-config",
                f"num-rounds=1 local-steps=2 output-dir='{out}'",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        logs = run.stdout + run.stderr
        assert run.returncode == 0, logs[-4000:]
        state, meta = load_federated_checkpoint(out / "checkpoint-round-1")
        assert state.round == 1 and meta["history"][0]["num_clients"] == 2
        assert "round 1: 2/2 clients" in logs
    finally:
        # `flwr run` leaves its managed local SuperLink running in the background
        for pid in _processes_mentioning(str(home)):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while _processes_mentioning(str(home)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _processes_mentioning(str(home))
