"""End to end on tiny random checkpoints: bs-export, bs-compile, the runtime pipeline and bs-run.

The reference is transformers' own ``generate`` (greedy) on the same checkpoint
and inputs; the sparse profile is checked against the reference lowering.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from blindsight.compiler.pipeline import compile_model
from blindsight.families import FAMILIES
from blindsight.models.checkpoints import make_tiny_checkpoint
from blindsight.models.export_vlm import export_vlm
from blindsight.profile import Profile, save
from blindsight.runtime.pipeline import SHRINK_ARENA, Pipeline

NEW_TOKENS = 8
SPARSE = [["intra", "sink", "intra_sink", "dense"], ["sink", "intra", "intra", "sink"]]


class Tiny:
    def __init__(self, family, root):
        self.family = family
        self.checkpoint = make_tiny_checkpoint(family, root / "checkpoint")
        self.out = export_vlm(self.checkpoint, root / "export", logits="all").out_dir  # some tests read every position
        lm = self.out / "language_model.onnx"
        kv = json.loads((self.out / "template.json").read_text())["num_kv_heads"]
        self.dense_path = compile_model(lm, Profile.uniform("dense", 2, 4, num_kv_heads=kv), self.out / "lm.dense.onnx").output
        save(Profile(SPARSE, num_kv_heads=kv), self.out / "profile.json")
        self.fast_path = compile_model(lm, Profile(SPARSE, num_kv_heads=kv), self.out / "language_model.blindsight.onnx").output
        self.ref_path = compile_model(lm, Profile(SPARSE, num_kv_heads=kv), self.out / "lm.reference.onnx", "reference").output
        self._hf = None

    @property
    def hf(self):
        from transformers import AutoModelForImageTextToText

        if self._hf is None:
            self._hf = AutoModelForImageTextToText.from_pretrained(self.checkpoint, local_files_only=True).eval()
        return self._hf

    def hf_generate(self, prompt, template, max_new_tokens):
        """transformers' greedy tokens for the same prompt ids and pixels."""
        ids = torch.as_tensor(prompt.input_ids)[None]
        kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
        if prompt.num_images:
            kw["pixel_values"] = torch.as_tensor(prompt.pixel_values)
            if self.family != "gemma3":
                kw["image_grid_thw"] = torch.as_tensor(prompt.image_grid_thw)
                kw["mm_token_type_ids"] = (ids == template["image_token_id"]).long()
            else:  # as Gemma 3's processor returns them: its image tokens attend both ways
                kw["token_type_ids"] = (ids == template["image_token_id"]).long()
        with torch.no_grad():
            out = self.hf.generate(**kw)
        return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    return Tiny(request.param, tmp_path_factory.mktemp(f"e2e_{request.param}"))


def _images(n, seed=0):
    """Blocks of random colour: pixel noise would average out in the towers' pooling."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (3, 3, 3), dtype=np.uint8)).resize((60, 48 + 8 * i), Image.NEAREST)
            for i in range(n)]


CASES = [("compare <image> with <image>, which is brighter?", 2), ("<image>describe", 1), ("no image at all", 0)]


@pytest.mark.parametrize("prompt,n", CASES)
def test_compiled_all_dense_pipeline_equals_transformers_generate(tiny, prompt, n):
    pipe = Pipeline(tiny.out, compiled=tiny.dense_path, threads=2)
    built = pipe.prompts.build(_images(n), prompt)
    got = pipe.generate_from(built, NEW_TOKENS)
    assert len(got.image_spans) == n
    assert got.token_ids == tiny.hf_generate(built, pipe.template, NEW_TOKENS)
    assert got.ttft_s > 0 and got.prefill_tokens == built.input_ids.size


def test_vision_runs_once_per_image_and_equals_one_call_over_all_images(tiny):
    """Features of three images of different sizes, one vision call each, equal the
    vision graph run once over all three (whose mask keeps images apart), and
    transformers' own image features."""
    pipe = Pipeline(tiny.out, compiled=False, threads=2)
    built = pipe.prompts.build(_images(3, seed=5), "<image><image><image>which differ?")
    calls = []
    run = pipe.vision.run
    pipe.vision.run = lambda *a, **k: calls.append(a[2] if len(a) > 2 else None) or run(*a, **k)
    got = pipe.image_features(built)
    pipe.vision.run = run
    # the arena is given back after the prompt's last image only
    assert calls == [None, None, SHRINK_ARENA]
    # one timing per tower call, as the peers harness records them
    assert len(pipe.vision_runs_s) == 3 and all(t > 0 for t in pipe.vision_runs_s)
    whole = pipe._encode(built.pixel_values, built.image_grid_thw)
    np.testing.assert_allclose(got, whole, rtol=0, atol=1e-5)
    kw = {"pixel_values": torch.as_tensor(built.pixel_values)}
    if built.image_grid_thw is not None:
        kw["image_grid_thw"] = torch.as_tensor(built.image_grid_thw)
    with torch.no_grad():
        out = tiny.hf.model.get_image_features(**kw).pooler_output
    want = (torch.cat(out) if isinstance(out, (list, tuple)) else out).reshape(-1, got.shape[-1]).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_images_change_the_answer(tiny):
    """The parity above would be weak if the images did not matter."""
    pipe = Pipeline(tiny.out, compiled=False, threads=2)
    answers = {tuple(pipe.generate(_images(2, seed), CASES[0][0], NEW_TOKENS).token_ids) for seed in range(3)}
    assert len(answers) > 1


