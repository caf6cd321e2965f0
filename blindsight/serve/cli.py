"""bs-serve: an OpenAI-compatible HTTP server for a bs-export directory (FastAPI on uvicorn)."""

from __future__ import annotations

import argparse
import logging
import sys

from blindsight.errors import BlindSightError
from blindsight.runtime.session import PROVIDERS

EPILOG = """\
endpoints: POST /v1/chat/completions (OpenAI's chat completions, "stream": true for
server-sent events; images as image_url parts holding data:image/...;base64 URLs),
GET /v1/models, GET /health, GET /metrics (Prometheus).

example:
  bs-serve qwen-onnx --port 8000
  curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "qwen-onnx", "max_tokens": 16, "messages": [{"role": "user", "content": "hello"}]}'
"""


def add_pipeline_arguments(p: argparse.ArgumentParser) -> None:
    """The options bs-serve and bs-serve-ray share: the model and the request limits."""
    p.add_argument("out_dir", metavar="OUT_DIR", help="a directory written by bs-export")
    p.add_argument("--provider", default="cpu", choices=sorted(PROVIDERS), help="ONNX Runtime execution provider (default cpu)")
    p.add_argument("--model", default="compiled", metavar="compiled|dense|PATH",
                   help="which language model to serve (default compiled: OUT_DIR/language_model.blindsight.onnx)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients send (default: OUT_DIR's directory name)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads per session (default: ONNX Runtime's choice)")
    p.add_argument("--concurrency", type=int, default=1, metavar="N",
                   help="requests generated at once on the one loaded pipeline (default 1)")
    p.add_argument("--max-queue", type=int, default=16, metavar="N",
                   help="requests that may wait beyond those running; more get 429 (default 16)")
    p.add_argument("--max-images", type=int, default=8, metavar="N", help="images per request (default 8)")
    p.add_argument("--max-image-bytes", type=int, default=8 * 1024 * 1024, metavar="B",
                   help="encoded size of one image (default 8 MiB)")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096, metavar="P",
                   help="width x height of one image, checked before decoding (default 4096 x 4096)")
    p.add_argument("--allow-local-images", action="append", default=[], metavar="DIR",
                   help="let image_url parts name local files (file:///abs/path) under DIR; repeat for several")
    p.add_argument("--max-context", type=int, default=None, metavar="N",
                   help="context length (default: max_position_embeddings of OUT_DIR/config.json)")
    p.add_argument("--default-max-tokens", type=int, default=256, metavar="N",
                   help="tokens generated when a request sets no max_tokens (default 256, within the context)")
    p.add_argument("--chunk-size", type=int, default=None, metavar="N",
                   help="prefill each prompt through the KV cache in chunks of N tokens (default: one call); "
                   "bounds a long prompt's prefill memory by N; same answers")
    p.add_argument("--prepack", default="auto", choices=("auto", "on", "off"),
                   help="ONNX Runtime's MatMul weight pre-packing (as bs-run): auto (default) turns it off where a "
                   "packed copy of the weights would not fit in memory")


def engine_kwargs(args) -> dict:
    from blindsight.serve.protocol import ImageLimits

    for name in ("max_images", "max_image_bytes", "max_image_pixels", "default_max_tokens"):
        if getattr(args, name) < 1:
            raise BlindSightError(f"--{name.replace('_', '-')} is {getattr(args, name)}; give 1 or more")
    limits = ImageLimits(args.max_images, args.max_image_bytes, args.max_image_pixels, tuple(args.allow_local_images))
    return dict(provider=args.provider, model=args.model, threads=args.threads, name=args.served_model_name,
                limits=limits, max_queue=args.max_queue, concurrency=args.concurrency, max_context=args.max_context,
                default_max_tokens=args.default_max_tokens, chunk_size=args.chunk_size, prepack=args.prepack)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bs-serve", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pipeline_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import uvicorn

    from blindsight.serve.app import create_app
    from blindsight.serve.engine import Engine

    try:
        engine = Engine.from_directory(args.out_dir, **engine_kwargs(args))
    except BlindSightError as exc:
        print(f"bs-serve: error: {exc}", file=sys.stderr)
        return 2
    app = create_app(engine)
    logging.basicConfig(level=logging.INFO, format="bs-serve: %(message)s")
    kind = "compiled (BlindSight attention)" if engine.pipeline.sparse else "dense"
    print(f"bs-serve: serving {engine.name!r} ({kind} model, {args.provider}) from {args.out_dir}; "
          f"context {engine.max_context}, concurrency {engine.concurrency}, queue {engine.max_queue}"
          + (f", prefill in chunks of {engine.pipeline.chunk_size} tokens" if engine.pipeline.chunk_size else ""),
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, access_log=args.access_log, log_level="info",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    try:
        server.run()
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
