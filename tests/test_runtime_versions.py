"""The supported onnxruntime versions: the native kernel (built once, from ONNX Runtime
1.21's headers) loads into each and a compiled node on it equals the numpy reference
of docs/specification.md §2, as do the node's function bodies.

Each version runs in a virtual environment that sees this environment's packages
(``--system-site-packages``) with only onnxruntime replaced, cached under the
blindsight cache folder; making one fetches one onnxruntime wheel."""

import json
import subprocess
import sys
import venv

import pytest

from blindsight import native
from blindsight.records import cache_root

#: the onnxruntime releases the project supports (pyproject's range) and that CI checks here
VERSIONS = ["1.31.1", "1.32.0"]

SCRIPT = r"""
import json
import numpy as np
import onnxruntime as ort
from blindsight.attention import reference_attention
from blindsight.attention.schema import AttentionConfig
from blindsight.passes.lowering.single_node import single_node_model
from blindsight.runtime.session import make_session

cfg = AttentionConfig(6, 2, 16, 0.25, ("sink", "intra", "intra_sink", "dense", "intra", "sink"), mask_type="none")
rng = np.random.default_rng(0)
spans = np.array([[3, 20], [24, 41], [45, 60]], dtype=np.int64)
q = rng.standard_normal((1, 6, 64, 16)).astype(np.float32)
k, v = (rng.standard_normal((1, 2, 64, 16)).astype(np.float32) for _ in range(2))
want = reference_attention(q, k, v, spans, cfg.categories, scale=cfg.scale)
out = {"version": ort.__version__}
for lowering, native in (("fast", True), ("fast", False), ("reference", False)):
    sess = make_session(single_node_model(cfg, lowering), threads=1, native=native)
    got = sess.run(None, {"query": q, "key": k, "value": v, "image_spans": spans})[0]
    out[f"{lowering}/{sess.blindsight_attention}"] = float(np.abs(got - want).max())
print(json.dumps(out))
"""


def runtime_python(version: str):
    """A Python whose onnxruntime is ``version``, everything else this environment's."""
    import onnxruntime

    if onnxruntime.__version__ == version:
        return sys.executable
    root = cache_root() / "runtimes" / f"onnxruntime-{version}"
    python = root / "bin" / "python"
    if not python.is_file():
        venv.EnvBuilder(system_site_packages=True, with_pip=True, clear=True).create(root)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", f"onnxruntime=={version}"], check=True)
    return python


@pytest.mark.parametrize("version", VERSIONS)
def test_the_kernel_and_the_function_bodies_run_on_each_supported_onnxruntime(version):
    assert native.available(), "the native kernel is not built: run python -m blindsight.native build"
    proc = subprocess.run([str(runtime_python(version)), "-c", SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result.pop("version") == version
    routes = sorted(result)
    assert len(routes) == 3 and routes[0].startswith("fast/function bodies") and routes[1].startswith("fast/native kernel")
    for route, err in result.items():
        assert err < 1e-5, (version, route, err)
