"""The ``fedpac-hf`` command line.

Each subcommand is a pair of functions registered in :data:`SUBCOMMANDS`:
``add_arguments(parser)`` declares its options and ``run(args) -> int`` does
the work; ``partition``, ``train`` and ``report`` are registered. Mistakes a
user can make (a bad option value, a missing column, file or model, an
unwritable or busy output_dir: ``ValueError``, ``OSError``, ``ImportError``)
end in a one-line ``fedpac-hf <cmd>: error: ...`` message and exit status 2,
without a traceback; a round that fails (too few clients succeeded, a
non-finite global model) ends in one line and status 1. A bug in training
code (a loss that is not a scalar, a model called wrongly) keeps its traceback.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]

# Option dest -> partitioner constructor argument, for `partition`.
_PARTITIONER_OPTIONS = {
    "num_clients": "num_clients",
    "alpha": "alpha",
    "scheme": "scheme",
    "classes_per_client": "classes_per_client",
    "min_examples_per_client": "min_examples_per_client",
    "power_law_exponent": "power_law_exponent",
    "label_column": "label_column",
    "column": "column",
    "seed": "seed",
}


def add_partition_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fedpac-hf partition``, each as ``--a-b`` and ``--a_b`` (as ``train`` reads
    them)."""
    from fedpac_hf.partition import PARTITIONERS

    def option(name: str, **kwargs: Any) -> None:
        spellings = dict.fromkeys([name, name[:2] + name[2:].replace("-", "_")])
        parser.add_argument(*spellings, **kwargs)

    option(
        "--dataset",
        required=True,
        help="mnist5k, digits, shakespeare, a Hub dataset id or a local path",
    )
    option("--split", default="train", help="which split to partition (default: train)")
    option(
        "--partitioner",
        required=True,
        choices=sorted(PARTITIONERS),
        help="how to split the data across clients",
    )
    option("--num-clients", type=int, help="number of clients")
    option("--alpha", type=float, help="Dirichlet concentration (dirichlet, quantity_skew)")
    option(
        "--scheme",
        choices=["client", "class"],
        help="dirichlet scheme: equal-size clients (client, FedPAC) or per-class (class)",
    )
    option("--classes-per-client", type=int, help="classes per client (pathological)")
    option(
        "--min-examples-per-client",
        type=int,
        help="smallest client allowed (dirichlet, quantity_skew)",
    )
    option("--power-law-exponent", type=float, help="power-law client sizes (quantity_skew)")
    option(
        "--label-column",
        default=None,
        help="label column (default: label); also the classes of the statistics",
    )
    option("--column", help="id column, one client per value (natural_id)")
    option("--seed", type=int, default=None, help="partition seed (default 0)")
    option("--data-seed", type=int, default=0, help="seed of the dataset's train/test split")
    option("--plot", help="write the client x class heatmap to this PNG")
    option(
        "--max-clients-shown",
        type=int,
        default=10,
        help="client rows in the printed table (0: the summary only)",
    )


def _partitioner_kwargs(args: argparse.Namespace) -> dict:
    """The partitioner arguments the user set, refusing options the partitioner does not take."""
    from fedpac_hf.partition import PARTITIONERS

    cls = PARTITIONERS[args.partitioner]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kwargs = {}
    for dest, parameter in _PARTITIONER_OPTIONS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if parameter not in accepted:
            if dest in ("label_column", "seed"):
                continue
            option = "--" + dest.replace("_", "-")
            raise ValueError(
                f"{option} does not apply to --partitioner {args.partitioner}; it takes "
                + ", ".join("--" + name.replace("_", "-") for name in sorted(accepted))
                + "."
            )
        kwargs[parameter] = value
    missing = [
        name
        for name, parameter in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and parameter.default is inspect.Parameter.empty and name not in kwargs
    ]
    if missing:
        raise ValueError(
            f"--partitioner {args.partitioner} needs "
            + ", ".join("--" + name.replace("_", "-") for name in missing)
            + "."
        )
    return kwargs


