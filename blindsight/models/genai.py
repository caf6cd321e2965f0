"""Decoders as onnxruntime-genai's model builder writes them, made offline.

The builder (``python -m onnxruntime_genai.models.builder``) turns a Hugging
Face checkpoint folder into ``model.onnx`` + ``genai_config.json``: the text
decoder with ``com.microsoft.GroupQueryAttention`` (past/present KV cache
sharing one buffer), the tokenizer files and the chat template. It needs
onnxruntime-genai's own onnxruntime (a newer one than this project pins), so it
runs in a separate Python environment, called here through a subprocess.

``make_tiny_decoder(family, out_dir, python=...)`` writes a tiny random
checkpoint with :mod:`blindsight.models.checkpoints` (in this environment) and
runs the builder on it (in ``python``'s environment). ``GENAI_REQUIREMENTS``
is what that environment needs; ``create_venv`` installs it.

``compile_for_genai`` compiles such a folder's decoder and points its
genai_config.json at the compiled graph; ``genai_greedy`` runs onnxruntime-genai
on a folder (feeding ``image_spans`` through ``Generator.set_model_input``)
and ``ort_greedy`` runs the same greedy loop in this environment's
onnxruntime, feeding the decoder as genai does, for comparison.

Command lines: ``python -m blindsight.models.genai OUT --python VENV/bin/python
[--family qwen2_5_vl] [--context-length 256]`` builds;
``python -m blindsight.models.genai OUT --python VENV/bin/python --greedy``
also compiles it (all-dense and with a sparse profile) and prints genai's and
onnxruntime's greedy tokens for each graph.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from blindsight.errors import ModelError

#: what the builder's environment needs (torch pinned: the CPU wheel; transformers as this project's)
GENAI_REQUIREMENTS = ("onnxruntime-genai==0.18.0", "onnx_ir", "torch==2.13.0", "transformers==5.23.0")


def create_venv(path, requirements=GENAI_REQUIREMENTS) -> Path:
    """Create a virtual environment at ``path`` with the builder's requirements; returns its python."""
    path = Path(path)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    python = path / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", *requirements], check=True)
    return python


def builder_versions(python) -> dict[str, str]:
    """The versions of the packages that make the builder's output, read in ``python``'s environment."""
    code = ("import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
            "('onnxruntime-genai', 'onnxruntime', 'onnx', 'onnx_ir', 'torch', 'transformers')}))")
    out = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def builder_command(python, checkpoint, out_dir, *, precision="fp32", provider="cpu", cache_dir=None,
                    extra_options: dict | None = None) -> list[str]:
    cmd = [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out_dir),
           "-p", precision, "-e", provider]
    if cache_dir is not None:
        cmd += ["-c", str(cache_dir)]
    if extra_options:
        cmd += ["--extra_options", *(f"{k}={v}" for k, v in extra_options.items())]
    return cmd


def build_decoder(python, checkpoint, out_dir, **kwargs) -> Path:
    """Run the builder in ``python``'s environment; returns ``out_dir`` (holding model.onnx)."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="genai-cache-") as cache:
        kwargs.setdefault("cache_dir", cache)
        cmd = builder_command(python, checkpoint, out_dir, **kwargs)
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not (out_dir / "model.onnx").is_file():
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise ModelError(f"onnxruntime-genai's builder failed ({' '.join(cmd)}):\n{tail}")
    return out_dir


def shrink_context(checkpoint, context_length: int) -> None:
    """Lower the checkpoint's ``max_position_embeddings`` (the builder sizes its
    cos/sin caches and genai's context from it)."""
    path = Path(checkpoint) / "config.json"
    config = json.loads(path.read_text())
    for section in (config, config.get("text_config") or {}):
        if "max_position_embeddings" in section:
            section["max_position_embeddings"] = context_length
    path.write_text(json.dumps(config, indent=2) + "\n")


