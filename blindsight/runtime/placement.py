"""Where ONNX Runtime ran each node: a GPU provider that silently hands nodes
back to the CPU costs all the speed, so a run on a GPU provider reports them.

The placement is read from ONNX Runtime's own profiler (one profiled run of
the given feeds): every executed kernel is an event with its node name, op
type and execution provider, function bodies inlined."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import tempfile

from blindsight.runtime.session import PROVIDERS, make_session

CPU = PROVIDERS["cpu"]


@dataclasses.dataclass
class Placement:
    requested: str  # short provider name
    nodes: dict[str, list[tuple[str, str]]]  # provider -> [(node name, op type)]

    @property
    def fallbacks(self) -> list[tuple[str, str]]:
        """Nodes that ran on the CPU although another provider was asked for."""
        if PROVIDERS.get(self.requested, self.requested) == CPU:
            return []
        return self.nodes.get(CPU, [])

    def summary(self, most: int = 12) -> str:
        counts = ", ".join(f"{len(v)} on {k}" for k, v in sorted(self.nodes.items()))
        line = f"node placement ({self.requested}): {counts or 'no node ran'}"
        fb = self.fallbacks
        if fb:
            ops = collections.Counter(op for _, op in fb)
            line += (f"; {len(fb)} fell back to the CPU ({', '.join(f'{op} x{n}' for op, n in ops.most_common())}): "
                     + ", ".join(name for name, _ in fb[:most]) + (" ..." if len(fb) > most else ""))
        return line

    def to_dict(self) -> dict:
        return {"requested": self.requested, "counts": {k: len(v) for k, v in self.nodes.items()},
                "cpu_fallbacks": [{"name": n, "op_type": o} for n, o in self.fallbacks]}


def parse_profile(events, requested: str) -> Placement:
    """A Placement from ONNX Runtime profiler events (the JSON list it writes)."""
    nodes: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for e in events:
        args = e.get("args") or {}
        if e.get("cat") != "Node" or "provider" not in args:
            continue
        name = e.get("name", "")
        for suffix in ("_kernel_time", "_fence_before", "_fence_after"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        nodes[args["provider"]][name] = args.get("op_name", "")
    return Placement(requested, {p: sorted(v.items()) for p, v in nodes.items()})


def profiled_runs(model, feeds: dict, *, provider: str = "cpu", threads: int | None = None, runs: int = 1,
                  log_severity: int | None = None, native: bool | None = False) -> list[dict]:
    """Run ``model`` ``runs`` times on ``feeds`` (inputs it lacks are dropped) under ONNX
    Runtime's profiler; returns the profiler's events (function bodies inlined; ``native``
    as in :func:`make_session`, default False: the function bodies' nodes are what is placed)."""
    with tempfile.TemporaryDirectory(prefix="blindsight-profile-") as tmp:
        sess = make_session(model, provider=provider, threads=threads, log_severity=log_severity,
                            profile_prefix=os.path.join(tmp, "run"), native=native)
        names = {i.name for i in sess.get_inputs()}
        f = {k: v for k, v in feeds.items() if k in names}
        for _ in range(runs):
            sess.run(None, f)
        with open(sess.end_profiling()) as fh:
            return json.load(fh)


def node_placement(model, feeds: dict, provider: str = "cpu", threads: int | None = None) -> Placement:
    """Run ``model`` once on ``feeds`` with the profiler on and read off where each node ran."""
    return parse_profile(profiled_runs(model, feeds, provider=provider, threads=threads), provider)
