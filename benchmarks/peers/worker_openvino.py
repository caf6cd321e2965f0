"""One measurement of OpenVINO GenAI: an optimum-cli export through ``VLMPipeline``.

Run as ``VENV/bin/python worker_openvino.py SPEC.json`` in the OpenVINO venv.
Spec keys: model_dir, mode (sdpa, paged, trishape, xattention), precision (f32 or
default), images, question, threads, chunk_size (max_num_batched_tokens of the
paged and sparse modes), sparse (SparseAttentionConfig fields to override),
max_new_tokens, warmup, out.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from worker_common import run  # noqa: E402


def pipeline_properties(spec: dict, g) -> dict:
    props = {"INFERENCE_NUM_THREADS": int(spec["threads"])}
    if spec["precision"] == "f32":
        # the CPU plugin picks bf16 by itself where the CPU has AVX512-BF16 or AMX
        props["INFERENCE_PRECISION_HINT"] = "f32"
    if spec["mode"] == "sdpa":
        # dense and stateful: the language model keeps its KV cache in its state, no scheduler
        props["ATTENTION_BACKEND"] = "SDPA"
        return props
    sched = g.SchedulerConfig()
    # the prompt is prefilled in chunks of this many tokens (the paged scheduler's batch)
    sched.max_num_batched_tokens = int(spec["chunk_size"])
    if spec["mode"] in ("trishape", "xattention"):
        sched.use_sparse_attention = True
        sparse = g.SparseAttentionConfig()
        sparse.mode = getattr(g.SparseAttentionMode, spec["mode"].upper())
        for key, value in (spec.get("sparse") or {}).items():
            setattr(sparse, key, type(getattr(sparse, key))(value))
        sched.sparse_attention_config = sparse
    props["ATTENTION_BACKEND"] = "PA"
    props["scheduler_config"] = sched
    return props


def _type_name(t) -> str:
    return t.to_string() if hasattr(t, "to_string") else str(t)


def _one_token(pipe):
    config = pipe.get_generation_config()
    config.max_new_tokens = 1
    config.do_sample = False
    return config


def measure(spec: dict) -> dict:
    import numpy as np
    import openvino as ov
    import openvino_genai as g
    from PIL import Image

    class TokenIds(g.StreamerBase):
        """Collects the generated token ids (results only carry text)."""

        def __init__(self):
            super().__init__()
            self.ids = []

        def write(self, token):
            self.ids.extend([token] if isinstance(token, int) else list(token))
            return g.StreamingStatus.RUNNING

        def end(self):
            pass

    props = pipeline_properties(spec, g)
    pipe = g.VLMPipeline(spec["model_dir"], "CPU", **props)
    images = [ov.Tensor(np.asarray(Image.open(p).convert("RGB"))[None]) for p in spec["images"]]
    config = pipe.get_generation_config()
    config.max_new_tokens = int(spec["max_new_tokens"])
    config.do_sample = False
    if spec["warmup"]:
        pipe.generate(spec["question"], images=images, generation_config=_one_token(pipe))
    streamer = TokenIds()
    t0 = time.perf_counter()
    result = pipe.generate(spec["question"], images=images, generation_config=config, streamer=streamer)
    generate_s = time.perf_counter() - t0
    metrics = result.perf_metrics
    prompt_tokens = int(metrics.get_num_input_tokens())
    # the engine exposes no image-token count: the same question without images,
    # counted by the same pipeline (untimed, after the measurement), leaves the
    # image blocks, each <|vision_start|> + image tokens + <|vision_end|>
    text_only = pipe.generate(spec["question"], images=[], generation_config=_one_token(pipe))
    image_tokens = prompt_tokens - int(text_only.perf_metrics.get_num_input_tokens()) - 2 * len(images)
    ttft = metrics.get_ttft().mean / 1e3
    # preparing the embeddings: image preprocessing, vision encoder, text embeddings, merge
    vision = metrics.get_prepare_embeddings_duration().mean / 1e3
    tpot_ms = metrics.get_tpot().mean
    generated = metrics.get_num_generated_tokens()
    return {
        "ttft_s": ttft,
        "vision_s": vision,
        "prefill_s": ttft - vision,
        "decode_tokens_per_s": 1e3 / tpot_ms if generated > 1 and tpot_ms > 0 else None,
        "prompt_tokens": prompt_tokens,
        "image_tokens": image_tokens,
        "token_counts_from": "perf_metrics.get_num_input_tokens(), with and without the images",
        "tokens": streamer.ids,
        "text": result.texts[0],
        "generate_s": generate_s,
        "details": {"properties": {k: (v if isinstance(v, (int, str)) else v.to_string()) for k, v in props.items()},
                    # what the CPU plugin runs at when not told: f32, or bf16 on CPUs with AVX512-BF16 / AMX
                    "cpu_default_precision": _type_name(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))},
    }


if __name__ == "__main__":
    sys.exit(run(measure))
