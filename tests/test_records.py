"""Records carry no absolute home paths: the committed ones under docs/
and BENCHMARKS.md, and what the writers put in new ones."""

import re
from pathlib import Path

import pytest

from blindsight.records import record_path, scrub

ROOT = Path(__file__).resolve().parents[1]
HOME_PATH = re.compile(r"(?<![\w.])(/root|/home/[^/\s\"']+|/Users/[^/\s\"']+|[A-Za-z]:\\\\?Users)(?=[/\\\s\"']|$)")


def _files():
    yield ROOT / "BENCHMARKS.md"
    for p in sorted((ROOT / "docs").rglob("*")):
        if p.is_file() and p.suffix in (".json", ".md", ".txt", ".csv"):
            yield p


@pytest.mark.parametrize("path", list(_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_absolute_home_path_in_docs(path):
    text = path.read_text()
    hits = [m.group(0) for m in HOME_PATH.finditer(text)]
    assert not hits, f"{path.relative_to(ROOT)} names {hits[0]}"
    assert Path.home().as_posix() == "/" or Path.home().as_posix() not in text
    if path.suffix == ".json":  # a record names no one's home, not even as ~ (prose may say ~/.cache)
        assert '"~/' not in text, f"{path.relative_to(ROOT)} names a path under ~"


def test_home_path_pattern():
    for bad in ('"/root/.cache/x"', "/home/alice/m.onnx", "C:\\Users\\bob", "/Users/carol/x"):
        assert HOME_PATH.search(bad), bad
    for ok in ("<cache>/onnx/m.onnx", "docs/bench/speedup.png", "copies (gather/concat/transpose)", "/tmp/x"):
        assert not HOME_PATH.search(ok), ok


def test_record_path(tmp_path, monkeypatch):
    home, cache, work = tmp_path / "home", tmp_path / "cache", tmp_path / "work"
    for d in (home, cache, work):
        d.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("BLINDSIGHT_CACHE", str(cache))
    monkeypatch.chdir(work)
    assert record_path(cache / "onnx" / "m" / "c.onnx") == "<cache>/onnx/m/c.onnx"
    assert record_path(work / "p.json") == "p.json" and record_path("sub/p.json") == "sub/p.json"
    assert record_path(home / "models" / "q") == "~/models/q"
    assert record_path(home / "x.png", base=home) == "x.png"
    assert record_path("/opt/m.onnx") == "/opt/m.onnx"
    assert scrub(f"{home}/models/qwen (qwen2_vl)") == "~/models/qwen (qwen2_vl)"
    assert scrub(f"{cache}/hf/gemma3-270m (gemma3)") == "<cache>/hf/gemma3-270m (gemma3)"
