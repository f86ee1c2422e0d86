"""The `automla` command: search, report, export, train.

A thin face over the library: every command parses its arguments, calls one function, and turns
the library's own errors (a bad space file, a missing run folder, a bad --where, an unreachable
cluster, unreadable data) into one line on stderr and exit code 2, without a traceback. Exit
codes: 0 done, 1 a search in which every trial failed or a run that diverged, 2 bad input,
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

EXAMPLES = """\
examples:
  automla search --space search_spaces/default.yaml
  automla search --resume runs/<run>
  automla report runs/<run>
  automla export runs/<run> --pick knee -o best.yaml
  automla train --config best.yaml
  automla dashboard runs/<run>
"""


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `automla` command; exits with the command's status."""
    sys.exit(run(argv))


def run(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit status (0 ok, 1 failed run, 2 bad input)."""
    parser = build_parser()
    # unknown options are named by the command's own parser (its usage, not the top level's)
    args, extra = parser.parse_known_args(argv)
    if extra:
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from automla.export import ExportError
    from automla.preflight import ClusterError
    from automla.report import RunError, SearchFailed, SearchInterrupted
    from automla.schema import SpaceError
    from automla.trainers.config import ConfigError

    try:
        return args.func(args)
    except (SpaceError, RunError, ExportError, ConfigError, ClusterError, FileExistsError) as e:
        print(f"automla {args.command}: error: {e}", file=sys.stderr)
        return 2
    except SearchFailed as e:
        print(f"automla {args.command}: {e}", file=sys.stderr)
        return 1
    except SearchInterrupted as e:
        print(f"automla {args.command}: {e}", file=sys.stderr)
        return 130
    except FloatingPointError as e:
        print(f"automla {args.command}: the run diverged: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"automla {args.command}: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="automla",
        description="Architecture search for Multi-Level Attention (local + global + sparse) "
        "language models, on Ray Tune and Optuna.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    from automla import __version__

    parser.add_argument("--version", action="version", version=f"automla {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser
    )

    p = sub.add_parser(
        "search",
        help="run a search described by a space file",
        description="Run a multi-objective search: Ray Tune runs the trials, Optuna proposes "
        "them. Starts a local Ray with its dashboard (or joins --address / RAY_ADDRESS) and "
        "writes the run folder OUT/NAME: space.yaml, trials.csv, pareto.json, pareto.png, "
        "study.db, hypervolume.csv, the plots, report.html, search.log, ray/. Exits 1 when every "
        "trial failed, listing the reasons.",
    )
    # required, checked in _search: argparse would report it before a misspelt option
    what = p.add_mutually_exclusive_group()
    what.add_argument("--space", metavar="FILE", help="search-space YAML file")
    what.add_argument(
        "--resume",
        metavar="RUN",
        help="continue an interrupted search from its run folder (finished trials are kept, "
        "unfinished ones restart from their last checkpoint)",
    )
    p.add_argument("--name", help="run name (default: <space file stem>-<date>-<time>)")
    p.add_argument(
        "--out", default="runs", metavar="DIR", help="parent of the run folder (default: runs)"
    )
    p.add_argument("--trials", type=int, metavar="N", help="override the file's trial budget")
    p.add_argument(
        "--address",
        metavar="A",
        help="join this Ray cluster instead of starting one (default: RAY_ADDRESS if set)",
    )
    p.set_defaults(func=_search)

    p = sub.add_parser(
        "report",
        help="print the Pareto front of a run and redraw its plot",
        description="Print the Pareto front of a run folder (a table, or JSON with --json) "
        "and rewrite its outputs from trials.json: trials.csv, pareto.json, hypervolume.csv, "
        "the plots and report.html. A damaged trials.json is set aside and rebuilt from "
        "study.db.",
    )
    p.add_argument("run", metavar="RUN", help="a run folder, e.g. runs/default-20250101-120000")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_report)

    p = sub.add_parser(
        "export",
        help="write one trial's complete trainer config",
        description="Pick one completed trial and write its complete trainer config "
        "(YAML, ready for `automla train --config`).",
    )
    p.add_argument("run", metavar="RUN", help="a run folder")
    p.add_argument(
        "--pick",
        default="knee",
        metavar="P",
        help="knee (of the Pareto front), min:METRIC or max:METRIC (default: knee)",
    )
    p.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="COND",
        help="keep trials with e.g. 'val_loss<=3.1' (ops: < <= > >= == !=; "
        "repeat or join with commas)",
    )
    p.add_argument(
        "-o",
        "--output",
        default="best.yaml",
        metavar="FILE",
        help="where to write the config (default: best.yaml)",
    )
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.set_defaults(func=_export)

    p = sub.add_parser(
        "train",
        help="train one configuration (e.g. an exported one)",
        description="Train the model of a trainer config file with a progress bar; the run "
        "folder receives config.yaml, metrics.jsonl and checkpoint/checkpoint.pt (with "
        "pruning, pruning.jsonl and model_compact.pt too). Exits 1 if the loss diverges.",
    )
    p.add_argument("--config", required=True, metavar="F", help="trainer config YAML")
    p.add_argument(
        "--out", metavar="DIR", help="run folder (default: runs/train-<stem>-<date>-<time>)"
    )
    p.add_argument("--steps", type=int, metavar="N", help="override the number of steps")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint (its logs continue too)",
    )
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "dashboard",
        help="open a run's Optuna study in optuna-dashboard",
        description="Serve the run folder's Optuna study (study.db) with optuna-dashboard "
        "until Ctrl-C; the same as `optuna-dashboard sqlite:///RUN/study.db`.",
    )
    p.add_argument("run", metavar="RUN", help="a run folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    p.set_defaults(func=_dashboard)
    for command in sub.choices.values():
        command.set_defaults(parser=command)
    return parser


class _CommandParser(argparse.ArgumentParser):
    """A command's parser: options are never taken by a prefix (`--trial` is not `--trials`)."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)


def _search(args: argparse.Namespace) -> int:
    from automla import schema
    from automla.runner import default_name, resume_search, run_search

    if not args.space and not args.resume:
        args.parser.error("one of the arguments --space --resume is required")
    if args.resume:
        if args.trials is not None or args.name or args.out != "runs":
            from automla.report import RunError

            raise RunError(
                "--resume continues the run with its own budget, name and folder; "
                "drop --trials, --name and --out"
            )
        resume_search(args.resume, address=args.address, console=_console())
        return 0
    config = schema.load(args.space)
    name = args.name or default_name(args.space)
    run_search(config, args.out, name, trials=args.trials, address=args.address, console=_console())
    return 0


def _report(args: argparse.Namespace) -> int:
    from automla.report import report

    report(args.run, as_json=args.json, console=_console())
    return 0


def _console():
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console.width = 120  # a log file is not an 80-column terminal
    return console


def _export(args: argparse.Namespace) -> int:
    from automla.export import export
    from automla.report import format_value

    record, path = export(args.run, args.pick, args.output, args.where, replace=args.force)
    metrics = ", ".join(
        f"{k}={format_value(v)}"
        for k, v in record["metrics"].items()
        if k in ("val_loss", "tokens_per_s")
    )
    print(f"trial {record['trial_id']} ({record.get('label', '')}; {metrics}) -> {path}")
    sp = record["config"].get("sequence_parallel", 1) or 1
    if sp > 1:  # one process per sequence shard (README: sequence parallelism)
        print(f"train it: torchrun --nproc-per-node {sp} -m automla.cli train --config {path}")
    else:
        print(f"train it: automla train --config {path}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import torch.distributed
    import yaml
    from rich.console import Console
    from rich.table import Table

    from automla.report import format_value
    from automla.trainers import train
    from automla.trainers.config import ConfigError, TrainConfig, build, read_yaml, to_dict
    from automla.trainers.distributed import init_from_env, is_main

    path = Path(args.config)
    try:
        data = read_yaml(path.read_text())
    except OSError as e:
        raise ConfigError("", f"{path}: cannot read the file ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError("", f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if isinstance(data, dict) and "space" in data and "objectives" in data:
        raise ConfigError(
            "", f"{path}: a search-space file, not a trainer config: automla search --space {path}"
        )
    try:
        config = build(TrainConfig, data)
        if args.steps is not None:
            config = build(TrainConfig, {**to_dict(config), "steps": args.steps})
    except ConfigError as e:
        raise ConfigError("", f"{path}: {e}") from None
    # every rank names the folder; only rank 0 writes it, so rank 0's name is the one made
    out = Path(args.out or f"runs/train-{path.stem}-{datetime.now():%Y%m%d-%H%M%S}")
    resume = _resume_from(out) if args.resume else _unused(out)
    # under torchrun (RANK, WORLD_SIZE, ... set) every process joins the group and trains its
    # share: data parallel, or sequence parallel with `sequence_parallel: P`. Each rank has
    # checked the folder above: none can have written it before the group is joined.
    joined = init_from_env(config.device)
    main = is_main()  # asked before the group is gone
    try:
        try:
            metrics = train(config, out_dir=out, resume=resume, progress=True)
        except ConfigError as e:  # the data cannot train: found before out is made
            raise ConfigError("", f"{path}: {e}") from None
    finally:
        if joined:
            torch.distributed.destroy_process_group()
    if not main:
        return 0
    both = "tokens_per_s" in metrics and "train_tokens_per_s" in metrics
    table = Table(
        title=f"final metrics ({out})",
        title_justify="left",
        caption="tokens_per_s: the exclusive benchmark's; train_tokens_per_s: this run's clock"
        if both
        else None,
        caption_justify="left",
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        if isinstance(v, (int, float)):
            table.add_row(k, format_value(v))
    Console().print(table)
    print(f"checkpoint: {out / 'checkpoint'}")
    return 0


def _resume_from(out: Path) -> Path:
    """The checkpoint folder that `train --resume` continues from."""
    from automla.trainers.config import ConfigError
    from automla.trainers.trainer import CHECKPOINT_DIR

    if not (out / CHECKPOINT_DIR).is_dir():
        raise ConfigError("", f"{out}: no {CHECKPOINT_DIR}/ to resume from; give --out RUN")
    return out / CHECKPOINT_DIR


def _unused(out: Path) -> None:
    """Refuses a folder that holds a training run already: training again would replace its
    checkpoint and logs."""
    from automla.trainers.trainer import CHECKPOINT_DIR, METRICS_LOG

    if (out / METRICS_LOG).exists() or (out / CHECKPOINT_DIR).exists():
        raise FileExistsError(
            f"{out} holds a training run already; give another --out, or --resume to continue it"
        )


def _dashboard(args: argparse.Namespace) -> int:
    from automla.report import RunError
    from automla.run_folder import study_url

    if not Path(args.run).is_dir():
        raise RunError(f"{args.run}: no such run folder")
    if not (Path(args.run) / "study.db").is_file():
        raise RunError(f"{args.run}: no study.db here; give the run folder of a search")
    url = study_url(args.run)
    try:
        import optuna_dashboard
    except ImportError:
        raise RunError("optuna-dashboard is not installed: pip install optuna-dashboard") from None
    _check_port(args.host, args.port)
    print(f"Optuna dashboard of {args.run}: http://{args.host}:{args.port} (Ctrl-C stops it)")
    optuna_dashboard.run_server(url, host=args.host, port=args.port)
    return 0


def _check_port(host: str, port: int) -> None:
    """Fails with one line, not the server's traceback, where host:port cannot be served."""
    import errno
    import socket

    from automla.report import RunError

    if not 0 < port < 65536:
        raise RunError(f"--port {port}: expected a port from 1 to 65535")
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        in_use = e.errno == errno.EADDRINUSE
        # the error's own words, without the address that create_server appends to them
        why = (e.strerror or str(e)).split(" (while attempting")[0]
        hint = "try another --port" if in_use else "check --host"
        raise RunError(f"cannot listen on {host}:{port} ({why}); {hint}") from None


if __name__ == "__main__":
    main()
