"""Model-level benchmark: the whole KV-cache language model of a full-size
configuration (:mod:`blindsight.models.fullsize`, random weights), raw export
vs compiled all-dense vs compiled with the profile mix. Time to first token is
one prefill of a multi-image prompt (empty cache); decode is one token after
that context (docs/specification.md §6: interleaved, medians).

Unlike the prefill level nothing is cut: every layer, the real vocabulary. The
graph computes the logits of the last position only, as bs-export writes it
by default (``ModelCase.logits = "all"``: every position; the FLOP accounting
counts what the graph computes).

The three graphs share one external-data file (bs-compile keeps the export's
references). Their sessions run without MatMul pre-packing, so ONNX Runtime
leaves the weights in the file mapping, which the three share, instead of a
packed private copy each: a 2B model in fp32 is 6 GB once, not three times.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from blindsight.attention.schema import SHORT_DTYPES
from blindsight.attention.spans import token_type_ids
from blindsight.flops import Template, count_flops, model_dims
from blindsight.flops.dims import ModelDims
from blindsight.profile import Profile

#: session configuration of every variant (see the module docstring)
SESSION_CONFIG = {"session.disable_prepacking": "1"}
#: the graphs a model-level run can time: the raw export, the all-dense compile, the profile mix
GRAPHS = ("raw", "dense", "mix")
#: the decode row of the compiled mix run as a plain session.run (no cache buffers)
PLAIN = "mix-plain"
#: the warm-up prompt: every kernel runs once before the timed prefills
WARMUP = Template(1, 16)


@dataclass(frozen=True)
class ModelCase:
    config: str = "qwen2-vl-2b"  # a full-size configuration (blindsight.models.fullsize.FULL_SIZE)
    num_images: int = 4
    image_len: int = 1024
    dtype: str = "fp32"  # bs-export's names
    overrides: dict | None = field(default=None, hash=False)  # shrinks the configuration (tests)
    logits: str = "last"  # bs-export's --logits: the positions the LM head runs on
    chunk: int | None = None  # prefill through the KV cache in chunks of this many tokens (None: one call)
    first_dense: bool = True  # the mix keeps layer 0 dense, as calibrated profiles do; False: every layer mixed

    @property
    def template(self) -> Template:
        return Template(self.num_images, self.image_len)

    def transformers_config(self):
        from blindsight.models.fullsize import full_config

        return full_config(self.config, self.overrides)[0]

    def dims(self):
        return replace(model_dims(self.transformers_config()), name=self.config + (" (shrunk)" if self.overrides else ""))

    def key(self) -> str:
        tag = "" if not self.overrides else "_" + hashlib.sha256(json.dumps(self.overrides, sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.config}{tag}_{self.dtype}_kv" + ("" if self.logits == "all" else f"_{self.logits}")


def layers_of(dims, name: str, first_dense: bool = True) -> list[list[str]]:
    """The timed profiles: "dense" everywhere, or "mix": the op-level benchmark's mixed layer
    in every layer (layer 0 dense with ``first_dense``)."""
    if name == "dense":
        return [["dense"] * dims.num_heads for _ in range(dims.num_layers)]
    return Profile.mixed(dims.num_layers, dims.num_heads, first_dense=first_dense).layers


def build(case: ModelCase, work_dir: Path, progress: bool = True) -> dict[str, Path]:
    """The structure export (cached in work_dir) and its compiles: {"raw", "dense", "mix"} -> paths."""
    from blindsight.compiler.pipeline import compile_model
    from blindsight.models.fullsize import export_language_model_structure

    dims = case.dims()
    work_dir.mkdir(parents=True, exist_ok=True)
    raw = work_dir / f"{case.key()}.onnx"
    if not raw.is_file():
        export_language_model_structure(case.config, raw, dtype=case.dtype, overrides=case.overrides, progress=progress,
                                        logits=case.logits)
    paths = {"raw": raw}
    for name in ("dense", "mix"):
        out = work_dir / f"{case.key()}.{name}.onnx"
        compile_model(raw, Profile(layers_of(dims, name, case.first_dense), num_kv_heads=dims.num_kv_heads), out, "fast")
        paths[name] = out
    return paths


def _inputs(sess, t: Template, dims, dtype, past: int, seed: int) -> dict[str, np.ndarray]:
    """Feeds of ``sess`` for the prompt ``t``: its whole prefill (``past`` 0) or
    one token after it (``past`` = t.seq_len, a random cache)."""
    rng = np.random.default_rng(seed)
    np_dtype = SHORT_DTYPES[dtype]
    S = t.seq_len
    new = S if past == 0 else 1
    spans = t.spans
    out = {}
    for i in sess.get_inputs():
        if i.name == "inputs_embeds":
            out[i.name] = rng.standard_normal((1, new, dims.hidden_size), dtype=np.float32).astype(np_dtype)
        elif i.name == "position_ids":
            pos = np.arange(past, past + new, dtype=np.int64)[None]
            out[i.name] = np.broadcast_to(pos, (3, 1, new)).copy() if len(i.shape) == 3 else pos
        elif i.name == "attention_mask":
            out[i.name] = np.ones((1, past + new), dtype=np.int64)
        elif i.name == "token_type_ids":  # Gemma 3: the soft tokens (span interiors, docs/specification.md §2) of the new positions
            out[i.name] = token_type_ids(spans, new, past, rows=1)
        elif i.name == "image_spans":
            out[i.name] = spans
        elif i.name.startswith("past_key_values."):
            out[i.name] = rng.standard_normal((1, dims.num_kv_heads, past, dims.head_dim), dtype=np.float32).astype(np_dtype)
        else:
            raise ValueError(f"the model-level benchmark does not know how to feed input {i.name!r}")
    return out


def prefill(sess, feeds: dict, chunk: int | None, image_blocks: bool = False):
    """One prefill of ``feeds`` (a whole prompt, empty cache): one call, or chunks
    of ``chunk`` tokens through the KV cache, each fed the previous chunk's presents
    and the whole prompt's spans. Returns the last call's logits."""
    if chunk is None:
        return sess.run(["logits"], feeds)[0]
    from blindsight.attention.spans import chunk_bounds

    names = [o.name for o in sess.get_outputs()]
    seq = feeds["inputs_embeds"].shape[1]
    spans = feeds.get("image_spans", np.zeros((0, 2), np.int64))
    past = {k: v for k, v in feeds.items() if k.startswith("past_key_values.")}
    for start, end in chunk_bounds(seq, chunk, spans, image_blocks):
        step = {"inputs_embeds": feeds["inputs_embeds"][:, start:end], "position_ids": feeds["position_ids"][..., start:end],
                "attention_mask": np.ones((1, end), dtype=np.int64), **past}
        if "image_spans" in feeds:
            step["image_spans"] = spans
        if "token_type_ids" in feeds:
            step["token_type_ids"] = feeds["token_type_ids"][:, start:end]
        outs = dict(zip(names, sess.run(None, step)))
        past = {k.replace("present.", "past_key_values.", 1): v for k, v in outs.items() if k.startswith("present.")}
    return outs["logits"]


def decode_step(sess, t: Template, dims, dtype, steps: int):
    """A decode step as the pipeline runs it: one new token on a random cache of
    ``t.seq_len`` tokens held in :class:`~blindsight.runtime.kv_cache.KVBuffers`,
    which ONNX Runtime writes the new cache into; each call adds its token (the
    context grows by one per call, as in generation); a call returns the outputs
    other than the cache."""
    from blindsight.runtime.kv_cache import KVBuffers, cache_names, run_with_cache

    feeds = _inputs(sess, t, dims, dtype, t.seq_len, seed=2)
    past = {k: feeds.pop(k) for k in list(feeds) if k.startswith("past_key_values.")}
    # room for the warm-up round and every timed step
    cache = KVBuffers(cache_names(dims.num_layers), dims.num_kv_heads, dims.head_dim, t.seq_len + steps + 2,
                      SHORT_DTYPES[dtype])
    cache.load(past)
    del past

    def call():
        n = cache.length
        feeds["attention_mask"] = np.ones((1, n + 1), dtype=np.int64)
        feeds["position_ids"] = np.full(feeds["position_ids"].shape, n, dtype=np.int64)
        return run_with_cache(sess, feeds, cache, 1)
    return call


def open_sessions(paths: dict[str, Path], threads: int, provider: str = "cpu", native: bool | None = None) -> dict:
    """The graphs' sessions as they are timed: no arena, SESSION_CONFIG, the raw export on
    ONNX operators and the compiled graphs on the route ``native`` picks."""
    from blindsight.bench.timing import session

    return {k: session(p, threads, provider, arena=False, native=False if k == "raw" else native, config=SESSION_CONFIG)
            for k, p in paths.items()}


def warm_up(sessions: dict, dims, dtype: str) -> dict[str, np.ndarray]:
    """Every kernel runs once on the short WARMUP prompt; each graph's logits (float64)."""
    return {k: s.run(["logits"], _inputs(s, WARMUP, dims, dtype, 0, seed=1))[0].astype(np.float64)
            for k, s in sessions.items()}


