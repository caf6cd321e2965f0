"""Each engine's conversion of the prepared checkpoint, made with that engine's own tool and cached.

A conversion lives in ``CACHE/<engine>-<key>/``; the key covers the prepared
checkpoint (its files and pixel bounds) and the converting tool's versions, and a
``converted.json`` written last marks it complete, so an interrupted conversion is
redone rather than used.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.peers.errors import PeersError

DONE = "converted.json"
#: the project's language models, one per compile of the raw export
PROJECT_MODELS = {"mix": "language_model.mix.onnx", "dense": "language_model.dense.onnx"}


def cached(cache: Path, engine: str, prepared: Path, versions: dict, make, extra: str = "") -> dict:
    """``make(tmp_dir)`` once per key (``extra``: more that the conversion depends on, e.g.
    a profile's text); returns the conversion's record (dir, seconds, cached)."""
    key = hashlib.sha256(json.dumps([prepared.name, versions, extra], sort_keys=True).encode()).hexdigest()[:12]
    out = cache / f"{engine}-{key}"
    if (out / DONE).is_file():
        return dict(json.loads((out / DONE).read_text()), dir=str(out), cached=True)
    tmp = cache / f".{engine}-{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    info = make(tmp) or {}
    record = dict(info, seconds=round(time.perf_counter() - t0, 1), checkpoint=prepared.name)
    (tmp / DONE).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return dict(record, dir=str(out), cached=False)


def _tool(cmd: list[str], what: str, log: Path):
    """Run a conversion tool; its output goes to ``log``, its failure is one line naming the log."""
    with open(log, "a") as sink:
        sink.write(f"$ {' '.join(cmd)}\n")
        sink.flush()
        rc = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        last = [line for line in log.read_text().splitlines() if line.strip()][-1:] or [""]
        raise PeersError(f"{what} failed (exit {rc}): {last[0][:300]} (full output: {log})")


def _bs(command: str, *args: str) -> list[str]:
    """A project console script run by this interpreter (no reliance on PATH)."""
    entry = command.replace("-", "_")
    return [sys.executable, "-c", f"import sys; from blindsight.entry import {entry}; sys.exit({entry}())", *args]


#: the project's code that decides what bs-export and bs-compile write
PROJECT_WRITERS = ("models", "passes", "compiler", "attention")
#: writes only genai folders (bs-compile --genai): it keys the genai conversion, not the project's
GENAI_WRITER = "compiler/genai_vlm.py"


def _blindsight_root() -> Path:
    import blindsight

    return Path(blindsight.__file__).parent


def project_code_digest() -> str:
    """A digest of the project's exporter and compiler sources: the project's cached
    conversion is made again when they change, not only when its version does.
    The genai folder writer is left out: a change there re-makes genai folders
    (:func:`genai_code_digest`), not the 9 GB export they are made from."""
    root = _blindsight_root()
    digest = hashlib.sha256()
    for path in sorted(p for d in PROJECT_WRITERS for p in (root / d).rglob("*.py")):
        if path.relative_to(root).as_posix() != GENAI_WRITER:
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def genai_code_digest() -> str:
    """A digest of the genai folder writer's source (part of the genai conversion's key)."""
    path = _blindsight_root() / GENAI_WRITER
    return hashlib.sha256(path.read_bytes() if path.is_file() else b"").hexdigest()[:16]


def project(prepared: Path, tmp: Path, profile: Path | None) -> dict:
    """bs-export, then bs-compile twice: the mix profile (or the given one) and all dense."""
    from blindsight.profile import Profile, load as load_profile

    log = tmp.parent / f"{tmp.name}.log"
    log.unlink(missing_ok=True)
    export = tmp / "export"
    _tool(_bs("bs-export", str(prepared), "-o", str(export), "--quiet"), "bs-export", log)
    template = json.loads((export / "template.json").read_text())
    layers, heads, kv = int(template["num_layers"]), int(template["num_heads"]), int(template["num_kv_heads"])
    if profile is not None:
        mix = load_profile(profile)
        mix_doc = mix.to_json()
    else:
        # the benchmarks' mixed layer in every layer, the first layer dense as calibrated profiles keep it
        mix_doc = Profile.mixed(layers, heads, first_dense=True, num_kv_heads=kv,
                                model="peers harness: hand-made mix (random weights have nothing to calibrate)").to_json()
    dense_doc = Profile.uniform("dense", layers, heads, num_kv_heads=kv, model="peers harness: all dense").to_json()
    for name, doc in (("mix", mix_doc), ("dense", dense_doc)):
        path = export / f"profile.{name}.json"
        path.write_text(json.dumps(doc, indent=1) + "\n")
        _tool(_bs("bs-compile", str(export / template["files"]["language_model"]), "--profile", str(path),
                  "-o", str(export / PROJECT_MODELS[name])), f"bs-compile ({name})", log)
    return {"tool": "bs-export, bs-compile", "mix_profile": mix_doc["model"]}


def project_int8(export: Path, tmp: Path, lm_head: bool = False) -> dict:
    """bs-quantize on the project's export (int8 vision tower and language model; ``lm_head``:
    its LM head too), then bs-compile with the same two profiles on the quantized language model."""
    log = tmp.parent / f"{tmp.name}.log"
    log.unlink(missing_ok=True)
    out = tmp / "export"
    _tool(_bs("bs-quantize", str(export), "-o", str(out), *(["--lm-head", "int8"] if lm_head else [])), "bs-quantize", log)
    template = json.loads((out / "template.json").read_text())
    for name in PROJECT_MODELS:
        _tool(_bs("bs-compile", str(out / template["files"]["language_model"]), "--profile", str(out / f"profile.{name}.json"),
                  "-o", str(out / PROJECT_MODELS[name])), f"bs-compile ({name}, int8)", log)
    return {"tool": "bs-quantize (int8), bs-compile", "quantized": template["quantized"], "from": export.parent.name}


#: run by the OpenVINO venv's interpreter after optimum-cli: the tokenizer and the
#: processor files are (re)written from the checkpoint itself, so a tokenizer that
#: optimum could not convert, or a processor it saved with other bounds, cannot differ
OPENVINO_FINISH = """
import shutil, sys
from pathlib import Path
src, out = Path(sys.argv[1]), Path(sys.argv[2])
for name in ("preprocessor_config.json", "chat_template.jinja", "chat_template.json", "tokenizer_config.json", "tokenizer.json"):
    if (src / name).is_file():
        shutil.copyfile(src / name, out / name)
