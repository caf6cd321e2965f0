"""One loaded pipeline behind a bounded queue.

Requests are admitted while fewer than ``concurrency + max_queue`` are in the
system (running or waiting), else refused with 429. ``concurrency`` worker
threads (default 1) share the one :class:`~blindsight.runtime.pipeline.Pipeline`:
ONNX Runtime sessions may be run from several threads. A job decodes its images,
builds the prompt, checks it against the context length and generates, handing
each token to the event loop as it is chosen (the pipeline's ``on_token``
callback). A job whose client has gone is stopped at its next token (or
skipped if it was still waiting), which frees its slot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from blindsight.errors import BlindSightError
from blindsight.serve.metrics import Metrics
from blindsight.serve.protocol import ApiError, Conversation, ImageLimits, decode_image

log = logging.getLogger("blindsight.serve")

DEFAULT_MAX_TOKENS = 256


class _Cancelled(Exception):
    """Raised from the on_token callback when the client has gone."""


# ---------------------------------------------------------------- prompts


def context_length(out_dir) -> int | None:
    """The language model's ``max_position_embeddings`` from the export's config.json (None: unknown)."""
    path = Path(out_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    value = (config.get("text_config") or {}).get("max_position_embeddings") or config.get("max_position_embeddings")
    return int(value) if value else None


# ---------------------------------------------------------------- FLOPs


class FlopCounter:
    """Attention FLOPs a prefill saves (dense minus BlindSight, docs/specification.md §2), with the categories
    and sink tokens of the compiled graph's own nodes. The model's mask (sliding windows, which
    an export may carry in the attention mask rather than a node attribute, and Gemma 3's image
    blocks) comes from the export's config.json through :func:`blindsight.flops.report.count_flops`;
    without a config.json, from the nodes' attributes alone."""

    def __init__(self, model_path, head_dim: int, out_dir=None):
        import onnx

        from blindsight.attention.schema import proto_configs

        graph = onnx.load(str(model_path), load_external_data=False).graph
        nodes = []  # (layer, categories, sink_tokens, window, image_blocks)
        for cfg in proto_configs(graph):
            window = cfg.local_window_size if cfg.local_window_size > 0 else None
            nodes.append((cfg.layer, cfg.categories, cfg.sink_tokens, window, bool(cfg.image_blocks)))
        nodes.sort(key=lambda n: n[0])
        self.heads = [n[1:] for n in nodes]
        self.head_dim = head_dim
        self.dims = None
        config = Path(out_dir) / "config.json" if out_dir is not None else None
        if config is not None and config.is_file() and nodes:
            from blindsight.flops.dims import dims_from_config

            try:
                dims = dims_from_config(json.loads(config.read_text()))
            except (BlindSightError, json.JSONDecodeError):
                dims = None
            if dims is not None and dims.num_layers == len(nodes) and all(len(n[1]) == dims.num_heads for n in nodes):
                self.dims = dims

    def saved(self, spans, seq_len: int) -> int:
        if not self.heads or len(spans) == 0:
            return 0
        if self.dims is not None:
            from blindsight.flops.report import count_flops

            rep = count_flops(self.dims, [list(h[0]) for h in self.heads], spans, seq_len, self.heads[0][1])
            return rep.attention_dense - rep.attention_sparse
        from blindsight.attention.pairs import attention_pairs

        cache: dict = {}

        def pairs(cat, sinks, window, blocks):
            key = (cat, sinks, window, blocks)
            if key not in cache:
                cache[key] = attention_pairs(cat, spans, seq_len, sinks, window, image_blocks=blocks)
            return cache[key]

        total = 0
        for cats, sinks, window, blocks in self.heads:
            dense = pairs("dense", sinks, window, blocks)
            total += sum(dense - pairs(c, sinks, window, blocks) for c in cats)
        return 4 * self.head_dim * total


# ---------------------------------------------------------------- jobs


