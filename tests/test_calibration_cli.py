"""bs-profile and bs-eval command lines: a real SmolLM2 calibration, and bad input."""

import json

import pytest

from blindsight import profile as profile_io
from blindsight.calibration.cli import main as profile_main
from blindsight.evaluation.cli import main as eval_main


def test_bs_profile_on_smollm2_writes_a_valid_profile(tmp_path, capsys):
    out = tmp_path / "smol.json"
    rc = profile_main(["--model", "smollm2-135m", "--prompts", "2", "-o", str(out), "--report", str(tmp_path / "rep"),
                       "--threshold", "0.8:0.95", "--json", "--quiet"])
    assert rc == 0
    record = json.loads(capsys.readouterr().out)
    prof = profile_io.load(out)
    assert (prof.num_layers, prof.num_heads, prof.num_kv_heads) == (30, 9, 3)  # SmolLM2-135M's config
    assert "surrogate" in prof.model and "surrogate" in prof.calibration["images"]
    cal = prof.calibration
    assert cal["num_prompts"] == 2 and cal["threshold"] == "0.8:0.95"
    assert cal["threshold_per_layer"][0] == pytest.approx(0.8) and cal["threshold_per_layer"][-1] == pytest.approx(0.95)
    recall = cal["mean_recall"]
    assert len(recall) == 30 and all(len(layer) == 9 for layer in recall)
    dense_col = cal["recall_columns"].index("dense")
    for layer in recall:
        for head in layer:
            assert head[dense_col] == pytest.approx(1.0, abs=1e-4)  # dense keeps all mass
            assert all(0.0 <= v <= 1.0 + 1e-6 for v in head)
    assert record["counts"] == prof.counts() and sum(prof.counts().values()) == 270
    assert (tmp_path / "rep" / "heatmap.png").stat().st_size > 1000
    assert 0.0 <= record["flops"]["attention_flop_reduction"] < 1.0


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--threshold", "2"], "threshold"),
        (["--threshold", "0.9:x"], "threshold"),
        (["--min-fraction", "0"], "--min-fraction"),
        (["--prompts", "0"], "--prompts"),
        (["--model", "no-such-model"], "neither a known model"),
        (["--template", "8x256"], "template"),
        (["--prompt-shape", "16"], "template"),
        (["--prompt-shape", "0:64"], "--prompt-shape"),
        (["--sweep", "0.9"], "--report"),
        (["-o", "/no/such/dir/p.json"], "does not exist"),
    ],
)
def test_bs_profile_bad_input_is_one_line_exit_2(argv, needle, capsys, tmp_path):
    assert profile_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err


def test_bs_eval_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert eval_main(["--profile", str(tmp_path / "missing.json")]) == 2
    assert "profile file not found" in capsys.readouterr().err
    wrong = tmp_path / "wrong.json"
    profile_io.save(profile_io.Profile.uniform("dense", 2, 4), wrong)
    assert eval_main(["--profile", str(wrong), "--prompts", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 layers x 4 heads" in err
    assert eval_main(["--profile", str(wrong), "--prompts", "0"]) == 2
    assert eval_main(["--profile", str(wrong), "--model", "smollm2-135m"]) == 2
    assert "gemma3-270m" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3"])
def test_bs_profile_on_a_vlm_directory_uses_its_images(family, tmp_path, capsys):
    """A Hugging Face VLM directory: prompts with drawn images through the family's tokenizer and
    image processor; the spans are the images' delimiters, the profile fits the checkpoint."""
    from blindsight.models.checkpoints import make_tiny_checkpoint

    ck = make_tiny_checkpoint(family, tmp_path / "ck")
    out = tmp_path / "p.json"
    assert profile_main(["--model", str(ck), "--prompts", "2", "-o", str(out), "--quiet", "--json"]) == 0
    prof = profile_io.load(out)
    cfg = json.loads((ck / "config.json").read_text())["text_config"]
    assert (prof.num_layers, prof.num_heads) == (cfg["num_hidden_layers"], cfg["num_attention_heads"])
    assert "surrogate" not in prof.model and prof.calibration["images_per_prompt"]["min"] >= 3


def test_bs_profile_prompt_shape_sets_images_and_their_length(tmp_path, capsys):
    """--prompt-shape IMAGES:TOKENS: every calibration prompt holds IMAGES images of about TOKENS tokens,
    on the built-in text-only weights (surrogate segments) and on a VLM directory (drawn images sized
    for the processor, checked against transformers' own processor); Gemma 3's fixed count is kept."""
    import numpy as np
    from transformers import AutoImageProcessor

    from blindsight.models.checkpoints import make_tiny_checkpoint

    out = tmp_path / "smol.json"
    assert profile_main(["--model", "smollm2-135m", "--prompts", "1", "--prompt-shape", "6:120", "-o", str(out),
                         "--quiet", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    cal = profile_io.load(out).calibration
    assert cal["images_per_prompt"] == {"min": 6, "max": 6} and record["prompt_shape"] == "6:120"
    assert 90 <= cal["tokens_per_image"]["min"] <= cal["tokens_per_image"]["max"] <= 150
    assert cal["prompt_tokens"]["min"] > 6 * 90

    ck = make_tiny_checkpoint("qwen2_vl", tmp_path / "ckq")
    assert profile_main(["--model", str(ck), "--prompts", "2", "--prompt-shape", "2:9", "-o", str(out), "--quiet"]) == 0
    capsys.readouterr()
    cal = profile_io.load(out).calibration
    side = 3 * 28  # sqrt(9) merged 28 px blocks
    grid = AutoImageProcessor.from_pretrained(ck).preprocess(np.zeros((side, side, 3), np.uint8), return_tensors="np")["image_grid_thw"]
    tokens = int(np.prod(grid[0])) // 4
    assert tokens == 9 and cal["images_per_prompt"] == {"min": 2, "max": 2}
    assert cal["tokens_per_image"] == {"min": tokens + 2, "max": tokens + 2}  # the span covers the two delimiters

    ckg = make_tiny_checkpoint("gemma3", tmp_path / "ckg")
    capsys.readouterr()
    assert profile_main(["--model", str(ckg), "--prompts", "1", "--prompt-shape", "2:9", "-o", str(tmp_path / "g.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "IMAGES:4" in err and not (tmp_path / "g.json").exists()
