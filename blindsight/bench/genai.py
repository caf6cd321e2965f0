"""genai level: onnxruntime-genai running the decoder its own model builder
wrote, against genai running the same decoder compiled by bs-compile (all-dense
and the profile mix), at a full-size configuration's width and vocabulary
(random weights), in each precision the builder writes (fp32, int4).

The checkpoint comes from :mod:`blindsight.models.fullsize` (text layers cut to
``layers`` where asked, the vision tower to one block: genai's builder writes
the text decoder only); the builder runs with ``prune_lm_head=true``, so every
graph computes the last position's logits in prefill, as a long-prompt user
builds it. The prompt is the benchmark template's token ids (text ids drawn at
random, each image ``<|vision_start|>``, pads, ``<|vision_end|>``); the compiled
folders get ``image_spans`` from those ids (:func:`~blindsight.runtime.genai.spans_from_ids`)
through ``Generator.set_model_input``.

Time to first token is ``append_tokens`` (the prefill) plus the first
``generate_next_token`` (picking the token); decode is the median of the next
``decode_steps`` calls, each one decoder step. Variants are timed interleaved,
one whole generation each per round (docs/specification.md §6). All graphs
run with the same session options: genai's defaults plus ``threads``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blindsight.bench.model import layers_of
from blindsight.errors import BlindSightError
from blindsight.flops import Template, count_flops, model_dims
from blindsight.profile import Profile

#: the configurations genai's builder turns into a decoder that bs-compile takes (model type qwen2_5_vl_text)
GENAI_CONFIGS = ("qwen2.5-vl-3b", "qwen2.5-vl-7b")
PRECISIONS = ("fp32", "int4")
VARIANTS = ("genai", "dense", "mix")

@dataclass(frozen=True)
class GenaiCase:
    config: str = "qwen2.5-vl-3b"
    num_images: int = 4
    image_len: int = 1024
    layers: int | None = 4  # text decoder layers (None: the configuration's depth); full width and vocabulary either way
    precisions: tuple[str, ...] = PRECISIONS
    decode_steps: int = 16

    @property
    def template(self) -> Template:
        return Template(self.num_images, self.image_len)

    def overrides(self) -> dict:
        text = {"num_hidden_layers": self.layers} if self.layers else {}
        return {"text_config": text, "vision_config": {"depth": 1}}

    def dims(self):
        from blindsight.models.fullsize import full_config

        return model_dims(full_config(self.config, self.overrides())[0])

    def key(self) -> str:
        return f"genai_{self.config}_l{self.layers or 'all'}"


def check(case: GenaiCase) -> None:
    if case.config not in GENAI_CONFIGS:
        raise BlindSightError(f"the genai level runs {', '.join(GENAI_CONFIGS)} (the builder's qwen2_5_vl decoder); "
                              f"got --model-config {case.config}")
    bad = [p for p in case.precisions if p not in PRECISIONS]
    if bad or not case.precisions:
        raise BlindSightError(f"--genai-precisions: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(PRECISIONS)}")
    if case.layers is not None and case.layers < 2:
        raise BlindSightError("--model-layers must be >= 2 (the profile mix keeps layer 0 dense)")
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        raise BlindSightError("the genai level needs onnxruntime-genai: pip install -e '.[genai,export]'") from None


def build(case: GenaiCase, work_dir: Path, threads: int, native: bool | None, progress=None) -> dict[str, dict[str, Path]]:
    """{precision: {"genai": builder folder, "dense": compiled, "mix": compiled}}, cached in work_dir."""
    from blindsight.compiler.genai import GENAI_CONFIG, compile_genai_folder
    from blindsight.models.fullsize import write_random_checkpoint
    from blindsight.models.genai import build_decoder, flatten_rope, shrink_context

    dims = case.dims()
    base = work_dir / case.key()
    ckpt = base / "checkpoint"
    context = case.template.seq_len + case.decode_steps + 64
    if not ckpt.is_dir():
        write_random_checkpoint(case.config, ckpt, dtype="fp32", overrides=case.overrides(), progress=progress is not None)
        shrink_context(ckpt, context)
        flatten_rope(ckpt)
    out = {}
    for precision in case.precisions:
        own = base / precision
        if not (own / "model.onnx").is_file():
            build_decoder(sys.executable, ckpt, own, precision=precision, extra_options={"prune_lm_head": "true"})
        config_path = own / GENAI_CONFIG
        config = json.loads(config_path.read_text())
        config["model"]["decoder"].setdefault("session_options", {}).update(intra_op_num_threads=threads, inter_op_num_threads=1)
        config_path.write_text(json.dumps(config, indent=4) + "\n")
        out[precision] = {"genai": own}
        for name in ("dense", "mix"):
            profile = Profile(layers_of(dims, name), num_kv_heads=dims.num_kv_heads)
            folder = base / f"{precision}.{name}"
            compile_genai_folder(own, profile, folder, native=native, overwrite=True)
            out[precision][name] = folder
        if progress is not None:
            progress.update(1)
    return out


def prompt_ids(case: GenaiCase, folder: Path, seed: int = 0) -> np.ndarray:
    """The template's token ids: text ids drawn at random below the tokenizer's first special
    token, each image span ``<|vision_start|>``, ``<|image_pad|>``s, ``<|vision_end|>``."""
    from blindsight.runtime.genai import delimiters_of

    t, delim = case.template, delimiters_of(folder)
    added = {a["content"]: int(a["id"]) for a in json.loads((folder / "tokenizer.json").read_text())["added_tokens"]}
    if "<|image_pad|>" not in added:
        raise BlindSightError(f"{folder / 'tokenizer.json'} has no <|image_pad|> token: not a Qwen2.5-VL tokenizer")
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, min(added.values()), size=t.seq_len)
    pad = added["<|image_pad|>"]
    for start, end in t.spans:
        ids[start], ids[start + 1:end - 1], ids[end - 1] = delim.start, pad, delim.end
    return ids.astype(np.int32)


class _Variant:
    """One genai model and a fresh generator per generation (genai takes one set_model_input per generator)."""

    def __init__(self, folder: Path, ids: np.ndarray, spans: np.ndarray | None, max_length: int):
        import onnxruntime_genai as og

        self.og, self.model, self.ids, self.spans, self.max_length = og, og.Model(str(folder)), ids, spans, max_length

    def generate(self, steps: int) -> dict:
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_length, do_sample=False)
        gen = og.Generator(self.model, params)
        if self.spans is not None:
            gen.set_model_input("image_spans", self.spans)
        t0 = time.perf_counter()
        gen.append_tokens(self.ids)
        t1 = time.perf_counter()
        gen.generate_next_token()
        ttft = time.perf_counter() - t0
        tokens, step_s = [int(gen.get_next_tokens()[0])], []
        for _ in range(steps):
            s0 = time.perf_counter()
            gen.generate_next_token()
            step_s.append(time.perf_counter() - s0)
            tokens.append(int(gen.get_next_tokens()[0]))
        return {"ttft": ttft, "prefill": t1 - t0, "decode": float(np.median(step_s)) if step_s else None, "tokens": tokens}


def run_precision(folders: dict[str, Path], case: GenaiCase, repeats: int, progress=None) -> dict:
    """Interleaved generations of the three folders of one precision."""
    from blindsight.runtime.genai import spans_from_ids

    ids = prompt_ids(case, folders["genai"])
    spans = spans_from_ids(ids, folders["genai"])
    if not np.array_equal(spans, case.template.spans):
        raise BlindSightError(f"the prompt's spans from its ids {spans.tolist()} differ from the template's")
    max_length = case.template.seq_len + case.decode_steps + 1
    variants = {k: _Variant(f, ids, None if k == "genai" else spans, max_length) for k, f in folders.items()}
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for r in range(repeats + 1):  # round 0 warms up
        for k, v in variants.items():
            res = v.generate(case.decode_steps)
            if r:
                runs[k].append(res)
            if progress is not None:
                progress.update(1)
    med = {k: {m: float(np.median([x[m] for x in rs])) for m in ("ttft", "prefill", "decode")} for k, rs in runs.items()}
    tokens = {k: rs[-1]["tokens"] for k, rs in runs.items()}
    return {"seconds": med, "tokens": tokens, "dense_tokens_equal_genai": tokens["dense"] == tokens["genai"],
            "speedup_mix_vs_dense": med["dense"]["ttft"] / med["mix"]["ttft"],
            "speedup_mix_vs_genai": med["genai"]["ttft"] / med["mix"]["ttft"],
            "dense_vs_genai": med["genai"]["ttft"] / med["dense"]["ttft"],
            "decode_tokens_per_s": {k: 1 / m["decode"] for k, m in med.items() if m["decode"]},
            "decode_ratio_mix_vs_genai": med["genai"]["decode"] / med["mix"]["decode"]}


def run(case: GenaiCase, work_dir: Path, threads: int = 2, repeats: int = 3, native: bool | None = None,
        progress=None) -> dict:
    """The record bs-bench --level genai reports."""
    from blindsight import native as native_kernel
    from blindsight.bench.timing import peak_rss_mb
    from blindsight.models.genai import builder_versions
    from blindsight.runtime.session import external_data_bytes

    check(case)
    dims, t = case.dims(), case.template
    folders = build(case, work_dir, threads, native, progress)
    fl = count_flops(dims, layers_of(dims, "mix"), t.spans, t.seq_len, logit_positions=1).to_dict()
    out = {"model": case.config, "num_layers": dims.num_layers, "vocab_size": dims.vocab_size, "N": case.num_images,
           "L": case.image_len, "seq_len": t.seq_len, "decode_steps": case.decode_steps, "repeats": repeats,
           "flop_bound": fl["prefill_bound"], "attention_flop_bound": fl["attention_bound"],
           "attention": "native kernel" if native is not False and native_kernel.library_path() else "function bodies",
           "versions": builder_versions(sys.executable), "precisions": {}}
    for precision, f in folders.items():
        rec = run_precision(f, case, repeats, progress)
        rec["weights_bytes"] = external_data_bytes(f["genai"] / "model.onnx")
        rec["efficiency"] = rec["speedup_mix_vs_dense"] / fl["prefill_bound"]
        out["precisions"][precision] = rec
    out["process_peak_rss_mb"] = peak_rss_mb()
    return out
