"""Interleaved timing and peak memory (docs/specification.md §6): ratios from one process, medians."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from blindsight.runtime.session import make_session


def session(model, threads: int, provider: str = "cpu", arena: bool = True, native: bool = False,
            config: dict[str, str] | None = None) -> ort.InferenceSession:
    """The benchmarks' session: ``threads`` intra-op threads, one inter-op thread, errors-only log;
    BlindSightAttention on its function bodies unless ``native`` (the native kernel, required);
    ``config``: session configuration entries."""
    return make_session(model, provider=provider, threads=threads, inter_threads=1, arena=arena, log_severity=3,
                        native=native, config=config)


def interleaved(runs: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, progress=None,
                seconds: Callable[[object], float] | None = None) -> dict[str, float]:
    """Median seconds of each callable, run round-robin so drift hits all alike.
    ``seconds``: the time of a call from its result (default: the call's wall-clock time)."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            result = fn()
            times[name].append(time.perf_counter() - t0 if seconds is None else seconds(result))
            if progress is not None:
                progress.update(1)
    return {k: float(np.median(v)) for k, v in times.items()}


def peak_rss_mb() -> float:
    """Peak resident memory of this process since the last :func:`reset_peak_rss`
    (Linux VmHWM; elsewhere the process-lifetime peak)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> None:
    """Start the peak over from the current RSS, so import-time peaks don't mask the run's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def measure_in_child(module: str, args: dict) -> dict:
    """Run ``python -m module`` with JSON args on stdin; its last stdout line is JSON.

    Peak RSS is per process and only grows, so each variant's peak memory is
    taken in a fresh child process.
    """
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", module], input=json.dumps(args), capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    """The machine a record was measured on: CPU, cores, onnxruntime and Python versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "onnxruntime": ort.__version__, "python": platform.python_version()}
