"""`fedpac-hf partition` end to end, through cli.main."""

from __future__ import annotations

from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from fedpac_hf import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_partition_mnist5k_dirichlet_prints_table_and_writes_heatmap(tmp_path, capsys):
    plot = tmp_path / "skew.png"
    status = cli.main(
        [
            "partition",
            "--dataset",
            "mnist5k",
            "--partitioner",
            "dirichlet",
            "--alpha",
            "0.1",
            "--num-clients",
            "100",
            "--plot",
            str(plot),
        ]
    )
    out = capsys.readouterr().out
    assert status == 0
    assert "mnist5k[train]: 4000 examples" in out
    assert "clients             100" in out
    assert "client size         min 40 / median 40 / max 40" in out
    skew = float(out.split("label skew (TV)")[1].split()[0])
    assert 0.5 < skew <= 1.0
    assert f"heatmap written to {plot}" in out
    data = plot.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000


def _tiny_saved_dataset(root: Path) -> Path:
    path = root / "tiny"
    train = Dataset.from_dict(
        {"label": [i % 4 for i in range(80)], "speaker": [f"s{i % 7}" for i in range(80)]}
    )
    DatasetDict({"train": train, "test": train.select(range(8))}).save_to_disk(str(path))
    return path


def test_partition_scheme_class_pathological_and_natural_id(tmp_path, capsys):
    data = str(_tiny_saved_dataset(tmp_path))
    common = ["partition", "--dataset", data, "--max-clients-shown", "0"]
    assert cli.main(common + ["--partitioner", "dirichlet", "--alpha", "100", "--scheme", "class",
                              "--num-clients", "5", "--seed", "3"]) == 0  # fmt: skip
    assert "clients             5" in capsys.readouterr().out
    # every option also as train spells it (--a_b, HfArgumentParser's) and reads both
    assert cli.main(common + ["--partitioner", "pathological", "--classes_per_client", "1",
                              "--num_clients", "8"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "classes per client  min 1 / median 1 / max 1" in out
    assert "label skew (TV)     0.750" in out
    assert cli.main(common + ["--partitioner", "natural_id", "--column", "speaker",
                              "--max-clients-shown", "2"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "clients             7" in out
    assert "[s0]" in out and "[s1]" in out and "[s2]" not in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--partitioner", "dirichlet", "--alpha", "0", "--num-clients", "3"], "alpha must be"),
        (["--partitioner", "dirichlet", "--num-clients", "3"], "needs --alpha"),
        (["--partitioner", "iid", "--num-clients", "3", "--alpha", "1"], "--alpha does not apply"),
        (["--partitioner", "iid", "--num-clients", "500"], "num_clients=500 is too many"),
        (
            [
                "--partitioner",
                "dirichlet",
                "--alpha",
                "1",
                "--num-clients",
                "3",
                "--label-column",
                "target",
            ],
            "available columns",
        ),  # fmt: skip
        (
            ["--partitioner", "pathological", "--classes-per-client", "9", "--num-clients", "3"],
            "classes_per_client=9 exceeds the 4 classes",
        ),
        (["--partitioner", "iid", "--num-clients", "3", "--split", "dev"], "--split 'dev'"),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, extra, message):
    data = str(_tiny_saved_dataset(tmp_path))
    capsys.readouterr()  # drop save_to_disk's progress bars
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["partition", "--dataset", data, *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("fedpac-hf partition: error:")


def test_missing_dataset_path_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(
            ["partition", "--dataset", "nobody/nothing", "--partitioner", "iid",
             "--num-clients", "2"]
        )  # fmt: skip
    assert exit_info.value.code == 2
    assert "nobody/nothing" in capsys.readouterr().err


def test_subcommands_are_registered_as_function_pairs():
    name, (help_text, add_arguments, run) = next(iter(cli.SUBCOMMANDS.items()))
    assert name == "partition" and callable(add_arguments) and callable(run) and help_text
    parser = cli.build_parser()
    args = parser.parse_args(
        ["partition", "--dataset", "digits", "--partitioner", "iid", "--num-clients", "4"]
    )
    assert args.num_clients == 4 and args._run is cli.run_partition