def time_to_first_token(sessions: dict, case: ModelCase, dims, repeats: int, progress=None) -> tuple[dict, dict]:
    """Median seconds of one prefill of ``case.template`` per graph (interleaved, no extra
    warm-up round: see :func:`warm_up`), and each graph's last logits."""
    from blindsight.bench.timing import interleaved

    feeds = {k: _inputs(s, case.template, dims, case.dtype, 0, seed=0) for k, s in sessions.items()}
    logits: dict[str, np.ndarray] = {}

    def timed(k):
        def call():
            logits[k] = prefill(sessions[k], feeds[k], case.chunk, dims.image_blocks)
        return call

    return interleaved({k: timed(k) for k in sessions}, repeats, warmup=0, progress=progress), logits


def run(case: ModelCase, work_dir: Path, threads: int = 2, repeats: int = 3, decode_repeats: int = 10,
        provider: str = "cpu", native: bool | None = None, memory: bool = True, progress=None,
        graphs: tuple[str, ...] = GRAPHS) -> dict:
    """Time to first token and decode of ``graphs`` (some of raw, dense, mix; mix always); the record bs-bench reports.
    Decode compares the mix with the raw export, or with the all-dense compile when the raw export is left out."""
    import gc

    from blindsight.bench.timing import interleaved, measure_in_child, peak_rss_mb
    from blindsight.runtime.session import external_data_bytes

    def tick(n=1):
        if progress is not None:
            progress.update(n)

    dims, t = case.dims(), case.template
    paths = build(case, work_dir, progress=progress is not None and not progress.disable)
    weights = external_data_bytes(paths["raw"])
    paths = {k: p for k, p in paths.items() if k in graphs}
    tick()
    sessions = open_sessions(paths, threads, provider, native)
    route = sessions["mix"].blindsight_attention
    # warm-up on a short prompt, which doubles as the check that the timed graphs agree
    warm = warm_up(sessions, dims, case.dtype)
    agree = float(np.abs(warm["dense"] - warm["raw"]).max()) if {"raw", "dense"} <= set(warm) else None
    ttft, _ = time_to_first_token(sessions, case, dims, repeats, progress)
    base = "raw" if "raw" in sessions else "dense" if "dense" in sessions else None
    decode_graphs = [k for k in (base, "mix") if k]
    steps = {k: decode_step(sessions[k], t, dims, case.dtype, decode_repeats) for k in decode_graphs}
    # the same step as a plain session.run, the cache in and out as fresh arrays (what the pipeline did before)
    plain = _inputs(sessions["mix"], t, dims, case.dtype, t.seq_len, seed=2)
    steps[PLAIN] = lambda s=sessions["mix"], f=plain: s.run(None, f)
    decode = interleaved(steps, decode_repeats, progress=progress)
    process_peak = peak_rss_mb()
    del sessions, steps, plain
    gc.collect()
    mem = {}
    if memory:
        for k, p in paths.items():
            mem[k] = measure_in_child("blindsight.bench.model", {"case": vars(case), "dims": asdict(dims), "path": str(p),
                                                                 "threads": threads, "provider": provider, "native": native,
                                                                 "raw": k == "raw"})["peak_rss_mb"]
            tick()
    fl = count_flops(dims, layers_of(dims, "mix", case.first_dense), t.spans, t.seq_len, logit_positions=t.seq_len if case.logits == "all" else 1).to_dict()
    rec = {
        "model": dims.name, "num_layers": dims.num_layers, "vocab_size": dims.vocab_size, "dtype": SHORT_DTYPES[case.dtype],
        "provider": provider, "N": case.num_images, "L": case.image_len, "seq_len": t.seq_len, "chunk": case.chunk,
        "attention": route, "weights_bytes": weights, "graphs": list(paths),
        # the cache the prompt fills, K and V of every layer (the memory goal: weights + this + 1.5 GB)
        "kv_cache_bytes": 2 * dims.num_layers * dims.num_kv_heads * dims.head_dim * t.seq_len * np.dtype(SHORT_DTYPES[case.dtype]).itemsize,
        "ttft_s": ttft, "flop_bound": fl["prefill_bound"], "attention_flop_bound": fl["attention_bound"],
        "dense_vs_raw_max_abs_logit_diff": agree,
        "decode_s": decode, "decode_baseline": base, "compiled_tokens_per_s": 1 / decode["mix"],
        "decode_cache": "bound", "bound_vs_plain_decode": decode[PLAIN] / decode["mix"],
        "peak_rss_mb": mem or None, "process_peak_rss_mb": process_peak,
        "session_config": SESSION_CONFIG, "repeats": repeats, "decode_repeats": decode_repeats,
    }
    if "dense" in ttft:
        rec["speedup"] = ttft["dense"] / ttft["mix"]
        rec["efficiency"] = rec["speedup"] / fl["prefill_bound"]
    if "raw" in ttft:
        rec["vs_raw_export"] = ttft["raw"] / ttft["mix"]
        if "dense" in ttft:
            rec["dense_vs_raw_export"] = ttft["raw"] / ttft["dense"]
    if base:
        rec[f"{base}_tokens_per_s"] = 1 / decode[base]
        rec["decode_ratio"] = decode[base] / decode["mix"]
    return rec


def _child() -> None:
    """Peak RSS of one variant's prefill in a fresh process (timing.measure_in_child). The
    dimensions come from the parent: reading them here would import transformers and
    torch (0.36 GB resident, measured), which a deployment does not load."""
    import sys

    from blindsight.bench.timing import peak_rss_mb, reset_peak_rss, session

    args = json.loads(sys.stdin.read())
    case = ModelCase(**args["case"])
    native = False if args["raw"] else args["native"]
    sess = session(args["path"], args["threads"], args["provider"], arena=False, native=native, config=SESSION_CONFIG)
    dims = ModelDims(**{k: tuple(v) if isinstance(v, list) else v for k, v in args["dims"].items()})
    feeds = _inputs(sess, case.template, dims, case.dtype, 0, seed=0)
    reset_peak_rss()
    prefill(sess, feeds, case.chunk, dims.image_blocks)
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "torch_loaded": "torch" in sys.modules}))


if __name__ == "__main__":
    _child()
