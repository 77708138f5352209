"""examples/flower_app/README.md, run as written: the simulation and the local deployment.

The commands come out of the README's ``bash`` blocks. They run in a copy of
the app folder with this checkout's fedpac_hf on ``PYTHONPATH``; the only
change is the ports (free ones instead of 9093-9096, and for the local
simulation SuperLink through Flower's environment variables), so that the
tests never meet another SuperLink on the machine. The install runs in
``tests/test_install_commands.py``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402

from fedpac_hf.federated import ServerState, sample_clients  # noqa: E402
from fedpac_hf.rundir.checkpoint import latest_checkpoint, load_federated_checkpoint  # noqa: E402
from fedpac_hf.rundir.environment import read_starts  # noqa: E402

from .doc_commands import bash_blocks  # noqa: E402
from .flower_processes import (  # noqa: E402
    APP,
    Processes,
    flower_env,
    free_port,
    kill_tree,
    process_tree,
    processes_mentioning,
    run_id,
    run_status,
    wait_gone,
)

INSTALL = ['pip install -e ".[flower,data]"']
CONFIGURE = [
    "mkdir -p flwr_home && cp -n flower_config.toml flwr_home/config.toml",
    "export FLWR_HOME=$PWD/flwr_home HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1",
    "export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1",
]
SIMULATION = "flwr run . fedpac-simulation --stream"
LIST_RUNS = "flwr ls fedpac-simulation --format json"
REPORT = "fedpac-hf report fedpac_flower_output"
OVERWRITE = 'flwr run . fedpac-simulation --stream --run-config "overwrite-output-dir=true"'
RESUME_FROM_PATH = (
    "flwr run . fedpac-simulation --stream --run-config "
    "\"resume-from-checkpoint='fedpac_flower_output/checkpoint-round-2'\""
)
SUPERLINK = (
    "flower-superlink --insecure --port 9093 --database state.db "
    "--disable-runtime-dependency-installation"
)
SUPERNODES = [
    f"flower-supernode --insecure --superlink 127.0.0.1:9093 --port {9094 + i} "
    f'--node-config "partition-id={i} num-partitions=3"'
    for i in range(3)
]
CERTIFICATES = (
    "python make_certificates.py --out certificates --supernodes 3 --flower-config "
    "flwr_home/config.toml --connection fedpac-secure --address 127.0.0.1:9093"
)
SECURE_SUPERLINK = (
    "flower-superlink --ssl-ca-certfile certificates/ca.crt --ssl-certfile certificates/server.pem "
    "--ssl-keyfile certificates/server.key --enable-supernode-auth --port 9093 --database state.db "
    "--disable-runtime-dependency-installation"
)
REGISTER = [
    f"flwr supernode register certificates/supernode-{i}.pub fedpac-secure" for i in (1, 2, 3)
]
SECURE_SUPERNODES = [
    f"flower-supernode --root-certificates certificates/ca.crt --superlink 127.0.0.1:9093 "
    f"--port {9094 + i} --auth-supernode-private-key certificates/supernode-{i + 1} "
    f'--node-config "partition-id={i} num-partitions=3"'
    for i in range(3)
]
SECURE_RUN = "flwr run . fedpac-secure --stream"
DEPLOYMENT = "flwr run . fedpac-deployment --stream"
RESUME_LATEST = 'flwr run . fedpac-deployment --stream --run-config "resume-from-checkpoint=true"'
#: The doc whose headroom commands run in the simulation test (in the app's folder).
SECURE_DOC = APP.parents[1] / "docs" / "secure_aggregation.md"
README_COMMANDS = [
    *INSTALL,
    *CONFIGURE,
    SIMULATION,
    LIST_RUNS,
    REPORT,
    OVERWRITE,
    RESUME_FROM_PATH,
    CERTIFICATES,
    SECURE_SUPERLINK,
    *REGISTER,
    *SECURE_SUPERNODES,
    SECURE_RUN,
    SUPERLINK,
    *SUPERNODES,
    DEPLOYMENT,
    RESUME_LATEST,
]


def readme_commands(path: Path = APP / "README.md") -> list[str]:
    """Every command of the ``bash`` blocks of ``path``, in order."""
    return [command for block in bash_blocks(path) for command in block]


def test_these_tests_run_every_command_of_the_readme():
    assert readme_commands() == README_COMMANDS, (
        "examples/flower_app/README.md's commands changed: update README_COMMANDS and the "
        "tests that run them"
    )


def test_every_run_config_override_the_readme_shows_is_a_key_of_the_apps_config():
    """Flower refuses a --run-config key the app's config lacks ("Invalid run configuration"),
    so each override the README shows, in a command or in the text, must name one."""
    from flwr.common.config import get_fused_config_from_dir, parse_config_args

    from fedpac_hf.flower.config import arguments_from_run_config

    text = (APP / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
    overrides = re.findall(r'--run-config\s+"((?:[^"\\]|\\.)*)"', text)
    assert len(overrides) >= 5 and any("log-level" in o for o in overrides)
    for override in overrides:
        fused = get_fused_config_from_dir(APP, parse_config_args([override]))
        settings = {"output-dir": str(APP / "unused"), "overwrite-output-dir": True}
        arguments_from_run_config({**fused, **settings}, ("dataset",))  # values a run accepts


def app_copy(tmp_path: Path, ports: dict[int, int] | None = None) -> Path:
    """A copy of the app folder (as a user has it), with ``ports`` replaced in its connections."""
    app = tmp_path / "app"
    shutil.copytree(
        APP, app, ignore=shutil.ignore_patterns("fedpac_flower_output", "flwr_home", "state.db")
    )
    if ports:
        config = app / "flower_config.toml"
        config.write_text(on_ports(config.read_text(), ports))
    return app


def on_ports(text: str, ports: dict[int, int]) -> str:
    return re.sub(r"\b(909[3-6])\b", lambda m: str(ports[int(m.group(1))]), text)


def configured(command: str) -> str:
    """``command`` after the README's configuration lines, as in the user's shell."""
    return "\n".join([*CONFIGURE, command])


def in_process_run(tmp_path: Path) -> ServerState:
    """The app's run config trained by ``FedPACTrainer`` in this process (the reference)."""
    spec = importlib.util.spec_from_file_location(
        "flower_app_task", APP / "fedpac_flower_app" / "task.py"
    )
    task = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task)
    from flwr.common.config import get_fused_config_from_dir

    from fedpac_hf.flower.config import arguments_from_run_config

    config = get_fused_config_from_dir(APP, {})  # the run config Flower gives the apps
    settings = {
        **config,
        "output-dir": str(tmp_path / "in_process"),
        "eval-strategy": "no",  # the Flower run evaluates on the server; no test set here
        "save-strategy": "no",
    }
    trainer = task.build_trainer(arguments_from_run_config(settings, task.APP_SETTINGS), config)
    trainer.train()
    return trainer.server_state


