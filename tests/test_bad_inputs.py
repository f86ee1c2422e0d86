"""Bad input, class by class: an unreachable cluster, data that cannot train, a scheduler or MLA
sizes that cannot fit the run, and fixed settings wrong on their own are all found before Ray
starts and before a run folder exists, and told in one line that names the key or file at
fault; Ctrl-C is not success. No test here starts Ray."""

from __future__ import annotations

import copy
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import search_space

from automla import cli, preflight, schema
from automla.preflight import ClusterError, cluster_address
from automla.schema import SpaceError
from automla.trainers import DataConfig, TrainConfig, load_data
from automla.trainers.config import ConfigError, build
from automla.trainers.data import STDLIB_DEFAULT_BYTES


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def http_port():
    class Quiet(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Quiet)
    # a short poll: shutdown() waits for the loop's next look (0.5 s by default, every test)
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def silent_port():
    """A port that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    yield listener.getsockname()[1]
    listener.close()


# --- the cluster: probed in seconds, named in the message ---------------------------------------


@pytest.mark.parametrize(
    "address, expected",
    [
        pytest.param("127.0.0.1:{closed}", "connection refused", id="refused"),
        pytest.param("no-such-host.invalid:6379", "does not resolve", id="unresolvable"),
        pytest.param("localhost", "expected HOST:PORT", id="no-port"),
        pytest.param("127.0.0.1:port", "expected HOST:PORT", id="port-not-a-number"),
        pytest.param("127.0.0.1:70000", "expected HOST:PORT", id="port-out-of-range"),
        pytest.param(":6379", "expected HOST:PORT", id="no-host"),
        pytest.param("127.0.0.1:{http}", "something else than gRPC", id="http-server"),
        pytest.param("ray://127.0.0.1:{closed}", "nothing answers", id="ray-client-refused"),
    ],
)
def test_an_address_without_a_ray_cluster_fails_in_seconds(address, expected, http_port):
    address = address.format(closed=closed_port(), http=http_port)
    t0 = time.perf_counter()
    with pytest.raises(ClusterError) as info:
        cluster_address(address)
    assert time.perf_counter() - t0 < preflight.PROBE_TIMEOUT_S + 1
    message = str(info.value)
    assert message.startswith(f"--address {address}:") and expected in message
    assert "\n" not in message


def test_a_port_that_never_answers_times_out(monkeypatch, silent_port):
    monkeypatch.setattr(preflight, "PROBE_TIMEOUT_S", 1.0)
    t0 = time.perf_counter()
    with pytest.raises(ClusterError, match=f"127.0.0.1:{silent_port}"):
        cluster_address(f"127.0.0.1:{silent_port}")
    assert time.perf_counter() - t0 < 3


def test_ray_address_from_the_environment_is_probed_and_named(monkeypatch):
    port = closed_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(ClusterError, match=f"^RAY_ADDRESS 127.0.0.1:{port}: "):
        cluster_address(None)
    monkeypatch.delenv("RAY_ADDRESS")
    assert cluster_address(None) is None and cluster_address("local") is None


def test_search_with_an_unreachable_cluster_leaves_no_folder(tmp_path: Path, capsys):
    space = write_space(tmp_path, search_space())
    out = tmp_path / "runs"
    address = f"127.0.0.1:{closed_port()}"
    assert cli.run(["search", "--space", str(space), "--out", str(out), "--address", address]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--address {address}" in err
    assert not out.exists()


# --- data that cannot train: read before Ray starts -------------------------------------------


def write_space(folder: Path, data: dict) -> Path:
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def data_space(**data) -> dict:
    return search_space(data=data)


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "folder").mkdir()
    (tmp_path / "binary.txt").write_bytes(bytes([0xFF, 0xFE, 0x00, 0xC3] * 500))
    (tmp_path / "short.txt").write_text("a few bytes")
    (tmp_path / "book.txt").write_text("It was a bright cold day in April. " * 300)
    (tmp_path / "odd.bin").write_bytes(b"\x00\x01\x02")
    np.arange(40_000, 42_000, dtype=np.uint16).tofile(tmp_path / "ids.bin")
    return tmp_path


@pytest.mark.parametrize(
    "space, key, expected",
    [
        pytest.param(data_space(source="text", path="nothing.txt"), "data.path", "does not exist", id="text-missing"),
        pytest.param(data_space(source="text", path="empty.txt"), "data.path", "is empty", id="text-empty"),
        pytest.param(data_space(source="text", path="folder"), "data.path", "is a directory", id="text-folder"),
        pytest.param(data_space(source="text", path="binary.txt"), "data.path", "not UTF-8", id="text-binary"),
        pytest.param(data_space(source="text", path="short.txt"), "data.path", "fewer than seq_len + 1", id="text-short"),
        pytest.param(data_space(source="text", path="book.txt", max_bytes=50), "data.path", "fewer than seq_len + 1", id="text-max-bytes"),
        pytest.param(data_space(source="tokens", path="odd.bin"), "data.path", "not a whole number", id="tokens-odd"),
        pytest.param(data_space(source="tokens", path="ids.bin"), "model.vocab_size", "token id 41999", id="tokens-vocab"),
        pytest.param(data_space(source="stdlib", max_bytes=500), "data.max_bytes", "at least 2", id="stdlib-tiny"),
    ],
)  # fmt: skip
def test_data_that_cannot_train_stops_the_search_before_ray(
    files: Path, space: dict, key: str, expected: str, capsys, monkeypatch
):
    monkeypatch.chdir(files)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    path = write_space(files, space)
    assert cli.run(["search", "--space", str(path), "--out", "runs"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"space.yaml: {key}: " in err and expected in err
    assert not (files / "runs").exists()


def test_a_searched_value_that_reads_too_little_is_named(files: Path):
    data = search_space(
        data={"source": "text", "path": str(files / "book.txt")},
        model={"d_model": 32, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 2048},
        train={"steps": 2, "eval_every": 1},
        space={"seq_len": {"choice": [64, 2048]}, "lr": {"loguniform": [1e-3, 1e-2]}},
    )
    data["model"]["mla"] = {"budget": 64}
    with pytest.raises(SpaceError) as info:
        preflight.check_data(schema.parse(data, "s.yaml"))
    assert info.value.path == "space.seq_len"
    assert info.value.message.startswith("value 2048 is invalid: data.path: validation split")


def test_max_bytes_applies_to_text_and_tokens(files: Path):
    book = files / "book.txt"
    train, val = load_data(DataConfig(source="text", path=str(book), max_bytes=1000), 16)
    assert len(train) + len(val) == 1000
    (files / "accents.txt").write_text("é" * 1000)  # two bytes each: a cut inside one is undone
    train, val = load_data(
        DataConfig(source="text", path=str(files / "accents.txt"), max_bytes=601), 16
    )
    assert len(train) + len(val) == 600
    bytes(train.tokens.tolist() + val.tokens.tolist()).decode("utf-8")
    train, val = load_data(
        DataConfig(source="tokens", path=str(files / "ids.bin"), max_bytes=800),
        16,
        vocab_size=50_000,
    )
    assert len(train) + len(val) == 400
    whole = load_data(DataConfig(source="text", path=str(book)), 16)
    assert sum(map(len, whole)) == book.stat().st_size  # null: the whole file


def test_stdlib_reads_its_default_cap_when_max_bytes_is_null():
    train, val = load_data(DataConfig(source="stdlib"), 64)
    assert len(train) + len(val) == STDLIB_DEFAULT_BYTES


def test_train_with_bad_data_exits_2_and_makes_no_folder(tmp_path: Path, capsys):
    config = tmp_path / "best.yaml"
    config.write_text(
        yaml.safe_dump({"data": {"source": "text", "path": str(tmp_path / "gone.txt")}})
    )
    out = tmp_path / "out"
    assert cli.run(["train", "--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "best.yaml: data.path: text file" in err
    assert not out.exists()


# --- the scheduler and sizes that cannot fit the run --------------------------------------------


def parse(data: dict) -> schema.SearchConfig:
    return schema.parse(data, "s.yaml")


def bad(data: dict) -> SpaceError:
    with pytest.raises(SpaceError) as info:
        parse(data)
    return info.value


def asha(**kw) -> dict:
    return {"name": "asha", "metric": "val_loss", "mode": "min", **kw}


def test_asha_grace_period_past_the_last_step_is_rejected():
    e = bad(search_space(scheduler=asha(grace_period=10)))  # the trials run 2 steps
    assert e.path == "scheduler.grace_period" and "exceeds the 2 steps" in e.message
    e = bad(search_space(scheduler=asha(max_t=5)))
    assert e.path == "scheduler.max_t" and "train.steps (2)" in e.message


def test_asha_with_searched_steps_runs_to_the_longest():
    from automla.factories import make_scheduler

    data = search_space(scheduler=asha(grace_period=4), train={"eval_every": 1, "seq_len": 64})
    data["space"]["steps"] = {"int": [2, 6], "step": 2}
    config = parse(data)
    assert schema.scheduler_max_t(config) == 6
    assert make_scheduler(config)._max_t == 6  # ASHA asserted grace_period <= max_t = 1 before
    data["scheduler"]["grace_period"] = 8
    assert bad(data).path == "scheduler.grace_period"


def tiny(**model) -> dict:
    data = search_space()
    data["model"] = {**data["model"], **model}
    return data


@pytest.mark.parametrize(
    "data, path, expected",
    [
        pytest.param(
            tiny(mla={"block_size": 128}), "model.mla.block_size", "no sequence holds a whole block", id="block"
        ),
        pytest.param(
            {**tiny(mla={"budget": 256}), "space": {"lr": {"loguniform": [1e-3, 1e-2]}}},
            "model.mla.budget", "256 exceeds model.max_seq_len (64)", id="budget-fixed",
        ),
        pytest.param(
            {**tiny(), "space": {"model.mla.budget": {"choice": [32, 1024]}}},
            "space.model.mla.budget", "value 1024 is invalid: 1024 exceeds", id="budget-searched",
        ),
        pytest.param(
            {**tiny(max_seq_len=96, mla={"ratios": [0, 0, 1], "block_size": 64}), "space": {"model.mla.budget": {"choice": [96]}}},
            "model.mla.block_size", "select 2 blocks of 64 keys", id="selection",
        ),
    ],
)  # fmt: skip
def test_mla_sizes_no_sequence_can_use_are_rejected(data, path, expected):
    e = bad(data)
    assert e.path == path and expected in e.message


def test_sizes_are_the_trainers_rule_and_dense_models_are_exempt():
    model = {"max_seq_len": 64, "mla": {"budget": 128}}
    with pytest.raises(ConfigError) as info:
        build(TrainConfig, {"seq_len": 64, "model": model})
    assert info.value.path == "model.mla.budget"
    build(TrainConfig, {"seq_len": 64, "model": {**model, "attention": "dense"}})
    build(TrainConfig, {"seq_len": 64, "model": {**model, "mla": {"budget": 64}}})


# --- errors name the key at fault ---------------------------------------------------------------


@pytest.mark.parametrize(
    "mla, searched, path, expected",
    [
        pytest.param({"ratios": [1.2, -0.1, -0.1]}, "model.mla.budget", "model.mla.ratios", "finite and >= 0", id="negative-ratios"),
        pytest.param({"ratios": [0.5, 0.5, 0.5]}, "model.mla.budget", "model.mla.ratios", "sum to 1", id="ratios-sum"),
        pytest.param({"block_size": 24}, "model.mla.budget", "model.mla.block_size", "power of two", id="block-24"),
        pytest.param({"budget": 0}, "model.mla.block_size", "model.mla.budget", "budget must be >= 1", id="budget-0"),
        pytest.param({"gate": {"hidden": [8, -2]}}, "model.mla.budget", "model.mla.gate.hidden", "positive", id="gate-width"),
    ],
)  # fmt: skip
def test_a_wrong_fixed_setting_is_named_not_a_searched_one(mla, searched, path, expected):
    data = copy.deepcopy(search_space())
    data["model"]["mla"] = mla
    data["space"] = {searched: {"choice": [16, 32]}, "lr": {"loguniform": [1e-3, 1e-2]}}
    e = bad(data)
    assert e.path == path, e
    assert expected in e.message


# --- interrupted is not success -----------------------------------------------------------------


def test_ctrl_c_exits_130(monkeypatch, tmp_path: Path, capsys):
    import automla.runner
    from automla.report import SearchInterrupted

    space = write_space(tmp_path, search_space())

    def interrupted(*args, **kwargs):
        raise SearchInterrupted(tmp_path / "runs" / "x")

    monkeypatch.setattr(automla.runner, "run_search", interrupted)
    assert cli.run(["search", "--space", str(space)]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "automla search --resume" in err

    def pressed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(automla.runner, "run_search", pressed)
    assert cli.run(["search", "--space", str(space)]) == 130


# --- the bench's table, a handful of its cases through the real command line --------------------


def test_bench_cases_fail_cleanly_through_the_cli(monkeypatch):
    import importlib.util

    path = Path(__file__).parents[1] / "bench" / "bad_inputs.py"
    spec = importlib.util.spec_from_file_location("bad_inputs", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bad_inputs", bench)  # its dataclasses look themselves up
    spec.loader.exec_module(bench)
    ids = [
        "address-refused",
        "text-binary",
        "budget-zero",
        "export-truncated",
        "train-text-missing",
    ]
    # the cases one a call, two at a time: each is a CLI process of its own, most of it
    # importing torch on one core
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = [o for got in pool.map(lambda i: bench.run_cases([i]), ids) for o in got]
    assert [o.id for o in outcomes] == ids
    for o in outcomes:
        assert bench.ok(o), o
        assert o.seconds < bench.TIMEOUT_S