def test_sparse_fast_equals_reference_lowering(tiny):
    fast = Pipeline(tiny.out, compiled=True, threads=2, native=False)
    ref = Pipeline(tiny.out, compiled=tiny.ref_path, threads=2, native=False)
    assert fast.sparse and ref.sparse
    for prompt, n in CASES:
        built = fast.prompts.build(_images(n, 5), prompt)
        a, b = fast.generate_from(built, 6), ref.generate_from(built, 6)
        assert a.token_ids == b.token_ids
        assert a.image_spans == b.image_spans


def test_decode_from_the_compiled_cache_is_dense(tiny):
    """A decode step of the compiled model (a text query) equals the dense export's step from the
    same cache; the first layer's cache, computed before any attention, equals the dense prefill's."""
    from blindsight.runtime.positions import decode_position_ids

    dense = Pipeline(tiny.out, compiled=False, threads=2)
    sparse = Pipeline(tiny.out, compiled=True, threads=2)
    built = dense.prompts.build(_images(2), CASES[0][0])
    spans = dense.image_spans(built.input_ids)
    embeds = dense.embeddings(built)
    pos, delta = dense.position_ids(built)
    s = built.input_ids.size
    _, dense_cache = dense._run_lm(embeds, pos, dense._empty_past(), s, spans)
    logits, cache = sparse._run_lm(embeds, pos, dense._empty_past(), s, spans)
    for kv in ("key", "value"):
        name = f"past_key_values.0.{kv}"
        np.testing.assert_allclose(cache[name], dense_cache[name], rtol=1e-5, atol=1e-5)
    token = np.array([[int(np.argmax(logits))]], dtype=np.int64)
    step = dense.embed.run(None, {"input_ids": token})[0]
    step_pos = decode_position_ids(s + delta, pos.shape[0] if pos.ndim == 3 else 1)
    want_logits, want_cache = dense._run_lm(step, step_pos, cache, s + 1, spans)
    got_logits, got_cache = sparse._run_lm(step, step_pos, cache, s + 1, spans)
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    for name in want_cache:
        assert got_cache[name].shape[2] == s + 1
        np.testing.assert_allclose(got_cache[name], want_cache[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tiny", ["qwen2_vl"], indirect=True)  # the command line is the same for every family
def test_bs_run_prints_answer_and_timings(tiny, tmp_path):
    paths = []
    for i, im in enumerate(_images(2)):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    args = [sys.executable, "-m", "blindsight.runtime.cli", tiny.out, "--image", paths[0], "--image", paths[1],
            "--prompt", CASES[0][0], "--max-new-tokens", "5", "--threads", "2"]
    r = subprocess.run([str(a) for a in args + ["--json"]], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    want = Pipeline(tiny.out, threads=2).generate(paths, CASES[0][0], 5)
    assert record["token_ids"] == want.token_ids and record["sparse"] is True
    assert len(record["image_spans"]) == 2 and record["tokens_per_s"] >= 0
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(want.text) and "time to first token" in r.stdout


def test_prepack_off_answers_like_on_and_auto_turns_it_off_when_memory_is_short(tiny, monkeypatch):
    import onnx

    from blindsight.errors import BlindSightError
    from blindsight.runtime import session

    on, off = Pipeline(tiny.out, prepack="on", threads=2), Pipeline(tiny.out, prepack="off", threads=2)
    assert on.prepack and not off.prepack
    assert on.generate(_images(2), CASES[0][0], 4).token_ids == off.generate(_images(2), CASES[0][0], 4).token_ids
    # the weights auto weighs: each graph file plus the external-data files it names
    graphs = [on.model_path, tiny.out / on.template["files"]["embed"], tiny.out / on.template["files"]["vision"]]
    total = 0
    for g in graphs:
        proto = onnx.load(str(g), load_external_data=False)
        names = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
        total += os.path.getsize(g) + sum(os.path.getsize(g.parent / n) for n in names)
    assert sum(session.weight_bytes(g) for g in graphs) == total
    monkeypatch.setattr(session, "available_memory", lambda: int(total / 0.6) + 1)
    assert Pipeline(tiny.out, threads=2).prepack
    monkeypatch.setattr(session, "available_memory", lambda: int(total / 0.6) - 1)
    assert not Pipeline(tiny.out, threads=2).prepack
    with pytest.raises(BlindSightError, match="--prepack"):
        Pipeline(tiny.out, prepack="maybe")


def test_pipeline_holds_no_kv_cache_between_answers(tiny):
    """Nothing of an answer's KV cache stays on the pipeline after it returns: a copy
    kept there was what a 16-image prompt's peak memory held a third time."""
    pipe = Pipeline(tiny.out, compiled=True, threads=2, chunk_size=8)
    pipe.generate(_images(1), CASES[1][0], 3)

    def arrays(x):
        if isinstance(x, np.ndarray):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from arrays(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from arrays(v)

    held = [a.shape for v in vars(pipe).values() for a in arrays(v)]
    assert pipe.prefill_feeds is None and not [s for s in held if len(s) == 4], held


def test_placement_of_the_prefill_a_pipeline_ran(tiny):
    from blindsight.runtime.placement import node_placement

    pipe = Pipeline(tiny.out, compiled=True, threads=2, keep_prefill_feeds=True)
    pipe.generate(_images(1), CASES[1][0], 2)
    assert "image_spans" in pipe.prefill_feeds and pipe.prefill_feeds["inputs_embeds"].shape[1] > 0
    p = node_placement(pipe.model_path, pipe.prefill_feeds, "cpu", 2)
    assert set(p.nodes) == {"CPUExecutionProvider"} and p.fallbacks == []
    assert "GroupQueryAttention" in {op for _, op in p.nodes["CPUExecutionProvider"]}


@pytest.mark.parametrize("tiny", ["gemma3"], indirect=True)
def test_gemma3_prefill_logits_equal_transformers_with_token_type_ids(tiny):
    """Raw export and compiled all-dense model: every prefill position's logits equal
    transformers' forward given token_type_ids (bidirectional image blocks), and
    differ from its forward without them (so the blocks are what is matched)."""
    built = Pipeline(tiny.out, compiled=False, threads=2).prompts.build(_images(2), CASES[0][0])
    ids = torch.as_tensor(built.input_ids)[None]
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.as_tensor(built.pixel_values))
    with torch.no_grad():
        want = tiny.hf(**kw, token_type_ids=(ids == tiny.hf.config.image_token_id).long()).logits[0].numpy()
        causal = tiny.hf(**kw).logits[0].numpy()
    assert np.abs(want - causal).max() > 1e-3
    for compiled in (False, tiny.dense_path):
        pipe = Pipeline(tiny.out, compiled=compiled, threads=2, keep_prefill_feeds=True)
        pipe.generate_from(built, 1)
        assert pipe.prefill_feeds["token_type_ids"].sum() == (built.input_ids == pipe.template["image_token_id"]).sum()
        got = pipe.lm.run(["logits"], pipe.prefill_feeds)[0][0]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("tiny", ["gemma3"], indirect=True)
def test_gemma3_chunk_that_splits_an_image_is_refused(tiny):
    """With a KV cache a block is bidirectional only within one chunk: a chunk
    boundary inside an image is refused, one outside it runs (and equals the whole prefill)."""
    from blindsight.errors import SpanError
    from blindsight.runtime.session import CompiledSession

    pipe = Pipeline(tiny.out, compiled=False, threads=2)
    built = pipe.prompts.build(_images(1), CASES[1][0])
    spans = pipe.image_spans(built.input_ids)
    embeds = pipe.embeddings(built)
    pos, _ = pipe.position_ids(built)
    s = built.input_ids.size
    whole, _ = pipe._run_lm(embeds, pos, pipe._empty_past(), s, spans)
    sess = CompiledSession(tiny.dense_path, threads=2)
    names = [o.name for o in sess.session.get_outputs()]

    def chunked(cut):
        first = dict(zip(names, sess.run({"inputs_embeds": embeds[:, :cut], "position_ids": pos[..., :cut],
                                          "attention_mask": np.ones((1, cut), np.int64), **pipe._empty_past()}, spans, cut)))
        past = {f"past_key_values.{i}.{n}": first[f"present.{i}.{n}"] for i in range(pipe.num_layers) for n in ("key", "value")}
        rest = dict(zip(names, sess.run({"inputs_embeds": embeds[:, cut:], "position_ids": pos[..., cut:],
                                         "attention_mask": np.ones((1, s), np.int64), **past}, spans, s)))
        return rest["logits"][0, -1]

    start, end = (int(x) for x in spans[0])
    np.testing.assert_allclose(chunked(end), whole, rtol=0, atol=1e-4)
    with pytest.raises(SpanError, match="splits the image block"):
        chunked((start + end) // 2)


VARIANTS = {"dense export": dict(compiled=False), "fast, native kernel when built": dict(compiled=True),
            "fast, function bodies": dict(compiled=True, native=False), "reference": dict(compiled="ref", native=False)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_chunked_prefill_equals_one_shot(tiny, variant):
    """The prompt through the KV cache in chunks (sizes 1 to beyond the prompt):
    the last position's logits and the whole cache equal one call's, and the
    greedy tokens are the same; with a sparse profile too (spans of the whole
    prompt on every chunk, queries at their absolute positions)."""
    kw = dict(VARIANTS[variant])
    if kw["compiled"] == "ref":
        kw["compiled"] = tiny.ref_path
    pipe = Pipeline(tiny.out, threads=2, **kw)
    built = pipe.prompts.build(_images(2), CASES[0][0])
    spans = pipe.image_spans(built.input_ids)
    embeds = pipe.embeddings(built)
    pos, _ = pipe.position_ids(built)
    want_logits, want_cache, chunks = pipe.prefill(embeds, pos, spans)
    want_past = want_cache.past()
    assert chunks == 1
    s = built.input_ids.size
    want_tokens = pipe.generate_from(built, NEW_TOKENS).token_ids
    for size in (1, 5, 16, s // 2 + 1, s - 1, s + 7):
        pipe.chunk_size = size
        logits, cache, chunks = pipe.prefill(embeds, pos, spans)
        past = cache.past()
        assert (chunks > 1) if size < s else (chunks == 1)
        np.testing.assert_allclose(logits, want_logits, rtol=0, atol=1e-4, err_msg=f"chunk size {size}")
        for name, value in want_past.items():
            np.testing.assert_allclose(past[name], value, rtol=0, atol=1e-4, err_msg=f"{name}, chunk size {size}")
    pipe.chunk_size = 7
    result = pipe.generate_from(built, NEW_TOKENS)
    assert result.token_ids == want_tokens and result.prefill_chunks > 1


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_chunk_bounds_cover_the_prompt_and_never_split_an_image_block(data):
    """Chunks tile 0..S-1 in order, none longer than the chunk size unless an
    image block is; with image blocks no chunk splits one, as token_type_ids
    (which refuses a split) confirms for every chunk."""
    from blindsight.attention.spans import chunk_bounds, token_type_ids

    seq = data.draw(st.integers(1, 80))
    cuts = sorted(data.draw(st.lists(st.integers(0, seq), max_size=8, unique=True)))
    spans = [(a, b) for a, b in zip(cuts[::2], cuts[1::2]) if b > a]
    size = data.draw(st.integers(1, seq + 3))
    blocks = data.draw(st.booleans())
    bounds = chunk_bounds(seq, size, spans, image_blocks=blocks)
    assert bounds[0][0] == 0 and bounds[-1][1] == seq
    assert all(a < b for a, b in bounds) and all(b == c for (_, b), (c, _) in zip(bounds, bounds[1:]))
    widest = max([e - a - 2 for a, e in spans] + [0]) if blocks else 0
    assert all(b - a <= max(size, widest) for a, b in bounds)
    if blocks:
        for a, b in bounds:
            token_type_ids(np.array(spans, dtype=np.int64).reshape(-1, 2), b - a, a)  # raises on a split
    else:
        assert [b - a for a, b in bounds[:-1]] == [size] * (len(bounds) - 1)


def test_cache_written_through_the_binding_equals_plain_runs(tiny):
    """The pipeline's KV cache, which ONNX Runtime writes into the pipeline's own
    buffers through an IOBinding, equals what plain ``session.run`` calls return
    (each call's Concat output fed back as an array): the logits and every cache
    tensor after a chunked prefill and after each decode step, with a capacity
    hint far too small, so that the buffers grow several times on the way."""
    from blindsight.attention.spans import chunk_bounds, token_type_ids
    from blindsight.runtime.positions import decode_position_ids

    pipe = Pipeline(tiny.out, threads=2, chunk_size=5)
    built = pipe.prompts.build(_images(2), CASES[0][0])
    spans = pipe.image_spans(built.input_ids)
    embeds = pipe.embeddings(built)
    pos, delta = pipe.position_ids(built)
    s = built.input_ids.size
    inputs = {i.name for i in pipe.lm.get_inputs()}
    outputs = [o.name for o in pipe.lm.get_outputs()]

    def plain(emb, p, past, start):
        feeds = {"inputs_embeds": emb, "position_ids": p, "image_spans": spans,
                 "attention_mask": np.ones((1, start + emb.shape[1]), np.int64), **past}
        if "token_type_ids" in inputs:
            feeds["token_type_ids"] = token_type_ids(spans, emb.shape[1], start, rows=1)
        out = dict(zip(outputs, pipe.lm.run(None, {k: v for k, v in feeds.items() if k in inputs})))
        return out["logits"][0, -1], {k.replace("present", "past_key_values"): v for k, v in out.items() if k.startswith("present")}

    bounds = chunk_bounds(s, 5, spans, "token_type_ids" in inputs)
    assert len(bounds) > 2
    want_past = pipe._empty_past()
    for start, end in bounds:
        want_logits, want_past = plain(embeds[:, start:end], pos[..., start:end], want_past, start)
    logits, cache, _ = pipe.prefill(embeds, pos, spans, capacity=3)
    rows = pos.shape[0] if pos.ndim == 3 else 1
    for step in range(4):
        np.testing.assert_allclose(logits, want_logits, rtol=0, atol=1e-6, err_msg=f"step {step}")
        got = cache.past()
        assert sorted(got) == sorted(want_past) and cache.length == s + step
        for name, value in want_past.items():
            np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-6, err_msg=f"{name}, step {step}")
        token = np.array([[int(np.argmax(want_logits))]], np.int64)
        emb = pipe.embed.run(None, {"input_ids": token})[0]
        p = decode_position_ids(s + step + delta, rows)
        want_logits, want_past = plain(emb, p, want_past, s + step)
        logits = pipe._call(emb, p, cache, spans)
    assert cache.capacity >= s + 4


def test_vision_timings_are_per_thread(tiny):
    """Two prompts on one pipeline at once (as the server runs them) each get their own tower timings."""
    from concurrent.futures import ThreadPoolExecutor

    pipe = Pipeline(tiny.out, compiled=False, threads=1)
    with ThreadPoolExecutor(2) as pool:
        one, three = pool.map(lambda n: pipe.generate(_images(n, seed=n), "What is shown?", 1), (1, 3))
    assert len(one.vision_runs_s) == 1 and len(three.vision_runs_s) == 3
    assert all(t > 0 for t in one.vision_runs_s + three.vision_runs_s)
