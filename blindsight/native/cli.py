"""``python -m blindsight.native build|info``: compile the kernel, or say whether it is built."""

from __future__ import annotations

import argparse

from blindsight import native
from blindsight.errors import run_cli
from blindsight.native.build import DEB_FILE, build


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blindsight.native", description="the native BlindSightAttention CPU kernel")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="fetch the pinned ONNX Runtime headers and compile the kernel")
    b.add_argument("--deb", help=f"a local {DEB_FILE} instead of fetching it (sha256 still checked)")
    b.add_argument("--headers", help="a directory holding onnxruntime_c_api.h (API version 21 or later, never newer than the runtime)")
    b.add_argument("--cxx", help="C++ compiler (default $CXX or g++)")
    b.add_argument("--quiet", action="store_true")
    sub.add_parser("info", help="say whether the kernel is built and which instruction set it runs")
    args = ap.parse_args(argv)

    def action():
        if args.cmd == "build":
            build(args.deb, args.headers, args.cxx, args.quiet)
        print(native.describe())

    code, _ = run_cli("python -m blindsight.native", action, False)
    return code
