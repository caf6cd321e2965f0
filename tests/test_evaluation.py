"""bs-eval: the task's construction, last-position logits, the torch masked path against
ONNX Runtime, and the real Gemma 3 270M end to end (export, compile, CLI record)."""

import json
import re

import numpy as np
import pytest

from _util import run, session
from blindsight.prompts import COLOURS, OBJECTS, task_prompts


def segment_texts(tp):
    return [p.text for p in tp.pieces if p.segment]


def test_task_is_deterministic_and_answerable_from_one_segment():
    a, b, c = task_prompts(200, seed=5), task_prompts(200, seed=5), task_prompts(200, seed=6)
    assert [x.pieces for x in a] == [x.pieces for x in b]
    assert [x.pieces for x in a] != [x.pieces for x in c]
    for tp in a:
        segs = segment_texts(tp)
        assert len(segs) >= 4 and len(segs) == tp.num_segments
        obj = re.search(r"What colour is the (\w+)\?", tp.pieces[-1].text).group(1)
        holders = [i for i, s in enumerate(segs) if re.search(rf"\b{obj}\b", s)]
        assert holders == [tp.answer], "the object is named in exactly the target segment"
        colour = tp.candidates[tp.answer]
        assert re.search(rf"\bThe {obj} is {colour}\.", segs[tp.answer])
        # every candidate colour is in exactly one segment, so only that segment answers
        for cand in tp.candidates:
            assert cand in COLOURS and sum(bool(re.search(rf"\b{cand}\b", s)) for s in segs) == 1
        assert all(o in OBJECTS for o in re.findall(r"A (\w+) stands", " ".join(segs)))


def test_last_position_logits_equal_the_full_output(exported, tmp_path):
    import onnx

    from blindsight.evaluation.onnx_models import last_position_logits
    from blindsight.models.configs import tiny_config
    from blindsight.models.export import example_inputs

    path = exported("gemma3", "eager")
    sliced = last_position_logits(onnx.load(str(path)))
    feeds = example_inputs("gemma3", tiny_config("gemma3"), batch=2, seq_len=19)
    full = run(session(str(path)), feeds)[0]
    last = run(session(sliced), feeds)[0]
    assert last.shape == (2, 1, full.shape[-1])
    np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)


def test_torch_masked_model_equals_compiled_onnx(exported, exports, tmp_path):
    """The sweep's masked transformers run and the compiled graph (fast lowering) agree."""
    import torch

    from blindsight.calibration.hooks import category_masker, hooked
    from blindsight.compiler.pipeline import compile_model
    from blindsight.models.configs import tiny_config
    from blindsight.models.export import example_inputs
    from blindsight.profile import Profile
    from blindsight.runtime.session import CompiledSession

    layers = [["intra", "sink", "intra_sink", "dense"], ["sink", "intra", "intra", "intra_sink"]]
    out = compile_model(exported("gemma3", "eager"), Profile(layers, num_kv_heads=2), tmp_path / "c.onnx").output
    seq, spans = 30, [(2, 9), (11, 12), (14, 22), (24, 28)]
    feeds = example_inputs("gemma3", tiny_config("gemma3"), seq_len=seq, seed=3)
    got = CompiledSession(out).run(feeds, spans, seq)[0]
    module = exports.module("gemma3", "eager")
    with torch.no_grad(), hooked(module.decoder, mask=category_masker(layers, spans, seq)):
        want = module(*(torch.from_numpy(feeds[k]) for k in ("inputs_embeds", "position_ids", "attention_mask")))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        dense = module(*(torch.from_numpy(feeds[k]) for k in ("inputs_embeds", "position_ids", "attention_mask")))
    assert np.abs(dense.numpy() - got).max() > 1e-3, "the profile must change the output of this prompt"


# ---------------------------------------------------------------- real Gemma 3 270M


@pytest.fixture(scope="module")
def gemma_eval(tmp_path_factory):
    """bs-eval on 3 prompts of the real Gemma 3 270M with an all-intra profile (export cached in a tmp work dir)."""
    from blindsight.evaluation.cli import main
    from blindsight.profile import Profile, save

    root = tmp_path_factory.mktemp("gemma_eval")
    prof = root / "intra.json"
    save(Profile.uniform("intra", 18, 4, num_kv_heads=1), prof)
    out = root / "record.json"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["--profile", str(prof), "--prompts", "3", "--work-dir", str(root / "work"), "--json", "--quiet"])
    assert rc == 0
    out.write_text(buf.getvalue())
    return root, json.loads(buf.getvalue())