def flatten_rope(checkpoint) -> None:
    """Gemma 3 under transformers 5 nests ``rope_parameters`` per layer type; the
    builder (0.18.0) reads ``rope_parameters["rope_type"]`` and
    ``config.rope_local_base_freq`` (KeyError 'rope_type' otherwise). Give it the
    full-attention layers' parameters flat and the sliding layers' theta apart."""
    path = Path(checkpoint) / "config.json"
    config = json.loads(path.read_text())
    text = config.get("text_config") or config
    rope = text.get("rope_parameters") or {}
    if "full_attention" in rope:
        text["rope_parameters"] = dict(rope["full_attention"])
        local = rope.get("sliding_attention", {}).get("rope_theta")
        if local is not None:
            text["rope_local_base_freq"] = config["rope_local_base_freq"] = local
    path.write_text(json.dumps(config, indent=2) + "\n")


def make_tiny_decoder(family: str, out_dir, *, python, seed: int = 0, num_layers: int = 2, num_kv_heads: int = 2,
                      context_length: int | None = 256, extra_options: dict | None = None) -> Path:
    """A tiny random checkpoint of ``family`` through the builder: ``out_dir`` gets
    model.onnx, model.onnx.data, genai_config.json and the tokenizer files.
    ``extra_options``: the builder's (e.g. ``{"windowed_kv_cache": "false"}``:
    sliding layers keep full-length caches rather than window-sized ones)."""
    from blindsight.models.checkpoints import make_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="genai-ckpt-") as tmp:
        ckpt = make_tiny_checkpoint(family, Path(tmp) / "ckpt", seed=seed, num_layers=num_layers,
                                    num_kv_heads=num_kv_heads)
        if context_length:
            shrink_context(ckpt, context_length)
        flatten_rope(ckpt)
        return build_decoder(python, ckpt, out_dir, extra_options=extra_options)


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
    """The same greedy loop in this environment's onnxruntime, fed as genai feeds
    the builder's decoder (stopping after an eos_token_id of its genai_config.json): text positions in all three rows of position_ids, an
    attention mask over every token so far, and past/present sharing one buffer
    of ``buffer`` positions (default ``max_length``)."""
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    names = [o.name for o in sess.get_outputs()]
    buffer = buffer or max_length
    model = json.loads((Path(model_path).parent / "genai_config.json").read_text())["model"]
    decoder = model["decoder"]
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


def compile_for_genai(folder, profile, lowering: str = "fast", name: str | None = None) -> Path:
    """Compile ``folder``'s decoder (its genai_config.json names it) next to it and
    return a sibling folder whose genai_config.json names the compiled graph."""
    import shutil

    from blindsight.compiler.pipeline import compile_model

    folder = Path(folder)
    config = json.loads((folder / "genai_config.json").read_text())
    source = config["model"]["decoder"]["filename"]
    out = folder.with_name(f"{folder.name}.{name or lowering}")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(folder, out)
    compiled = compile_model(out / source, profile, out / (Path(source).stem + ".blindsight.onnx"), lowering)
    config["model"]["decoder"]["filename"] = compiled.output.name
    (out / "genai_config.json").write_text(json.dumps(config, indent=4) + "\n")
    return out


def greedy_parity(python, folder, profiles: dict, prompt, spans, max_length: int = 40) -> dict:
    """{graph: {"genai": tokens, "ort": tokens}} for the builder's decoder
    ("source") and for each compiled one (``profiles``: name -> (profile, lowering))."""
    folder = Path(folder)
    config = json.loads((folder / "genai_config.json").read_text())
    result = {"source": {"genai": genai_greedy(python, folder, prompt, max_length),
                         "ort": ort_greedy(folder / config["model"]["decoder"]["filename"], prompt, max_length)}}
    for name, (profile, lowering) in profiles.items():
        out = compile_for_genai(folder, profile, lowering, name)
        decoder = out / json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["filename"]
        result[name] = {"genai": genai_greedy(python, out, prompt, max_length, spans),
                        "ort": ort_greedy(decoder, prompt, max_length, spans)}
    return result


#: a prompt of the tiny Qwen checkpoints' ids: text, <|vision_start|> <|image_pad|>... <|vision_end|>, text, a second image, text
DEMO_PROMPT = [5, 9, 259, 261, 261, 261, 260, 30, 40, 259, 261, 261, 260, 50, 60, 70]
DEMO_SPANS = [[2, 7], [9, 13]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blindsight.models.genai", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="output folder (model.onnx, genai_config.json, tokenizer)")
    ap.add_argument("--python", required=True, help="python of an environment with onnxruntime-genai (see create_venv)")
    ap.add_argument("--family", default="qwen2_5_vl")
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
