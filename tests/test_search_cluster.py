"""A real two-node Ray cluster on loopback (`ray start --head` and a second `ray start
--address`, separate processes, one CPU each): a search joins it with `address`, its trials
run on both nodes (trials.csv names the node of each), and the token-protected dashboard's
HTTP API lists the search's driver job (labelled with the run name) and its trial actors."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import search_space

pytestmark = pytest.mark.slow

SPACE = search_space(trials=4, train={"steps": 2, "eval_every": 1, "seq_len": 64})


def napping_trainer(config, *, out_dir=None, report=None, resume=None):
    """Takes a few seconds, so that two trials overlap and need both nodes."""
    for step in (1, 2):
        time.sleep(1.5)
        loss = 1.0 + config.lr * 100
        speed = 1000.0 / config.model.mla.budget
        report({"step": step, "train_loss": loss, "val_loss": loss, "tokens_per_s": speed}, None)
    return {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_TOKEN: list[str] = []


def token() -> str:
    """The cluster's auth token (~/.ray/auth_token), read once: `ray get-auth-token` is a
    Python process that imports Ray (about a second a call)."""
    if not _TOKEN:
        out = subprocess.run(["ray", "get-auth-token"], capture_output=True, text=True, check=True)
        _TOKEN.append(out.stdout.strip().splitlines()[-1])
    return _TOKEN[0]


def get(url: str) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token()}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def cluster():
    port, dashboard = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--block"]
    head = [
        "ray", "start", "--head", f"--port={port}", f"--temp-dir={temp}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
    ]  # fmt: skip
    nodes = []
    try:
        # --block keeps each node's processes under one process we can end by its id
        nodes.append(subprocess.Popen([*head, *common], start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
        url = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                get(f"{url}/api/version")
                break
            except (OSError, subprocess.CalledProcessError):  # not up, or no token written yet
                time.sleep(0.5)
        worker = ["ray", "start", f"--address=127.0.0.1:{port}", *common]
        # joining a token-protected cluster takes token mode on the joining side too
        nodes.append(
            subprocess.Popen(
                worker,
                env={**os.environ, "RAY_AUTH_MODE": "token"},
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        while time.time() < deadline:
            try:
                alive = get(f"{url}/api/v0/nodes?detail=1")["data"]["result"]["result"]
                if sum(n["state"] == "ALIVE" for n in alive) == 2:
                    break
            except (OSError, KeyError):
                pass
            time.sleep(0.5)
        else:
            pytest.fail("the two-node cluster did not come up in 90 s")
        yield f"127.0.0.1:{port}", url
    finally:
        for node in reversed(nodes):
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGTERM)
        # the nodes stop together, with a short grace in all: a `ray start --block` node takes
        # about half a minute to stop on SIGTERM, so what ends it is the SIGKILL after the grace
        grace = time.time() + 2
        for node in reversed(nodes):
            try:
                node.wait(timeout=max(0.0, grace - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
        shutil.rmtree(temp, ignore_errors=True)


DRIVER = """
import sys
from ray import cloudpickle
sys.path.insert(0, {tests!r})
import test_search_cluster as m
cloudpickle.register_pickle_by_value(m)
from automla import schema
from automla.runner import run_search
config = schema.load({space!r})
run_search(config, {out!r}, "two-nodes", address={address!r}, train_fn=m.napping_trainer)
"""


def test_trials_run_on_both_nodes_and_the_dashboard_lists_them(cluster, tmp_path):
    address, url = cluster
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(SPACE))
    script = DRIVER.format(
        tests=str(Path(__file__).parent),
        space=str(tmp_path / "s.yaml"),
        out=str(tmp_path / "runs"),
        address=address,
    )
    # Ray reads RAY_AUTH_MODE once per process: the driver that joins runs in its own
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "two-nodes"
    rows = list(csv.DictReader(open(run_dir / "trials.csv")))
    assert [r["state"] for r in rows] == ["completed"] * 4
    nodes = get(f"{url}/api/v0/nodes?detail=1")["data"]["result"]["result"]
    node_ids = {n["node_id"] for n in nodes}
    assert {r["node_id"] for r in rows} == node_ids and len(node_ids) == 2

    jobs = get(f"{url}/api/jobs/")
    ours = [j for j in jobs if (j.get("metadata") or {}).get("automla_run") == "two-nodes"]
    assert len(ours) == 1 and ours[0]["type"] == "DRIVER"
    job_id = ours[0]["job_id"]
    actors = get(f"{url}/api/v0/actors?detail=1&limit=1000")["data"]["result"]["result"]
    trials = [a for a in actors if a.get("job_id") == job_id and a["class_name"] == "ImplicitFunc"]
    assert trials and all(a.get("repr_name") == "automla_trial" for a in trials)
    assert {a["node_id"] for a in trials} == node_ids
