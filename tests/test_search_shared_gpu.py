"""Trials sharing one GPU (`resources.gpus` a fraction): two trials run side by side on it, and
each one's tokens_per_s comes from the exclusive benchmark, not the shared training clock.

On CPU (in CI) Ray is told the machine has one GPU: the scheduling and the benchmark locks are
the real ones, the training falls back to the CPU. With CUDA the same search trains on the GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import local_ray, objectives

from automla import schema
from automla.runner import run_search

pytestmark = pytest.mark.slow

SPACE = {
    "objectives": [
        *objectives(),
        {"metric": "tokens_per_s@256", "mode": "max"},  # twice the training context
    ],
    "sampler": {"name": "random", "seed": 0},
    "trials": 2,
    "concurrency": 2,
    "resources": {"cpus": 1, "gpus": 0.5},
    "data": {"source": "stdlib", "max_bytes": 300_000},
    "train": {
        "steps": 16,
        "eval_every": 8,
        "eval_batches": 2,
        "batch_size": 2,
        "seq_len": 128,
        "warmup_steps": 2,
        "throughput_warmup": 2,
        "dtype": "bfloat16",
        "benchmark": {"steps": 3, "warmup": 1},
    },
    "model": {
        "d_model": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "max_seq_len": 128,
        "attention": "mla",
    },
    "space": {
        "model.mla.ratios": {"simplex": {"min_share": 0.1}},
        "model.mla.budget": {"choice": [32, 64]},
    },
    "reference": "none",  # both trials start at once, on the one GPU
}


def _search(tmp_path: Path) -> list[str]:
    """Run the search, check it; the memory kind each trial reported."""
    config = schema.parse(SPACE, "shared.yaml")
    assert config.fixed["benchmark"]["enabled"]  # a GPU fraction turns the benchmark on
    run_dir = run_search(config, tmp_path / "runs", "shared")
    summary = json.loads((run_dir / "pareto.json").read_text())
    assert summary["throughput"].startswith("exclusive benchmark")
    records = json.loads((run_dir / "trials.json").read_text())
    assert [r["state"] for r in records] == ["completed", "completed"], records
    for r in records:
        m = r["metrics"]
        assert m["step"] == 16 and m["tokens_per_s"] > 0 and m["train_tokens_per_s"] > 0
        assert m["tokens_per_s@256"] > 0
    with open(run_dir / "trials.csv") as f:
        assert "tokens_per_s@256" in f.readline().strip().split(",")
    # side by side: both trials started before either one was done
    events = [line.split()[2] for line in (run_dir / "search.log").read_text().splitlines()]
    events = [e for e in events if e in ("start", "done")]
    assert events[:2] == ["start", "start"], events
    return [_memory_kind(run_dir, r["trial_id"]) for r in records]


def _memory_kind(run_dir: Path, trial_id: str) -> str:
    """Where the trial trained, from its trainer's last evaluation."""
    lines = (run_dir / "ray" / f"trial_{trial_id}" / "train" / "metrics.jsonl").read_text()
    return json.loads(lines.splitlines()[-1])["peak_mem_kind"]


def test_two_trials_share_one_gpu_cpu_fallback(tmp_path: Path):
    if torch.cuda.is_available():
        pytest.skip("the GPU variant runs on this machine")
    with local_ray(num_cpus=2, num_gpus=1):
        kinds = _search(tmp_path)
    assert kinds == ["cpu_peak_rss"] * 2


@pytest.mark.gpu
def test_two_trials_share_one_gpu(tmp_path: Path):
    with local_ray(num_cpus=4) as ray:
        assert ray.cluster_resources().get("GPU", 0) >= 1
        kinds = _search(tmp_path)
    assert kinds == ["cuda_max_allocated"] * 2


def test_gpus_the_cluster_lacks_stop_the_search_and_leave_no_folder(tmp_path: Path):
    with local_ray(num_cpus=2, num_gpus=0):
        with pytest.raises(schema.SpaceError, match="resources.*GPU"):
            run_search(schema.parse(SPACE, "shared.yaml"), tmp_path / "runs", "nogpu")
    assert not (tmp_path / "runs" / "nogpu").exists()