@dataclasses.dataclass
class Job:
    conversation: Conversation
    max_tokens: int | None
    loop: asyncio.AbstractEventLoop
    accepted: float = dataclasses.field(default_factory=time.perf_counter)
    events: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)  # read by the worker thread
    gone: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # awaited while the job waits
    first_token_s: float | None = None

    def emit(self, kind: str, value=None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def cancel(self) -> None:
        """From the event loop: the client has gone (or the response is over)."""
        self.cancelled.set()
        self.gone.set()


class Engine:
    def __init__(self, pipeline, name: str, limits: ImageLimits | None = None, max_queue: int = 16,
                 concurrency: int = 1, max_context: int | None = None, default_max_tokens: int = DEFAULT_MAX_TOKENS):
        if concurrency < 1 or max_queue < 0:
            raise BlindSightError(f"--concurrency {concurrency} and --max-queue {max_queue}: give 1 or more and 0 or more")
        self.pipeline, self.name = pipeline, name
        self.limits = limits or ImageLimits()
        self.max_queue, self.concurrency = max_queue, concurrency
        self.max_context = max_context if max_context is not None else context_length(pipeline.out_dir)
        self.default_max_tokens = default_max_tokens
        self.flops = (FlopCounter(pipeline.model_path, int(pipeline.template["head_dim"]), pipeline.out_dir)
                      if pipeline.sparse else None)
        self.metrics = Metrics()
        self.pending = 0  # admitted and not finished: running + waiting
        self.running = 0
        self._sem: asyncio.Semaphore | None = None
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="bs-serve")
        self._tasks: set = set()

    @classmethod
    def from_directory(cls, out_dir, provider: str = "cpu", model="compiled", threads: int | None = None,
                       name: str | None = None, chunk_size: int | None = None, prepack: str = "auto",
                       **kwargs) -> "Engine":
        from blindsight.runtime.pipeline import Pipeline

        pipe = Pipeline(out_dir, provider=provider, compiled=model, threads=threads, chunk_size=chunk_size,
                        prepack=prepack)
        return cls(pipe, name or Path(out_dir).resolve().name, **kwargs)

    @property
    def capacity(self) -> int:
        return self.concurrency + self.max_queue

    @property
    def waiting(self) -> int:
        return self.pending - self.running

    def _gauges(self) -> None:
        self.metrics.queue_depth.set(self.waiting)
        self.metrics.running.set(self.running)

    def submit(self, conversation: Conversation, max_tokens: int | None) -> Job:
        """Admit a job (429 when the queue is full) and start it; its events arrive on ``job.events``."""
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.concurrency)
        if self.pending >= self.capacity:
            self.metrics.rejected.inc()
            raise ApiError(429, f"the server is busy: {self.running} running and {self.waiting} waiting "
                                f"(bs-serve --max-queue {self.max_queue}); retry later", code="queue_full")
        job = Job(conversation, max_tokens, asyncio.get_running_loop())
        self.pending += 1
        self._gauges()
        task = asyncio.create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def _run(self, job: Job) -> None:
        try:
            if not await self._acquire(job):  # the client left while it waited: its queue slot is free now
                self.metrics.cancelled.inc()
                job.emit("cancelled")
                return
            try:
                self.running += 1
                self._gauges()
                await job.loop.run_in_executor(self._executor, self._work, job)
            finally:
                self.running -= 1
                self._sem.release()
        finally:
            self.pending -= 1
            self._gauges()

    async def _acquire(self, job: Job) -> bool:
        """A worker slot for the job (True), or False if its client goes first."""
        acquire = asyncio.ensure_future(self._sem.acquire())
        gone = asyncio.ensure_future(job.gone.wait())
        await asyncio.wait({acquire, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not job.gone.is_set():
            return True
        acquire.cancel()
        try:
            await acquire
            self._sem.release()  # it had the slot before the cancel landed: give it back
        except asyncio.CancelledError:
            pass
        return False

    def _work(self, job: Job) -> None:
        """In a worker thread: images, prompt, context check, generation."""
        start = time.perf_counter()
        try:
            images = [decode_image(data, i) for i, data in enumerate(job.conversation.images)]
            prompt = self.pipeline.prompts.build_messages(images, job.conversation.messages)
            n = int(prompt.input_ids.size)
            max_tokens = self._max_tokens(n, job.max_tokens)
            job.emit("started", n)

            def on_token(token: int) -> None:
                if job.cancelled.is_set():
                    raise _Cancelled
                if job.first_token_s is None:
                    job.first_token_s = time.perf_counter() - job.accepted
                job.emit("token", token)

            result = self.pipeline.generate_from(prompt, max_tokens, start, on_token)
            saved = self.flops.saved(np.asarray(result.image_spans, dtype=np.int64).reshape(-1, 2), n) if self.flops else 0
            self.metrics.observe(job.first_token_s, result, saved)
            job.emit("done", (result, saved))
        except _Cancelled:
            self.metrics.cancelled.inc()
            job.emit("cancelled")
        except ApiError as exc:
            job.emit("error", exc)
        except BlindSightError as exc:
            job.emit("error", ApiError(400, str(exc)))
        except Exception as exc:  # the request fails; the server goes on
            log.exception("request failed")
            job.emit("error", ApiError(500, f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"))

    def _max_tokens(self, prompt_tokens: int, asked: int | None) -> int:
        ctx = self.max_context
        if ctx is None:
            return asked or self.default_max_tokens
        if prompt_tokens >= ctx:
            raise ApiError(400, f"the prompt is {prompt_tokens} tokens, over the model's context length of {ctx}; "
                                f"send fewer or smaller images or a shorter text", param="messages",
                           code="context_length_exceeded")
        if asked is not None and prompt_tokens + asked > ctx:
            raise ApiError(400, f"the prompt ({prompt_tokens} tokens) plus max_tokens ({asked}) is over the model's "
                                f"context length of {ctx}; ask for at most {ctx - prompt_tokens} tokens",
                           param="max_tokens", code="context_length_exceeded")
        return asked or min(self.default_max_tokens, ctx - prompt_tokens)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


class TextStream:
    """Token ids in, text deltas out: the concatenation of the deltas is the decoded text of all
    tokens (a delta is held back while the text so far ends in a partial character)."""

    def __init__(self, decode):
        self.decode, self.tokens, self.sent = decode, [], ""

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.decode(self.tokens)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def finish(self, final: str) -> str:
        """The rest of ``final`` (the answer's text); ``final`` starts with what was sent in all usual cases."""
        if final.startswith(self.sent):
            delta = final[len(self.sent):]
        else:  # a tokenizer whose cleanup changed earlier text: send what differs from here on
            delta = final[len(self.sent):] if len(final) > len(self.sent) else ""
        self.sent += delta
        return delta
