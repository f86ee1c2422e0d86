"""Bad input through the real command line: does every case fail fast, in one line, cleanly?

    python bench/bad_inputs.py [--only ID,ID] [--json bench/bad_inputs.json] [--md FILE]

Each case runs `python -m automla.cli ...` in a subprocess of its own working folder (30 s
limit) and records the exit status, the seconds to fail, whether a run folder was left
behind, whether a traceback was printed, the number of lines on stderr and the last one, and
whether it names the key or file at fault. The cases cover an unreachable or wrong cluster,
data that cannot train, ASHA and MLA sizes that cannot fit the run, fixed settings that are
wrong on their own, damaged run folders, and `train` / `dashboard` misuse. Writes JSON and
prints a markdown table (also written with --md). Kept out of pytest (minutes); a test runs a
handful of its cases.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import yaml

TIMEOUT_S = 30.0

# the smallest search the CLI accepts: CPU, a 64-token byte model, the stdlib corpus
BASE = {
    "objectives": [
        {"metric": "val_loss", "mode": "min"},
        {"metric": "tokens_per_s", "mode": "max"},
    ],
    "sampler": {"name": "random", "seed": 0},
    "trials": 2,
    "resources": {"cpus": 1},
    "data": {"source": "stdlib", "max_bytes": 100_000},
    "train": {"steps": 4, "eval_every": 2, "seq_len": 64, "batch_size": 2},
    "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 64},
    "space": {"model.mla.budget": {"choice": [16, 32]}, "lr": {"loguniform": [1e-3, 1e-2]}},
}


@dataclass
class Case:
    id: str
    what: str
    argv: list[str]
    """Arguments of `automla`; '{dir}' is the case's working folder, '{port}' a closed port,
    '{http}' the port of a plain HTTP server."""
    names: str
    """Text the error line must contain: the key or file at fault."""
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    id: str
    what: str
    exit: int | None
    seconds: float
    timed_out: bool
    folder_left: bool
    traceback: bool
    stderr_lines: int
    message: str
    names_fault: bool


def space(change: Callable[[dict], None] | None = None) -> dict:
    data = copy.deepcopy(BASE)
    if change:
        change(data)
    return data


def text_space(path: str, **data) -> Callable[[dict], None]:
    return lambda d: d.update(data={"source": "text", "path": path, **data})


def search(name: str) -> list[str]:
    return ["search", "--space", f"{name}.yaml", "--trials", "2"]


# the space files the search cases read, by name
SPACES: dict[str, Callable[[dict], None] | None] = {
    "good": None,
    "text-missing": text_space("no-such-file.txt"),
    "text-empty": text_space("empty.txt"),
    "text-directory": text_space("a-folder"),
    "text-binary": text_space("random.bin"),
    "text-too-small": text_space("tiny.txt"),
    "text-no-path": lambda d: d.update(data={"source": "text"}),
    "text-max-bytes": text_space("book.txt", max_bytes=40),
    "tokens-odd": lambda d: d.update(data={"source": "tokens", "path": "odd.bin"}),
    "tokens-missing": lambda d: d.update(data={"source": "tokens", "path": "gone.bin"}),
    "tokens-vocab": lambda d: d.update(data={"source": "tokens", "path": "big-ids.bin"}),
    "stdlib-tiny": lambda d: d["data"].update(max_bytes=1000),
    "seq-len-searched": lambda d: (
        text_space("book.txt")(d),
        d["model"].update(max_seq_len=8192, mla={"budget": 32}),
        d["train"].pop("seq_len"),
        d["space"].pop("model.mla.budget"),
        d["space"].update({"seq_len": {"choice": [64, 8192]}}),
    ),
    "asha-grace": lambda d: d.update(
        scheduler={"name": "asha", "metric": "val_loss", "mode": "min", "grace_period": 50}
    ),
    "asha-max-t": lambda d: d.update(
        scheduler={"name": "asha", "metric": "val_loss", "mode": "min", "max_t": 40}
    ),
    "asha-searched-steps": lambda d: (
        d["train"].pop("steps"),
        d["space"].update({"steps": {"int": [4, 8]}}),
        d.update(
            scheduler={"name": "asha", "metric": "val_loss", "mode": "min", "grace_period": 20}
        ),
    ),
    "budget-fixed-too-big": lambda d: (
        d["model"].update(mla={"budget": 512}),
        d["space"].pop("model.mla.budget"),
    ),
    "budget-value-too-big": lambda d: d["space"].update(
        {"model.mla.budget": {"choice": [32, 1024]}}
    ),
    "block-too-big": lambda d: (
        d["model"].update(mla={"block_size": 128}),
        d["space"].update({"model.mla.budget": {"choice": [32, 64]}}),
    ),
    "selection-too-big": lambda d: (
        d["model"].update(max_seq_len=96, mla={"ratios": [0, 0, 1], "block_size": 64}),
        d["space"].update({"model.mla.budget": {"choice": [96]}}),
    ),
    "ratios-negative": lambda d: d["model"].update(mla={"ratios": [1.2, -0.1, -0.1]}),
    "ratios-sum": lambda d: d["model"].update(mla={"ratios": [0.5, 0.5, 0.5]}),
    "budget-zero": lambda d: (
        d["model"].update(mla={"budget": 0}),
        d["space"].pop("model.mla.budget"),
        d["space"].update({"model.mla.block_size": {"choice": [16, 32]}}),
    ),
    "block-24": lambda d: d["model"].update(mla={"block_size": 24}),
    "gate-negative": lambda d: d["model"].update(mla={"gate": {"hidden": [16, -4]}}),
}

CASES = [
    # the cluster: unreachable, not Ray, or not an address at all
    Case("address-refused", "nothing listens on the port", [*search("good"), "--address", "127.0.0.1:{port}"], "127.0.0.1:"),
    Case("address-unresolvable", "host name does not resolve", [*search("good"), "--address", "no-such-host.invalid:6379"], "no-such-host.invalid"),
    Case("address-no-port", "no port", [*search("good"), "--address", "localhost"], "--address localhost"),
    Case("address-bad-port", "port out of range", [*search("good"), "--address", "127.0.0.1:70000"], "127.0.0.1:70000"),
    Case("address-http", "an HTTP server, not a Ray head", [*search("good"), "--address", "127.0.0.1:{http}"], "127.0.0.1:"),
    Case("ray-address-env", "RAY_ADDRESS unreachable", search("good"), "RAY_ADDRESS", env={"RAY_ADDRESS": "127.0.0.1:{port}"}),
    # data that cannot train, found before Ray starts
    Case("text-missing", "text file missing", search("text-missing"), "data.path"),
    Case("text-empty", "text file empty", search("text-empty"), "data.path"),
    Case("text-directory", "text path is a folder", search("text-directory"), "data.path"),
    Case("text-binary", "text file is binary", search("text-binary"), "data.path"),
    Case("text-too-small", "text shorter than one sequence", search("text-too-small"), "data.path"),
    Case("text-no-path", "source text without a path", search("text-no-path"), "data.path"),
    Case("text-max-bytes", "max_bytes leaves less than one sequence", search("text-max-bytes"), "data.path"),
    Case("tokens-odd", "tokens file of odd size", search("tokens-odd"), "data.path"),
    Case("tokens-missing", "tokens file missing", search("tokens-missing"), "data.path"),
    Case("tokens-vocab", "token ids above the vocabulary", search("tokens-vocab"), "model.vocab_size"),
    Case("stdlib-tiny", "stdlib max_bytes too small", search("stdlib-tiny"), "data.max_bytes"),
    Case("seq-len-searched", "a searched seq_len longer than the file", search("seq-len-searched"), "space.seq_len"),
    # the scheduler and sizes that cannot fit the run
    Case("asha-grace", "grace_period above train.steps", search("asha-grace"), "scheduler.grace_period"),
    Case("asha-max-t", "max_t above train.steps", search("asha-max-t"), "scheduler.max_t"),
    Case("asha-searched-steps", "grace_period above every searched steps", search("asha-searched-steps"), "scheduler.grace_period"),
    Case("budget-fixed-too-big", "budget above max_seq_len", search("budget-fixed-too-big"), "model.mla.budget"),
    Case("budget-value-too-big", "a searched budget above max_seq_len", search("budget-value-too-big"), "space.model.mla.budget"),
    Case("block-too-big", "block_size above max_seq_len", search("block-too-big"), "model.mla.block_size"),
    Case("selection-too-big", "selected blocks exceed max_seq_len", search("selection-too-big"), "model.mla.block_size"),
    # fixed settings wrong on their own: blamed on themselves, not on a searched key
    Case("ratios-negative", "negative ratios", search("ratios-negative"), "model.mla.ratios"),
    Case("ratios-sum", "ratios not summing to 1", search("ratios-sum"), "model.mla.ratios"),
    Case("budget-zero", "budget 0", search("budget-zero"), "model.mla.budget"),
    Case("block-24", "block_size 24", search("block-24"), "model.mla.block_size"),
    Case("gate-negative", "a negative gate width", search("gate-negative"), "model.mla.gate.hidden"),
    # damaged or odd run folders
    Case("export-truncated", "trials.json cut short", ["export", "truncated", "-o", "best.yaml"], "truncated/trials.json"),
    Case("export-empty", "trials.json empty", ["export", "empty", "-o", "best.yaml"], "empty/trials.json"),
    Case("export-dict", "trials.json a mapping", ["export", "dict", "-o", "best.yaml"], "dict/trials.json"),
    Case("export-strings", "trials.json a list of strings", ["export", "strings", "-o", "best.yaml"], "strings/trials.json"),
    Case("report-no-study", "trials.json damaged, no study.db", ["report", "no-study"], "no-study/trials.json"),
    Case("report-both-damaged", "trials.json and study.db damaged", ["report", "both-damaged"], "both-damaged/study.db"),
    Case("report-not-a-run", "a folder without space.yaml", ["report", "a-folder"], "a-folder"),
    Case("export-space-damaged", "space.yaml not YAML", ["export", "bad-space", "-o", "best.yaml"], "bad-space/space.yaml"),
    Case("export-missing", "no such run folder", ["export", "nowhere", "-o", "best.yaml"], "nowhere"),
    Case("export-bad-where", "a --where that names nothing", ["export", "good-run", "--where", "speed>1"], "speed"),
    # train and the other commands
    Case("train-text-missing", "train on a missing text file", ["train", "--config", "train-missing.yaml"], "data.path"),
    Case("train-text-binary", "train on a binary text file", ["train", "--config", "train-binary.yaml"], "data.path"),
    Case("train-budget", "train with a budget above max_seq_len", ["train", "--config", "train-budget.yaml"], "model.mla.budget"),
    Case("train-no-config", "train with no such config", ["train", "--config", "nothing.yaml"], "nothing.yaml"),
    Case("dashboard-no-study", "dashboard of a folder without study.db", ["dashboard", "a-folder"], "a-folder"),
    Case("search-trials-0", "--trials 0", ["search", "--space", "good.yaml", "--trials", "0"], "trials"),
    Case("resume-with-name", "--resume with --name", ["search", "--resume", "good-run", "--name", "x"], "--name"),
]  # fmt: skip


def write_inputs(root: Path) -> None:
    """The files every case may read, in `root` (copied into each case's folder)."""
    import optuna

    from automla import schema

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name, change in SPACES.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(space(change), sort_keys=False))
    (root / "empty.txt").write_text("")
    (root / "a-folder").mkdir()
    (root / "random.bin").write_bytes(bytes([0xC3, 0x28, 0xFF, 0xFE] * 4000))
    (root / "tiny.txt").write_text("too short for one batch")
    (root / "book.txt").write_text("The quick brown fox jumps over the lazy dog. " * 400)
    (root / "odd.bin").write_bytes(b"\x01\x02\x03")
    (root / "big-ids.bin").write_bytes(bytes(range(256)) * 64)  # uint16 ids up to 65535
    train = {k: v for k, v in space().items() if k in ("data", "model")}
    train.update({"steps": 4, "seq_len": 64, "batch_size": 2, "eval_every": 2})
    fits = {"mla": {"budget": 32}}
    for name, data, model in (
        ("train-missing", {"source": "text", "path": "no-such-file.txt"}, fits),
        ("train-binary", {"source": "text", "path": "random.bin"}, fits),
        ("train-budget", {"source": "stdlib", "max_bytes": 100_000}, {"mla": {"budget": 512}}),
    ):
        cfg = {**train, "data": data, "model": {**train["model"], **model}}
        (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    # a small finished run by hand (no Ray), then damaged copies of it
    config = schema.parse(space(), "good.yaml")
    run = root / "good-run"
    run.mkdir()
    (run / "space.yaml").write_text(yaml.safe_dump(schema.to_yaml_dict(config)))
    study = optuna.create_study(
        study_name="good-run",
        storage=f"sqlite:///{run / 'study.db'}",
        directions=["minimize", "maximize"],
    )
    records = []
    for n, budget in enumerate((16, 32)):
        trial = study.ask(
            {"model.mla.budget": optuna.distributions.CategoricalDistribution([16, 32])}
        )
        trial.suggest_float("lr", 1e-3, 1e-2, log=True)
        trial.set_user_attr("ray_trial_id", f"t{n}")
        values = [3.0 - n, 100.0 * (2 - n)]
        study.tell(trial, values)
        records.append(
            {
                "trial_id": f"t{n}",
                "optuna_trial": n,
                "state": "completed",
                "params": {"model.mla.budget": budget, "lr": trial.params["lr"]},
                "metrics": {"val_loss": values[0], "tokens_per_s": values[1]},
                "config": None,
            }
        )
    (run / "trials.json").write_text(json.dumps(records))
    text = (run / "trials.json").read_text()
    for name, damaged in (
        ("truncated", text[: len(text) // 2]),
        ("empty", ""),
        ("dict", json.dumps({"trials": records})),
        ("strings", json.dumps(["t0", "t1"])),
        ("no-study", text[:10]),
        ("both-damaged", "["),
    ):
        copy_dir(run, root / name)
        (root / name / "trials.json").write_text(damaged)
    (root / "no-study" / "study.db").unlink()
    (root / "both-damaged" / "study.db").write_bytes(b"not a database at all" * 10)
    copy_dir(run, root / "bad-space")
    (root / "bad-space" / "space.yaml").write_text("objectives: [unclosed\n")


def copy_dir(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src, dst)


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_server() -> HTTPServer:
    """A plain HTTP server on a free port, answering every request with 404."""

    class Quiet(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def run_case(case: Case, inputs: Path, work: Path, ports: dict[str, int]) -> Outcome:
    """Run one case in a fresh copy of the inputs; what it left is what appeared there."""
    folder = work / case.id
    copy_dir(inputs, folder)
    before = set(_tree(folder))
    argv = [a.format(dir=folder, **ports) for a in case.argv]
    env = {**os.environ, **{k: v.format(**ports) for k, v in case.env.items()}}
    if not case.env:
        env.pop("RAY_ADDRESS", None)
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "automla.cli", *argv],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        code, out, err, timed_out = proc.returncode, proc.stdout, proc.stderr, False
    except subprocess.TimeoutExpired as e:
        code, timed_out = None, True
        out, err = _text(e.stdout), _text(e.stderr)
    seconds = time.perf_counter() - started
    lines = [ln for ln in err.splitlines() if ln.strip()]
    message = _anonymous(lines[-1] if lines else "", folder)
    left = [p for p in set(_tree(folder)) - before if p.startswith("runs")]
    return Outcome(
        id=case.id,
        what=case.what,
        exit=code,
        seconds=round(seconds, 2),
        timed_out=timed_out,
        folder_left=bool(left),
        traceback="Traceback (most recent call last)" in out + err,
        stderr_lines=len(lines),
        message=message,
        names_fault=case.names in message,
    )


def _anonymous(message: str, folder: Path) -> str:
    """The message without this machine's paths (the case folder, the stdlib's root)."""
    from automla.trainers.data import stdlib_root

    return message.replace(str(folder), ".").replace(str(stdlib_root()), "<stdlib>")


def _tree(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*")]


def _text(data: bytes | str | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


def run_cases(ids: list[str] | None = None) -> list[Outcome]:
    """Run the cases named by `ids` (all when None) in a temporary folder."""
    chosen = [c for c in CASES if ids is None or c.id in ids]
    server = http_server()
    ports = {"port": closed_port(), "http": server.server_address[1]}
    try:
        with tempfile.TemporaryDirectory(prefix="bad-inputs-") as tmp:
            inputs = Path(tmp) / "inputs"
            inputs.mkdir()
            write_inputs(inputs)
            return [run_case(c, inputs, Path(tmp), ports) for c in chosen]
    finally:
        server.shutdown()


def ok(o: Outcome) -> bool:
    """What every case must show: a non-zero exit within the limit, no folder, no traceback,
    one line on stderr naming the key or file at fault."""
    return (
        o.exit not in (None, 0)
        and not o.timed_out
        and not o.folder_left
        and not o.traceback
        and o.stderr_lines == 1
        and o.names_fault
    )


def markdown(outcomes: list[Outcome]) -> str:
    rows = [
        "| case | what | exit | s | folder left | traceback | names fault | message |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for o in outcomes:
        msg = o.message.replace("|", "\\|")
        msg = msg if len(msg) <= 150 else msg[:147] + "..."
        rows.append(
            f"| {o.id} | {o.what} | {'timeout' if o.timed_out else o.exit} | {o.seconds:.1f} | "
            f"{'yes' if o.folder_left else 'no'} | {'yes' if o.traceback else 'no'} | "
            f"{'yes' if o.names_fault else 'no'} | {msg} |"
        )
    good = sum(ok(o) for o in outcomes)
    slowest = max((o.seconds for o in outcomes), default=0.0)
    rows.append("")
    rows.append(
        f"{good} of {len(outcomes)} cases fail as they should (non-zero exit, one line naming "
        f"the fault, no traceback, no run folder); slowest {slowest:.1f} s."
    )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated case ids")
    ap.add_argument("--json", default="bench/bad_inputs.json", help="where to write the JSON")
    ap.add_argument("--md", help="also write the markdown table here")
    args = ap.parse_args()
    ids = args.only.split(",") if args.only else None
    outcomes = run_cases(ids)
    table = markdown(outcomes)
    print(table)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    Path(args.json).write_text(
        json.dumps({"date": stamp, "cases": [asdict(o) for o in outcomes]}, indent=1) + "\n"
    )
    if args.md:
        Path(args.md).write_text(table + "\n")
    sys.exit(0 if all(ok(o) for o in outcomes) else 1)


if __name__ == "__main__":
    main()
