"""bs-check: run a source model and its compiled form on the same feeds and report how far
their outputs are apart (max absolute and relative error per output, top-1 agreement of
the logits), against a tolerance.

Modes:

- ``dense``: SOURCE is the exported model (no ``image_spans`` input), COMPILED its compile
  with an all-``dense`` profile. docs/specification.md §4: they must be equal up to float rounding.
- ``lowering``: SOURCE is the ``--lowering reference`` compile of a profile, COMPILED the
  ``fast`` one of the same profile; both take ``image_spans``.

The mode follows from the graphs (SOURCE without ``image_spans``: dense) unless forced.

Error measure and tolerance. For an output ``a`` (COMPILED) against ``r`` (SOURCE), the
relative error of an element is ``|a - r| / max(|r|, 1)``: absolute for values of
magnitude below 1, relative above (logits of real models reach tens). An output passes
when its largest such error is at most the tolerance. Defaults, per output dtype
(:data:`DEFAULT_TOLERANCE`): fp32 1e-4, about 800 float32 ulps at magnitude 1, above
the reordering error of a different attention kernel (GroupQueryAttention vs
MatMul/Softmax), which the tests measure at 1e-6 and below on the tiny models, yet far
below any semantic change (a wrongly masked key moves logits by 1e-2 and more); fp16
1e-2 (fp16 eps is 9.8e-4: about ten fp16 ulps, several roundings per layer); bf16 5e-2
(eps 7.8e-3). Top-1 agreement is reported, not judged: two logits that tie within
rounding may swap.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from blindsight.attention import validate_spans
from blindsight.attention.schema import SPANS_INPUT, TOKEN_TYPE_INPUT, AttentionConfig, is_blindsight
from blindsight.attention.spans import token_type_ids
from blindsight.errors import BlindSightError, ModelError, SpanError
from blindsight.tables import fmt_table

MODES = ("dense", "lowering")
DEFAULT_TOLERANCE = {"float32": 1e-4, "float64": 1e-8, "float16": 1e-2, "bfloat16": 5e-2}
DEFAULT_SEQ_LEN = 32
DEFAULT_IMAGES = 2


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    dims: tuple  # int (static) or str (symbolic; "" when unnamed)

    def role(self, i: int, has_past: bool) -> str | int:
        """What dim i is: its static size, or 'batch', 'seq', 'past' or 'total' (past + seq)."""
        d = self.dims[i]
        if isinstance(d, int):
            return d
        low = d.lower()
        if "batch" in low or (i == 0 and not low):
            return "batch"
        if "past" in low or (is_past(self.name) and i != 0):
            return "past"
        if "total" in low or (self.name == "attention_mask" and has_past and i == len(self.dims) - 1):
            return "total"
        return "seq"


def is_past(name: str) -> bool:
    return name.startswith("past_key_values") or name.startswith("past.") or ".past" in name


@dataclasses.dataclass
class OutputParity:
    name: str
    dtype: str
    shape: list
    max_abs: float
    max_rel: float
    tolerance: float
    top1: float | None = None  # share of positions whose argmax agrees (logits only)

    @property
    def passed(self) -> bool:
        return bool(self.max_rel <= self.tolerance)


@dataclasses.dataclass
class ParityReport:
    mode: str
    provider: str
    source: str
    compiled: str
    spans: list
    feeds: dict  # name -> shape
    outputs: list[OutputParity]
    note: str = ""
    placement: dict | None = None  # on a GPU provider: where COMPILED's nodes ran (runtime.placement)
    attention: str = ""  # which path ran COMPILED's BlindSightAttention nodes (SOURCE: always the function bodies)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def failures(self) -> list[OutputParity]:
        return [o for o in self.outputs if not o.passed]

    def to_json(self) -> dict:
        rec = dataclasses.asdict(self)
        for o, out in zip(rec["outputs"], self.outputs):
            o["passed"] = out.passed
        rec["passed"] = self.passed
        return rec

    def table(self) -> str:
        rows = [[o.name, o.dtype, "x".join(map(str, o.shape)), f"{o.max_abs:.3g}", f"{o.max_rel:.3g}",
                 f"{o.tolerance:g}", "" if o.top1 is None else f"{o.top1:.4f}", "ok" if o.passed else "FAIL"]
                for o in self.outputs]
        head = (f"{self.mode} mode, {self.provider}: {self.compiled} vs {self.source}; "
                f"feeds {', '.join(f'{k} {list(v)}' for k, v in self.feeds.items() if k != SPANS_INPUT)}; "
                f"image_spans {self.spans}")
        body = fmt_table(["output", "dtype", "shape", "max abs err", "max rel err", "tolerance", "top-1", "verdict"], rows)
        verdict = "all outputs within tolerance" if self.passed else \
            "over tolerance: " + ", ".join(o.name for o in self.failures)
        extra = [self.note] if self.note else []
        if self.attention:
            extra.append(f"COMPILED's attention: {self.attention}; SOURCE's: function bodies")
        if self.placement is not None:
            extra.append(self.placement["summary"])
        return "\n".join([head, body, verdict] + extra)


def _read_graph(path) -> tuple[dict[str, InputSpec], list[str], list[tuple]]:
    """(inputs by name, output names, categories of each BlindSightAttention node)."""
    from blindsight.compiler.pipeline import load_model

    model = load_model(Path(path))
    inputs = {}
    for v in model.graph.inputs:
        try:
            dtype = np.dtype(v.dtype.numpy())
        except Exception:
            raise ModelError(f"{path}: input {v.name!r} has type {v.dtype}, which numpy cannot feed") from None
        dims = tuple(d if isinstance(d, int) else (d.value or "") for d in v.shape) if v.shape is not None else ()
        inputs[v.name] = InputSpec(v.name, dtype, dims)
    cats = [AttentionConfig.from_node(n).categories for n in model.graph if is_blindsight(n) and "categories" in n.attributes]
    return inputs, [v.name for v in model.graph.outputs], cats


def _match(source, compiled, src, cmp) -> None:
    (s_in, s_out, _), (c_in, c_out, _) = src, cmp
    if SPANS_INPUT not in c_in:
        raise ModelError(f"{compiled} has no '{SPANS_INPUT}' input: it is not a compiled BlindSight model")
    a, b = set(s_in) - {SPANS_INPUT}, set(c_in) - {SPANS_INPUT}
    if a != b:
        raise ModelError(f"the graphs take different inputs: only {source}: {sorted(a - b) or 'none'}; "
                         f"only {compiled}: {sorted(b - a) or 'none'}")
    for name in sorted(a):
        if s_in[name].dtype != c_in[name].dtype or len(s_in[name].dims) != len(c_in[name].dims):
            raise ModelError(f"input {name!r} is {s_in[name].dtype} rank {len(s_in[name].dims)} in {source} but "
                             f"{c_in[name].dtype} rank {len(c_in[name].dims)} in {compiled}")
    if set(s_out) != set(c_out):
        raise ModelError(f"the graphs give different outputs: only {source}: {sorted(set(s_out) - set(c_out)) or 'none'}; "
                         f"only {compiled}: {sorted(set(c_out) - set(s_out)) or 'none'}")


def random_feeds(inputs: dict[str, InputSpec], *, batch: int = 1, seq_len: int = DEFAULT_SEQ_LEN, past: int = 0,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds shaped from the graph's inputs: attention_mask ones, position_ids an arange from
    ``past`` ([3, B, S] for a rank-3 M-RoPE input), KV-cache inputs of length ``past``, float
    inputs from a seeded normal in their own dtype, other integers zeros."""
    rng = np.random.default_rng(seed)
    has_past = any(is_past(n) for n in inputs)
    sizes = {"batch": batch, "seq": seq_len, "past": past, "total": past + seq_len}
    feeds = {}
    for name, spec in inputs.items():
        if name == SPANS_INPUT:
            continue
        shape = tuple(r if isinstance(r, int) else sizes[r] for r in (spec.role(i, has_past) for i in range(len(spec.dims))))
        if name == "position_ids" or name == "cache_position":
            feeds[name] = np.broadcast_to(np.arange(past, past + seq_len, dtype=spec.dtype), shape).copy()
        elif name == "attention_mask" or spec.dtype == np.bool_:
            feeds[name] = np.ones(shape, dtype=spec.dtype)
        elif np.issubdtype(spec.dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            feeds[name] = np.zeros(shape, dtype=spec.dtype)
    return feeds


def load_feeds(path, inputs: dict[str, InputSpec]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Feeds from an .npz (every input but image_spans, which it may hold too), checked against the graph."""
    path = Path(path)
    if not path.is_file():
        raise BlindSightError(f"feeds file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as exc:
        raise BlindSightError(f"{path} is not a readable .npz file ({type(exc).__name__})") from None
    spans = data.pop(SPANS_INPUT, None)
    wanted = [n for n in inputs if n != SPANS_INPUT]
    missing = [n for n in wanted if n not in data]
    if missing:
        raise BlindSightError(f"{path} lacks the inputs {', '.join(missing)}")
    extra = sorted(set(data) - set(wanted))
    if extra:
        raise BlindSightError(f"{path} holds arrays the models do not take: {', '.join(extra)}")
    has_past = any(is_past(n) for n in inputs)
    seen: dict = {}
    for name in wanted:
        spec, arr = inputs[name], data[name]
        if arr.dtype != spec.dtype:
            raise BlindSightError(f"{path}: input {name!r} is {arr.dtype}, the model takes {spec.dtype}")
        if arr.ndim != len(spec.dims):
            raise BlindSightError(f"{path}: input {name!r} has shape {list(arr.shape)}, the model takes rank {len(spec.dims)} {list(spec.dims)}")
        for i, size in enumerate(arr.shape):
            role = spec.role(i, has_past)
            if isinstance(role, int):
                if size != role:
                    raise BlindSightError(f"{path}: input {name!r} has shape {list(arr.shape)}, dim {i} must be {role}")
            elif seen.setdefault(role, (size, name))[0] != size:
                raise BlindSightError(f"{path}: input {name!r} has {role} length {size} but {seen[role][1]!r} has {seen[role][0]}")
    return data, spans


def prompt_length(inputs: dict[str, InputSpec], feeds: dict) -> int:
    """Absolute prompt length (past + new tokens) of the feeds: the positions spans live in."""
    has_past = any(is_past(n) for n in inputs)
    sizes: dict = {}
    for name, arr in feeds.items():
        if name in inputs:
            for i, size in enumerate(arr.shape):
                sizes.setdefault(inputs[name].role(i, has_past), size)
    if "total" in sizes:
        return int(sizes["total"])
    if "seq" not in sizes:
        raise BlindSightError("cannot tell the prompt length from the models' inputs (no sequence dimension)")
    return int(sizes["seq"] + sizes.get("past", 0))


def random_spans(num_images: int, length: int, seed: int = 0) -> np.ndarray:
    """``num_images`` sorted, non-overlapping spans in [0, length): the prompt is cut into
    equal segments and each holds one image of at least half its segment."""
    if num_images < 0:
        raise SpanError(f"--images must be >= 0, got {num_images}")
    if num_images > length:
        raise SpanError(f"{num_images} images do not fit in a prompt of {length} tokens")
    rng = np.random.default_rng(seed + 1)
    seg = length // max(num_images, 1)
    rows = []
    for i in range(num_images):
        size = int(rng.integers(max(1, seg // 2), seg + 1))
        start = i * seg + int(rng.integers(0, seg - size + 1))
        rows.append((start, start + size))
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


def parse_spans(text: str) -> np.ndarray:
    """'3:20,25:40' -> [[3, 20], [25, 40]]; '' -> no image."""
    rows = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            start, end = (int(x) for x in part.split(":"))
        except ValueError:
            raise SpanError(f"--spans: {part!r} is not START:END (e.g. --spans 3:20,25:40)") from None
        rows.append((start, end))
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


def compare(name: str, ref: np.ndarray, out: np.ndarray, tolerance: float) -> OutputParity:
    r, a = np.asarray(ref, dtype=np.float64), np.asarray(out, dtype=np.float64)
    if r.shape != a.shape:
        return OutputParity(name, str(np.asarray(out).dtype), list(a.shape), float("inf"), float("inf"), tolerance)
    diff = np.abs(a - r)
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float((diff / np.maximum(np.abs(r), 1.0)).max()) if diff.size else 0.0
    if not np.all(np.isfinite(a) == np.isfinite(r)):
        max_abs = max_rel = float("inf")
    top1 = None
    if name.endswith("logits") and r.ndim >= 1 and r.size:
        top1 = float(np.mean(np.argmax(r, axis=-1) == np.argmax(a, axis=-1)))
    return OutputParity(name, str(np.asarray(out).dtype), list(a.shape), max_abs, max_rel, tolerance, top1)


def default_tolerance(dtype: str) -> float:
    return DEFAULT_TOLERANCE.get(str(dtype), 1e-4)


def check(source, compiled, *, feeds=None, spans=None, provider: str = "cpu", seed: int = 0,
          tolerance: float | None = None, mode: str | None = None, batch: int = 1, seq_len: int = DEFAULT_SEQ_LEN,
          past: int = 0, images: int = DEFAULT_IMAGES, threads: int | None = None,
          native: bool | None = None) -> ParityReport:
    """Run SOURCE and COMPILED on the same feeds (a dict, an .npz path, or None: random,
    shaped by ``batch``/``seq_len``/``past``, seeded) and spans (None: ``images`` random
    spans inside the prompt, or the .npz's ``image_spans``); compare every output.
    SOURCE runs on the function bodies; COMPILED on the native kernel when it is built
    (``native`` as in :func:`make_session`; False: the function bodies)."""
    from blindsight.runtime.session import make_session, resolve_provider

    if mode is not None and mode not in MODES:
        raise BlindSightError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if tolerance is not None and not tolerance >= 0:
        raise BlindSightError(f"--tolerance must be >= 0, got {tolerance}")
    for n, v in (("batch", batch), ("seq-len", seq_len)):
        if v < 1:
            raise BlindSightError(f"--{n} must be >= 1, got {v}")
    if past < 0:
        raise BlindSightError(f"--past must be >= 0, got {past}")
    resolve_provider(provider)
    src, cmp = _read_graph(source), _read_graph(compiled)
    _match(source, compiled, src, cmp)
    inputs = src[0]
    mode = mode or ("lowering" if SPANS_INPUT in inputs else "dense")
    npz_spans = None
    if feeds is None:
        feeds = random_feeds(inputs, batch=batch, seq_len=seq_len, past=past, seed=seed)
    elif isinstance(feeds, (str, Path)):
        feeds, npz_spans = load_feeds(feeds, inputs)
    length = prompt_length(inputs, feeds)
    if spans is None:
        spans = npz_spans if npz_spans is not None else random_spans(images, length, seed)
    spans = validate_spans(spans, length)
    if TOKEN_TYPE_INPUT in inputs and (npz_spans is None or TOKEN_TYPE_INPUT not in feeds):
        # Gemma 3's image blocks follow the same spans (random feeds hold zeros)
        rows, new = feeds[TOKEN_TYPE_INPUT].shape
        feeds[TOKEN_TYPE_INPUT] = token_type_ids(spans, new, length - new, rows)
    runs = []
    attention = ""
    for path, (ins, outs, _), use in ((source, src, False), (compiled, cmp, native)):
        sess = make_session(path, provider=provider, threads=threads, native=use)
        if path is compiled and SPANS_INPUT in ins:
            attention = sess.blindsight_attention
        f = {k: v for k, v in feeds.items() if k in ins}
        if SPANS_INPUT in ins:
            f[SPANS_INPUT] = spans
        runs.append(dict(zip(outs, sess.run(None, f))))
    ref, out = runs
    results = [compare(n, ref[n], out[n], tolerance if tolerance is not None else default_tolerance(out[n].dtype))
               for n in src[1]]
    note = ""
    sparse = sum(c != "dense" for layer in cmp[2] for c in layer)
    if mode == "dense" and sparse:
        note = f"note: {compiled} has {sparse} sparse heads; dense mode expects an all-dense profile"
    elif mode == "lowering" and src[2] != cmp[2]:
        note = "note: the two compiled models carry different profiles; lowering mode expects the same one"
    placement = None
    if provider != "cpu":
        from blindsight.runtime.placement import node_placement

        p = node_placement(compiled, {**feeds, SPANS_INPUT: spans}, provider, threads)
        placement = {**p.to_dict(), "summary": p.summary()}
    return ParityReport(mode, provider, str(source), str(compiled), spans.tolist(),
                        {k: list(v.shape) for k, v in feeds.items()}, results, note, placement, attention)


def _parser() -> argparse.ArgumentParser:
    from blindsight.runtime.session import PROVIDERS

    p = argparse.ArgumentParser(prog="bs-check", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="the reference: the exported model (dense mode) or the reference-lowered compile (lowering mode)")
    p.add_argument("compiled", help="the compiled model to check")
    p.add_argument("--mode", choices=MODES, help="default: dense when SOURCE has no image_spans input, else lowering")
    p.add_argument("--feeds", help=".npz with every input (and optionally image_spans); default: random feeds")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--spans", help="image spans START:END,... (half-open, absolute positions); '' for none")
    g.add_argument("--images", type=int, default=DEFAULT_IMAGES, help=f"random image spans in the prompt (default {DEFAULT_IMAGES})")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help=f"new tokens per prompt (default {DEFAULT_SEQ_LEN})")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--past", type=int, default=0, help="KV-cache length fed to past_key_values.* (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, help="max relative error |a - r| / max(|r|, 1) (default: fp32 1e-4, fp16 1e-2)")
    p.add_argument("--provider", default="cpu", choices=list(PROVIDERS))
    p.add_argument("--threads", type=int)
    p.add_argument("--no-native", action="store_true",
                   help="run COMPILED on its function bodies even when the native kernel is built")
    p.add_argument("--json", action="store_true", help="print one JSON record")
    p.add_argument("--debug", action="store_true", help="show a traceback on internal errors")
    return p


def main(argv=None) -> int:
    from blindsight.errors import run_cli

    args = _parser().parse_args(argv)

    def work():
        for label, path in (("SOURCE", args.source), ("COMPILED", args.compiled)):
            if not Path(path).is_file():
                raise ModelError(f"{label} model file not found: {path}")
        spans = parse_spans(args.spans) if args.spans is not None else None
        return check(args.source, args.compiled, feeds=args.feeds, spans=spans, provider=args.provider, seed=args.seed,
                     tolerance=args.tolerance, mode=args.mode, batch=args.batch, seq_len=args.seq_len, past=args.past,
                     images=args.images, threads=args.threads, native=False if args.no_native else None)

    code, report = run_cli("bs-check", work, args.debug)
    if report is None:
        return code
    print(json.dumps(report.to_json()) if args.json else report.table())
    for o in report.failures:
        print(f"bs-check: {o.name} differs: max rel error {o.max_rel:.3g} (max abs {o.max_abs:.3g}) > tolerance {o.tolerance:g}",
              file=sys.stderr)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
