"""Console-script entry points: each imports its command inside :func:`blindsight.errors.run_cli`,
so a missing optional dependency, at import time or while the command runs, is one line
naming the extra to install (exit status 2), never a traceback."""

from __future__ import annotations

import importlib
import sys

from blindsight.errors import run_cli


def _entry(prog: str, target: str):
    module, func = target.split(":")

    def main(argv=None) -> int:
        args = sys.argv[1:] if argv is None else list(argv)
        code, rc = run_cli(prog, lambda: getattr(importlib.import_module(module), func)(args), "--debug" in args)
        return rc if code == 0 else code

    main.__name__ = main.__qualname__ = prog.replace("-", "_")
    main.__doc__ = f"{prog}: {module}.{func}, guarded by run_cli."
    return main


COMMANDS = {
    "bs-compile": "blindsight.compiler.cli:main",
    "bs-quantize": "blindsight.compiler.quantize_cli:main",
    "bs-demo": "blindsight.demo:main",
    "bs-flops": "blindsight.flops.cli:main",
    "bs-bench": "blindsight.bench.cli:main",
    "bs-profile": "blindsight.calibration.cli:main",
    "bs-eval": "blindsight.evaluation.cli:main",
    "bs-export": "blindsight.models.cli:main",
    "bs-checkpoint": "blindsight.models.fullsize:main",
    "bs-run": "blindsight.runtime.cli:main",
    "bs-check": "blindsight.runtime.parity:main",
    "bs-serve": "blindsight.serve.cli:main",
    "bs-serve-load": "blindsight.serve.load:main",
    "bs-serve-ray": "blindsight.serve.ray_app:main",
    "bs-serve-triton": "blindsight.serve.triton:main",
}
(bs_compile, bs_quantize, bs_demo, bs_flops, bs_bench, bs_profile, bs_eval, bs_export, bs_checkpoint, bs_run, bs_check, bs_serve, bs_serve_load,
 bs_serve_ray, bs_serve_triton) = (
    _entry(prog, target) for prog, target in COMMANDS.items()
)