if not (out / "openvino_tokenizer.xml").is_file() or not (out / "openvino_detokenizer.xml").is_file():
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer
    from transformers import AutoTokenizer
    tok, detok = convert_tokenizer(AutoTokenizer.from_pretrained(src), with_detokenizer=True)
    ov.save_model(tok, out / "openvino_tokenizer.xml")
    ov.save_model(detok, out / "openvino_detokenizer.xml")
"""


def openvino(prepared: Path, tmp: Path, python: Path, weight_format: str = "fp32") -> dict:
    log = tmp.parent / f"{tmp.name}.log"
    log.unlink(missing_ok=True)
    model = tmp / "model"
    cli = python.parent / "optimum-cli"
    _tool([str(cli), "export", "openvino", "-m", str(prepared), "--task", "image-text-to-text",
           "--weight-format", weight_format, str(model)], "optimum-cli export openvino", log)
    _tool([str(python), "-c", OPENVINO_FINISH, str(prepared), str(model)], "saving the OpenVINO tokenizer", log)
    return {"tool": f"optimum-cli export openvino --task image-text-to-text --weight-format {weight_format}"}


#: run by the llama.cpp venv's interpreter: convert_hf_to_gguf.py as its own command
#: line runs it, with two repairs for tokenizers made locally (as bs-checkpoint makes them):
#: - a pre-tokenizer whose hash the script does not list gets Qwen2's, which Qwen2-VL and
#:   Qwen2.5-VL use (the published tokenizers are listed and keep their detection);
#: - a BPE vocabulary without merges (byte-level, 256 tokens) gets one merge of two ASCII
#:   characters whose result is not a token: llama.cpp refuses a BPE vocabulary without
#:   merges, and splits a merged symbol that is not a token back into its single-byte
#:   tokens, so the text tokenizes as before (the harness checks the counts and tokens)
LLAMACPP_CONVERT = """
import os, runpy, sys
from pathlib import Path
script = Path(sys.argv[1])
sys.path.insert(0, str(script.parent))
if 'NO_LOCAL_GGUF' not in os.environ:
    sys.path.insert(1, str(script.parent / 'gguf-py'))
import gguf
from conversion.base import TextModel
detect = TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return detect(self, tokenizer)
    except NotImplementedError:
        print("convert: pre-tokenizer not in the converter's list; using qwen2's (a Qwen checkpoint)", file=sys.stderr)
        return "qwen2"
TextModel.get_vocab_base_pre = get_vocab_base_pre
add_to_gguf = gguf.SpecialVocab.add_to_gguf
def add_with_merges(self, gw, *args, **kwargs):
    if self.load_merges and not self.merges:
        print("convert: the BPE vocabulary has no merges; adding the no-op merge '! !'", file=sys.stderr)
        self.merges = ["! !"]
    return add_to_gguf(self, gw, *args, **kwargs)
