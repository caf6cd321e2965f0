"""Decoders that onnxruntime-genai's model builder writes (tests/fixtures/genai:
tiny random Qwen2.5-VL, Qwen3-VL and Gemma 3 text decoders, com.microsoft
GroupQueryAttention with a KV cache whose past and present share one buffer;
Qwen's rotary comes before it (Qwen3-VL's after q/k norms, interleaved
M-RoPE), Gemma 3's inside it, with a sliding window on its first layer).

Compiled all-dense, the decoder equals the builder's own graph in ONNX Runtime
(logits and the valid part of every present) over a prompt and decode steps;
with a sparse profile every BlindSightAttention node equals the numpy
reference (docs/specification.md §2) on the Q/K/V it receives, and those are
the decoder's own."""

from __future__ import annotations

import json
import importlib.util
import os
import sys
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from _util import run, session
from blindsight.attention import reference_attention
from blindsight.compiler.pipeline import compile_model
from blindsight.profile import Profile

FIXTURES = Path(__file__).parent / "fixtures" / "genai"
FAMILIES = ("qwen2_5_vl", "qwen3_vl", "gemma3")
#: graphs compiled here: (fixture folder, graph file, its genai_config); gemma3_windowed is the
#: builder's default Gemma 3 build (sliding_window_cache on layer 0; same weights file)
VARIANTS = {
    "qwen2_5_vl": ("qwen2_5_vl", "model.onnx", "genai_config.json"),
    "qwen3_vl": ("qwen3_vl", "model.onnx", "genai_config.json"),
    "gemma3": ("gemma3", "model.onnx", "genai_config.json"),
    "gemma3_windowed": ("gemma3", "model.windowed.onnx", "genai_config.windowed.json"),
}
WINDOW = 8  # Gemma 3's tiny sliding window#: the builder's extra options per variant (gemma3: full-length caches on its sliding layers)
EXTRA_OPTIONS = {"qwen2_5_vl": None, "qwen3_vl": None, "gemma3": {"windowed_kv_cache": "false"}, "gemma3_windowed": None}
LAYERS, HEADS, KV_HEADS, HEAD_SIZE, SCALE = 2, 4, 2, 16, 0.25
SPANS = np.array([[2, 7], [8, 14]], dtype=np.int64)  # two "images" inside a 16-token prompt
SPARSE = [["dense", "sink", "intra", "intra_sink"], ["intra", "intra_sink", "sink", "intra"]]


def _copy_fixture(variant: str, dst: Path) -> Path:
    """The variant's folder as genai reads it: model.onnx, its weights, genai_config.json and the tokenizer."""
    folder, graph, config = VARIANTS[variant]
    dst.mkdir(parents=True, exist_ok=True)
    for name in (FIXTURES / folder).iterdir():
        if name.name not in ("model.onnx", "model.windowed.onnx", "genai_config.json", "genai_config.windowed.json"):
            shutil.copy(name, dst / name.name)
    shutil.copy(FIXTURES / folder / graph, dst / "model.onnx")
    shutil.copy(FIXTURES / folder / config, dst / "genai_config.json")
    return dst / "model.onnx"


def held(n: int, capacity: int) -> int:
    """Positions a window-sized cache of ``capacity`` holds after n tokens (measured on GroupQueryAttention)."""
    return n if n <= capacity else WINDOW + (n - WINDOW) % (capacity - WINDOW + 1)


@pytest.fixture(scope="module", params=list(VARIANTS))
def compiled(request, tmp_path_factory):
    """{(profile name, lowering): compiled path}, the source under key "source", the family under "family"."""
    root = tmp_path_factory.mktemp(f"genai_{request.param}")
    source = _copy_fixture(request.param, root)
    out = {"source": source, "family": request.param}
    for name, profile in (("dense", Profile.uniform("dense", LAYERS, HEADS)), ("sparse", Profile(SPARSE))):
        for lowering in ("fast", "reference"):
            out[name, lowering] = compile_model(source, profile, root / f"{name}_{lowering}.onnx", lowering).output
    return out


