"""onnxruntime-genai running compiled decoders, and the same greedy loop in onnxruntime.

``genai_greedy`` runs onnxruntime-genai on a model folder in a child Python
process (this environment's with the ``genai`` extra, or another one: see
:mod:`blindsight.models.genai`), feeding ``image_spans`` through
``Generator.set_model_input`` once, before the first ``append_tokens``: genai
takes a second ``set_model_input`` on the same generator badly (the next
``append_tokens`` fails with "input name cannot be empty"), so use a new
generator per prompt. ``ort_greedy`` runs the same greedy loop in this
environment's onnxruntime, feeding the decoder as genai does.
``spans_from_ids`` finds a prompt's ``image_spans`` from its token ids.
``add_vision_inputs`` completes a multimodal processor's output for a folder
written by :func:`blindsight.compiler.genai_vlm.write_genai_vlm`.

Command line: ``python -m blindsight.runtime.genai OUT [--python PYTHON]
[--family qwen2_5_vl] [--greedy]`` builds a tiny random decoder with the
builder; ``--greedy`` also compiles it (all-dense and with a sparse profile,
both lowerings) and prints genai's and onnxruntime's greedy tokens for each.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from blindsight.attention.spans import Delimiters, find_spans
from blindsight.compiler.genai import GENAI_CONFIG, compile_genai_folder
from blindsight.errors import ModelError
from blindsight.models.genai import make_tiny_decoder


#: image delimiters by their token text: Qwen2-VL / Qwen2.5-VL, Gemma 3
DELIMITER_TOKENS = (("<|vision_start|>", "<|vision_end|>"), ("<start_of_image>", "<end_of_image>"))


def delimiters_of(folder) -> Delimiters:
    """The image-start and image-end token ids of a genai folder's tokenizer.json."""
    path = Path(folder) / "tokenizer.json"
    try:
        added = {t["content"]: int(t["id"]) for t in json.loads(path.read_text()).get("added_tokens", [])}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path} cannot be read ({exc}); the folder needs the model's tokenizer.json") from None
    for start, end in DELIMITER_TOKENS:
        if start in added and end in added:
            return Delimiters(added[start], added[end])
    raise ModelError(f"{path} has no image delimiter tokens ({', '.join(' / '.join(p) for p in DELIMITER_TOKENS)})")


def spans_from_ids(input_ids, folder) -> np.ndarray:
    """The ``image_spans`` int64 [N, 2] of a prompt's token ids: each run from an
    image-start delimiter through its image-end delimiter, with the folder's token ids."""
    return find_spans(np.asarray(input_ids, dtype=np.int64).reshape(-1), delimiters_of(folder)).astype(np.int64).reshape(-1, 2)


def add_vision_inputs(inputs, template):
    """Add the index inputs of a Qwen ``vision.onnx`` to ``inputs``, the ``NamedTensors``
    of genai's multimodal processor, before ``Generator.set_inputs``; returns ``inputs``.

    Folders that ``bs-compile --genai`` writes now hold a tower that computes these
    inputs itself (``vision.genai.onnx``, template.json's ``vision_index_in_graph``):
    for them this returns ``inputs`` unchanged, and the call may be left out. It
    serves folders whose tower takes the index inputs.

    genai feeds the vision session every named tensor that it declares, but computes
    only ``pixel_values`` and ``image_grid_thw``; the export's tower takes the index
    tensors that transformers computes in Python loops instead of ``image_grid_thw``.
    When the images differ in size, genai pads each image's patches to the largest
    one's count; ``pixel_values`` is then replaced by the patches back to back, as
    the tower reads them (:func:`blindsight.vision_inputs.unpad_patches`).
    ``template``: the folder's template.json, as a dict or the folder (or file) path.
    A prompt without images is returned as it is."""
    from blindsight.vision_inputs import qwen_vision_feeds, unpad_patches

    if not isinstance(template, dict):
        path = Path(template)
        template = json.loads((path / "template.json" if path.is_dir() else path).read_text())
    if "image_grid_thw" not in inputs or template.get("vision_index_in_graph"):
        # a folder written now computes the index inputs in its tower, per image
        return inputs
    pixels, grid = (inputs[name] for name in ("pixel_values", "image_grid_thw"))
    pixels, grid = (t.as_numpy() if hasattr(t, "as_numpy") else np.asarray(t) for t in (pixels, grid))
    packed = unpad_patches(pixels, grid)
    if packed is not pixels:  # images of different sizes: genai padded each to the largest
        inputs["pixel_values"] = np.ascontiguousarray(packed)
    feeds = qwen_vision_feeds(template["family"], template["vision"], packed, grid)
    for name in template["vision_inputs"]:
        if name != "pixel_values":  # genai's own, in the vision graph's dtype
            inputs[name] = feeds[name]
    return inputs


