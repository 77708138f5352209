"""Peak memory of the Flower ServerApp with 100 virtual clients versus 10.

The example app (``examples/flower_app``) on MNIST-5k (``dataset='mnist5k'``,
the small ViT, ``fedpac_soap``) runs on Flower's simulation engine with
``flwr run``, exactly as a user runs it, once with 10 and once with 100
virtual SuperNodes (one client each, Dirichlet 0.3 split of the 5,000
training digits), 10 clients per round, 5 local steps, 3 rounds. The ServerApp
holds only the global state and one round's messages, never per-client state,
so its peak memory must not grow with the number of clients. It logs its peak
RSS (``getrusage``) as its last line; the simulation's ServerApp process also
hosts Flower's simulation engine and the Ray driver. Ray runs one ClientApp
actor per CPU (``client-resources-num-cpus=1``); each actor builds the trainer
once and reuses it.

Usage::

    python benchmarks/flower_scale.py          # prints a table, writes flower_scale.md
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# the process helpers the Flower tests use (free ports, process trees)
from tests.flower_processes import free_port, process_tree, processes_mentioning  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
APP = ROOT / "examples" / "flower_app"
BIN = Path(sys.executable).parent
_FINISHED = re.compile(
    r"FedPAC run finished: (\d+) of \d+ rounds done; .*peak memory of the ServerApp process "
    r"(\d+) MiB"
)


def run_once(
    num_clients: int,
    per_round: int,
    rounds: int,
    workdir: Path,
    dataset: str = "mnist5k",
    extra: str = "",
) -> dict[str, float]:
    """``flwr run`` the example on ``num_clients`` virtual SuperNodes; its ServerApp's numbers.

    ``extra`` is added to the run config (e.g. ``secure-aggregation=true``).
    """
    home = workdir / f"flwr_home_{num_clients}"
    home.mkdir(parents=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = ":local:"\n'
    )
    out = workdir / f"out_{num_clients}"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    run_config = (
        f"dataset='{dataset}' num-clients={num_clients} clients-per-round={per_round} "
        f"num-rounds={rounds} output-dir='{out}' {extra}"
    ).strip()
    federation = (
        f"num-supernodes={num_clients} client-resources-num-cpus=1 client-resources-num-gpus=0"
    )
    command = [str(BIN / "flwr"), "run", str(APP), "bench", "--stream"]
    command += ["--run-config", run_config, "--federation-config", federation]
    start = time.perf_counter()
    try:
        result = subprocess.run(
            command, env=env, cwd=workdir, capture_output=True, text=True, timeout=1800
        )
    finally:  # `flwr run` leaves its local SuperLink running: end it and its children
        tree = [p for pid in processes_mentioning(str(home)) for p in process_tree(pid)]
        for pid in reversed(tree):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 60
        while any(Path(f"/proc/{pid}").exists() for pid in tree) and time.monotonic() < deadline:
            time.sleep(0.5)
    wall = time.perf_counter() - start
    logs = result.stdout + result.stderr
    (workdir / f"flwr_run_{num_clients}.log").write_text(logs)
    found = _FINISHED.search(logs)
    if found is None:
        raise RuntimeError(f"the run with {num_clients} clients did not finish:\n{logs[-4000:]}")
    accuracy = re.findall(r"round \d+: evaluation \{[^}]*'eval_accuracy': ([0-9.]+)", logs)
    return {
        "clients": num_clients,
        "per_round": per_round,
        "rounds": int(found.group(1)),
        "peak_mib": int(found.group(2)),
        "wall_s": wall,
        "accuracy": float(accuracy[-1]) if accuracy else float("nan"),
    }


def machine() -> str:
    """The machine in words: CPU model and count, memory."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPU cores ({model}), {memory:.0f} GiB RAM, {platform.system()}"


def render(rows: list[dict[str, float]], rounds: int, per_round: int, command: str) -> str:
    import flwr
    import torch

    small, large = rows[0], rows[-1]
    lines = [
        f"# Flower ServerApp memory: {small['clients']} vs {large['clients']} virtual clients",
        "",
        f"Command: `{command}` on {machine()}; flwr {flwr.__version__}, torch {torch.__version__}.",
        "",
        "`flwr run examples/flower_app` on Flower's simulation engine (one virtual SuperNode per",
        "client, one Ray ClientApp actor per CPU), `dataset='mnist5k'` (the small ViT,",
        f"`fedpac_soap`, Dirichlet 0.3), {per_round} clients per round, 5 local steps, {rounds} rounds,",
        "central evaluation after every round. Peak RSS is the ServerApp process's own",
        "(`getrusage`, logged as its last line); in a simulation that process also hosts",
        "Flower's simulation engine and the Ray driver. Wall time includes starting Ray, on a",
        "machine shared with other jobs.",
        "",
        "| virtual clients | clients per round | rounds | ServerApp peak RSS (MiB) | final accuracy | wall time (s) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['per_round']} | {r['rounds']} | {r['peak_mib']} | "
            f"{r['accuracy']:.3f} | {r['wall_s']:.0f} |"
        )
    ratio = large["peak_mib"] / small["peak_mib"]
    lines += [
        "",
        f"Peak memory ratio ({large['clients']} / {small['clients']} clients): **{ratio:.3f}**.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default=str(HERE / "flower_scale.md"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flower_scale_") as tmp:
        rows = [run_once(n, args.per_round, args.rounds, Path(tmp)) for n in args.clients]
    command = " ".join(
        ["python benchmarks/flower_scale.py", *(argv if argv is not None else sys.argv[1:])]
    )
    text = render(rows, args.rounds, args.per_round, command)
    print(text)
    Path(args.output).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