def _past_names(sess):
    return [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values.")]


def _next_past(sess, outputs):
    return {o.name.replace("present", "past_key_values"): x for o, x in zip(sess.get_outputs(), outputs) if o.name.startswith("present")}


class Steps:
    """A prompt (possibly in chunks) then decode steps, fed the way onnxruntime-genai
    feeds the decoder: attention_mask over all tokens so far, position_ids [3, B, S],
    a past buffer of ``buffer`` positions (share buffer) or of the past's length."""

    def __init__(self, lengths, chunks, decode, buffer, capacity=WINDOW, seed=0):
        rng = np.random.default_rng(seed)
        self.lengths, self.buffer, self.capacity = list(lengths), buffer, capacity
        self.prompt = max(lengths)
        self.ids = rng.integers(0, 256, (len(lengths), self.prompt + decode))
        self.chunks = list(chunks) + [1] * decode
        self.garbage = rng.standard_normal((len(lengths), KV_HEADS, buffer or 1, HEAD_SIZE)).astype(np.float32) * 50

    def __iter__(self):
        batch, done = len(self.lengths), 0
        for n in self.chunks:
            if done < self.prompt:
                tok = self.ids[:, done:done + n]
                mask = np.zeros((batch, done + n), np.int64)
                for b, length in enumerate(self.lengths):
                    mask[b, :length] = 1  # right padding in the prompt
                pos = np.broadcast_to(np.arange(done, done + n), (3, batch, n))
            else:  # a decode step: one new token per row, right after its last valid one
                k = done - self.prompt
                tok = self.ids[:, done:done + 1]
                mask = np.concatenate([np.arange(self.prompt)[None] < np.array(self.lengths)[:, None],
                                       np.ones((batch, k + 1), bool)], axis=1).astype(np.int64)
                pos = np.broadcast_to((np.array(self.lengths) + k)[None, :, None], (3, batch, 1))
            done += n
            yield tok, mask, np.ascontiguousarray(pos, dtype=np.int64)

    def first_past(self, sess):
        past = {}
        for info in sess.get_inputs():
            if not info.name.startswith("past_key_values."):
                continue
            if info.shape[2] == "past_sliding_length":  # a window-sized cache
                past[info.name] = np.zeros((len(self.lengths), KV_HEADS, self.capacity, HEAD_SIZE), np.float32)
            elif self.buffer:
                past[info.name] = self.garbage.copy()
            else:
                past[info.name] = np.zeros((len(self.lengths), KV_HEADS, 0, HEAD_SIZE), np.float32)
        return past

    def valid(self, mask, b, name=None):
        """Slots of row b's present that hold keys: 0 .. seqlens_k[b] (the last held(total)
        of a window-sized cache)."""
        n = int(mask[b].sum())
        if name is not None and name.replace("present", "past_key_values") in self.sliding:
            return held(n, self.capacity)
        return n

    sliding: set = set()


def spans_so_far(total: int) -> np.ndarray:
    """The spans clipped to the tokens the model has seen (a chunked prompt's first
    chunk sees part of the images): the fast lowering wants spans inside [0, total)."""
    clipped = np.minimum(SPANS, total)
    return clipped[clipped[:, 0] < clipped[:, 1]].reshape(-1, 2)


def _drive(path, steps: Steps):
    """Run every step; yields (the step's attention_mask, outputs by name)."""
    sess = session(str(path))
    steps.sliding = {i.name for i in sess.get_inputs() if i.name.startswith("past") and i.shape[2] == "past_sliding_length"}
    past = steps.first_past(sess)
    names = [o.name for o in sess.get_outputs()]
    for tok, mask, pos in steps:
        spans = spans_so_far(mask.shape[1])
        outs = run(sess, dict(input_ids=tok, attention_mask=mask, position_ids=pos, image_spans=spans, **past))
        yield mask, dict(zip(names, outs))
        past = _next_past(sess, outs)


CASES = {
    "prompt+decode, share buffer": dict(lengths=[16], chunks=[16], decode=3, buffer=24),
    "prompt+decode, no share buffer": dict(lengths=[16], chunks=[16], decode=3, buffer=0),
    "chunked prompt, share buffer": dict(lengths=[16], chunks=[9, 7], decode=2, buffer=24),
    "batch of 2, right padded": dict(lengths=[16, 11], chunks=[16], decode=3, buffer=24),
    "chunked prompt, window cache with slack": dict(lengths=[16], chunks=[6, 10], decode=6, buffer=24, capacity=10),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_fixture_is_the_builders_decoder(family):
    model = onnx.load(str(FIXTURES / family / "model.onnx"), load_external_data=False)
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == LAYERS
    for layer, node in enumerate(gqa):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["num_heads"] == HEADS and attrs["kv_num_heads"] == KV_HEADS
        if family == "gemma3":  # rotary inside the op, the first layer slides
            assert attrs["do_rotary"] == 1 and node.input[7:9] == (["cos_cache_local", "sin_cache_local"] if layer == 0
                                                                  else ["cos_cache_global", "sin_cache_global"])
            assert attrs["local_window_size"] == (8 if layer == 0 else -1) and "sliding_window_cache" not in attrs
        else:
            assert attrs["do_rotary"] == 0 and attrs["local_window_size"] == -1
        assert node.input[3:5] == [f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"]
        assert node.output[1:] == [f"present.{layer}.key", f"present.{layer}.value"]
    if family == "qwen3_vl":  # q/k RMS norms, then interleaved M-RoPE (mrope_layout 1), outside the op
        ops = [n.op_type for n in model.graph.node]
        assert sum(n.name.endswith(("q_norm/SimplifiedLayerNormalization", "k_norm/SimplifiedLayerNormalization"))
                   for n in model.graph.node) == 2 * LAYERS
        rotary = [n for n in model.graph.node if n.op_type == "MRotaryEmbedding"]
        assert len(rotary) == 2 * LAYERS and ops.count("GroupQueryAttention") == LAYERS
        for node in rotary:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["mrope_layout"] == 1 and attrs["mrope_section"] == [4, 2, 2] and node.input[1] == "position_ids"
    config = json.loads((FIXTURES / family / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True


def test_windowed_fixture_is_the_default_gemma3_build():
    """The builder's default Gemma 3 graph: layer 0 keeps a window-sized cache."""
    model = onnx.load(str(FIXTURES / "gemma3" / "model.windowed.onnx"), load_external_data=False)
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in gqa]
    assert [a.get("sliding_window_cache", 0) for a in attrs] == [1, 0]
    dims = {i.name: i.type.tensor_type.shape.dim[2].dim_param for i in model.graph.input if i.name.startswith("past")}
    assert dims["past_key_values.0.key"] == "past_sliding_length" and dims["past_key_values.1.key"] == "past_sequence_length"
    config = json.loads((FIXTURES / "gemma3" / "genai_config.windowed.json").read_text())
    assert config["model"]["decoder"]["sliding_window"]["window_size"] == WINDOW


def test_compiled_keeps_the_decoders_interface(compiled):
    src = onnx.load(str(compiled["source"]), load_external_data=False)
    out = onnx.load(str(compiled["sparse", "fast"]), load_external_data=False)
    assert [i.name for i in out.graph.input] == [i.name for i in src.graph.input] + ["image_spans"]
    assert [o.name for o in out.graph.output] == [o.name for o in src.graph.output]
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("BlindSightAttention") == LAYERS and "GroupQueryAttention" not in ops


def _source_runs(compiled, case):
    if compiled["family"] == "gemma3_windowed" and len(set(CASES[case]["lengths"])) > 1:
        # measured on onnxruntime 1.31, capacities 8 to 24: "seqlens_k[1] = 10 is too small for sequence_length 16"
        pytest.skip("the source cannot run it: GroupQueryAttention with a window-sized cache refuses a right-padded prompt")


@pytest.mark.parametrize("lowering", ["fast", "reference"])
@pytest.mark.parametrize("case", list(CASES))
def test_all_dense_equals_the_decoder(compiled, case, lowering):
    _source_runs(compiled, case)
    steps = Steps(**CASES[case])
    pairs = zip(_drive(compiled["source"], steps), _drive(compiled["dense", lowering], steps))
    for step, ((mask, want), (_, got)) in enumerate(pairs):
        for b, length in enumerate(steps.lengths):
            rows = slice(0, length - sum(steps.chunks[:step])) if step < len(CASES[case]["chunks"]) else slice(None)
            if rows.stop is not None and rows.stop <= 0:
                continue
            diff = np.abs(got["logits"][b, rows] - want["logits"][b, rows]).max()
            assert diff <= 1e-4, (case, step, b, diff)  # padded query rows are unspecified
            for name in want:
                if name.startswith("present"):
                    assert got[name].shape == want[name].shape
                    valid = steps.valid(mask, b, name)
                    diff = np.abs(got[name][b, :, :valid] - want[name][b, :, :valid]).max()
                    assert diff <= 1e-5, (case, step, b, name, diff)


def _probe(path: Path, dst: Path) -> tuple[Path, dict[int, int]]:
    """A copy of a compiled model whose graph also outputs every BlindSightAttention
    node's inputs and output; and each layer's sliding window."""
    model = onnx.load(str(path), load_external_data=False)
    known = {o.name for o in model.graph.output}
    windows = {}
    for node in model.graph.node:
        if node.op_type != "BlindSightAttention":
            continue
        layer = int(node.name.rsplit("_", 1)[1])
        windows[layer] = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "local_window_size")
        for role, name in zip(("q", "k", "v", "mask", "out"), list(node.input[:4]) + [node.output[0]]):
            alias = f"probe.{layer}.{role}"
            elem = onnx.TensorProto.BOOL if role == "mask" else onnx.TensorProto.FLOAT
            model.graph.node.append(helper.make_node("Identity", [name], [alias]))
            model.graph.output.append(helper.make_tensor_value_info(alias, elem, None))
        assert not known & {f"probe.{layer}.{r}" for r in ("q", "k", "v", "mask", "out")}
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(path.parent / "model.onnx.data", dst.parent / "model.onnx.data")
    onnx.save(model, str(dst))
    return dst, windows


def _gqa_inputs(path: Path, dst: Path) -> Path:
    """A copy of the builder's decoder that also outputs layer 0's query (after
    rotary where the rotary comes before GroupQueryAttention)."""
    model = onnx.load(str(path), load_external_data=False)
    gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    model.graph.output.append(helper.make_tensor_value_info(gqa.input[0], onnx.TensorProto.FLOAT, None))
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(path.parent / "model.onnx.data", dst.parent / "model.onnx.data")
    onnx.save(model, str(dst))
    return dst, gqa.input[0]


@pytest.mark.parametrize("lowering", ["fast", "reference"])
@pytest.mark.parametrize("case", ["prompt+decode, share buffer", "chunked prompt, share buffer", "batch of 2, right padded",
                                  "chunked prompt, window cache with slack"])
def test_sparse_profile_equals_numpy_on_the_decoders_qkv(compiled, case, lowering, tmp_path):
    _source_runs(compiled, case)
    steps = Steps(**CASES[case])
    probe, windows = _probe(compiled["sparse", lowering], tmp_path / "probe" / "model.onnx")
    source, q_name = _gqa_inputs(compiled["source"], tmp_path / "source" / "model.onnx")
    dense = _drive(compiled["dense", lowering], steps)
    moved = 0.0
    for step, ((mask, got), (_, want), (_, dense_out)) in enumerate(zip(_drive(probe, steps), _drive(source, steps), dense)):
        sq = got["logits"].shape[1]
        for layer in range(LAYERS):
            q, k, v = (got[f"probe.{layer}.{r}"] for r in ("q", "k", "v"))
            key_mask = got[f"probe.{layer}.mask"]  # [B, 1, 1, total]: row b's valid keys as the node reads them
            assert k.shape[2] == mask.shape[1]  # total keys
            ref = reference_attention(q, k, v, spans_so_far(mask.shape[1]), SPARSE[layer], scale=SCALE,
                                      model_mask=key_mask, window=windows[layer])
            for b, length in enumerate(steps.lengths):
                rows = slice(None)
                if step == 0 and length < sq:
                    rows = slice(0, length)  # right padding: padded query rows are unspecified
                diff = np.abs(got[f"probe.{layer}.out"][b, :, rows] - ref[b, :, rows]).max()
                assert diff <= 1e-4, (case, step, layer, b, diff)
        # layer 0's Q and K are the decoder's own (before any attention they are unchanged);
        # Gemma 3's query enters GroupQueryAttention before its rotary: its keys (stored after) tell
        if not compiled["family"].startswith("gemma3"):
            q_bsd = got["probe.0.q"].transpose(0, 2, 1, 3).reshape(want[q_name].shape)
            assert np.abs(q_bsd - want[q_name]).max() <= 1e-5
        for b in range(len(steps.lengths)):
            valid = steps.valid(mask, b, "present.0.key")
            assert np.abs(got["present.0.key"][b, :, :valid] - want["present.0.key"][b, :, :valid]).max() <= 1e-5
        moved = max(moved, float(np.abs(got["logits"] - dense_out["logits"]).max()))
    assert moved > 1e-3  # the profile changed what the prompt's image tokens saw


#: a Python with onnxruntime-genai: this one with the genai extra installed, or another set in the environment
GENAI_PYTHON = os.environ.get("BLINDSIGHT_GENAI_PYTHON") or (
    sys.executable if importlib.util.find_spec("onnxruntime_genai") is not None else None)


@pytest.mark.skipif(not GENAI_PYTHON, reason="install the genai extra, or set BLINDSIGHT_GENAI_PYTHON to a python with onnxruntime-genai")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_builder_still_writes_the_fixture(variant, tmp_path):
    """The fixture is what `python -m blindsight.runtime.genai` makes today, byte for byte
    (the graph's producer_version aside: the builder appends the commit of whatever git
    checkout its install folder happens to sit in, e.g. a pyenv clone)."""
    from blindsight.models.genai import make_tiny_decoder

    def unstamped(path):
        proto = onnx.load(str(path), load_external_data=False)
        assert proto.producer_version.startswith("0.18.0"), proto.producer_version
        proto.producer_version = ""
        return proto.SerializeToString()

    folder, graph, config = VARIANTS[variant]
    out = make_tiny_decoder(folder, tmp_path / "genai", python=GENAI_PYTHON, extra_options=EXTRA_OPTIONS[variant])
    assert unstamped(out / "model.onnx") == unstamped(FIXTURES / folder / graph)
    for name, fixture in (("model.onnx.data", "model.onnx.data"), ("genai_config.json", config),
                          ("tokenizer.json", "tokenizer.json")):
        assert (out / name).read_bytes() == (FIXTURES / folder / fixture).read_bytes(), name


def _profiles():
    sparse = Profile([[("sink", "intra", "intra_sink", "dense")[(h + layer) % 4] for h in range(HEADS)] for layer in range(LAYERS)],
                     num_kv_heads=KV_HEADS)
    return {"dense": (Profile.uniform("dense", LAYERS, HEADS, num_kv_heads=KV_HEADS), "fast"), "sparse": (sparse, "fast"),
            "sparse_reference": (sparse, "reference")}


def _bs_compile(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "blindsight.compiler.cli", *map(str, args)], capture_output=True, text=True)


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bs_compile_writes_a_genai_folder_that_decodes_like_the_source(variant, tmp_path):
    """bs-compile FOLDER -o OUT: a complete genai folder (every source file, the
    compiled decoder named in genai_config.json, the native kernel copied in when
    built), the source folder untouched; decoded greedily the way genai feeds it
    (one shared past/present buffer, the folder's custom_ops_library registered),
    all-dense gives the builder's decoder's tokens, and the sparse profile's tokens
    are the same under both lowerings and on the function bodies."""
    from blindsight import native
    from blindsight.profile import save
    from blindsight.runtime.genai import DEMO_PROMPT, DEMO_SPANS, ort_greedy

    folder = _copy_fixture(variant, tmp_path / "decoder").parent
    before = _tree(folder)
    want = ort_greedy(folder / "model.onnx", DEMO_PROMPT, 28)
    tokens = {}
    for name, (profile, lowering) in _profiles().items():
        for kernel in ((), ("--no-native",)):
            save(profile, tmp_path / f"{name}.json")
            out = tmp_path / f"{name}{'-bodies' if kernel else ''}"
            r = _bs_compile(folder, "--profile", tmp_path / f"{name}.json", "-o", out, "--lowering", lowering, *kernel)
            assert r.returncode == 0, r.stderr
            config = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
            assert config["filename"] == "model.blindsight.onnx"
            assert set(before) <= {p.name for p in out.iterdir()}
            library = (config.get("session_options") or {}).get("custom_ops_library")
            if kernel or not native.available():
                assert library is None
            else:
                assert library == native.library_path().name and (out / library).is_file()
            tokens[out.name] = ort_greedy(out / "model.blindsight.onnx", DEMO_PROMPT, 28, DEMO_SPANS)
    assert _tree(folder) == before
    assert len(want) >= 8 and tokens["dense"] == tokens["dense-bodies"] == want
    assert tokens["sparse"] == tokens["sparse-bodies"] == tokens["sparse_reference"] == tokens["sparse_reference-bodies"]
    if variant in ("qwen2_5_vl", "qwen3_vl"):  # (Gemma 3's tiny decoder happens to keep its tokens under this profile)
        assert tokens["sparse"] != want


def test_bs_compile_genai_bad_input_is_one_line(tmp_path):
    from blindsight.profile import save

    folder = _copy_fixture("qwen2_5_vl", tmp_path / "decoder").parent
    save(Profile.uniform("dense", LAYERS, HEADS, num_kv_heads=KV_HEADS), tmp_path / "p.json")
    cases = [((folder, "--profile", tmp_path / "p.json"), "pass -o OUT_DIR"),
             ((folder, "--profile", tmp_path / "p.json", "-o", folder / "inside"), "inside it")]
    config = json.loads((folder / "genai_config.json").read_text())
    del config["model"]["decoder"]["filename"]
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "genai_config.json").write_text(json.dumps(config))
    cases.append(((broken, "--profile", tmp_path / "p.json", "-o", tmp_path / "out"), "model.decoder.filename"))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    cases.append(((folder, "--profile", tmp_path / "p.json", "-o", taken), "--overwrite"))
    for args, msg in cases:
        r = _bs_compile(*args)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists() and (taken / "notes.txt").read_text() == "mine"
    r = _bs_compile(folder, "--profile", tmp_path / "p.json", "-o", taken, "--overwrite")
    assert r.returncode == 0 and not (taken / "notes.txt").exists() and (taken / "model.blindsight.onnx").is_file(), r.stderr


def test_spans_from_ids_reads_the_folders_delimiters():
    from blindsight.runtime.genai import DEMO_PROMPT, DEMO_SPANS, spans_from_ids

    ids = np.array(DEMO_PROMPT)
    start, end = 259, 260  # the fixture tokenizer's <|vision_start|> and <|vision_end|>
    want = [[int(a), int(b) + 1] for a, b in zip(np.flatnonzero(ids == start), np.flatnonzero(ids == end))]
    assert want == DEMO_SPANS
    assert spans_from_ids(ids, FIXTURES / "qwen2_5_vl").tolist() == want
    assert spans_from_ids([5, 6, 7], FIXTURES / "qwen2_5_vl").shape == (0, 2)


@pytest.mark.skipif(not GENAI_PYTHON, reason="install the genai extra, or set BLINDSIGHT_GENAI_PYTHON to a python with onnxruntime-genai")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_onnxruntime_genai_runs_the_compiled_decoder(variant, tmp_path):
    """onnxruntime-genai itself (image_spans through Generator.set_model_input):
    its greedy tokens equal onnxruntime's loop, and all-dense equals the source."""
    from blindsight.runtime.genai import DEMO_PROMPT, DEMO_SPANS, greedy_parity

    folder = _copy_fixture(variant, tmp_path / "decoder").parent
    result = greedy_parity(GENAI_PYTHON, folder, _profiles(), DEMO_PROMPT, DEMO_SPANS, max_length=28)
    for name, runs in result.items():
        assert runs["genai"] == runs["ort"], name
    assert result["dense"]["genai"] == result["source"]["genai"]
    assert result["sparse"]["genai"] == result["sparse_reference"]["genai"]


@pytest.mark.skipif(not GENAI_PYTHON, reason="install the genai extra, or set BLINDSIGHT_GENAI_PYTHON to a python with onnxruntime-genai")
def test_int4_build_compiles_around_matmulnbits(tmp_path):
    """The builder's int4 decoder: the compile leaves every MatMulNBits as it is, and all-dense the
    compiled graph equals the builder's. Compared with accuracy_level 0 (fp32 compute) in both
    graphs: at the builder's default 4, MatMulNBits quantizes its activations to int8 per block,
    and a rounding that the attention's last-bit differences flip moves the logits by a
    quantization step."""
    from blindsight.models.genai import make_tiny_decoder

    out = make_tiny_decoder("qwen2_5_vl", tmp_path / "int4", python=GENAI_PYTHON, precision="int4")
    source = out / "model.onnx"
    compiled = compile_model(source, Profile([["dense"] * HEADS] * LAYERS, num_kv_heads=KV_HEADS), tmp_path / "int4" / "c.onnx").output

    def matmulnbits(path, level=None):
        proto = onnx.load(str(path), load_external_data=False)
        nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
        if level is not None:
            for n in nodes:
                for a in n.attribute:
                    if a.name == "accuracy_level":
                        a.i = level
            onnx.save(proto, str(path))
        return sorted((n.name, tuple(n.input)) for n in nodes)

    assert matmulnbits(source) and matmulnbits(source) == matmulnbits(compiled)
    matmulnbits(source, 0), matmulnbits(compiled, 0)
    S, rng = 12, np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 250, (1, S)), "attention_mask": np.ones((1, S), np.int64),
             "position_ids": np.broadcast_to(np.arange(S), (3, 1, S)).copy(),
             **{f"past_key_values.{i}.{kv}": np.zeros((1, KV_HEADS, 0, HEAD_SIZE), np.float32)
                for i in range(LAYERS) for kv in ("key", "value")}}
    want = run(session(source), feeds)[0]
    got = run(session(compiled), {**feeds, "image_spans": np.zeros((0, 2), np.int64)})[0]
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
