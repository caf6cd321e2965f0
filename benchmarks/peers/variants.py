"""The variants the harness can run: which engine, with which settings, and what each one is."""

from __future__ import annotations

import dataclasses

from benchmarks.peers.errors import PeersError


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    engine: str  # "project", "genai", "openvino" or "llamacpp": which worker and venv run it
    settings: dict  # what the engine's worker needs beyond the shared spec
    dense: bool  # computes the dense model: its greedy tokens should equal every other dense variant's
    precision: str  # "fp32" (the matched comparison), "default" (the engine's own choice) or "int8" (bs-quantize)
    what: str


VARIANTS = {v.name: v for v in (
    Variant("mix", "project", {"model": "mix"}, False, "fp32",
            "the project: profile mix compiled, native kernel"),
    Variant("dense", "project", {"model": "dense"}, True, "fp32",
            "the project: all-dense compile, native kernel"),
    Variant("raw", "project", {"model": "raw"}, True, "fp32",
            "the project: raw bs-export (eager attention), no compile"),
    # int8 computes another model: its tokens are compared with the dense ones, never judged
    Variant("mix-int8", "project", {"model": "mix", "weights": "int8"}, False, "int8",
            "the project with bs-quantize's int8 weights (vision tower and language model; LM head fp32): "
            "profile mix compiled, native kernel"),
    Variant("dense-int8", "project", {"model": "dense", "weights": "int8"}, False, "int8",
            "the project with bs-quantize's int8 weights: all-dense compile, native kernel"),
    Variant("mix-int8-head", "project", {"model": "mix", "weights": "int8-lm-head"}, False, "int8",
            "as mix-int8, the LM head int8 too (bs-quantize --lm-head int8)"),
    Variant("dense-int8-head", "project", {"model": "dense", "weights": "int8-lm-head"}, False, "int8",
            "as dense-int8, the LM head int8 too (bs-quantize --lm-head int8)"),
    Variant("genai", "genai", {"folder": "builder"}, True, "fp32",
            "onnxruntime-genai: its model builder's decoder (GroupQueryAttention, past and present in one buffer, "
            "logits at every position as the builder writes them by default), the prompt in one decoder call; genai's image processor, the vision "
            "tower and embedding from bs-export (the builder writes neither)"),
    Variant("genai-pruned", "genai", {"folder": "builder-pruned"}, True, "fp32",
            "onnxruntime-genai: as genai, the builder run with prune_lm_head=true (logits of the last position, "
            "as the project's export computes them)"),
    Variant("genai-dense", "genai", {"folder": "dense"}, True, "fp32",
            "onnxruntime-genai running the project's all-dense compile (bs-compile --genai), native kernel"),
    Variant("genai-mix", "genai", {"folder": "mix"}, False, "fp32",
            "onnxruntime-genai running the project's profile mix (bs-compile --genai), native kernel"),
    Variant("ov-sdpa", "openvino", {"mode": "sdpa", "precision": "f32"}, True, "fp32",
            "OpenVINO GenAI: dense, stateful SDPA"),
    Variant("ov-paged", "openvino", {"mode": "paged", "precision": "f32"}, True, "fp32",
            "OpenVINO GenAI: dense, paged attention, prefill in chunks of --chunk-size"),
    Variant("ov-trishape", "openvino", {"mode": "trishape", "precision": "f32"}, False, "fp32",
            "OpenVINO GenAI: sparse prefill TRISHAPE, paged, chunks of --chunk-size"),
    Variant("ov-xattention", "openvino", {"mode": "xattention", "precision": "f32"}, False, "fp32",
            "OpenVINO GenAI: sparse prefill XATTENTION, paged, chunks of --chunk-size"),
    Variant("ov-default-precision", "openvino", {"mode": "sdpa", "precision": "default"}, True, "default",
            "OpenVINO GenAI: dense, stateful SDPA, the CPU plugin's own precision (bf16 where the CPU has it)"),
    Variant("llama-f32", "llamacpp", {"outtype": "f32", "kv_type": "f32", "flash_attn": False}, True, "fp32",
            "llama.cpp (llama-cpp-python, mtmd): f32 GGUF, f32 KV cache, no flash attention (llama-cpp-python's "
            "default), batches of --chunk-size"),
    # llama.cpp casts K and V to f16 for flash attention (mtmd's clip.cpp and the language
    # model's graph): not the fp32 model, so its tokens are compared but not judged
    Variant("llama-f32-fa", "llamacpp", {"outtype": "f32", "kv_type": "f32", "flash_attn": True}, True, "default",
            "llama.cpp: f32 GGUF and KV cache with flash attention (K and V cast to f16 inside attention)"),
    Variant("llama-f16", "llamacpp", {"outtype": "f16", "kv_type": "f16", "flash_attn": True}, True, "default",
            "llama.cpp: f16 GGUF (the converter's default type) and f16 KV cache (llama.cpp's default), flash attention"),
)}

GROUPS = {
    "all": list(VARIANTS),
    "project": [n for n, v in VARIANTS.items() if v.engine == "project" and v.precision == "fp32"],
    "project-int8": [n for n, v in VARIANTS.items() if v.engine == "project" and v.precision == "int8"],
    # not "genai": that is the variant running genai's own decoder
    "onnxruntime-genai": [n for n, v in VARIANTS.items() if v.engine == "genai"],
    "openvino": [n for n, v in VARIANTS.items() if v.engine == "openvino"],
    "llamacpp": [n for n, v in VARIANTS.items() if v.engine == "llamacpp"],
}


def select(spec: str) -> list[Variant]:
    """Comma-separated variant or group names, in the given order, each once."""
    names: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item in GROUPS:
            names += GROUPS[item]
        elif item in VARIANTS:
            names.append(item)
        else:
            raise PeersError(f"unknown variant {item!r}; choose from {', '.join(VARIANTS)} "
                             f"or the groups {', '.join(GROUPS)}")
    if not names:
        raise PeersError("no variants selected; pass --variants with at least one name")
    return [VARIANTS[n] for n in dict.fromkeys(names)]


#: the project's int8 conversions (made from its fp32 one), by the variants' "weights" setting
INT8_CONVERSIONS = {"int8": "project-int8", "int8-lm-head": "project-int8-lm-head"}


def conversion_of(v: Variant) -> str:
    """The conversion a variant runs: its engine's, or one of the project's int8 ones."""
    return INT8_CONVERSIONS.get(v.settings.get("weights"), v.engine)


def describe() -> str:
    width = max(map(len, VARIANTS))
    return "\n".join(f"  {n:<{width}}  {v.what}" for n, v in VARIANTS.items())
