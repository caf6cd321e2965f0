"""bs-serve-load: a bounded load run against bs-serve (or bs-serve-ray), through the official
openai client, streaming, as users would call it.

TARGET is a running server's URL (``http://127.0.0.1:8000``) or a bs-export directory,
for which a bs-serve subprocess is started on a free loopback port for the run and
stopped after it. Every request is the same conversation (the same images and
question), so with greedy decoding every answer must be the same: one that
differs counts as ``mismatched``. Reported: requests ok / failed (an error or a
429) / lost (a stream that ended without its final chunk) / mismatched, the wall
time, throughput (requests and generated tokens per second) and p50/p99 of the
time to first token (the first streamed chunk, which carries the first token) and
of the whole request. The exit status is 1 if any request failed, was lost or
mismatched.

Only loopback addresses are targets unless --allow-remote is given.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import io
import ipaddress
import json
import os
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlparse

from blindsight.errors import BlindSightError

PROMPT = "compare these pictures: which is brighter?"


def percentile(values, q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation between order statistics."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def sample_images(n: int, seed: int = 0, size=(60, 48)) -> list[bytes]:
    """n PNGs of blocks of random colour (what the tests use), encoded in memory."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        im = Image.fromarray(rng.integers(0, 255, (3, 3, 3), dtype=np.uint8)).resize((size[0], size[1] + 8 * i),
                                                                                       Image.NEAREST)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def messages(images: list[bytes], prompt: str = PROMPT) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": prompt}]}]


