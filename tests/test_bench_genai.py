"""bs-bench --level genai: the prompt it times and the generations it compares, on the
builder-made tiny Qwen2.5-VL decoder (tests/fixtures/genai) compiled by bs-compile."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from blindsight.bench.genai import GenaiCase, prompt_ids, run_precision
from blindsight.bench.render import render_genai
from blindsight.compiler.genai import compile_genai_folder
from blindsight.profile import Profile
from blindsight.runtime.genai import delimiters_of

FIXTURE = Path(__file__).parent / "fixtures" / "genai" / "qwen2_5_vl"
CASE = GenaiCase(num_images=2, image_len=6, layers=2, precisions=("fp32",), decode_steps=3)


def test_prompt_ids_delimit_the_templates_spans():
    ids = prompt_ids(CASE, FIXTURE)
    delim = delimiters_of(FIXTURE)
    t = CASE.template
    assert ids.shape == (t.seq_len,) and ids.dtype == np.int32
    inside = np.zeros(t.seq_len, bool)
    for start, end in t.spans:
        assert ids[start] == delim.start and ids[end - 1] == delim.end
        assert len(set(ids[start + 1:end - 1].tolist())) == 1 and ids[start + 1] not in (delim.start, delim.end)
        inside[start:end] = True
    assert not np.isin(ids[~inside], [delim.start, delim.end, ids[t.spans[0][0] + 1]]).any()


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None,
                    reason="onnxruntime-genai not installed (the genai extra; the README's test command installs it)")
def test_genai_runs_the_three_folders_and_all_dense_matches_the_builder(tmp_path):
    own = tmp_path / "genai"
    shutil.copytree(FIXTURE, own)
    folders = {"genai": own}
    # the fixture's 2 layers x 4 heads (2 KV heads); the mix as the bench builds it: layer 0 dense
    profiles = {"dense": Profile([["dense"] * 4] * 2, num_kv_heads=2), "mix": Profile.mixed(2, 4, first_dense=True, num_kv_heads=2)}
    for name, profile in profiles.items():
        folders[name] = compile_genai_folder(own, profile, tmp_path / name, native=False).out_dir
    rec = run_precision(folders, CASE, repeats=1)
    assert rec["dense_tokens_equal_genai"] and len(rec["tokens"]["genai"]) == CASE.decode_steps + 1
    assert set(rec["seconds"]) == {"genai", "dense", "mix"} and all(s["ttft"] > 0 for s in rec["seconds"].values())
    rec["efficiency"] = 1.0
    table = render_genai({"versions": {"onnxruntime-genai": "x", "onnxruntime": "y"}, "model": "tiny", "num_layers": 2,
                          "vocab_size": 263, "N": 2, "L": 6, "seq_len": CASE.template.seq_len, "attention": "function bodies",
                          "flop_bound": 1.0, "attention_flop_bound": 1.0, "decode_steps": 3, "precisions": {"fp32": rec}})
    for label in ("builder's decoder", "compiled all-dense", "compiled profile mix"):
        assert label in table
    assert table.rstrip().endswith("fp32: yes")


def test_bs_bench_genai_bad_input_is_one_line(tmp_path):
    for args, needle in ((["--model-config", "qwen2-vl-2b"], "qwen2.5-vl-3b"),
                         (["--genai-precisions", "fp8"], "fp8"),
                         (["--model-layers", "1"], ">= 2")):
        code = "import sys; from blindsight.bench.cli import main; sys.exit(main(sys.argv[1:]))"
        proc = subprocess.run([sys.executable, "-c", code, "--level", "genai", "--work-dir", str(tmp_path / "w"), *args],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and needle in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()
