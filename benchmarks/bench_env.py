"""What the throughput benchmarks share: the machine and versions a result was measured on,
median-of-N step timing, and appending one JSON line per run."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax

RESULTS = Path(__file__).resolve().parent / "results"
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "torch", "transformers")


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo (and lscpu) give it; the platform string elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Where and when: device, platform, versions, host CPU, cores and load (1/5/15-minute)."""
    device = jax.devices()[0]
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device_kind": device.device_kind, "platform": device.platform, "num_devices": jax.device_count(),
            "versions": {"python": platform.python_version(), **{p: _version(p) for p in _PACKAGES}},
            "host": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_avg": list(os.getloadavg())}}


def host_peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20), 3)


def time_calls(call: Callable[[], Any], count: int, warmup: int) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of `count` calls after `warmup` untimed ones; `call` must wait
    for its device. On a shared CPU the wall time also counts waiting for a core, the CPU time not
    (though it does count threads spinning while they wait for work)."""
    for _ in range(warmup):
        call()
    wall, cpu = [], []
    for _ in range(count):
        start, start_cpu = time.perf_counter(), time.process_time()
        call()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def best_median(runs: list[list[float]]) -> float:
    """The fastest run's median: runs interleave with the other framework, the best is least disturbed."""
    return min(statistics.median(run) for run in runs)


def append_result(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def main_with(argv: Optional[list[str]], parse_args: Callable[[Optional[list[str]]], Any],
              prepare: Callable[[Any], Any], run: Callable[[Any, Any], dict[str, Any]],
              summary: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """A benchmark's `main`: parse, prepare (a bad flag value is one line, no traceback), run, print."""
    args = parse_args(argv)
    try:
        prepared = prepare(args)
    except ValueError as e:  # a bad preset, JSON, mesh or attention value
        sys.exit(f"error: {e}")
    row = run(args, prepared)
    print(summary(row), flush=True)
    return row