gguf.SpecialVocab.add_to_gguf = add_with_merges
sys.argv = [str(script)] + sys.argv[2:]
runpy.run_path(str(script), run_name="__main__")
"""
#: run by the llama.cpp venv's interpreter: the tensors in a GGUF file, read with the converter's gguf-py
GGUF_TENSORS = """
import sys
sys.path.insert(0, sys.argv[1])
import gguf
print(len(gguf.GGUFReader(sys.argv[2]).tensors))
"""


def gguf_tensor_count(python: Path, converter_dir: Path, path: Path) -> int:
    proc = subprocess.run([str(python), "-c", GGUF_TENSORS, str(converter_dir / "gguf-py"), str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise PeersError(f"reading {path.name} with gguf-py failed: {(proc.stderr.strip().splitlines() or [''])[-1][:300]}")
    return int(proc.stdout.strip())


#: the files of a llama.cpp conversion
LLAMACPP_FILES = {"model": "model-{outtype}.gguf", "mmproj": "mmproj-{outtype}.gguf"}


#: tokenizer classes that transformers 5 writes and the converter's transformers 4.57 cannot
#: import; the tokenizer itself is tokenizer.json, which the generic fast class reads
TRANSFORMERS5_TOKENIZERS = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def converter_view(prepared: Path, view: Path) -> Path:
    """The checkpoint as convert_hf_to_gguf.py's transformers (4.57) can read it: symlinks to
    its files, with a tokenizer_config.json written by transformers 5 put in 4.57's terms."""
    view.mkdir(parents=True)
    for item in prepared.iterdir():
        (view / item.name).symlink_to(item.resolve())
    config = prepared / "tokenizer_config.json"
    if config.is_file():
        doc = json.loads(config.read_text())
        before = dict(doc)
        if doc.get("tokenizer_class") in TRANSFORMERS5_TOKENIZERS:
            doc["tokenizer_class"] = TRANSFORMERS5_TOKENIZERS[doc["tokenizer_class"]]
        if isinstance(doc.get("extra_special_tokens"), list):
            # transformers 5 writes a list here; 4.57 reads a mapping, and lists extra tokens elsewhere
            extra = doc.pop("extra_special_tokens")
            if extra:
                doc["additional_special_tokens"] = extra
        if doc != before:
            (view / config.name).unlink()
            (view / config.name).write_text(json.dumps(doc, indent=2) + "\n")
    return view


def llamacpp(prepared: Path, tmp: Path, python: Path, outtypes=("f32", "f16")) -> dict:
    """The language model and the vision projector, each as a GGUF per ``outtypes``."""
    from benchmarks.peers.envs import CONVERTER

    log = tmp.parent / f"{tmp.name}.log"
    log.unlink(missing_ok=True)
    script = python.parent.parent / CONVERTER / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise PeersError(f"{script} is missing: remove the llama.cpp venv {python.parent.parent} to have it made again")
    source = converter_view(prepared, tmp / "checkpoint")
    for outtype in outtypes:
        for part, name in LLAMACPP_FILES.items():
            extra = ["--mmproj"] if part == "mmproj" else []
            out = tmp / name.format(outtype=outtype)
            _tool([str(python), "-c", LLAMACPP_CONVERT, str(script), str(source), *extra, "--outtype", outtype,
                   "--outfile", str(out)], f"convert_hf_to_gguf.py ({part}, {outtype})", log)
            if gguf_tensor_count(python, script.parent, out) == 0:
                # the converter selects tensors by their published names and writes an empty file otherwise
                raise PeersError(f"convert_hf_to_gguf.py wrote no tensors to {out.name}: the checkpoint's tensors are "
                                 "not stored under the published names (e.g. model.visual.* instead of visual.*); "
                                 "write it with transformers' save_pretrained or a current bs-checkpoint")
    shutil.rmtree(source)
    return {"tool": "convert_hf_to_gguf.py (llama-cpp-python's sdist), --mmproj for the vision projector",
            "outtypes": list(outtypes)}


#: the builder's --extra_options of each folder of the builder's decoder (the genai variants'
#: other folders, "mix" and "dense", are the project's compiles written by bs-compile --genai): embeddings are left to the
#: embedding model (genai's VLM pipeline); "builder-pruned" also computes the logits of
#: the last position only, as the project's export does by default
GENAI_BUILDS = {"builder": {"exclude_embeds": "true"},
                "builder-pruned": {"exclude_embeds": "true", "prune_lm_head": "true"}}


