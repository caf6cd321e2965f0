"""Decode-level benchmark: one token after a multi-image context, the KV-cache
export of a Qwen2-VL-2B-sized language model (random weights) raw vs compiled
with the profile mix (docs/specification.md §6: interleaved, medians).

Decode steps are text queries, dense for every category (docs/specification.md §2), so the
compiled model can only lose here: the figure to hold is tokens per second at
least the raw export's. The vocabulary is cut as in the prefill level
(:data:`prefill.BENCH_VOCAB`): a 151,936-row LM head would be most of a 4-layer
step and hide the attention this measures.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blindsight.bench.prefill import PrefillCase, _qwen2_vl_config, profile_mix
from blindsight.flops import Template
from blindsight.profile import Profile

IMAGES = 4  # the context holds 4 images; text as in docs/specification.md §6's template


@dataclass(frozen=True)
class DecodeCase:
    model: str = "qwen2-vl-2b"
    num_layers: int = 4

    def dims(self):
        return PrefillCase(self.model, self.num_layers).dims()

    def key(self) -> str:
        return f"{self.model}_l{self.num_layers}_kv"


def context_template(context: int) -> Template:
    """4 images sized so that docs/specification.md §6's template (prefix 24, gap 8, question 32) spans ``context`` tokens."""
    text = 24 + 32 + 8 * IMAGES
    if context < text + IMAGES:
        raise ValueError(f"a decode context needs at least {text + IMAGES} tokens, got {context}")
    length, extra = divmod(context - text, IMAGES)
    return Template(IMAGES, length, question=32 + extra)


def build(case: DecodeCase, work_dir: Path) -> dict[str, Path]:
    """KV-cache export (cached in work_dir) and its compile with the profile mix: {"raw", "mix"}."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from blindsight.compiler.pipeline import compile_model
    from blindsight.models.export_kv import export_language_model_with_cache

    if not case.model.startswith("qwen2-vl"):
        raise ValueError("the decode benchmark builds Qwen2-VL text models; pick qwen2-vl-2b or qwen2-vl-7b")
    dims = case.dims()
    work_dir.mkdir(parents=True, exist_ok=True)
    raw = work_dir / f"{case.key()}.onnx"
    if not raw.is_file():
        torch.manual_seed(0)
        model = Qwen2VLForConditionalGeneration._from_config(_qwen2_vl_config(dims), attn_implementation="eager",
                                                             dtype=torch.float32).eval()
        tmp = raw.with_name(f".{raw.name}.tmp.onnx")
        export_language_model_with_cache("qwen2_vl", model, tmp)
        tmp.replace(raw)
    mix = work_dir / f"{case.key()}.mix.onnx"
    compile_model(raw, Profile(profile_mix(dims), num_kv_heads=dims.num_kv_heads), mix, "fast")
    return {"raw": raw, "mix": mix}


def feeds(case: DecodeCase, context: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One new token after ``context`` cached tokens (random keys and values)."""
    dims, t = case.dims(), context_template(context)
    rng = np.random.default_rng(seed)
    out = {
        "inputs_embeds": rng.standard_normal((1, 1, dims.hidden_size), dtype=np.float32),
        "position_ids": np.full((3, 1, 1), context, dtype=np.int64),
        "attention_mask": np.ones((1, context + 1), dtype=np.int64),
        "image_spans": t.spans,
    }
    for i in range(dims.num_layers):
        for kv in ("key", "value"):
            out[f"past_key_values.{i}.{kv}"] = rng.standard_normal((1, dims.num_kv_heads, context, dims.head_dim), dtype=np.float32)
    return out


def run(case, contexts, threads, repeats, work_dir, bar, provider="cpu") -> list[dict]:
    """bs-bench --level decode: one token after each context of ``contexts``, the raw
    export against the profile-mix compile; one row each."""
    from blindsight.bench.timing import interleaved, session

    paths = build(case, work_dir)
    bar.update(1)
    out = []
    for context in contexts:
        f = feeds(case, context)
        runs = {}
        for name in ("raw", "mix"):
            sess = session(paths[name], threads, provider)
            names = {i.name for i in sess.get_inputs()}
            inputs = {n: v for n, v in f.items() if n in names}
            runs[name] = lambda sess=sess, inputs=inputs: sess.run(None, inputs)
        med = interleaved(runs, repeats, progress=bar)
        out.append({"model": case.dims().name, "context": context, "provider": provider, "dtype": "float32",
                    "images": IMAGES, "raw_s": med["raw"], "compiled_s": med["mix"],
                    "raw_tokens_per_s": 1 / med["raw"], "compiled_tokens_per_s": 1 / med["mix"],
                    "ratio": med["raw"] / med["mix"]})
        del runs
        gc.collect()
    return out
