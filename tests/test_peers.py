"""The peers harness (benchmarks/peers): the driver end to end on the project's
variants of a tiny checkpoint and, where onnxruntime-genai is installed, on genai's
(its builder's decoder and the project's compiles in genai folders); the
cross-engine checks on made-up runs, the prepared checkpoint, OpenVINO's and
llama.cpp's pieces without those engines, and one-line errors for bad input."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.peers import checkpoint, envs, report, variants  # noqa: E402
from benchmarks.peers.cli import run_one  # noqa: E402
from benchmarks.peers.errors import PeersError  # noqa: E402

QUESTION = "What differs between the two pictures?"
# Qwen2-VL: 14 px patches merged 2 x 2, so a side that is a multiple of 28 inside the
# checkpoint's pixel bounds (3136..12544) is kept: 112 x 112 px -> 8 x 8 patches -> 16
# tokens, 168 x 56 px -> 12 x 4 patches -> 12 tokens
IMAGES = {"square.png": (112, 112), "wide.png": (168, 56)}
IMAGE_TOKENS = sum(w // 14 * h // 14 // 4 for w, h in IMAGES.values())
CHUNK = 16


def peers(*args, cwd=ROOT, timeout=600):
    return subprocess.run([sys.executable, "-m", "benchmarks.peers", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from blindsight.models.checkpoints import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("peers")
    ckpt = make_tiny_checkpoint("qwen2_vl", root / "checkpoint")
    images = []
    for i, (name, size) in enumerate(IMAGES.items()):
        Image.new("RGB", size, (40 * i, 200, 90)).save(root / name)
        images.append(root / name)
    return SimpleNamespace(root=root, checkpoint=ckpt, images=images, cache=root / "cache", venvs=root / "venvs")


@pytest.fixture(scope="module")
def project_run(tiny):
    """The driver once over the project's three variants, two interleaved repeats."""
    out = tiny.root / "record.json"
    args = [tiny.checkpoint, "--question", QUESTION, "--variants", "project", "--repeats", 2, "--threads", 2,
            "--chunk-size", CHUNK, "--max-new-tokens", 4, "--cache", tiny.cache, "--venvs", tiny.venvs, "-o", out]
    for image in tiny.images:
        args += ["--image", image]
    proc = peers(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return SimpleNamespace(proc=proc, record=json.loads(out.read_text()))


def expected_prompt_tokens(tiny) -> int:
    """The chat template rendered by hand (images before the question, as both engines
    place them) and encoded with the checkpoint's tokenizer.json, outside the project."""
    from tokenizers import Tokenizer

    blocks = "".join("<|vision_start|>" + "<|image_pad|>" * (w // 14 * h // 14 // 4) + "<|vision_end|>"
                     for w, h in IMAGES.values())
    text = f"<|im_start|>user\n{blocks}{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    return len(Tokenizer.from_file(str(tiny.checkpoint / "tokenizer.json")).encode(text).ids)


def test_project_variants_end_to_end(tiny, project_run):
    record = project_run.record
    assert record["format"] == "blindsight-peers"
    assert list(record["variants"]) == ["mix", "dense", "raw"]
    prompt = expected_prompt_tokens(tiny)
    for name, v in record["variants"].items():
        assert v["runs"] == 2 and not v["failed"], name
        assert v["prompt_tokens"] == prompt and v["image_tokens"] == IMAGE_TOKENS, name
        m = v["median"]
        assert 0 < m["vision_s"] < m["ttft_s"] and 0 < m["prefill_s"] < m["ttft_s"], name
        assert m["decode_tokens_per_s"] > 0 and m["peak_rss_mib"] > 10, name
    runs = record["runs"]
    # interleaved: the second repeat starts one variant further along
    assert [r["variant"] for r in runs] == ["mix", "dense", "raw", "dense", "raw", "mix"]
    for r in runs:
        assert r["ttft_s"] <= r["generate_s"] <= r["process_wall_s"]
        assert r["details"]["prefill_chunks"] == math.ceil(prompt / CHUNK)
        # one tower call per image, each within the vision part
        towers = r["details"]["vision_runs_s"]
        assert len(towers) == len(tiny.images) and 0 < sum(towers) < r["vision_s"]
    for name in ("mix", "dense", "raw"):
        ttfts = sorted(r["ttft_s"] for r in runs if r["variant"] == name)
        assert record["variants"][name]["median"]["ttft_s"] == pytest.approx(sum(ttfts) / 2)
    assert record["checks"]["token_counts"]["agree"] is True
    assert record["checks"]["greedy_tokens"]["compared"] == ["dense", "raw"]
    assert record["versions"]["project"]["onnxruntime"]
    assert record["settings"]["threads"] == 2 and record["processor"]["max_pixels"] == 12544
    # the patches before the merger: merge_size^2 = 4 per image token
    assert sum(record["vision_patches"]) == 4 * IMAGE_TOKENS
    assert record["openvino_merger_mask_bytes"] == 4 * (4 * IMAGE_TOKENS) ** 2


def test_project_variants_answer_as_the_pipeline_does(tiny, project_run):
    """The record's tokens are what blindsight's Pipeline answers on the same conversion."""
    from blindsight.runtime.pipeline import Pipeline

    record = project_run.record
    export = Path(record["conversions"]["project"]["dir"]) / "export"
    for name, model in (("dense", export / "language_model.dense.onnx"), ("raw", "dense"),
                        ("mix", export / "language_model.mix.onnx")):
        pipe = Pipeline(export, compiled=model, threads=2, chunk_size=CHUNK)
        r = pipe.generate([str(p) for p in tiny.images], QUESTION, max_new_tokens=4)
        assert record["variants"][name]["tokens"] == r.token_ids, name
        assert record["variants"][name]["prompt_tokens"] == len(r.prompt_ids)


def test_table_and_check_lines_are_printed(project_run):
    out = project_run.proc.stdout.splitlines()
    assert out[0].split()[:3] == ["variant", "runs", "TTFT"]
    assert [line.split()[0] for line in out[1:4]] == ["mix", "dense", "raw"]
    counts = project_run.record["variants"]["dense"]
    assert f"every variant saw {counts['prompt_tokens']} prompt tokens, {IMAGE_TOKENS} of them image tokens" in out[4]
    assert out[5].startswith("greedy tokens: the dense variants (dense, raw) agree")


def test_conversion_is_cached_and_prepack_reaches_the_sessions(tiny, project_run):
    out = tiny.root / "again.json"
    proc = peers(tiny.checkpoint, "--image", tiny.images[0], "--question", QUESTION, "--variants", "raw",
                 "--cache", tiny.cache, "--venvs", tiny.venvs, "-o", out, "--max-new-tokens", 2, "--prepack", "off")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    again = record["conversions"]["project"]
    first = project_run.record["conversions"]["project"]
    assert again["cached"] is True and first["cached"] is False and again["dir"] == first["dir"]
    # auto keeps pre-packing for weights this small; off is what the worker's pipeline ran
    assert project_run.record["settings"]["prepack"] == "auto" and record["settings"]["prepack"] == "off"
    assert all(r["details"]["prepack"] is True for r in project_run.record["runs"])
    assert record["runs"][0]["details"]["prepack"] is False


def test_int8_variants_run_the_quantized_export(tiny, project_run):
    """mix-int8 and dense-int8 (and their -head twins, --lm-head int8) run bs-quantize's export of
    the project's conversion; their tokens are what blindsight's Pipeline answers on that export,
    compared but not judged."""
    from blindsight.runtime.pipeline import Pipeline

    out = tiny.root / "int8.json"
    args = [tiny.checkpoint, "--question", QUESTION, "--variants", "dense,project-int8", "--chunk-size", CHUNK,
            "--max-new-tokens", 4, "--cache", tiny.cache, "--venvs", tiny.venvs, "-o", out]
    for image in tiny.images:
        args += ["--image", image]
    proc = peers(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert list(record["variants"]) == ["dense", "mix-int8", "dense-int8", "mix-int8-head", "dense-int8-head"]
    assert record["checks"]["greedy_tokens"]["compared"] == ["dense"], "int8 tokens are not judged"
    for key, head in (("project-int8", False), ("project-int8-lm-head", True)):
        conv = record["conversions"][key]
        assert conv["from"] == Path(project_run.record["conversions"]["project"]["dir"]).name
        export = Path(conv["dir"]) / "export"
        template = json.loads((export / "template.json").read_text())
        assert template["quantized"]["scheme"] == "int8-dynamic" and conv["quantized"] == template["quantized"]
        assert (template["quantized"]["lm_head"] == "int8") == head
        suffix = "-head" if head else ""
        assert record["variants"][f"mix-int8{suffix}"]["precision"] == "int8"
        for name, model in ((f"dense-int8{suffix}", "language_model.dense.onnx"),
                            (f"mix-int8{suffix}", "language_model.mix.onnx")):
            pipe = Pipeline(export, compiled=export / model, threads=2, chunk_size=CHUNK)
            r = pipe.generate([str(p) for p in tiny.images], QUESTION, max_new_tokens=4)
            assert record["variants"][name]["tokens"] == r.token_ids, name
            assert record["variants"][name]["prompt_tokens"] == len(r.prompt_ids)


def test_project_conversion_follows_the_exporter_code(tmp_path, monkeypatch):
    """A changed exporter or compiler source makes a new cached conversion; other
    project files do not."""
    import blindsight

    from benchmarks.peers import convert

    pkg = tmp_path / "blindsight"
    for d in (*convert.PROJECT_WRITERS, "runtime"):
        (pkg / d).mkdir(parents=True)
        (pkg / d / "a.py").write_text(f"# {d}\n")
    monkeypatch.setattr(blindsight, "__file__", str(pkg / "__init__.py"))
    first = convert.project_code_digest()
    (pkg / "runtime" / "a.py").write_text("# changed\n")
    assert convert.project_code_digest() == first
    # the genai folder writer keys the genai conversion only
    (pkg / convert.GENAI_WRITER).write_text("# genai folders\n")
    genai = convert.genai_code_digest()
    assert convert.project_code_digest() == first
    (pkg / convert.GENAI_WRITER).write_text("# genai folders, changed\n")
    assert convert.project_code_digest() == first and convert.genai_code_digest() != genai
    (pkg / "passes" / "a.py").write_text("# changed\n")
    assert convert.project_code_digest() != first


# ------------------------------------------------------------------ checks on made-up runs

def run(variant, ttft, prompt=100, image=64, tokens=(5, 6, 7), repeat=0):
    return {"variant": variant, "repeat": repeat, "ttft_s": ttft, "vision_s": ttft / 2, "prefill_s": ttft / 2,
            "decode_tokens_per_s": 10.0, "peak_rss_mib": 500.0, "prompt_tokens": prompt, "image_tokens": image,
            "tokens": list(tokens)}


def test_summary_takes_medians_of_successful_runs_only():
    runs = [run("a", 3.0), run("a", 1.0), run("a", 2.0), {"variant": "a", "repeat": 3, "error": "exit 1: boom"},
            run("b", 4.0), run("b", 6.0)]
    s = report.summarize(runs)
    assert s["a"]["runs"] == 3 and s["a"]["failed"] == ["exit 1: boom"]
    assert s["a"]["median"]["ttft_s"] == 2.0 and s["b"]["median"]["ttft_s"] == 5.0
    assert s["a"]["median"]["vision_s"] == 1.0


def test_counts_agree_when_every_variant_saw_the_same_tokens():
    c = report.check_counts(report.summarize([run("a", 1), run("b", 1), run("b", 2)]))
    assert c["agree"] is True and "every variant saw 100 prompt tokens, 64 of them image tokens" in c["line"]


def test_counts_disagree_names_each_group():
    c = report.check_counts(report.summarize([run("a", 1), run("b", 1), run("c", 1, prompt=101, image=65)]))
    assert c["agree"] is False
    assert "a/b: 100 prompt, 64 image" in c["line"] and "c: 101 prompt, 65 image" in c["line"]


def test_counts_unknown_or_changing_between_repeats_do_not_agree():
    assert report.check_counts(report.summarize([run("a", 1, image=None), run("b", 1, image=None)]))["agree"] is False
    c = report.check_counts(report.summarize([run("a", 1), run("a", 1, image=63, repeat=1)]))
    assert c["agree"] is False and "changed between repeats: a" in c["line"]


def test_dense_tokens_agree_and_sparse_variants_are_compared_but_not_judged():
    s = report.summarize([run("dense", 1, tokens=(1, 2, 3)), run("ov-sdpa", 1, tokens=(1, 2, 3)),
                          run("mix", 1, tokens=(1, 9, 9))])
    t = report.check_tokens(s, ["dense", "ov-sdpa"], first=3)
    assert t["agree"] is True and t["reference"] == "dense"
    assert t["matching_prefix"] == {"dense": 3, "ov-sdpa": 3, "mix": 1}


def test_dense_tokens_disagree_says_how_far_they_match():
    s = report.summarize([run("dense", 1, tokens=(1, 2, 3, 4)), run("ov-sdpa", 1, tokens=(1, 2, 8, 4))])
    t = report.check_tokens(s, ["dense", "ov-sdpa"], first=4)
    assert t["agree"] is False and "ov-sdpa matches 2 of 4" in t["line"]


def test_an_answer_ended_early_agrees_as_far_as_it_goes():
    s = report.summarize([run("dense", 1, tokens=(1, 2, 3)), run("raw", 1, tokens=(1, 2))])
    assert report.check_tokens(s, ["dense", "raw"], first=3)["agree"] is True


def test_table_shows_a_failed_variant_with_its_reason():
    chosen = variants.select("dense,ov-sdpa")
    s = report.summarize([run("dense", 1.5), {"variant": "ov-sdpa", "repeat": 0, "error": "exit 1: no venv"}])
    lines = report.table(s, chosen, report.check_tokens(s, ["dense"], 3), 3).splitlines()
    assert lines[1].split()[:3] == ["dense", "1", "1.500"]
    assert lines[2].split()[:4] == ["ov-sdpa", "0", "failed:", "exit"]


# ------------------------------------------------------------------ pieces

def test_variant_selection_keeps_order_and_expands_groups():
    assert [v.name for v in variants.select("raw,project")] == ["raw", "mix", "dense"]
    assert [v.name for v in variants.select("project-int8")] == ["mix-int8", "dense-int8", "mix-int8-head",
                                                                 "dense-int8-head"]
    assert all(v.engine == "openvino" for v in variants.select("openvino"))
    # the variant named genai is genai's own decoder; its group has another name
    assert [v.name for v in variants.select("genai")] == ["genai"]
    assert [v.name for v in variants.select("onnxruntime-genai")] == ["genai", "genai-pruned", "genai-dense", "genai-mix"]
    with pytest.raises(PeersError, match="unknown variant 'fast'"):
        variants.select("dense,fast")


def test_prepared_checkpoint_fixes_both_forms_of_the_pixel_bounds(tiny):
    from blindsight.runtime.images import ImageProcessor  # the project's reader of the same file

    prepared, settings = checkpoint.prepare(tiny.checkpoint, tiny.root / "prep", max_pixels=28 * 28 * 20)
    doc = json.loads((prepared / checkpoint.PROCESSOR).read_text())
    assert doc["max_pixels"] == doc["size"]["longest_edge"] == settings["max_pixels"] == 15680
    assert doc["min_pixels"] == doc["size"]["shortest_edge"] == 3136  # the checkpoint's own
    assert (prepared / "config.json").is_symlink() and (prepared / "config.json").resolve() == (tiny.checkpoint / "config.json").resolve()
    assert ImageProcessor.from_directory(prepared, "qwen2_vl").max_pixels == 15680
    again, _ = checkpoint.prepare(tiny.checkpoint, tiny.root / "prep", max_pixels=28 * 28 * 20)
    assert again == prepared


def test_openvino_properties_for_each_mode():
    """What the OpenVINO worker asks of VLMPipeline, checked with stand-ins for openvino_genai."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))
    from worker_openvino import pipeline_properties

    class Config(SimpleNamespace):
        def __init__(self):
            super().__init__(mode=None, xattention_threshold=0.8, xattention_block_size=64)

    g = SimpleNamespace(SchedulerConfig=SimpleNamespace, SparseAttentionConfig=Config,
                        SparseAttentionMode=SimpleNamespace(TRISHAPE="T", XATTENTION="X"))
    base = {"threads": 2, "chunk_size": 512}
    sdpa = pipeline_properties(dict(base, mode="sdpa", precision="f32"), g)
    assert sdpa == {"INFERENCE_NUM_THREADS": 2, "INFERENCE_PRECISION_HINT": "f32", "ATTENTION_BACKEND": "SDPA"}
    assert "INFERENCE_PRECISION_HINT" not in pipeline_properties(dict(base, mode="sdpa", precision="default"), g)
    paged = pipeline_properties(dict(base, mode="paged", precision="f32"), g)
    assert paged["ATTENTION_BACKEND"] == "PA" and paged["scheduler_config"].max_num_batched_tokens == 512
    assert not hasattr(paged["scheduler_config"], "use_sparse_attention")
    xa = pipeline_properties(dict(base, mode="xattention", precision="f32", sparse={"xattention_threshold": "0.5"}), g)
    sched = xa["scheduler_config"]
    assert sched.use_sparse_attention is True and sched.sparse_attention_config.mode == "X"
    assert sched.sparse_attention_config.xattention_threshold == 0.5


def test_openvino_venv_pins_cpu_torch_and_leaves_torchvision_out(tmp_path):
    pins = envs.PINS["openvino"] + envs.NO_DEPS["openvino"]
    assert "torch==2.13.0" in pins and not any(p.startswith("torchvision") for p in pins)
    assert envs.venv_path(tmp_path, "openvino").name.startswith("openvino-")


def test_a_failing_worker_is_one_line_in_the_run(tmp_path):
    v = variants.VARIANTS["raw"]
    spec = {"export_dir": str(tmp_path / "nothing"), "model": "dense", "native": None, "images": [], "question": "q",
            "threads": 1, "chunk_size": 16, "max_new_tokens": 1, "warmup": False}
    r = run_one(v, spec, Path(sys.executable), tmp_path, 0, timeout=120)
    assert r["error"].startswith("exit 1: ") and "not a bs-export directory" in r["error"]


def test_openvino_mask_warning_grows_with_the_square_of_the_images():
    from benchmarks.peers.cli import openvino_memory_warning

    # 896 x 896 px at Qwen2-VL's 14 px patches: 4,096 patches an image
    assert openvino_memory_warning([4096] * 4, 23.5) is None  # 1.07 GB
    line = openvino_memory_warning([4096] * 16, 23.5)
    assert "65,536 patches of the 16 images" in line and "17.2 GB" in line and "23.5 GiB" in line
    assert openvino_memory_warning([4096] * 16, None) is None


def test_a_worker_killed_by_a_signal_is_named(tmp_path):
    """A worker the kernel kills (SIGKILL, as the out-of-memory killer does) says so, not a bare -9."""
    interpreter = tmp_path / "python"
    interpreter.write_text("#!/bin/sh\necho loading the model\nkill -9 $$\n")
    interpreter.chmod(0o755)
    spec = {"threads": 1}
    r = run_one(variants.VARIANTS["ov-sdpa"], spec, interpreter, tmp_path, 0, timeout=60)
    assert r["error"].startswith("exit -9, killed by SIGKILL (the kernel's out-of-memory killer")
    assert "loading the model" in r["error"]
    interpreter.write_text("#!/bin/sh\nkill -15 $$\n")
    assert run_one(variants.VARIANTS["ov-sdpa"], spec, interpreter, tmp_path, 1, timeout=60)["error"].startswith(
        "exit -15, killed by SIGTERM (log: ")


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("args, message", [
    (["MISSING", "--image", "IMG", "--question", "q"], "is not a directory"),
    (["CKPT", "--image", "IMG", "--question", "q", "--variants", "dense,turbo"], "unknown variant 'turbo'"),
    (["CKPT", "--image", "NOPE.png", "--question", "q"], "does not exist"),
    (["CKPT", "--image", "CKPT/config.json", "--question", "q"], "is not an image"),
    (["CKPT", "--image", "IMG", "--question", "q", "--threads", "0"], "--threads is 0"),
    (["CKPT", "--image", "IMG", "--question", "q", "--sparse", "stride=4"], "expected KEY=VALUE"),
    (["CKPT", "--image", "IMG", "--question", "q", "--variants", "dense,llama-f16"], "vision tower has 1 block(s)"),
    (["CKPT", "--image", "IMG", "--question", "q", "--variants", "genai", "--genai-python", "NOPE/python"],
     "--genai-python NOPE/python does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(tiny, tmp_path, args, message):
    subs = {"CKPT": str(tiny.checkpoint), "IMG": str(tiny.images[0]), "MISSING": str(tmp_path / "missing")}
    args = [subs.get(a, a.replace("CKPT", str(tiny.checkpoint))) for a in args]
    proc = peers(*args, "--cache", tmp_path / "cache", "--venvs", tmp_path / "venvs")
    assert proc.returncode == 2
    assert proc.stderr.startswith("peers: ") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_llamacpp_variants_picked_by_a_group_are_left_out_for_a_shallow_tower(tiny):
    from benchmarks.peers.cli import check_args, parser

    args = parser().parse_args([str(tiny.checkpoint), "--image", str(tiny.images[0]), "--question", "q",
                                "--variants", "dense,llamacpp"])
    assert [v.name for v in check_args(args)] == ["dense"]
    args = parser().parse_args([str(tiny.checkpoint), "--image", str(tiny.images[0]), "--question", "q",
                                "--variants", "llamacpp"])
    with pytest.raises(PeersError, match="no other variant is selected"):
        check_args(args)


def test_help_names_every_variant():
    proc = peers("--help")
    assert proc.returncode == 0
    assert all(name in proc.stdout for name in variants.VARIANTS)


# ------------------------------------------------------------------ onnxruntime-genai

HAS_GENAI = importlib.util.find_spec("onnxruntime_genai") is not None
needs_genai = pytest.mark.skipif(not HAS_GENAI, reason="onnxruntime-genai is not installed (pip install -e '.[genai]')")


@pytest.fixture(scope="module")
def genai_run(tiny, project_run):
    """The driver over genai's four variants and the project's dense, with this
    interpreter as genai's (it has onnxruntime-genai and the builder's requirements)."""
    out = tiny.root / "genai.json"
    args = [tiny.checkpoint, "--question", QUESTION, "--variants", "dense,onnxruntime-genai", "--threads", 2, "--chunk-size", CHUNK,
            "--max-new-tokens", 4, "--cache", tiny.cache, "--venvs", tiny.venvs, "--genai-python", sys.executable,
            "-o", out]
    for image in tiny.images:
        args += ["--image", image]
    proc = peers(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return SimpleNamespace(proc=proc, record=json.loads(out.read_text()))


@needs_genai
def test_genai_variants_answer_as_the_pipeline_does(tiny, genai_run):
    """genai's builder decoder and the all-dense compile in genai give the tokens of the
    project's Pipeline on the raw export; the mix in genai those of the Pipeline on the
    compiled mix; every variant saw the prompt counted outside the project."""
    from blindsight.runtime.pipeline import Pipeline

    record = genai_run.record
    assert list(record["variants"]) == ["dense", "genai", "genai-pruned", "genai-dense", "genai-mix"]
    export = Path(record["conversions"]["project"]["dir"]) / "export"
    images = [str(p) for p in tiny.images]
    raw = Pipeline(export, compiled=False, native=False).generate(images, QUESTION, max_new_tokens=4).token_ids
    mix = Pipeline(export, compiled=export / "language_model.mix.onnx").generate(images, QUESTION, max_new_tokens=4).token_ids
    prompt = expected_prompt_tokens(tiny)
    for name, want in (("genai", raw), ("genai-pruned", raw), ("genai-dense", raw), ("genai-mix", mix)):
        v = record["variants"][name]
        assert v["runs"] == 1 and not v["failed"], name
        assert v["tokens"] == want, name
        assert v["prompt_tokens"] == prompt and v["image_tokens"] == IMAGE_TOKENS, name
        m = v["median"]
        assert 0 < m["vision_s"] < m["ttft_s"] and 0 < m["prefill_s"] < m["ttft_s"], name
    assert record["checks"]["greedy_tokens"]["compared"] == ["dense", "genai", "genai-pruned", "genai-dense"]
    assert record["checks"]["token_counts"]["agree"] is True
    assert record["versions"]["genai"]["onnxruntime-genai"] == envs.GENAI_VERSION
    assert record["setup"]["genai"]["interpreter"] == sys.executable


@needs_genai
def test_genai_folders_hold_the_builders_decoder_and_the_compiles(tiny, genai_run):
    """The builder folder's decoder is genai's own (GroupQueryAttention, one cache buffer,
    no BlindSightAttention) beside the export's tower as bs-compile --genai wraps it;
    the compiled folders' decoders hold BlindSightAttention and name the native kernel;
    the vision runs, one per image, were timed."""
    import onnx

    record = genai_run.record
    root = Path(record["conversions"]["genai"]["dir"])
    ops, logits = {}, {}
    for folder in ("builder", "builder-pruned", "dense", "mix"):
        config = json.loads((root / folder / "genai_config.json").read_text())
        assert config["model"]["type"] == "qwen2_5_vl", folder
        decoder = onnx.load(root / folder / config["model"]["decoder"]["filename"], load_external_data=False)
        ops[folder] = {n.op_type for n in decoder.graph.node}
        out = next(o for o in decoder.graph.output if o.name == "logits")
        logits[folder] = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
        vision = onnx.load(root / folder / config["model"]["vision"]["filename"], load_external_data=False)
        assert [i.name for i in vision.graph.input] == ["pixel_values", "image_grid_thw"], folder
    builder = json.loads((root / "builder" / "genai_config.json").read_text())
    assert "GroupQueryAttention" in ops["builder"] and "BlindSightAttention" not in ops["builder"]
    # the builder's default LM head runs at every position; pruned, at the last one as the project's
    assert logits["builder"][1] == "sequence_length" and logits["builder-pruned"][1] == 1 and logits["mix"][1] == 1
    assert builder["search"]["past_present_share_buffer"] is True
    assert "BlindSightAttention" in ops["dense"] and "BlindSightAttention" in ops["mix"]
    from blindsight import native

    mix = json.loads((root / "mix" / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    assert ("custom_ops_library" in mix) == (native.library_path() is not None)
    for run in record["runs"]:
        if run["variant"].startswith("genai"):
            d = run["details"]
            # genai calls the folder's tower once per image
            assert len(d["vision_runs_s"]) == len(tiny.images) and min(d["vision_runs_s"]) > 0 and d["embedding_run_s"] > 0
            assert run["vision_s"] >= d["processor_s"] + sum(d["vision_runs_s"])


def test_builder_checkpoint_gives_qwen2_vl_as_qwen2_5_vl(tiny, tmp_path):
    """The builder's view of a Qwen2-VL checkpoint: transformers loads it as Qwen2.5-VL
    with every text weight equal to the checkpoint's own; other families are refused."""
    import torch
    from safetensors.numpy import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    from benchmarks.peers.convert import builder_checkpoint

    view = tmp_path / "view"
    assert "Qwen2-VL given as Qwen2.5-VL" in builder_checkpoint(tiny.checkpoint, view)
    config = json.loads((view / "config.json").read_text())
    original = json.loads((tiny.checkpoint / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert {k: v for k, v in config["text_config"].items() if k != "model_type"} == \
        {k: v for k, v in original["text_config"].items() if k != "model_type"}
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(view, dtype=torch.float32)
    weights = {k: v for f in tiny.checkpoint.glob("*.safetensors") for k, v in load_file(f).items()}
    text = {k: v for k, v in weights.items() if not k.startswith(("visual.", "model.visual."))}
    state = model.state_dict()
    assert len(text) > 10
    for key, value in text.items():
        name = key if key in state else key.replace("model.", "model.language_model.", 1)
        assert (state[name].numpy() == value).all(), key
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    with pytest.raises(PeersError, match="is gemma3"):
        builder_checkpoint(other, tmp_path / "view2")


def test_genai_venv_pins_cpu_torch_and_genai(tmp_path):
    pins = envs.PINS["genai"]
    assert f"onnxruntime-genai=={envs.GENAI_VERSION}" in pins and "torch==2.13.0" in pins
    assert not any(p.startswith("torchvision") for p in pins)
    assert envs.venv_path(tmp_path, "genai") not in (envs.venv_path(tmp_path, "openvino"), envs.venv_path(tmp_path, "llamacpp"))
    given = tmp_path / "python"
    assert envs.python_of("genai", tmp_path, given=given) == (given, None)
    assert not list(tmp_path.iterdir())  # no venv made when an interpreter is given


# ------------------------------------------------------------------ llama.cpp, without llama.cpp

def _llamacpp_worker():
    sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))
    import worker_llamacpp

    return worker_llamacpp


def test_llamacpp_token_bounds_match_the_pixel_bounds():
    """1,003,520 px is 1,280 tokens of 28 x 28 px: an 896 x 896 px image (1,024 tokens) is not resized."""
    bounds = checkpoint.token_bounds({"min_pixels": 3136, "max_pixels": 1003520, "patch_size": 14, "merge_size": 2})
    assert bounds == {"min_tokens": 4, "max_tokens": 1280, "patch_size": 14, "merge_size": 2}
    assert (896 // 28) ** 2 <= bounds["max_tokens"]


def test_llamacpp_context_covers_the_prompt(tiny):
    """The KV cache the worker asks for holds the prompt as the tokenizer counts it, and the answer."""
    w = _llamacpp_worker()
    n_ctx = w.context_length(list(IMAGES.values()), 14, 2, 1280, QUESTION, 8)
    assert n_ctx % 256 == 0
    assert expected_prompt_tokens(tiny) + 8 <= n_ctx <= expected_prompt_tokens(tiny) + 8 + 512
    # an image above the bound counts as the bound, not as its size
    assert w.context_length([(4480, 4480)], 14, 2, 1280, QUESTION, 8) < 1280 + 512


def test_llamacpp_log_split_reads_mtmd_lines():
    """Lines as mtmd-helper prints them (llama-cpp-python 0.3.36, two images)."""
    w = _llamacpp_worker()
    log = ("encoding image slice...\nimage slice encoded in 1520 ms\ndecoding image batch 1/1, n_tokens_batch = 1024\n"
           "image decoded (batch 1/1) in 830 ms\nencoding image slice...\nimage slice encoded in 1480 ms\n"
           "decoding image batch 1/2, n_tokens_batch = 512\nimage decoded (batch 1/2) in 400 ms\n"
           "image decoded (batch 2/2) in 410 ms\n")
    assert w.parse_log(log) == {"encode_s": 3.0, "encoded_images": 2, "image_decode_s": 1.64}
    assert w.parse_log("nothing here")["encoded_images"] == 0


def test_llamacpp_stderr_capture_takes_what_c_code_writes_to_fd_2(capfd):
    w = _llamacpp_worker()
    with w.CapturedStderr() as captured:
        os.write(2, b"image slice encoded in 7 ms\n")  # as C code writes: to the descriptor, past sys.stderr
    assert "encoded in 7 ms" in captured.text
    assert "encoded in 7 ms" in capfd.readouterr().err  # echoed back, so the run's log keeps it


def test_llamacpp_prompt_counts_come_from_the_chunks():
    """Counted over mtmd's chunks (text, image, text, image, text) with a stand-in mtmd module."""
    w = _llamacpp_worker()
    chunks = [("text", 12), ("image", 16), ("text", 2), ("image", 12), ("text", 15)]
    mtmd = SimpleNamespace(
        MTMD_INPUT_CHUNK_TYPE_TEXT=0, MTMD_INPUT_CHUNK_TYPE_IMAGE=1,
        mtmd_tokenize=lambda ctx, c, *a: 0,
        mtmd_input_chunks_size=lambda c: len(c),
        mtmd_input_chunks_get=lambda c, i: c[i],
        mtmd_input_chunk_get_n_tokens=lambda chunk: chunk[1],
        mtmd_input_chunk_get_type=lambda chunk: 1 if chunk[0] == "image" else 0)
    clocks = w.Clocks(mtmd)
    assert mtmd.mtmd_tokenize(None, chunks) == 0
    assert (clocks.prompt_tokens, clocks.image_tokens) == (57, 28)
    assert clocks.tokenize_s >= 0


def test_llamacpp_token_recorder_keeps_sampled_ids_in_order():
    w = _llamacpp_worker()
    stream = iter([5, 9, 2])
    llm = SimpleNamespace(sample=lambda *a, **k: next(stream))
    recorder = w.TokenRecorder(llm)
    assert [llm.sample() for _ in range(3)] == [5, 9, 2]
    assert recorder.ids == [5, 9, 2] and recorder.times == sorted(recorder.times)


def test_llamacpp_spec_names_the_conversion_files(tiny, tmp_path):
    from benchmarks.peers.cli import spec_for

    args = SimpleNamespace(image=tiny.images, question=QUESTION, threads=2, chunk_size=512, max_new_tokens=4,
                           warmup=False, prepared=tiny.checkpoint,
                           processor={"min_pixels": 3136, "max_pixels": 12544, "patch_size": 14, "merge_size": 2})
    spec = spec_for(variants.VARIANTS["llama-f16"], {"dir": str(tmp_path)}, args)
    assert spec["model"] == str(tmp_path / "model-f16.gguf") and spec["mmproj"] == str(tmp_path / "mmproj-f16.gguf")
    assert (spec["kv_type"], spec["flash_attn"], spec["min_tokens"], spec["max_tokens"]) == ("f16", True, 4, 16)
    assert spec["chat_template"] == (tiny.checkpoint / "chat_template.jinja").read_text()
    assert [v.name for v in variants.select("llamacpp")] == ["llama-f32", "llama-f32-fa", "llama-f16"]
    # llama.cpp's flash attention casts K and V to f16: only the variant without it is judged as fp32
    judged = [v for v in variants.VARIANTS.values() if v.engine == "llamacpp" and v.dense and v.precision == "fp32"]
    assert [v.name for v in judged] == ["llama-f32"] and judged[0].settings["flash_attn"] is False


def _fake_sdist(path: Path, files: dict) -> Path:
    import io
    import tarfile

    prefix = f"llama_cpp_python-{envs.LLAMACPP_VERSION}/"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_llamacpp_converter_is_unpacked_from_the_sdist(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _fake_sdist(wheels / f"llama_cpp_python-{envs.LLAMACPP_VERSION}.tar.gz", {
        "vendor/llama.cpp/convert_hf_to_gguf.py": "print('convert')\n",
        "vendor/llama.cpp/conversion/base.py": "class TextModel: pass\n",
        "vendor/llama.cpp/gguf-py/gguf/__init__.py": "\n",
        "vendor/llama.cpp/src/llama.cpp": "// not wanted\n",
        "llama_cpp/llama.py": "# not wanted\n"})
    script = envs.unpack_converter(wheels, tmp_path / "out")
    assert script.read_text() == "print('convert')\n"
    got = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert got == ["conversion/base.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    _fake_sdist(wheels / f"llama_cpp_python-{envs.LLAMACPP_VERSION}.tar.gz", {"README.md": "x"})
    with pytest.raises(PeersError, match="has no vendor/llama.cpp/convert_hf_to_gguf.py"):
        envs.unpack_converter(wheels, tmp_path / "again")


def test_llamacpp_converter_repairs_only_what_a_local_tokenizer_lacks(tmp_path):
    """The launcher runs the converter as a script with its arguments; a pre-tokenizer the
    converter does not know becomes qwen2's and a known one stays; a vocabulary without
    merges gets the one no-op merge, one with merges keeps its own."""
    from benchmarks.peers.convert import LLAMACPP_CONVERT

    (tmp_path / "conversion").mkdir()
    (tmp_path / "conversion" / "__init__.py").write_text("")
    (tmp_path / "conversion" / "base.py").write_text(
        "class TextModel:\n"
        "    def get_vocab_base_pre(self, tokenizer):\n"
        "        if tokenizer == 'known':\n"
        "            return 'llama-bpe'\n"
        "        raise NotImplementedError('BPE pre-tokenizer was not recognized')\n")
    (tmp_path / "gguf-py" / "gguf").mkdir(parents=True)
    (tmp_path / "gguf-py" / "gguf" / "__init__.py").write_text(
        "class SpecialVocab:\n"
        "    def __init__(self, merges):\n"
        "        self.load_merges, self.merges = True, merges\n"
        "    def add_to_gguf(self, gw, quiet=False):\n"
        "        gw.extend(self.merges)\n")
    script = tmp_path / "convert_hf_to_gguf.py"
    script.write_text("import sys, gguf\nfrom conversion.base import TextModel\n"
                      "merges = [] if sys.argv[2] == 'none' else ['a b']\n"
                      "written = []\ngguf.SpecialVocab(merges).add_to_gguf(written)\n"
                      "print(sys.argv[1:], TextModel().get_vocab_base_pre(sys.argv[1]), written)\n")
    for tok, merges, expected in (("known", "some", "llama-bpe ['a b']"), ("local", "none", "qwen2 ['! !']")):
        proc = subprocess.run([sys.executable, "-c", LLAMACPP_CONVERT, str(script), tok, merges, "--outtype", "f32"],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"['{tok}', '{merges}', '--outtype', 'f32'] {expected}"


def _fake_llamacpp_venv(root: Path, writes_tensors: bool) -> Path:
    """A venv layout whose converter writes a GGUF stand-in (a tensor count) and whose
    gguf-py reads it back; the interpreter is this one."""
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "python").symlink_to(sys.executable)
    conv = root / envs.CONVERTER
    (conv / "conversion").mkdir(parents=True)
    (conv / "conversion" / "__init__.py").write_text("")
    (conv / "conversion" / "base.py").write_text("class TextModel:\n    def get_vocab_base_pre(self, t):\n        return 'qwen2'\n")
    (conv / "gguf-py" / "gguf").mkdir(parents=True)
    (conv / "gguf-py" / "gguf" / "__init__.py").write_text(
        "from pathlib import Path\n"
        "class SpecialVocab:\n    def add_to_gguf(self, gw):\n        pass\n"
        "class GGUFReader:\n    def __init__(self, path):\n        self.tensors = [0] * int(Path(path).read_text())\n")
    (conv / "convert_hf_to_gguf.py").write_text(
        "import sys\nfrom pathlib import Path\n"
        "args = sys.argv[1:]\nsrc, out = Path(args[0]), Path(args[args.index('--outfile') + 1])\n"
        "assert (src / 'config.json').is_file()\n"
        f"out.write_text('0' if '--mmproj' in args and not {writes_tensors} else '5')\n")
    return root / "bin" / "python"


def test_llamacpp_conversion_refuses_an_empty_gguf(tiny, tmp_path):
    """A checkpoint whose tensors the converter does not recognise gives an empty projector
    file (no error from the converter): the conversion says so instead of caching it."""
    from benchmarks.peers import convert

    good = _fake_llamacpp_venv(tmp_path / "good", writes_tensors=True)
    (tmp_path / "out").mkdir()
    record = convert.llamacpp(tiny.checkpoint, tmp_path / "out", good, ("f32",))
    assert record["outtypes"] == ["f32"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mmproj-f32.gguf", "model-f32.gguf"]
    bad = _fake_llamacpp_venv(tmp_path / "bad", writes_tensors=False)
    (tmp_path / "out2").mkdir()
    with pytest.raises(PeersError, match="wrote no tensors to mmproj-f32.gguf"):
        convert.llamacpp(tiny.checkpoint, tmp_path / "out2", bad, ("f32",))


def test_llamacpp_no_op_merge_leaves_the_tokenization_alone(tiny):
    """llama.cpp splits a merged symbol that is not a token back into single-byte tokens:
    the added merge's result must not be a token, and both its halves must be."""
    vocab = json.loads((tiny.checkpoint / "tokenizer.json").read_text())["model"]["vocab"]
    left, right = "! !".split()
    assert left in vocab and right in vocab and left + right not in vocab


def test_llamacpp_prompt_is_the_checkpoints_template_with_image_urls(tiny):
    """The worker's prompt text against transformers' own rendering of the same template."""
    from transformers import AutoTokenizer

    w = _llamacpp_worker()
    urls = [Path(p).resolve().as_uri() for p in tiny.images]
    fmt = w.prompt_format(checkpoint.chat_template(tiny.checkpoint), urls, QUESTION)
    assert fmt.startswith("{% raw %}") and fmt.endswith("{% endraw %}")
    content = [{"type": "image"} for _ in urls] + [{"type": "text", "text": QUESTION}]
    reference = AutoTokenizer.from_pretrained(tiny.checkpoint).apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    for url in urls:
        reference = reference.replace(w.IMAGE_BLOCK, url, 1)
    assert fmt[len("{% raw %}"):-len("{% endraw %}")] == reference
    with pytest.raises(SystemExit, match="wrote 0 image blocks for 2 images"):
        w.prompt_format("{{ messages[0]['content'][-1]['text'] }}", urls, QUESTION)


def test_chat_template_is_found_where_transformers_looks(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from config"}))
    assert checkpoint.chat_template(tmp_path) == "from config"
    (tmp_path / "chat_template.jinja").write_text("from jinja")
    assert checkpoint.chat_template(tmp_path) == "from jinja"
    with pytest.raises(PeersError, match="has no chat template"):
        checkpoint.chat_template(tmp_path / "nothing")


def test_converter_view_puts_a_transformers5_tokenizer_config_in_457_terms(tiny, tmp_path):
    from benchmarks.peers.convert import converter_view

    src = tmp_path / "src"
    src.mkdir()
    for item in tiny.checkpoint.iterdir():
        (src / item.name).symlink_to(item.resolve())
    (src / "tokenizer_config.json").unlink()
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "TokenizersBackend", "extra_special_tokens": ["<|a|>"], "eos_token": "<|im_end|>"}))
    view = converter_view(src, tmp_path / "view")
    doc = json.loads((view / "tokenizer_config.json").read_text())
    assert doc == {"tokenizer_class": "PreTrainedTokenizerFast", "additional_special_tokens": ["<|a|>"],
                   "eos_token": "<|im_end|>"}
    assert json.loads((src / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
    assert (view / "config.json").is_symlink() and (view / "tokenizer.json").resolve() == (tiny.checkpoint / "tokenizer.json").resolve()
    # a config transformers 4.57 reads as it is stays a link to the original
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Qwen2Tokenizer"}))
    assert (converter_view(src, tmp_path / "view2") / "tokenizer_config.json").is_symlink()


def test_llamacpp_venv_pins_cpu_torch_and_the_converters_transformers(tmp_path):
    pins = envs.PINS["llamacpp"]
    assert f"llama-cpp-python=={envs.LLAMACPP_VERSION}" in pins and "torch==2.13.0" in pins
    assert "transformers==4.57.6" in pins and not any(p.startswith("torchvision") for p in pins)
    assert envs.venv_path(tmp_path, "llamacpp") != envs.venv_path(tmp_path, "openvino")
