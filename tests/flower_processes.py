"""Real Flower processes for the deployment tests: start them, watch their logs, end them.

Every process is started in its own session with its output in a log file;
ending one ends the processes it started too (a SuperLink's SuperExec and
ServerApp, a SuperNode's ClientApps), found by walking ``/proc`` before any
of them is signalled. Waits have generous deadlines that only turn a hang
into a failure with the logs; nothing asserts how long anything took.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "examples" / "flower_app"
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flower_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of every Flower process: this checkout's fedpac_hf, offline, one thread."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def _parents() -> dict[int, int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    parents = _parents()
    tree, frontier = [pid], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        tree += children
        frontier = children
    return tree


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to ``pid`` and every process it started (collected first)."""
    for p in reversed(process_tree(pid)):
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def processes_mentioning(text: str) -> list[int]:
    """Ids of processes whose command line mentions ``text`` (a path unique to one test)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


class Processes:
    """The processes one test started, each logging to ``folder/<name>.log``."""

    def __init__(self, folder: Path, env: dict[str, str], cwd: Path) -> None:
        self.folder, self.env, self.cwd = folder, env, cwd
        self.started: dict[str, subprocess.Popen] = {}

    def log(self, name: str) -> Path:
        return self.folder / f"{name}.log"

    def start(self, name: str, command: str) -> subprocess.Popen:
        """Run the shell ``command`` in the background (``name`` must be new)."""
        assert name not in self.started, name
        with self.log(name).open("wb") as sink:
            process = subprocess.Popen(
                ["bash", "-c", command],
                cwd=self.cwd,
                env=self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started[name] = process
        return process

    def run(self, command: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run the shell ``command`` to its end; its output is returned and kept in the folder."""
        result = subprocess.run(
            ["bash", "-c", command],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        number = len(list(self.folder.glob("run-*.log")))
        self.log(f"run-{number}").write_text(f"$ {command}\n{result.stdout}{result.stderr}")
        return result

    def text(self, name: str) -> str:
        return self.log(name).read_text(errors="replace")

    def kill(self, name: str) -> None:
        """SIGKILL the process ``name`` and everything it started; wait for it."""
        process = self.started[name]
        kill_tree(process.pid)
        process.wait(timeout=30)

    def wait_until(
        self, ready: Callable[[], bool], what: str, timeout: float = 900, watch: str | None = None
    ) -> None:
        """Poll ``ready`` until it holds; fail with the logs if ``watch`` exits or time runs out."""
        deadline = time.monotonic() + timeout
        while not ready():
            if watch is not None and self.started[watch].poll() is not None and not ready():
                raise AssertionError(f"{watch} ended before {what}:\n{self.tail(watch)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {timeout:.0f} s:\n{self.tails()}")
            time.sleep(0.2)

    def wait_for_port(self, port: int, name: str) -> None:
        def listening() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        self.wait_until(listening, f"listener on port {port}", timeout=120, watch=name)

    def tail(self, name: str, chars: int = 3000) -> str:
        return self.text(name)[-chars:]

    def tails(self) -> str:
        return "\n".join(f"--- {name}\n{self.tail(name, 1500)}" for name in self.started)

    def stop_all(self) -> None:
        """End every process started here and its children; wait for them."""
        trees = [process_tree(p.pid) for p in self.started.values()]
        for tree in trees:
            for pid in reversed(tree):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for process in self.started.values():
            process.wait(timeout=30)
        wait_gone([pid for tree in trees for pid in tree])


def wait_gone(pids: list[int], timeout: float = 30) -> None:
    """Wait until none of ``pids`` runs any more (zombies of others' children count as gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                alive.append(pid)
        if not alive:
            return
        time.sleep(0.3)
    raise AssertionError(f"processes {alive} still run")


def run_id(output: str) -> int:
    """The run id ``flwr run`` printed ("Successfully started run N")."""
    found = re.search(r"Successfully started run (\d+)", output)
    assert found, output[-3000:]
    return int(found.group(1))


def run_status(listing: str, run: int) -> dict:
    """The entry of ``run`` in the output of ``flwr ls ... --format json``."""
    runs = json.loads(listing[listing.index("{") :])["runs"]
    (entry,) = [r for r in runs if int(r["run-id"]) == run]
    return entry


def local_superlink(tmp_path: Path) -> tuple[Processes, int]:
    """A plain-HTTP SuperLink on a free port of 127.0.0.1, started and listening.

    Its ``flwr`` connection is ``test`` (in ``tmp_path / "flwr_home"``); every
    process logs to ``tmp_path``. Returns the processes and the SuperLink's port.
    """
    home, link = tmp_path / "flwr_home", free_port()
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
        f'address = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    processes = Processes(tmp_path, flower_env(home), tmp_path)
    try:
        processes.start(
            "superlink",
            f"flower-superlink --insecure --port {link} --database {tmp_path / 'state.db'} "
            "--disable-runtime-dependency-installation",
        )
        processes.wait_for_port(link, "superlink")
    except BaseException:
        processes.stop_all()
        raise
    return processes, link


def start_supernode(processes: Processes, name: str, link: int, partition: int, num: int) -> None:
    """A plain-HTTP SuperNode ``name`` holding ``partition`` of ``num``, on a free port."""
    processes.start(
        name,
        f"flower-supernode --insecure --superlink 127.0.0.1:{link} --port {free_port()} "
        f"--node-config 'partition-id={partition} num-partitions={num}'",
    )