def builder_checkpoint(prepared: Path, dest: Path) -> str:
    """The checkpoint as genai's model builder reads it; returns what was changed.

    The builder (0.18.0) knows Qwen2.5-VL, not Qwen2-VL. Their text decoders are one
    architecture (Qwen2 layers with M-RoPE over the same sections, biases on q/k/v), and
    the builder writes the text decoder only, so a Qwen2-VL checkpoint is given to it
    as a Qwen2.5-VL one: the same weight files (linked), the same text config, and a
    one-block vision config whose tensors that share a name with Qwen2-VL's have their
    shapes (transformers loads the model whole: the other vision tensors are left
    out or made up, and the builder reads none of them)."""
    config = json.loads((prepared / "config.json").read_text())
    dest.mkdir(parents=True)
    for item in prepared.iterdir():
        if item.name != "config.json":
            (dest / item.name).symlink_to(item.resolve())
    kind = config.get("model_type")
    changed = "nothing (a Qwen2.5-VL checkpoint)"
    if kind == "qwen2_vl":
        vision, text = config["vision_config"], config.get("text_config") or config
        config = dict(config, architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl")
        if "text_config" in config:
            config["text_config"] = dict(text, model_type="qwen2_5_vl_text")
        config["vision_config"] = {
            "model_type": "qwen2_5_vl", "depth": 1, "hidden_size": vision["embed_dim"], "num_heads": vision["num_heads"],
            "intermediate_size": 16, "hidden_act": "silu", "patch_size": vision["patch_size"],
            "temporal_patch_size": vision["temporal_patch_size"], "in_channels": vision.get("in_channels", 3),
            "spatial_merge_size": vision["spatial_merge_size"], "out_hidden_size": text["hidden_size"],
            "fullatt_block_indexes": [0], "window_size": 112}
        changed = "Qwen2-VL given as Qwen2.5-VL (architectures, model_type, a one-block vision config)"
    elif kind != "qwen2_5_vl":
        raise PeersError(f"onnxruntime-genai's builder takes Qwen2.5-VL (and here Qwen2-VL); {prepared} is {kind}")
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return changed


def genai_builder_folder(export: Path, builder: Path, out: Path) -> None:
    """A genai VLM folder around the builder's decoder: genai's image processor, the
    export's vision tower and embedding as bs-compile --genai wraps them (the builder
    writes no vision or embedding model), and the builder's decoder files, moved in,
    with its own genai_config decoder and cache settings."""
    from blindsight.compiler import genai_vlm as gv

    template = gv.read_template(export)
    out.mkdir(parents=True)
    gv.write_vision_and_embedding(export, template, out)
    own = json.loads((builder / "genai_config.json").read_text())
    decoder = own["model"]["decoder"]
    for name in [decoder["filename"]] + [p.name for p in builder.iterdir() if p.name.startswith(decoder["filename"] + ".")]:
        (builder / name).rename(out / name)
    config = gv.genai_config(template, gv._read_json(export / "config.json"), gv._read_json(export / "generation_config.json"), None)
    config["model"]["decoder"] = decoder
    config["search"]["past_present_share_buffer"] = own["search"]["past_present_share_buffer"]
    (out / "genai_config.json").write_text(json.dumps(config, indent=4) + "\n")


def genai(prepared: Path, tmp: Path, python: Path, export: Path, folders, native: bool) -> dict:
    """genai's builder on the checkpoint (fp32, CPU, the options of :data:`GENAI_BUILDS`),
    then the VLM folders, each named as in ``folders`` ("builder", "builder-pruned":
    the builder's decoders; "mix"/"dense": bs-compile --genai with the project conversion's profiles)."""
    from blindsight.compiler.genai_vlm import write_genai_vlm
    from blindsight.profile import load as load_profile

    log = tmp.parent / f"{tmp.name}.log"
    log.unlink(missing_ok=True)
    record = {"tool": "onnxruntime_genai.models.builder -p fp32 -e cpu --extra_options ...; bs-compile --genai",
              "folders": list(folders), "builder_options": {f: GENAI_BUILDS[f] for f in folders if f in GENAI_BUILDS}}
    builds = [f for f in folders if f in GENAI_BUILDS]
    if builds:
        source = tmp / "builder-checkpoint"
        record["builder_checkpoint"] = builder_checkpoint(prepared, source)
        for name in builds:
            built = tmp / "builder-out"
            options = [f"{k}={v}" for k, v in GENAI_BUILDS[name].items()]
            _tool([str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(built), "-p",
                   "fp32", "-e", "cpu", "-c", str(tmp / "builder-cache"), "--extra_options", *options],
                  f"onnxruntime-genai's model builder ({' '.join(options)})", log)
            genai_builder_folder(export, built, tmp / name)
            shutil.rmtree(built)
        for leftover in (source, tmp / "builder-cache"):
            shutil.rmtree(leftover, ignore_errors=True)
    for name in (f for f in folders if f not in GENAI_BUILDS):
        profile = load_profile(export / f"profile.{name}.json")
        write_genai_vlm(export, profile, tmp / name, native=bool(native))
    return record