def test_bs_eval_runs_end_to_end_on_gemma3_270m(gemma_eval):
    _, rec = gemma_eval
    for key in ("model", "num_prompts", "dense_accuracy", "compiled_accuracy", "top1_agreement", "mean_kl",
                "attention_flop_reduction"):
        assert key in rec
    assert "surrogate" in rec["model"] and rec["num_prompts"] == 3
    assert 0.0 <= rec["dense_accuracy"] <= 1.0 and 0.0 <= rec["compiled_accuracy"] <= 1.0
    assert rec["mean_kl"] > 0.0, "an all-intra profile changes the distribution"
    # all-intra on 4-6 segments: most image-to-image pairs are skipped
    assert 0.3 < rec["attention_flop_reduction"] < 1.0


def test_gemma3_export_and_compiled_models_equal_transformers(gemma_eval):
    """Dense ONNX, compiled all-dense ONNX and compiled all-intra ONNX against transformers
    (plain, and with the category masks applied by the sweep's hook) on one task prompt."""
    import torch

    from blindsight.calibration.hooks import category_masker, hooked
    from blindsight.evaluation.onnx_models import compile_with
    from blindsight.evaluation.runner import onnx_feeds
    from blindsight.models import pretrained
    from blindsight.models.image_blocks import prompt_masks
    from blindsight.profile import Profile
    from blindsight.prompts import encode
    from blindsight.runtime.session import CompiledSession

    root, _ = gemma_eval
    loaded = pretrained.load("gemma3-270m")
    ids, spans = encode(task_prompts(1, seed=11)[0].pieces, loaded.tokenizer, loaded.delimiters)
    feeds = onnx_feeds(loaded, ids, spans)
    assert feeds["token_type_ids"].sum() == sum(e - s - 2 for s, e in spans.tolist())
    ids_t = torch.from_numpy(ids)[None]
    with torch.no_grad():
        # transformers' own Gemma 3 mask from token_type_ids (bidirectional within each image)
        want = loaded.model(input_ids=ids_t, attention_mask=prompt_masks(loaded.model, spans, len(ids)),
                            logits_to_keep=1).logits[0, -1].numpy()
        causal = loaded.model(input_ids=ids_t, logits_to_keep=1).logits[0, -1].numpy()
        intra = [["intra"] * 4] * 18
        with hooked(loaded.model, mask=category_masker(intra, spans, len(ids))):
            want_intra = loaded.model(input_ids=ids_t, attention_mask=prompt_masks(loaded.model, spans, len(ids)),
                                      logits_to_keep=1).logits[0, -1].numpy()
    assert np.abs(want - causal).max() > 10 * 2e-3, "the image blocks must move these logits"
    dense_path = root / "work" / "dense-r2.onnx"
    dense = run(session(str(dense_path)), feeds)[0][0, -1]
    tol = dict(rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(dense, want, **tol)
    all_dense = compile_with(dense_path, Profile.uniform("dense", 18, 4, num_kv_heads=1))
    np.testing.assert_allclose(CompiledSession(all_dense).run(feeds, spans, len(ids))[0][0, -1], want, **tol)
    all_intra = compile_with(dense_path, Profile.uniform("intra", 18, 4, num_kv_heads=1))  # cached by bs-eval
    got_intra = CompiledSession(all_intra).run(feeds, spans, len(ids))[0][0, -1]
    np.testing.assert_allclose(got_intra, want_intra, **tol)
    assert np.abs(want_intra - want).max() > 10 * 2e-3, "the intra profile must move these logits"


def test_causal_surrogate_mask_runs_gemma3_as_trained(gemma_eval):
    """--mask causal: the dense export fed all-zero token_type_ids and the model compiled
    without image blocks equal transformers' plain causal Gemma 3 (with the category masks
    applied by the sweep's hook for a sparse profile), and the calibration forward is causal."""
    import torch

    from blindsight.calibration.hooks import category_masker, hooked
    from blindsight.calibration.runner import forward
    from blindsight.evaluation.onnx_models import compile_with
    from blindsight.evaluation.runner import onnx_feeds
    from blindsight.models import pretrained
    from blindsight.profile import Profile
    from blindsight.prompts import Encoded, encode
    from blindsight.runtime.session import CompiledSession

    root, _ = gemma_eval
    loaded = pretrained.load("gemma3-270m", mask="causal")
    assert not loaded.image_blocks and "causal" in loaded.describe()
    ids, spans = encode(task_prompts(1, seed=11)[0].pieces, loaded.tokenizer, loaded.delimiters)
    feeds = onnx_feeds(loaded, ids, spans)
    assert feeds["token_type_ids"].sum() == 0
    ids_t = torch.from_numpy(ids)[None]
    layers = [["intra", "sink", "intra_sink", "dense"]] * 18
    with torch.no_grad():
        causal = loaded.model(input_ids=ids_t, logits_to_keep=1).logits[0, -1].numpy()
        with hooked(loaded.model, mask=category_masker(layers, spans, len(ids))):
            want_mix = loaded.model(input_ids=ids_t, logits_to_keep=1).logits[0, -1].numpy()
    np.testing.assert_allclose(forward(loaded, Encoded(ids, spans)).numpy(), causal, rtol=1e-5, atol=1e-5)
    tol = dict(rtol=2e-3, atol=2e-3)
    dense_path = root / "work" / "dense-r2.onnx"
    np.testing.assert_allclose(run(session(str(dense_path)), feeds)[0][0, -1], causal, **tol)
    mix = compile_with(dense_path, Profile(layers, num_kv_heads=1), image_blocks=False)
    assert mix.name.endswith("-causal.onnx")
    got = CompiledSession(mix).run(feeds, spans, len(ids))[0][0, -1]
    np.testing.assert_allclose(got, want_mix, **tol)
    assert np.abs(want_mix - causal).max() > 10 * 2e-3, "the profile must move these logits"


def test_bs_eval_causal_mask_record_and_refusal(gemma_eval, tmp_path):
    import contextlib
    import io

    from blindsight.evaluation.cli import main as eval_main
    from blindsight.calibration.cli import main as profile_main

    root, _ = gemma_eval
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = eval_main(["--profile", str(root / "intra.json"), "--prompts", "2", "--work-dir", str(root / "work"),
                        "--json", "--quiet", "--mask", "causal"])
    assert rc == 0
    rec = json.loads(buf.getvalue())
    assert rec["mask"].startswith("causal (surrogate") and "causal surrogate mask" in rec["model"]
    lo, hi = rec["dense_accuracy_ci95"]
    assert 0.0 <= lo <= rec["dense_accuracy"] <= hi <= 1.0
    # a VLM checkpoint directory never runs under the surrogate mask: one line, nothing written
    ck = tmp_path / "vlm"
    ck.mkdir()
    (ck / "config.json").write_text('{"model_type": "qwen2_vl"}')
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = profile_main(["--model", str(ck), "--mask", "causal", "-o", str(tmp_path / "p.json")])
    assert rc != 0 and not (tmp_path / "p.json").exists()
    lines = [l for l in err.getvalue().splitlines() if l.strip()]
    assert len(lines) == 1 and "--mask causal" in lines[0] and "Traceback" not in err.getvalue()


def test_bs_eval_int8_weights_quantize_only_the_compiled_model(gemma_eval):
    import contextlib
    import io

    import onnx

    from blindsight.evaluation.cli import main as eval_main

    root, fp32 = gemma_eval

    def evaluated(weights):
        """The record of bs-eval --weights ``weights`` and the MatMulInteger count of its compiled model."""
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = eval_main(["--profile", str(root / "intra.json"), "--prompts", "3", "--work-dir", str(root / "work"),
                            "--json", "--quiet", "--weights", weights])
        assert rc == 0
        rec = json.loads(buf.getvalue())
        (quantized,) = (root / "work").glob(f"*.{weights}.onnx")
        ops = [n.op_type for n in onnx.load(str(quantized), load_external_data=False).graph.node]
        return rec, ops.count("MatMulInteger")

    rec, int8_matmuls = evaluated("int8")
    assert rec["weights"] == "int8" and fp32["weights"] == "fp32"
    assert rec["compiled_model"].endswith(".int8.onnx")
    # the reference stays the fp32 dense model; int8 moves the compiled one
    assert rec["dense_accuracy"] == fp32["dense_accuracy"]
    assert rec["mean_kl"] != fp32["mean_kl"]
    assert int8_matmuls == 18 * 7, "every projection of the 18 layers, the LM head left fp32"

    head, head_matmuls = evaluated("int8-lm-head")
    assert head["weights"] == "int8-lm-head" and head["compiled_model"].endswith(".int8-lm-head.onnx")
    assert head["dense_accuracy"] == fp32["dense_accuracy"] and head["mean_kl"] != rec["mean_kl"]
    assert head_matmuls == 18 * 7 + 1, "the LM head too"


def test_wilson_interval_against_the_closed_form():
    from blindsight.evaluation.runner import wilson

    # 72 of 100 at z = 1.96: centre (0.72 + 0.019208) / 1.038416 = 0.71186, half 0.08674
    lo, hi = wilson(72, 100)
    assert lo == pytest.approx(0.62512, abs=1e-4) and hi == pytest.approx(0.79860, abs=1e-4)
    assert wilson(0, 8)[0] == 0.0 and 0.3 < wilson(0, 8)[1] < 0.33
