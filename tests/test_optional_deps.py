"""A missing optional dependency is one line naming the extra to install, exit status 2, for
every console script: each runs in a subprocess whose import system refuses
the blocked modules before the command's entry point is called."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from blindsight.entry import COMMANDS
from blindsight.errors import OPTIONAL_MODULES

ROOT = Path(__file__).resolve().parents[1]
WRAPPER = """
import importlib, importlib.abc, sys
blocked = set(sys.argv[1].split(","))
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Blocker())
module, func = sys.argv[2].split(":")
sys.exit(getattr(importlib.import_module(module), func)(sys.argv[3:]))
"""


def _scripts():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _run(blocked, command, *argv, cwd=None):
    target = _scripts()[command]
    return subprocess.run([sys.executable, "-c", WRAPPER, ",".join(blocked), target, *map(str, argv)],
                          capture_output=True, text=True, check=False, cwd=cwd, timeout=300)


def test_every_script_goes_through_the_guard():
    scripts = _scripts()
    assert set(scripts) == set(COMMANDS) and all(v.startswith("blindsight.entry:") for v in scripts.values())


CASES = [
    ("bs-export", ["torch"], ["ckpt", "-o", "out"], "export"),
    ("bs-checkpoint", ["torch"], ["tiny-qwen2-vl", "-o", "ckpt"], "export"),
    ("bs-demo", ["torch"], ["--out", "demo", "--no-real-weights"], "export"),
    ("bs-demo", ["PIL"], ["--out", "demo", "--no-real-weights", "--quiet"], ""),  # "": a core dependency
    ("bs-run", ["PIL"], ["{vlm}", "--image", "a.png", "--prompt", "hi", "--model", "dense"], ""),
    ("bs-serve", ["fastapi"], ["{vlm}", "--model", "dense"], "serve"),
    ("bs-serve", ["prometheus_client"], ["{vlm}", "--model", "dense"], "serve"),
    ("bs-serve-load", ["openai"], ["http://127.0.0.1:9"], "serve"),
    ("bs-serve-ray", ["ray"], ["{vlm}", "--model", "dense"], "ray"),
    ("bs-profile", ["torch"], ["-o", "p.json"], "export"),
    ("bs-eval", ["torch"], ["--profile", "p.json"], "export"),
    ("bs-eval", ["tqdm"], ["--profile", "p.json"], "export"),
    ("bs-bench", ["matplotlib"], ["--merge", ROOT / "docs/bench/op.json", "--plot", "p.png"], "plot"),
    ("bs-bench", ["tqdm"], ["--level", "op", "--quick"], "export"),
]


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    """A tiny Qwen2-VL bs-export output with one picture in it, for bs-run."""
    from PIL import Image

    from blindsight.models.checkpoints import make_tiny_checkpoint
    from blindsight.models.export_vlm import export_vlm

    root = tmp_path_factory.mktemp("optional")
    out = export_vlm(make_tiny_checkpoint("qwen2_vl", root / "ckpt", seed=3), root / "export", progress=False).out_dir
    Image.new("RGB", (56, 56)).save(out / "a.png")
    return out


@pytest.mark.parametrize("command,blocked,argv,extra", CASES, ids=[f"{c[0]}-{c[1][0]}" for c in CASES])
def test_missing_optional_module_is_one_line(command, blocked, argv, extra, tmp_path, request):
    if any("{vlm}" in str(a) for a in argv):
        vlm = request.getfixturevalue("vlm_dir")
        argv = [str(a).replace("{vlm}", str(vlm)) for a in argv]
        tmp_path = vlm
    proc = _run(blocked, command, *argv, cwd=tmp_path)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and err, proc.stderr
    line = err[-1]
    wanted = f"pip install 'blindsight-ort[{extra}]'" if extra else "pip install 'blindsight-ort'"
    assert line.startswith(f"{command}: error: ") and wanted in line, proc.stderr
    assert not any(line.startswith(command) for line in err[:-1]), proc.stderr  # only progress bars before it


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_without_any_optional_module(command, tmp_path):
    """--help with every optional module refused: the usage, or the one line naming the extra."""
    proc = _run(sorted(OPTIONAL_MODULES), command, "--help", cwd=tmp_path)
    assert "Traceback" not in proc.stderr, proc.stderr
    if proc.returncode == 0:
        assert proc.stdout.startswith("usage:")
    else:
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "pip install 'blindsight-ort[" in proc.stderr


def test_deployment_commands_need_no_optional_module(tmp_path):
    """bs-compile, bs-check, bs-quantize and bs-flops run with every optional module refused."""
    proc = _run(sorted(OPTIONAL_MODULES), "bs-flops", "--model", "qwen2-vl-2b", "--images", "2", "--image-len", "16", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = _run(sorted(OPTIONAL_MODULES), "bs-check", "a.onnx", "b.onnx", cwd=tmp_path)
    assert proc.returncode == 2 and "SOURCE model file not found" in proc.stderr
    proc = _run(sorted(OPTIONAL_MODULES), "bs-quantize", "a.onnx", cwd=tmp_path)
    assert proc.returncode == 2 and "model file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_transformers_backend_message():
    from blindsight.errors import missing_dependency

    msg = missing_dependency(ImportError("Qwen2VLImageProcessorPil requires the PIL library but it was not found"))
    assert msg and "Pillow" in msg and "core dependency" in msg and "pip install 'blindsight-ort'" in msg
    assert missing_dependency(ModuleNotFoundError("No module named 'foo'", name="foo")) is None
    assert missing_dependency(ValueError("x")) is None
