"""One measurement of llama.cpp: GGUF files from convert_hf_to_gguf.py through llama-cpp-python's mtmd handler.

Run as ``VENV/bin/python worker_llamacpp.py SPEC.json`` in the llama.cpp venv.
Spec keys: model (the language model's GGUF), mmproj (the vision projector's GGUF),
chat_template (the checkpoint's, as text), kv_type (f32 or f16: the KV cache's type),
flash_attn, images, question, threads,
chunk_size (n_batch and n_ubatch: the prompt goes through the model this many tokens
at a time), min_tokens / max_tokens (the image processor's bounds in image tokens),
max_new_tokens, warmup, out.

The chat handler (``Qwen25VLChatHandler``) runs the prompt as users run it, except
that the prompt text comes from the checkpoint's chat template (as in the other
engines) instead of the handler's own, which adds a system message: mtmd
tokenizes text and images (resizing each image), then each image chunk is encoded by
the vision tower and decoded by the language model, text chunks are decoded, and the
completion samples. llama.cpp reports no split of that, so the worker times it from
the outside: the Python wrapper of ``mtmd_tokenize`` gets a clock, and the encoder's
time comes from mtmd's own log line (the helper that evaluates an image chunk calls
the encoder inside the C library, where no Python wrapper sees it).
"""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from worker_common import run  # noqa: E402

#: mtmd-helper's log line per encoded image (milliseconds, an integer)
ENCODED = re.compile(r"image slice encoded in (\d+) ms")
#: ... and per language-model batch of an image's embeddings
DECODED = re.compile(r"image decoded \(batch \d+/\d+\) in (\d+) ms")
KV_TYPES = {"f32": 0, "f16": 1}  # ggml_type values of GGML_TYPE_F32 and GGML_TYPE_F16


def context_length(image_sizes, patch: int, merge: int, max_tokens: int, question: str, new_tokens: int) -> int:
    """An upper bound of the prompt plus the answer, so the KV cache is sized by this
    prompt rather than by the model's training context (which would inflate peak RSS)."""
    side = patch * merge
    image_tokens = sum(min(max_tokens, math.ceil(w / side) * math.ceil(h / side)) for w, h in image_sizes)
    # template, delimiters and question: generously above any tokenizer's count of them
    text = 64 + 8 * len(image_sizes) + len(question.encode()) + new_tokens
    return int(math.ceil((image_tokens + text) / 256) * 256)


def parse_log(text: str) -> dict:
    """mtmd's timings in a captured stderr: seconds encoding images and decoding their embeddings."""
    encoded = [int(m) for m in ENCODED.findall(text)]
    decoded = [int(m) for m in DECODED.findall(text)]
    return {"encode_s": sum(encoded) / 1e3, "encoded_images": len(encoded), "image_decode_s": sum(decoded) / 1e3}


class CapturedStderr:
    """Redirects file descriptor 2 (where llama.cpp's C code logs) to a temporary file
    for the block and echoes it back afterwards, so the run's log still has it."""

    def __enter__(self):
        sys.stderr.flush()
        self.file = tempfile.TemporaryFile(mode="w+b")
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        self.text = ""
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.seek(0)
        self.text = self.file.read().decode(errors="replace")
        self.file.close()
        sys.stderr.write(self.text)
        sys.stderr.flush()
        return False


class Clocks:
    """Wraps the handler's ``mtmd_tokenize`` with a wall clock (seconds summed in ``tokenize_s``)
    and counts the prompt's tokens from the chunks it made."""

    def __init__(self, mtmd):
        self.mtmd = mtmd
        self.tokenize_s = 0.0
        self.prompt_tokens = self.image_tokens = None
        original = mtmd.mtmd_tokenize

        def tokenize(ctx, chunks, *args):
            t0 = time.perf_counter()
            result = original(ctx, chunks, *args)
            self.tokenize_s += time.perf_counter() - t0
            if result == 0:
                self.count(chunks)
            return result

        mtmd.mtmd_tokenize = tokenize

    def count(self, chunks):
        m = self.mtmd
        prompt = image = 0
        for i in range(m.mtmd_input_chunks_size(chunks)):
            chunk = m.mtmd_input_chunks_get(chunks, i)
            n = int(m.mtmd_input_chunk_get_n_tokens(chunk))
            prompt += n
            if m.mtmd_input_chunk_get_type(chunk) == m.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                image += n
        self.prompt_tokens, self.image_tokens = prompt, image


class TokenRecorder:
    """The ids ``Llama.generate`` samples and when (the stream carries text only, and
    holds text back while it could still be the start of a stop string)."""

    def __init__(self, llm):
        self.ids: list[int] = []
        self.times: list[float] = []
        original = llm.sample

        def sample(*args, **kwargs):
            token = original(*args, **kwargs)
            self.times.append(time.perf_counter())
            self.ids.append(int(token))
            return token

        llm.sample = sample