def run_partition(args: argparse.Namespace) -> int:
    """Partition a dataset, print its statistics table and optionally write the heatmap."""
    if args.max_clients_shown < 0:
        raise ValueError(
            f"--max-clients-shown must be >= 0 (0: the summary only), got {args.max_clients_shown}"
        )
    from fedpac_hf.data import load_dataset_by_name
    from fedpac_hf.partition import (
        get_partitioner,
        partition_stats,
        plot_label_heatmap,
        read_column,
    )

    kwargs = _partitioner_kwargs(args)
    partitioner = get_partitioner(args.partitioner, **kwargs)
    splits = load_dataset_by_name(args.dataset, seed=args.data_seed)
    if args.split not in splits:
        raise ValueError(f"--split {args.split!r} not found; the dataset has {list(splits)}.")
    dataset = splits[args.split]
    parts = partitioner.assign(dataset)
    label_column = args.label_column or "label"
    if label_column in dataset.column_names:
        labels = read_column(dataset, label_column, argument="--label-column")
    elif args.label_column is None and args.partitioner in ("iid", "quantity_skew", "natural_id"):
        label_column = "(none)"
        labels = [0] * len(dataset)
    else:
        read_column(dataset, label_column, argument="--label-column")
    stats = partition_stats(parts, labels, client_names=getattr(partitioner, "client_ids", None))
    description = ", ".join(f"{key}={value}" for key, value in kwargs.items())
    print(f"{args.dataset}[{args.split}]: {len(dataset)} examples, label column {label_column}")
    print(f"partitioner {args.partitioner}({description})")
    print()
    print(stats.table(max_clients=args.max_clients_shown))
    if args.plot:
        title = f"{args.dataset}, {args.partitioner}" + (
            f" alpha={args.alpha:g}" if args.alpha is not None else ""
        )
        path = plot_label_heatmap(stats, args.plot, title=title)
        print(f"\nheatmap written to {path}")
    return 0


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fedpac-hf train``: a YAML config and ``--field value`` overrides."""
    parser.add_argument(
        "config",
        help="YAML file of settings: any FedPACArguments field (algorithm, num_rounds, "
        "local_steps, learning_rate, output_dir, ...) and any ModelDataArguments field "
        "(task, model_name_or_path, dataset, lora_r, ...); see configs/",
    )
    parser.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        metavar="--field value",
        help="settings that replace the config's, e.g. --num_rounds 2 --output_dir runs/try",
    )
    parser.epilog = (
        "Writes the run directory (output_dir): config.yaml, metrics.jsonl, metrics.csv, "
        "plots, summary.md and the final model; prints the final accuracy or perplexity."
    )


def run_train(args: argparse.Namespace) -> int:
    """Train one federated run from a YAML config with command-line overrides."""
    if args.overrides and args.overrides[0] == "--":
        args.overrides = args.overrides[1:]
    if any(item in ("-h", "--help") for item in args.overrides):
        from fedpac_hf.run import config_parser

        config_parser().print_help()
        return 0
    from fedpac_hf.run import parse_run_config, run_training
    from fedpac_hf.run.parsing import settings_stage
    from fedpac_hf.trainer.logs import show_package_log

    with settings_stage("reading the settings"):
        model_args, training_args = parse_run_config(args.config, args.overrides)
    show_package_log(training_args)
    run_training(model_args, training_args)
    return 0


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fedpac-hf report``."""
    parser.add_argument("run_dir", help="output_dir of a finished or running `fedpac-hf train` run")
    parser.add_argument("--title", help="prefix of the figure titles (default: from config.yaml)")


def run_report(args: argparse.Namespace) -> int:
    """Redraw a run's plots and summary.md from its metrics files and print the summary."""
    from fedpac_hf.rundir.reporting import SUMMARY_MD, write_report

    written = write_report(args.run_dir, title=args.title)
    summary = next(path for path in written if path.name == SUMMARY_MD)
    print(summary.read_text(encoding="utf-8").split("## Figures")[0].rstrip())
    print()
    print("written: " + ", ".join(str(path) for path in written))
    return 0


SUBCOMMANDS: dict[str, tuple[str, AddArguments, Run]] = {
    "partition": (
        "split a dataset across clients and show how non-IID the split is",
        add_partition_arguments,
        run_partition,
    ),
    "train": (
        "train a federated run from a YAML config (with --field value overrides)",
        add_train_arguments,
        run_train,
    ),
    "report": (
        "redraw the plots and summary table of a run directory from its metrics",
        add_report_arguments,
        run_report,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``fedpac-hf`` argument parser with one sub-parser per registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="fedpac-hf",
        description="Federated second-order fine-tuning (FedPAC) for Hugging Face models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, run) in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(subparser)
        subparser.set_defaults(_run=run, _parser=subparser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fedpac-hf``; returns 0 on success, exits with status 2 on a user error.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status of the subcommand.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args._run(args)
    except BrokenPipeError:
        # Output piped into e.g. `head`, which stopped reading: not an error.
        sys.stdout = open(os.devnull, "w")
        return 0
    except (ValueError, OSError, ImportError) as error:  # caused by input: one line, status 2
        message = " ".join(str(error).split())
        args._parser.exit(2, f"{args._parser.prog}: error: {message}\n")
    except RuntimeError as error:
        from fedpac_hf.federated import RoundError

        if not isinstance(error, RoundError):
            raise
        # a failed round (too few clients, non-finite model): the run stops, checkpoints stay
        message = " ".join(str(error).split())
        args._parser.exit(1, f"{args._parser.prog}: error: {message}\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