def assert_same_state(path: Path, reference: ServerState) -> None:
    state, _ = load_federated_checkpoint(path)
    assert state.round == reference.round
    for part in ("params", "curvature", "direction"):
        mine, theirs = getattr(state, part), getattr(reference, part)
        assert set(mine) == set(theirs), part
        for name in theirs:
            assert torch.equal(mine[name], theirs[name]), (path, part, name)


def rounds_in(out: Path) -> list[float]:
    return [json.loads(r)["round"] for r in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_readme_simulation_commands(tmp_path):
    pytest.importorskip("ray")
    app = app_copy(tmp_path)
    env = flower_env(
        app / "flwr_home",  # what the README's export sets; the local SuperLink on free ports
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
    )
    processes = Processes(tmp_path, env, app)
    out = app / "fedpac_flower_output"
    reference = in_process_run(tmp_path)
    try:
        first = processes.run(configured(SIMULATION))
        logs = first.stdout + first.stderr
        assert first.returncode == 0, logs[-4000:]
        # three rounds, the round-2 actor reuse included: no client lost its Accelerate state
        for number, clients in ((1, "[1, 2]"), (2, "[1, 2]"), (3, "[0, 1]")):
            assert f"round {number}: 2/2 clients {clients}" in logs, logs[-4000:]
        assert "dropping client" not in logs
        assert "(preflight=False skips it)" in logs  # a ClientApp's preflight: the package's log
        assert "FedPAC run finished: 3 of 3 rounds done" in logs
        assert rounds_in(out) == [1.0, 2.0, 3.0]
        assert [p.name for p in sorted(out.glob("checkpoint-round-*"))] == [
            f"checkpoint-round-{r}" for r in (1, 2, 3)
        ]
        assert_same_state(out / "checkpoint-round-3", reference)  # bit for bit
        _, meta = load_federated_checkpoint(out / "checkpoint-round-3")
        assert all("eval_accuracy" in h for h in meta["history"])

        listing = processes.run(configured(LIST_RUNS))
        assert run_status(listing.stdout, run_id(first.stdout))["status"] == "finished:completed"

        report = processes.run(configured(REPORT))
        assert report.returncode == 0, report.stderr[-3000:]
        assert (out / "summary.md").is_file() and (out / "accuracy.png").is_file()
        assert "## Environment" in (out / "summary.md").read_text()  # environment.jsonl's

        # the same command again: the folder holds a run, so the ServerApp refuses to start ...
        refused = processes.run(configured(SIMULATION))
        logs = refused.stdout + refused.stderr
        assert "FedPAC run failed after 0 of 3 rounds: ValueError" in logs, logs[-4000:]
        assert "holds another run" in logs
        # ... and `flwr run` does not say so in its exit status (Flower 1.42); the SuperLink does
        status = run_status(processes.run(configured(LIST_RUNS)).stdout, run_id(refused.stdout))
        assert status["status"] == "finished:failed", status
        assert "holds another run" in status["status-details"]
        assert_same_state(out / "checkpoint-round-3", reference)  # the run is untouched

        resumed = processes.run(configured(RESUME_FROM_PATH))
        logs = resumed.stdout + resumed.stderr
        assert "resumed from fedpac_flower_output/checkpoint-round-2" in logs, logs[-4000:]
        assert "round 3 of 3 (Flower's round 1)" in logs
        assert "round 1: 2/2" not in logs and "round 2: 2/2" not in logs
        assert "FedPAC run finished: 3 of 3 rounds done" in logs
        assert_same_state(out / "checkpoint-round-3", reference)
        assert rounds_in(out) == [1.0, 2.0, 3.0]
        assert [s["start_round"] for s in read_starts(out)] == [0, 2]  # the README's line

        replaced = processes.run(configured(OVERWRITE))
        logs = replaced.stdout + replaced.stderr
        assert "round 1: 2/2 clients [1, 2]" in logs, logs[-4000:]
        assert "FedPAC run finished: 3 of 3 rounds done" in logs
        assert rounds_in(out) == [1.0, 2.0, 3.0]
        assert [s["start_round"] for s in read_starts(out)] == [0]  # the old starts went too
        assert_same_state(out / "checkpoint-round-3", reference)

        # docs/secure_aggregation.md: SecAgg+ at the default headroom clips values of round 2,
        # at twice the headroom none
        tight, loose = [c for c in readme_commands(SECURE_DOC) if "secagg-headroom" in c]
        for command, clips in ((tight, True), (loose, False)):
            secure = processes.run(configured(command))
            logs = secure.stdout + secure.stderr
            assert "FedPAC run finished: 3 of 3 rounds done" in logs, logs[-4000:]
            warned = re.findall(r"round (\d+): the bounds clipped [1-9]\d* values .* secagg_", logs)
            assert ("2" in warned) if clips else not warned, (command, warned)
    finally:
        # `flwr run` leaves its local SuperLink running in the background
        roots = processes_mentioning(str(app / "flwr_home"))
        trees = [pid for root in roots for pid in process_tree(root)]
        for root in roots:
            kill_tree(root)
        wait_gone(trees)
    assert not processes_mentioning(str(app / "flwr_home"))


@pytest.mark.slow
def test_the_readme_deployment_survives_a_server_restart(tmp_path):
    ports = {port: free_port() for port in (9093, 9094, 9095, 9096)}
    app = app_copy(tmp_path, ports)
    processes = Processes(tmp_path, flower_env(app / "flwr_home"), app)
    out = app / "fedpac_flower_output"
    # the example's run (seed 0): rounds 1 and 2 train partitions 1 and 2, round 3 needs 0
    assert [sample_clients(3, 2, 0, r) for r in range(3)] == [[1, 2], [1, 2], [0, 1]]
    reference = in_process_run(tmp_path)
    try:
        processes.start("superlink", configured(on_ports(SUPERLINK, ports)))
        processes.wait_for_port(ports[9093], "superlink")
        for partition in (1, 2):  # partition 0's site is not up yet
            processes.start(f"node{partition}", configured(on_ports(SUPERNODES[partition], ports)))
        processes.start("run", configured(DEPLOYMENT))
        processes.wait_until(
            lambda: (
                (out / "checkpoint-round-2").is_dir()
                and "for the nodes of partitions [0]" in processes.text("run")
            ),
            "round 3 waiting for partition 0's node",
            watch="run",
        )
        # the server machine goes down: the SuperLink and the ServerApp it runs
        processes.kill("superlink")
        processes.started["run"].wait(timeout=120)  # `flwr run --stream` ends with its SuperLink
        assert latest_checkpoint(out).name == "checkpoint-round-2"
        assert "round 2: 2/2 clients [1, 2]" in processes.text("run")

        # the same command brings the SuperLink back; the running SuperNodes reconnect
        processes.start("superlink-again", configured(on_ports(SUPERLINK, ports)))
        processes.wait_for_port(ports[9093], "superlink-again")
        processes.start("node0", configured(on_ports(SUPERNODES[0], ports)))
        resumed = processes.run(configured(RESUME_LATEST), timeout=900)
        logs = resumed.stdout + resumed.stderr
        assert "resumed from fedpac_flower_output/checkpoint-round-2" in logs, logs[-4000:]
        assert "round 3 of 3 (Flower's round 1): clients [0, 1]" in logs
        assert "round 3: 2/2 clients [0, 1]" in logs
        assert "FedPAC run finished: 3 of 3 rounds done" in logs
        assert rounds_in(out) == [1.0, 2.0, 3.0]
        # killed after round 2, resumed on a restarted SuperLink: the uninterrupted result
        assert_same_state(out / "checkpoint-round-3", reference)
    finally:
        processes.stop_all()


@pytest.mark.slow
def test_the_readme_secure_deployment_tls_auth_refuses_an_unregistered_supernode(tmp_path):
    """TLS on every connection, 3 registered SuperNodes and one that is not: the run
    completes bit for bit as in process, the stranger is refused."""
    ports = {port: free_port() for port in (9093, 9094, 9095, 9096)}
    app = app_copy(tmp_path, ports)
    processes = Processes(tmp_path, flower_env(app / "flwr_home"), app)
    out = app / "fedpac_flower_output"
    reference = in_process_run(tmp_path)
    made = processes.run(configured(on_ports(CERTIFICATES, ports)))
    assert made.returncode == 0, made.stderr
    connection = (app / "flwr_home" / "config.toml").read_text()
    assert f'root-certificates = "{app / "certificates" / "ca.crt"}"' in connection
    assert "insecure" not in connection.split("[superlink.fedpac-secure]")[1]
    stranger = processes.run(
        "python make_certificates.py --out strangers --supernodes 1"
    )  # a key pair the SuperLink never hears of
    assert stranger.returncode == 0, stranger.stderr
    try:
        processes.start("superlink", configured(on_ports(SECURE_SUPERLINK, ports)))
        processes.wait_for_port(ports[9093], "superlink")
        for command in REGISTER:
            registered = processes.run(configured(command))
            assert "registered successfully" in registered.stdout, registered.stdout[-2000:]
        processes.start(
            "stranger",
            configured(
                f"flower-supernode --root-certificates certificates/ca.crt --superlink "
                f"127.0.0.1:{ports[9093]} --port {free_port()} "
                "--auth-supernode-private-key strangers/supernode-1 "
                '--node-config "partition-id=0 num-partitions=3"'
            ),
        )
        for i, command in enumerate(SECURE_SUPERNODES):
            processes.start(f"node{i}", configured(on_ports(command, ports)))
        result = processes.run(configured(SECURE_RUN), timeout=900)
        processes.wait_until(
            lambda: processes.started["stranger"].poll() is not None,
            "the unregistered SuperNode's exit",
            timeout=300,
        )
    finally:
        processes.stop_all()
    logs = result.stdout + result.stderr
    assert "FedPAC run finished: 3 of 3 rounds done" in logs, logs[-4000:]
    assert "Failed to activate SuperNode" in processes.text("stranger")
    assert processes.started["stranger"].returncode != 0
    assert "https://" in processes.text("superlink")  # TLS, not plain HTTP
    assert_same_state(out / "checkpoint-round-3", reference)
