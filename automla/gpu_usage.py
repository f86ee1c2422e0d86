"""GPU utilisation over a search: `nvidia-smi` polled in a background thread, rows in a CSV.

The sampler runs in the search driver's process, so it only sees the GPUs of the machine the
driver runs on: `nvidia-smi` is a local tool, and Ray may place trials on other nodes of a
cluster, whose GPUs are never sampled. It also sees every GPU of that machine, whatever
CUDA_VISIBLE_DEVICES says and whoever else uses them. On a single machine the numbers are the
search's; on a cluster they describe the head node only.

Sampling is best effort: without `nvidia-smi` nothing is recorded, and a failing or garbled
call only skips that sample, so monitoring can never break a search.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType

HEADER = ("time_s", "gpu", "util_pct", "mem_mib")
QUERY = (
    "--query-gpu=index,utilization.gpu,memory.used",
    "--format=csv,noheader,nounits",
)
# A hung driver can make nvidia-smi block for a long time; this also bounds how long exit waits.
CALL_TIMEOUT_S = 5.0

Row = tuple[float, int, float, float]


def parse_query(text: str) -> list[tuple[int, float, float]]:
    """(gpu, util_pct, mem_mib) per line of `nvidia-smi --query-gpu` output.

    Raises ValueError on any malformed line (e.g. "[N/A]"), so a sample is kept whole or not at all.
    """
    out = []
    for line in text.strip().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3:
            raise ValueError(f"expected 3 fields, got {line!r}")
        out.append((int(fields[0]), float(fields[1]), float(fields[2])))
    if not out:
        raise ValueError("no GPU rows")
    return out


def summarize(rows: list[Row]) -> dict | None:
    """Summary of sampled rows; None if there are none. A sample is one timestamp."""
    if not rows:
        return None
    per_gpu: dict[int, list[float]] = {}
    for _, gpu, util, _ in rows:
        per_gpu.setdefault(gpu, []).append(util)
    return {
        "samples": len({t for t, *_ in rows}),
        "gpus": sorted(per_gpu),
        "mean_util_pct": sum(r[2] for r in rows) / len(rows),
        "mean_util_pct_per_gpu": {g: sum(u) / len(u) for g, u in sorted(per_gpu.items())},
        "peak_mem_mib": max(r[3] for r in rows),
    }


def summarize_csv(path: Path) -> dict | None:
    """`summarize` of a sampler's CSV; None if it is missing or has no rows.

    Unparsable lines are skipped: a driver killed mid-write leaves a partial last line.
    """
    path = Path(path)
    if not path.is_file():
        return None
    rows: list[Row] = []
    with path.open(newline="") as f:
        for rec in csv.DictReader(f):
            try:
                rows.append(
                    (
                        float(rec["time_s"]),
                        int(rec["gpu"]),
                        float(rec["util_pct"]),
                        float(rec["mem_mib"]),
                    )
                )
            except (TypeError, ValueError):
                continue
    return summarize(rows)


class GpuSampler:
    """Context manager that samples all local GPUs every `interval_s` into the CSV at `path`.

    The file is (re)written with a header on enter, only if `nvidia-smi` is found. The first
    sample is taken at once, so even a short search gets one.
    """

    def __init__(self, path: Path, interval_s: float = 1.0) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.path = Path(path)
        self.interval_s = interval_s
        self.failed_samples = 0  # calls that failed, timed out or printed nothing usable
        self._exe: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def __enter__(self) -> GpuSampler:
        self._exe = shutil.which("nvidia-smi")
        if self._exe is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as f:
            csv.writer(f).writerow(HEADER)
        self._t0 = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._thread is not None:
            self._stop.set()  # wakes the thread's wait at once
            self._thread.join()

    def summary(self) -> dict | None:
        """Summary of what has been sampled so far; None without `nvidia-smi` or samples."""
        if self._exe is None:
            return None
        return summarize_csv(self.path)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            if self._stop.wait(self.interval_s):
                break

    def _sample(self) -> None:
        assert self._exe is not None
        t = round(time.monotonic() - self._t0, 3)
        try:
            res = subprocess.run(
                [self._exe, *QUERY],
                capture_output=True,
                text=True,
                timeout=CALL_TIMEOUT_S,
                check=True,
            )
            gpus = parse_query(res.stdout)
            # one write per sample, so a concurrent reader sees whole samples (or a partial line)
            lines = "".join(f"{t},{g},{u:g},{m:g}\n" for g, u, m in gpus)
            with self.path.open("a", newline="") as f:
                f.write(lines)
        except (OSError, subprocess.SubprocessError, ValueError):
            self.failed_samples += 1