def _check_loopback(url: str, allow_remote: bool) -> None:
    host = urlparse(url).hostname or ""
    if allow_remote or host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise BlindSightError(f"{url} is not a loopback address; pass --allow-remote to load another host")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc=None, timeout: float = 180.0) -> dict:
    """Poll GET /health until it answers (or the server process exits, or the time is up)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BlindSightError(f"the server exited with status {proc.returncode} before it answered {url}/health")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            time.sleep(0.25)
    raise BlindSightError(f"{url}/health did not answer within {timeout:.0f} s")


def spawn_server(out_dir: str, serve_args: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "blindsight.serve", out_dir, "--port", str(port), *serve_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    proc.tail = collections.deque(maxlen=20)  # the server's last lines, drained so its pipe never fills
    threading.Thread(target=lambda: [proc.tail.append(line.rstrip()) for line in proc.stderr], daemon=True).start()
    return proc, f"http://127.0.0.1:{port}"


async def _one(client, model: str, msgs, max_tokens: int, sem, record: list) -> None:
    async with sem:
        t0 = time.perf_counter()
        ttft = None
        text, finish, tokens = "", None, 0
        try:
            stream = await client.chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens,
                                                          stream=True)
            async for chunk in stream:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                text += choice.delta.content or ""
                if choice.finish_reason is not None:
                    finish = choice.finish_reason
                    extra = (chunk.model_extra or {}).get("blindsight") or {}
                    tokens = len(extra.get("token_ids") or [])
        except Exception as exc:  # noqa: BLE001 (a failed request is a row of the report)
            record.append({"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            return
        record.append({"ok": finish is not None, "lost": finish is None, "ttft_s": ttft, "latency_s": time.perf_counter() - t0,
                       "text": text, "tokens": tokens})


async def run_load(url: str, model: str | None, requests: int, concurrency: int, images: int, max_tokens: int,
                   timeout: float = 120.0) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=timeout)
    try:
        if model is None:
            model = (await client.models.list()).data[0].id
        msgs = messages(sample_images(images))
        sem = asyncio.Semaphore(concurrency)
        record: list = []
        t0 = time.perf_counter()
        await asyncio.gather(*(_one(client, model, msgs, max_tokens, sem, record) for _ in range(requests)))
        wall = time.perf_counter() - t0
    finally:
        await client.close()
    ok = [r for r in record if r["ok"]]
    answers = [r["text"] for r in ok]
    expected = max(set(answers), key=answers.count) if answers else None
    ttft = [r["ttft_s"] for r in ok]
    lat = [r["latency_s"] for r in ok]
    errors = sorted({r["error"] for r in record if "error" in r})
    return {
        "url": url, "model": model, "requests": requests, "concurrency": concurrency, "images": images,
        "max_tokens": max_tokens, "ok": len(ok), "failed": sum(1 for r in record if "error" in r),
        "lost": sum(1 for r in record if r.get("lost")), "mismatched": sum(1 for a in answers if a != expected),
        "wall_s": wall, "requests_per_s": len(ok) / wall if wall else 0.0,
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall if wall else 0.0,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "latency_p50_s": percentile(lat, 50), "latency_p99_s": percentile(lat, 99),
        "answer": expected, "errors": errors[:5],
    }


def format_report(rep: dict) -> str:
    from blindsight.tables import fmt_table

    ms = lambda v: "-" if v is None else f"{v * 1000:.1f}"  # noqa: E731
    rows = [[rep["url"], rep["requests"], rep["concurrency"], rep["ok"], rep["failed"], rep["lost"], rep["mismatched"],
             f"{rep['wall_s']:.2f}", f"{rep['requests_per_s']:.2f}", f"{rep['tokens_per_s']:.1f}",
             ms(rep["ttft_p50_s"]), ms(rep["ttft_p99_s"]), ms(rep["latency_p50_s"]), ms(rep["latency_p99_s"])]]
    head = ["target", "requests", "conc", "ok", "failed", "lost", "mismatched", "wall s", "req/s", "tok/s",
            "TTFT p50 ms", "TTFT p99 ms", "lat p50 ms", "lat p99 ms"]
    text = fmt_table(head, rows)
    if rep["errors"]:
        text += "\nerrors: " + "; ".join(rep["errors"])
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bs-serve-load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="URL|OUT_DIR", help="a running server (http://127.0.0.1:8000) or a bs-export directory to serve for the run")
    p.add_argument("--requests", type=int, default=200, metavar="N", help="requests in all (default 200)")
    p.add_argument("--concurrency", type=int, default=8, metavar="N", help="requests in flight at once (default 8)")
    p.add_argument("--images", type=int, default=2, metavar="N", help="images per request (default 2)")
    p.add_argument("--max-tokens", type=int, default=16, metavar="N", help="max_tokens of each request (default 16)")
    p.add_argument("--model", default=None, help="the model id to send (default: the server's first, GET /v1/models)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S", help="per-request timeout (default 120 s)")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="an argument for the spawned bs-serve (with OUT_DIR), e.g. --serve-arg=--threads=2; repeat")
    p.add_argument("--allow-remote", action="store_true", help="allow a target that is not a loopback address")
    p.add_argument("--json", action="store_true", help="print one JSON record instead of the table")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import openai  # noqa: F401 (missing: one line naming the serve extra, before any server starts)

    for name in ("requests", "concurrency", "max_tokens"):
        if getattr(args, name) < 1:
            raise BlindSightError(f"--{name.replace('_', '-')} is {getattr(args, name)}; give 1 or more")
    if args.images < 0:
        raise BlindSightError(f"--images is {args.images}; give 0 or more")
    proc = None
    if args.target.startswith(("http://", "https://")):
        url = args.target.rstrip("/")
        _check_loopback(url, args.allow_remote)
        wait_healthy(url, timeout=10)
    else:
        if not os.path.isdir(args.target):
            raise BlindSightError(f"{args.target} is neither a server URL nor a bs-export directory")
        proc, url = spawn_server(args.target, args.serve_arg)
    try:
        if proc is not None:
            try:
                wait_healthy(url, proc)
            except BlindSightError as exc:
                time.sleep(0.5)
                raise BlindSightError(f"{exc}: {proc.tail[-1] if proc.tail else 'no message'}") from None
        rep = asyncio.run(run_load(url, args.model, args.requests, args.concurrency, args.images, args.max_tokens,
                                   args.timeout))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(json.dumps(rep) if args.json else format_report(rep))
    return 0 if rep["failed"] == rep["lost"] == rep["mismatched"] == 0 and rep["ok"] == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