#: run in the builder's environment: argv = model folder, JSON {"prompt": [...], "max_length": n, "spans": [[s, e], ...] | null}
_GREEDY = """
import json, sys
import numpy as np
import onnxruntime_genai as og
folder, job = sys.argv[1], json.loads(sys.argv[2])
model = og.Model(folder)
params = og.GeneratorParams(model)
params.set_search_options(max_length=job["max_length"], do_sample=False)
gen = og.Generator(model, params)
if job["spans"] is not None:
    gen.set_model_input("image_spans", np.array(job["spans"], dtype=np.int64).reshape(-1, 2))
gen.append_tokens(np.array(job["prompt"], dtype=np.int32))
out = []
while not gen.is_done():
    gen.generate_next_token()
    out.append(int(gen.get_next_tokens()[0]))
print(json.dumps(out))
"""


def genai_greedy(python, folder, prompt, max_length: int, spans=None) -> list[int]:
    """onnxruntime-genai's greedy tokens after ``prompt`` (up to ``max_length`` tokens in all)."""
    job = json.dumps({"prompt": [int(t) for t in prompt], "max_length": int(max_length),
                      "spans": None if spans is None else [[int(a), int(b)] for a, b in spans]})
    proc = subprocess.run([str(python), "-c", _GREEDY, str(folder), job], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelError(f"onnxruntime-genai failed on {folder}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ort_greedy(model_path, prompt, max_length: int, spans=None, *, buffer: int | None = None) -> list[int]:
    """The same greedy loop in this environment's onnxruntime (with the
    ``custom_ops_library`` that genai_config.json names, as genai loads it), fed as genai feeds
    the builder's decoder (stopping after an eos_token_id of its genai_config.json): text positions in all three rows of position_ids, an
    attention mask over every token so far, and past/present sharing one buffer
    of ``buffer`` positions (default ``max_length``)."""
    import numpy as np
    import onnxruntime as ort

    model = json.loads((Path(model_path).parent / GENAI_CONFIG).read_text())["model"]
    decoder = model["decoder"]
    opts = ort.SessionOptions()
    library = (decoder.get("session_options") or {}).get("custom_ops_library")
    if library:  # as genai does: the folder's copy of the native kernel
        opts.register_custom_ops_library(str(Path(model_path).parent / library))
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    names = [o.name for o in sess.get_outputs()]
    buffer = buffer or max_length
    eos = model.get("eos_token_id", [])
    eos = set(eos if isinstance(eos, list) else [eos])
    sliding = decoder.get("sliding_window") or {}
    windowed = set(sliding.get("layers", [])) if sliding else set()
    past = {}
    for name in inputs:
        if name.startswith("past_key_values."):
            layer = int(name.split(".")[1])
            # a windowed layer's cache (sliding_window_cache) holds window_size + cache_slack positions
            length = sliding["window_size"] + sliding.get("cache_slack", 0) if layer in windowed else buffer
            past[name] = np.zeros((1, decoder["num_key_value_heads"], length, decoder["head_size"]), np.float32)
    tokens, out = [int(t) for t in prompt], []
    new = tokens
    while len(tokens) < max_length:
        feeds = dict(input_ids=np.array([new], np.int64), attention_mask=np.ones((1, len(tokens)), np.int64),
                     position_ids=np.broadcast_to(np.arange(len(tokens) - len(new), len(tokens)), (3, 1, len(new))).astype(np.int64),
                     **past)
        if "position_ids" not in inputs:  # Gemma 3: the rotary inside GroupQueryAttention takes positions from the mask
            del feeds["position_ids"]
        if "image_spans" in inputs:
            feeds["image_spans"] = np.array(spans if spans is not None else [], np.int64).reshape(-1, 2)
        result = dict(zip(names, sess.run(None, feeds)))
        past = {n.replace("present", "past_key_values"): result[n] for n in names if n.startswith("present")}
        nxt = int(result["logits"][0, -1].argmax())
        out.append(nxt)
        tokens.append(nxt)
        new = [nxt]
        if nxt in eos:  # genai stops after an end-of-sequence token
            break
    return out


def greedy_parity(python, folder, profiles: dict, prompt, spans, max_length: int = 40) -> dict:
    """{graph: {"genai": tokens, "ort": tokens}} for the builder's decoder
    ("source") and for each compiled one (``profiles``: name -> (profile, lowering))."""
    folder = Path(folder)
    config = json.loads((folder / GENAI_CONFIG).read_text())
    result = {"source": {"genai": genai_greedy(python, folder, prompt, max_length),
                         "ort": ort_greedy(folder / config["model"]["decoder"]["filename"], prompt, max_length)}}
    for name, (profile, lowering) in profiles.items():
        out = compile_genai_folder(folder, profile, folder.with_name(f"{folder.name}.{name}"), lowering,
                                   overwrite=True).out_dir
        decoder = out / json.loads((out / GENAI_CONFIG).read_text())["model"]["decoder"]["filename"]
        result[name] = {"genai": genai_greedy(python, out, prompt, max_length, spans),
                        "ort": ort_greedy(decoder, prompt, max_length, spans)}
    return result


#: a prompt of the tiny Qwen checkpoints' ids: text, <|vision_start|> <|image_pad|>... <|vision_end|>, text, a second image, text
DEMO_PROMPT = [5, 9, 259, 261, 261, 261, 260, 30, 40, 259, 261, 261, 260, 50, 60, 70]
DEMO_SPANS = [[2, 7], [9, 13]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blindsight.runtime.genai", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="output folder (model.onnx, genai_config.json, tokenizer)")
    ap.add_argument("--python", default=sys.executable,
                    help="python of an environment with onnxruntime-genai and its builder's needs (default: this one, "
                         "with the genai and export extras installed; or a venv made by create_venv)")
    ap.add_argument("--family", default="qwen2_5_vl", help="qwen2_vl, qwen2_5_vl, gemma3 or qwen3_vl (default qwen2_5_vl)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--context-length", type=int, default=256)
    ap.add_argument("--extra-option", action="append", default=[], metavar="KEY=VALUE",
                    help="the builder's --extra_options, e.g. windowed_kv_cache=false")
    ap.add_argument("--greedy", action="store_true", help="then compile it and compare greedy tokens (genai and onnxruntime)")
    args = ap.parse_args(argv)
    out = make_tiny_decoder(args.family, args.out, python=args.python, seed=args.seed, num_layers=args.layers,
                            num_kv_heads=args.kv_heads, context_length=args.context_length,
                            extra_options=dict(o.split("=", 1) for o in args.extra_option) or None)
    print(f"wrote {out / 'model.onnx'}")
    if args.greedy:
        from blindsight.configs import TINY_HEADS
        from blindsight.profile import Profile

        sparse = Profile([[("sink", "intra", "intra_sink", "dense")[(h + layer) % 4] for h in range(TINY_HEADS)]
                          for layer in range(args.layers)])
        dense = Profile.uniform("dense", args.layers, TINY_HEADS)
        result = greedy_parity(args.python, out, {"dense": (dense, "fast"), "dense_reference": (dense, "reference"),
                                                  "sparse": (sparse, "fast"), "sparse_reference": (sparse, "reference")},
                               DEMO_PROMPT, DEMO_SPANS)
        for name, runs in result.items():
            for engine, tokens in runs.items():
                print(f"{name:17s} {engine:5s} {tokens}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
