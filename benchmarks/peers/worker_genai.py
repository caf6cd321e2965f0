"""One measurement of onnxruntime-genai: a genai VLM folder through ``og.Generator``.

Run as ``PYTHON worker_genai.py SPEC.json`` with an interpreter that has
onnxruntime-genai. Spec keys: model_dir (a genai folder of type qwen2_5_vl whose
tower computes its index inputs, as bs-compile --genai writes it), prompt (the
chat-template text with one image placeholder per image), images, threads,
max_new_tokens, warmup, out. genai's processor output goes to the generator as it is.

genai times nothing itself. The run's clock starts before its image processor and
stops at the first generated token. Its vision and embedding sessions are profiled
by ONNX Runtime (the session option ``enable_profiling``; the decoder is not), and
their ``model_run`` durations, with the processor and the index inputs, make the
vision part; the language prefill is the rest of the first token.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from worker_common import run  # noqa: E402

PROFILED = ("vision", "embedding")


def session_overlay(threads: int, profile_prefix: str) -> dict:
    """genai_config settings for this run: every session on ``threads`` threads, and
    the vision and embedding sessions profiled (file names start with the prefix)."""
    model = {}
    for name in ("decoder", *PROFILED):
        options = {"intra_op_num_threads": int(threads), "inter_op_num_threads": 1}
        if name in PROFILED:
            options["enable_profiling"] = f"{profile_prefix}-{name}"
        model[name] = {"session_options": options}
    return {"model": model}


def model_runs(profile_prefix: str, name: str) -> list[float]:
    """Seconds of each ``model_run`` of one profiled session, in order."""
    files = sorted(Path(profile_prefix).parent.glob(f"{Path(profile_prefix).name}-{name}*.json"))
    if not files:
        raise RuntimeError(f"ONNX Runtime wrote no profile for genai's {name} session ({profile_prefix}-{name}*.json)")
    events = json.loads(files[-1].read_text())
    return [e["dur"] / 1e6 for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]


def measure(spec: dict) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    folder = Path(spec["model_dir"])
    template = json.loads((folder / "template.json").read_text())
    if not template.get("vision_index_in_graph"):
        raise RuntimeError(f"{folder}'s tower takes index inputs (a genai folder written before its tower computed "
                           "them): remove the cached genai conversion to have it written again")
    profile_prefix = str(Path(spec["out"]).with_suffix("")) + "-profile"
    config = og.Config(str(folder))
    config.overlay(json.dumps(session_overlay(spec["threads"], profile_prefix)))
    model = og.Model(config)
    processor = model.create_multimodal_processor()
    tokenizer = og.Tokenizer(model)

    def answer(max_new: int):
        """One generation; the clock readings and the token ids."""
        t0 = time.perf_counter()
        inputs = processor(spec["prompt"], images=og.Images.open(*spec["images"]))
        grid = inputs["image_grid_thw"].as_numpy()
        ids = inputs["input_ids"].as_numpy().reshape(-1)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=int(ids.size) + max_new, do_sample=False)
        gen = og.Generator(model, params)
        t_inputs = time.perf_counter()
        gen.set_inputs(inputs)
        t_set = time.perf_counter()
        tokens, stamps = [], []
        while not gen.is_done() and len(tokens) < max_new:
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
            stamps.append(time.perf_counter())
        del gen
        return dict(t0=t0, inputs_s=t_inputs - t0, set_inputs_s=t_set - t_inputs, stamps=stamps, tokens=tokens,
                    ids=ids, grid=grid)

    if spec["warmup"]:
        answer(1)
    r = answer(int(spec["max_new_tokens"]))
    text = tokenizer.decode(np.asarray(r["tokens"], dtype=np.int32))
    del processor, tokenizer, model, config  # ONNX Runtime writes a session's profile when it is released
    # the measured generation's runs, after the warm-up's: the warm-up ran the vision
    # session as often (once over all images when the tower takes index inputs, once
    # per image when genai slices pixel_values and image_grid_thw for it) and the
    # embedding once (its only token was the prompt's)
    vision_runs = model_runs(profile_prefix, "vision")
    prompt_vision = vision_runs[len(vision_runs) // 2:] if spec["warmup"] else vision_runs
    embed_run = model_runs(profile_prefix, "embedding")[1 if spec["warmup"] else 0:]
    ttft = r["stamps"][0] - r["t0"]
    vision = r["inputs_s"] + sum(prompt_vision) + embed_run[0]
    steps = len(r["stamps"]) - 1
    return {
        "ttft_s": ttft,
        # genai's image processor, the vision session's runs (one per image) and the prompt's embedding session
        "vision_s": vision,
        "prefill_s": ttft - vision,
        "decode_tokens_per_s": steps / (r["stamps"][-1] - r["stamps"][0]) if steps > 0 else None,
        "prompt_tokens": int(r["ids"].size),
        "image_tokens": int(np.sum(r["ids"] == int(template["image_token_id"]))),
        "token_counts_from": "genai's processor's input_ids",
        "tokens": r["tokens"],
        "text": text,
        "generate_s": r["stamps"][-1] - r["t0"],
        "details": {"processor_s": r["inputs_s"], "set_inputs_s": r["set_inputs_s"],
                    "vision_runs_s": prompt_vision, "embedding_run_s": embed_run[0],
                    "image_grid_thw": r["grid"].tolist(), "decoder": json.loads((folder / "genai_config.json").read_text())
                    ["model"]["decoder"]["filename"]},
    }


if __name__ == "__main__":
    sys.exit(run(measure))
