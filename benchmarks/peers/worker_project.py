"""One measurement of the project: a bs-export directory through blindsight's Pipeline.

Run as ``python worker_project.py SPEC.json`` in an interpreter where blindsight is
installed. Spec keys: export_dir, model (a language-model .onnx path, or "dense"
for the raw export), native, images, question, threads, chunk_size,
prepack (auto, on, off), max_new_tokens, warmup, out.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from worker_common import run  # noqa: E402


def measure(spec: dict) -> dict:
    from blindsight.runtime.pipeline import Pipeline

    pipe = Pipeline(spec["export_dir"], compiled=spec["model"], threads=spec["threads"],
                    native=spec["native"], chunk_size=spec["chunk_size"], prepack=spec.get("prepack", "auto"))
    if spec["warmup"]:
        pipe.generate(spec["images"], spec["question"], max_new_tokens=1)
    t0 = time.perf_counter()
    r = pipe.generate(spec["images"], spec["question"], max_new_tokens=spec["max_new_tokens"])
    generate_s = time.perf_counter() - t0
    image_token = int(pipe.template["image_token_id"])
    return {
        "ttft_s": r.ttft_s,
        # everything before the language model (prompt, image preprocessing, vision
        # encoder, embeddings): what OpenVINO reports as preparing the embeddings
        "vision_s": r.ttft_s - r.prefill_s,
        "prefill_s": r.prefill_s,
        "decode_tokens_per_s": r.tokens_per_s or None,
        "prompt_tokens": r.prefill_tokens,
        "image_tokens": r.prompt_ids.count(image_token),
        "token_counts_from": "the pipeline's prompt ids",
        "tokens": r.token_ids,
        "text": r.text,
        "generate_s": generate_s,
        "details": {"attention": pipe.attention, "prepack": pipe.prepack, "prefill_chunks": r.prefill_chunks,
                    # wall time of each tower call, beside genai's vision_runs_s (its profiler's model_run)
                    "vision_runs_s": [round(t, 6) for t in r.vision_runs_s],
                    "language_model": Path(str(pipe.model_path)).name},
    }


if __name__ == "__main__":
    sys.exit(run(measure))
