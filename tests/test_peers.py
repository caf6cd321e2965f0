"""The peers harness (benchmarks/peers) without any peer engine installed: the driver
end to end on the project's variants of a tiny checkpoint, the cross-engine checks
on made-up runs, the prepared checkpoint, and one-line errors for bad input."""

from __future__ import annotations

import json
import math
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
    for name in ("mix", "dense", "raw"):
        ttfts = sorted(r["ttft_s"] for r in runs if r["variant"] == name)
        assert record["variants"][name]["median"]["ttft_s"] == pytest.approx(sum(ttfts) / 2)
    assert record["checks"]["token_counts"]["agree"] is True
    assert record["checks"]["greedy_tokens"]["compared"] == ["dense", "raw"]
    assert record["versions"]["project"]["onnxruntime"]
    assert record["settings"]["threads"] == 2 and record["processor"]["max_pixels"] == 12544


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


def test_conversion_is_cached(tiny, project_run):
    out = tiny.root / "again.json"
    proc = peers(tiny.checkpoint, "--image", tiny.images[0], "--question", QUESTION, "--variants", "raw",
                 "--cache", tiny.cache, "--venvs", tiny.venvs, "-o", out, "--max-new-tokens", 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads(out.read_text())["conversions"]["project"]
    first = project_run.record["conversions"]["project"]
    assert again["cached"] is True and first["cached"] is False and again["dir"] == first["dir"]


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
    assert all(v.engine == "openvino" for v in variants.select("openvino"))
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


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("args, message", [
    (["MISSING", "--image", "IMG", "--question", "q"], "is not a directory"),
    (["CKPT", "--image", "IMG", "--question", "q", "--variants", "dense,turbo"], "unknown variant 'turbo'"),
    (["CKPT", "--image", "NOPE.png", "--question", "q"], "does not exist"),
    (["CKPT", "--image", "CKPT/config.json", "--question", "q"], "is not an image"),
    (["CKPT", "--image", "IMG", "--question", "q", "--threads", "0"], "--threads is 0"),
    (["CKPT", "--image", "IMG", "--question", "q", "--sparse", "stride=4"], "expected KEY=VALUE"),
])
def test_bad_input_is_one_line_and_exit_2(tiny, tmp_path, args, message):
    subs = {"CKPT": str(tiny.checkpoint), "IMG": str(tiny.images[0]), "MISSING": str(tmp_path / "missing")}
    args = [subs.get(a, a.replace("CKPT", str(tiny.checkpoint))) for a in args]
    proc = peers(*args, "--cache", tmp_path / "cache", "--venvs", tmp_path / "venvs")
    assert proc.returncode == 2
    assert proc.stderr.startswith("peers: ") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_help_names_every_variant():
    proc = peers("--help")
    assert proc.returncode == 0
    assert all(name in proc.stdout for name in variants.VARIANTS)
