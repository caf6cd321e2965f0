"""What every engine's worker shares; standard library only, since a worker runs
in its engine's venv, where neither the project nor the harness is installed.

A worker is one process per measurement: it reads a JSON spec (argv[1]), loads
its engine (not timed), answers once (timed by the engine itself) and writes one
JSON result to the spec's ``out`` path. A fresh process per run makes peak RSS
that variant's own, and the engine's caches start cold each time.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path


def peak_rss_mib() -> float:
    """The process's peak resident set (VmHWM), which counts mapped weight pages once read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run(measure) -> int:
    """Read the spec, call ``measure(spec) -> dict`` and write its result with the peak RSS."""
    spec = json.loads(Path(sys.argv[1]).read_text())
    result = measure(spec)
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    Path(spec["out"]).write_text(json.dumps(result) + "\n")
    return 0
