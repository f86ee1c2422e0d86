"""GPU sampler against fake `nvidia-smi` scripts put first in PATH (no GPU needed)."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest

from automla.gpu_usage import GpuSampler, parse_query, summarize_csv

ARGS = "--query-gpu=index,utilization.gpu,memory.used --format=csv,noheader,nounits"
# Two GPUs in nvidia-smi's own format (", " separated); wrong arguments fail the fake.
GOOD = f"""#!/bin/sh
[ "$*" = "{ARGS}" ] || exit 2
printf '0, 30, 1024\\n1, 90, 20480\\n'
"""


def fake_smi(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, script: str | None) -> Path:
    """A bin dir holding `script` as nvidia-smi (none if None), made the whole PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if script is not None:
        exe = bin_dir / "nvidia-smi"
        exe.write_text(script)
        exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    return tmp_path / "out" / "gpu.csv"


def test_samples_two_gpus(monkeypatch, tmp_path):
    path = fake_smi(monkeypatch, tmp_path, GOOD)
    with GpuSampler(path, interval_s=0.05) as s:
        time.sleep(0.3)
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["time_s", "gpu", "util_pct", "mem_mib"]
    body = rows[1:]
    n = len(body) // 2
    assert n >= 2 and len(body) == 2 * n
    assert [r[1:] for r in body] == [["0", "30", "1024"], ["1", "90", "20480"]] * n
    times = [float(r[0]) for r in body[::2]]
    assert [float(r[0]) for r in body[1::2]] == times  # both GPUs share a sample's time
    assert times == sorted(times) and len(set(times)) == n and times[0] < 0.3

    expected = {
        "samples": n,
        "gpus": [0, 1],
        "mean_util_pct": 60.0,
        "mean_util_pct_per_gpu": {0: 30.0, 1: 90.0},
        "peak_mem_mib": 20480.0,
    }
    assert s.summary() == expected
    assert summarize_csv(path) == expected
    assert s.failed_samples == 0


@pytest.mark.parametrize(
    "script",
    [
        "#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 1\n",
        "#!/bin/sh\nprintf '0, 30, 1024\\n1, 90, 20480\\n'\nexit 1\n",
        "#!/bin/sh\necho 'garbage'\n",
        "#!/bin/sh\nprintf '0, [N/A], 1024\\n'\n",
        "#!/bin/sh\nprintf ''\n",
    ],
    ids=["error", "exit1-with-rows", "garbage", "n/a", "empty"],
)
def test_failing_smi_records_nothing(monkeypatch, tmp_path, script):
    path = fake_smi(monkeypatch, tmp_path, script)
    with GpuSampler(path, interval_s=0.05) as s:
        time.sleep(0.15)
    assert path.read_text().splitlines() == ["time_s,gpu,util_pct,mem_mib"]
    assert s.failed_samples >= 1
    assert s.summary() is None
    assert summarize_csv(path) is None


def test_without_nvidia_smi_does_nothing(monkeypatch, tmp_path):
    path = fake_smi(monkeypatch, tmp_path, None)
    with GpuSampler(path, interval_s=0.05) as s:
        time.sleep(0.1)
    assert not path.exists()
    assert s.summary() is None
    assert summarize_csv(path) is None


def test_exit_is_prompt_with_long_interval(monkeypatch, tmp_path):
    path = fake_smi(monkeypatch, tmp_path, GOOD)
    start = time.monotonic()
    with GpuSampler(path, interval_s=60.0) as s:
        pass
    assert time.monotonic() - start < 2.0
    assert s._thread is not None and not s._thread.is_alive()
    # the first sample is taken on start, unless exit came first
    assert len(path.read_text().splitlines()) in (1, 3)


def test_summarize_csv_uneven_values_and_partial_line(tmp_path):
    path = tmp_path / "gpu.csv"
    path.write_text(
        "time_s,gpu,util_pct,mem_mib\n"
        "0.0,0,10,100\n0.0,1,20,300\n"
        "1.0,0,40,200\n1.0,1,50,250\n"
        "2.0,0,7"  # a driver killed mid-write
    )
    assert summarize_csv(path) == {
        "samples": 2,
        "gpus": [0, 1],
        "mean_util_pct": 30.0,
        "mean_util_pct_per_gpu": {0: 25.0, 1: 35.0},
        "peak_mem_mib": 300.0,
    }


def test_parse_query():
    assert parse_query("0, 30, 1024\n1, 90, 20480\n") == [(0, 30.0, 1024.0), (1, 90.0, 20480.0)]
    for bad in ["", "0, 30\n", "0, [N/A], 1024\n", "x, 1, 2\n"]:
        with pytest.raises(ValueError):
            parse_query(bad)


def test_rejects_bad_interval(tmp_path):
    with pytest.raises(ValueError, match="interval_s"):
        GpuSampler(tmp_path / "gpu.csv", interval_s=0)