def bounded_params(mtmd, min_tokens: int, max_tokens: int):
    """mtmd's default context parameters with the image processor's bounds in tokens
    (the handler passes none: llama.cpp's own for Qwen2-VL are 8 to 4,096 tokens)."""
    original = mtmd.mtmd_context_params_default

    def params():
        p = original()
        p.image_min_tokens = int(min_tokens)
        p.image_max_tokens = int(max_tokens)
        return p

    mtmd.mtmd_context_params_default = params


IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"


def prompt_format(chat_template: str, urls: list[str], question: str) -> str:
    """The handler's CHAT_FORMAT for this one prompt: the checkpoint's template rendered as
    transformers renders it, each image's block replaced by the image's URL (the handler
    turns URLs into mtmd's media marker, and mtmd writes the block around the image's
    tokens), kept literal so the handler's own rendering leaves it as it is."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    content = [{"type": "image"} for _ in urls] + [{"type": "text", "text": question}]
    text = env.from_string(chat_template).render(messages=[{"role": "user", "content": content}],
                                                 add_generation_prompt=True)
    if text.count(IMAGE_BLOCK) != len(urls):
        raise SystemExit(f"the chat template wrote {text.count(IMAGE_BLOCK)} image blocks for {len(urls)} images")
    for url in urls:
        text = text.replace(IMAGE_BLOCK, url, 1)
    return "{% raw %}" + text + "{% endraw %}"


def image_urls(spec: dict) -> list[str]:
    return [Path(p).resolve().as_uri() for p in spec["images"]]


def answer(llm, spec: dict, max_tokens: int) -> str:
    """One greedy chat completion, streamed as a chat client streams it; returns its text."""
    content = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls(spec)]
    content.append({"type": "text", "text": spec["question"]})
    pieces = []
    for piece in llm.create_chat_completion(messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
                                            temperature=0.0, top_k=1, repeat_penalty=1.0, stream=True):
        pieces.append(piece["choices"][0].get("delta", {}).get("content") or "")
    return "".join(pieces)


def measure(spec: dict) -> dict:
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Qwen25VLChatHandler
    from PIL import Image

    bounded_params(mtmd, spec["min_tokens"], spec["max_tokens"])
    sizes = [Image.open(p).size for p in spec["images"]]
    n_ctx = context_length(sizes, spec["patch_size"], spec["merge_size"], spec["max_tokens"], spec["question"],
                           int(spec["max_new_tokens"]) + 8)

    class CheckpointTemplate(Qwen25VLChatHandler):
        DEFAULT_SYSTEM_MESSAGE = None
        CHAT_FORMAT = prompt_format(spec["chat_template"], image_urls(spec), spec["question"])

    handler = CheckpointTemplate(clip_model_path=spec["mmproj"], verbose=True)
    kv = KV_TYPES[spec["kv_type"]]
    llm = Llama(model_path=spec["model"], chat_handler=handler, n_ctx=n_ctx, n_threads=int(spec["threads"]),
                n_threads_batch=int(spec["threads"]), n_batch=int(spec["chunk_size"]), n_ubatch=int(spec["chunk_size"]),
                flash_attn=bool(spec["flash_attn"]), type_k=kv, type_v=kv, verbose=True)
    if spec["warmup"]:
        answer(llm, spec, 1)
    clocks = Clocks(mtmd)
    tokens = TokenRecorder(llm)
    with CapturedStderr() as captured:
        t0 = time.perf_counter()
        text = answer(llm, spec, int(spec["max_new_tokens"]))
        generate_s = time.perf_counter() - t0
    if not tokens.ids:
        raise SystemExit("llama.cpp sampled no token")
    # from the call to the first sampled token: the streamed text can lag it by tokens
    ttft = tokens.times[0] - t0
    logged = parse_log(captured.text)
    if logged["encoded_images"] != len(spec["images"]):
        raise SystemExit(f"mtmd logged {logged['encoded_images']} encoded images for {len(spec['images'])} images: "
                         "cannot split the time to first token")
    # before the language model: mtmd's tokenization (image loading, resizing, patches) and the vision tower
    vision = clocks.tokenize_s + logged["encode_s"]
    ids = tokens.ids
    generated = len(ids)
    return {
        "ttft_s": ttft,
        "vision_s": vision,
        "prefill_s": ttft - vision,
        "decode_tokens_per_s": (generated - 1) / (tokens.times[-1] - tokens.times[0]) if generated > 1 else None,
        "prompt_tokens": clocks.prompt_tokens,
        "image_tokens": clocks.image_tokens,
        "token_counts_from": "the chunks mtmd_tokenize made (text and image tokens)",
        "tokens": ids,
        "text": text,
        "generate_s": generate_s,
        "details": {"n_ctx": n_ctx, "n_batch": int(spec["chunk_size"]), "kv_type": spec["kv_type"],
                    "flash_attn": bool(spec["flash_attn"]), "tokenize_s": clocks.tokenize_s, **logged,
                    "llama_cpp_python": getattr(llama_cpp, "__version__", None)},
    }


if __name__ == "__main__":
    sys.exit(run(measure))
