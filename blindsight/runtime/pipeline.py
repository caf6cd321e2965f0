"""Images and a question in, an answer out: a bs-export directory run in ONNX Runtime.

``Pipeline(out_dir).generate(images, prompt)`` builds the prompt (tokenizer and
image processor of the export), runs the vision encoder, merges the image
features into the token embeddings, computes position ids (Qwen's 3-row
M-RoPE), finds the image spans from the token ids, runs the prefill (the
compiled model takes the spans as its ``image_spans`` input) and greedy
decoding with the KV cache. Decode steps keep feeding the prompt's spans: the
new tokens are text and attend densely (docs/specification.md §2).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from blindsight import families
from blindsight.errors import BlindSightError
from blindsight.attention.schema import SPANS_INPUT, TOKEN_TYPE_INPUT
from blindsight.attention.spans import chunk_bounds, token_type_ids
from blindsight.runtime.kv_cache import KVBuffers, cache_names, run_with_cache
from blindsight.runtime.positions import decode_position_ids, mrope_position_ids
from blindsight.runtime.prompt import Prompt, PromptBuilder
from blindsight.attention import Delimiters, find_spans
from blindsight.runtime.session import NO_PREPACK, make_session, prepack_weights, resolve_provider

TEMPLATE = "template.json"
COMPILED_NAME = "language_model.blindsight.onnx"


@dataclasses.dataclass
class Result:
    text: str
    token_ids: list[int]  # the generated tokens (an end-of-sequence token included)
    ttft_s: float  # from the call to the first token: prompt, vision, embedding, prefill
    prefill_s: float  # the language model's prefill alone
    tokens_per_s: float  # decode steps after the first token (0.0 when there were none)
    prefill_tokens: int
    prefill_chunks: int
    image_spans: list[tuple[int, int]]
    prompt_ids: list[int]
    model: str
    vision_runs_s: list[float] = dataclasses.field(default_factory=list)  # the vision tower's calls, one per image

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_template(out_dir) -> dict:
    path = Path(out_dir) / TEMPLATE
    if not path.is_file():
        raise BlindSightError(f"{path} not found: {out_dir} is not a bs-export directory; run bs-export MODEL_DIR -o {out_dir}")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BlindSightError(f"{path} is not valid JSON ({exc}); export again with bs-export") from None
    if doc.get("format") != "blindsight-export":
        raise BlindSightError(f"{path} is not a bs-export template (format {doc.get('format')!r}); export again with bs-export")
    return doc


def resolve_model(out_dir: Path, template: dict, model) -> Path:
    """``True``/"compiled": the compiled model; ``False``/"dense": the export; else a path."""
    if model is True or model == "compiled":
        path = out_dir / COMPILED_NAME
        if not path.is_file():
            raise BlindSightError(
                f"no compiled model at {path}; run bs-compile {out_dir / template['files']['language_model']} "
                f"--profile P.json -o {path}, or use the dense export (--model dense)")
        return path
    if model is False or model == "dense":
        return out_dir / template["files"]["language_model"]
    path = Path(model)
    if not path.is_file():
        raise BlindSightError(f"language model {path} does not exist; pass compiled, dense or an existing .onnx file")
    return path


def float_dtype(template: dict) -> np.dtype:
    """The numpy dtype of the export's float inputs (template.json ``dtype``; float32 before it existed)."""
    name = template.get("dtype", "float32")
    if name not in ("float32", "float16"):
        raise BlindSightError(
            f"this export is {name}; the numpy pipeline feeds float32 and float16 exports only "
            f"(numpy has no {name}): export again with bs-export --dtype fp32 or fp16")
    return np.dtype(name)


def per_image(prompt: Prompt):
    """(pixel_values, image_grid_thw) of each image of ``prompt`` in order: Qwen's
    patch rows cut by each image's t x h x w, or one row of a [N, 3, H, W] batch."""
    grid = prompt.image_grid_thw
    if grid is None:
        for i in range(len(prompt.pixel_values)):
            yield prompt.pixel_values[i:i + 1], None
        return
    ends = np.cumsum(np.prod(grid, axis=-1))
    for i, (start, end) in enumerate(zip(np.concatenate([[0], ends[:-1]]), ends)):
        yield prompt.pixel_values[start:end], grid[i:i + 1]


#: the last vision run of a prompt hands its arena's free memory back when it
#: returns, so the tower's buffers are not held while the language model
#: prefills; the runs before it keep them for the next image (the same peak,
#: without faulting about 0.8 GB in again per 896 px image)
SHRINK_ARENA = ort.RunOptions()
SHRINK_ARENA.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")


class Pipeline:
    def __init__(self, out_dir, provider: str = "cpu", compiled=True, threads: int | None = None,
                 native: bool | None = None, chunk_size: int | None = None, prepack: str = "auto",
                 keep_prefill_feeds: bool = False):
        """``prepack`` (auto, on, off): ONNX Runtime's MatMul weight pre-packing
        (:func:`~blindsight.runtime.session.prepack_weights`: auto turns it off
        where a packed copy of the weights would not fit). ``chunk_size``: prefill the prompt through the KV cache in chunks of this
        many tokens (None: in one call). Each chunk's activations and attention
        buffers are sized by the chunk, not the prompt; every chunk attends with
        the prompt's spans as one call would (docs/specification.md §2: queries
        at their absolute positions), and for Gemma 3 no chunk boundary falls
        inside an image block (it moves to the block's edge). ``keep_prefill_feeds``:
        keep the last prefill call's feeds as ``prefill_feeds`` (a node-placement
        report reruns them); off by default, since they hold a copy of the KV cache."""
        if chunk_size is not None and chunk_size < 1:
            raise BlindSightError(f"chunk size {chunk_size}: pass a positive number of tokens (or none for one call)")
        self.chunk_size = chunk_size
        self.keep_prefill_feeds = keep_prefill_feeds
        self.prefill_feeds = None
        self.out_dir = Path(out_dir)
        self.template = load_template(self.out_dir)
        self.family = self.template["family"]
        self.dtype = float_dtype(self.template)
        self.model_path = resolve_model(self.out_dir, self.template, compiled)
        resolve_provider(provider)  # a bad provider fails before anything loads
        self.provider, self.threads, self.native = provider, threads, native
        files = self.template["files"]
        graphs = [self.model_path, self.out_dir / files["embed"], self.out_dir / files["vision"]]
        #: whether the sessions pre-pack their MatMul weights (a private packed copy)
        self.prepack = prepack_weights([g for g in graphs if Path(g).is_file()], prepack)
        self.prompts = PromptBuilder(self.out_dir, self.template)
        self.lm = self._session(self.model_path)
        #: which path runs the language model's attention (native kernel or function bodies)
        self.attention = self.lm.blindsight_attention
        self.embed = self._session(self.out_dir / self.template["files"]["embed"])
        # loaded here, not on the first image, so time to first token counts no set-up
        self.vision = self._session(self.out_dir / self.template["files"]["vision"], arena=True)
        self.vision_inputs = [i.name for i in self.vision.get_inputs()]
        self._vision_feeds = None
        # per thread: a server runs several prompts on one pipeline at once
        self._timings = threading.local()
        if families.get(self.family).vision_tower == families.QWEN_VISION and not set(self.vision_inputs) <= {"pixel_values", "image_grid_thw"}:
            # the export takes the tower's index tensors, computed on the host (numpy, no torch)
            from blindsight.vision_inputs import qwen_vision_feeds

            self._vision_feeds = qwen_vision_feeds
        self.prompts.image_processor  # noqa: B018 (load it now)
        self.lm_inputs = {i.name for i in self.lm.get_inputs()}
        self.sparse = SPANS_INPUT in self.lm_inputs
        self.num_layers = int(self.template["num_layers"])
        self.eos = set(int(t) for t in self.template.get("eos_token_ids") or [])
        self.delimiters = Delimiters(int(self.template["image_start_id"]), int(self.template["image_end_id"]))

    @property
    def vision_runs_s(self) -> list[float]:
        """Seconds of each vision tower call of this thread's last prompt (one per image)."""
        if not hasattr(self._timings, "runs"):
            self._timings.runs = []
        return self._timings.runs

    def _session(self, path, arena: bool = False) -> ort.InferenceSession:
        """No CPU arena by default: each session's arena would keep its own peak and the
        process would hold the sum. The vision tower keeps one (``arena=True``): without
        it every query chunk's scores were fresh pages, 2.1x slower per image (measured,
        Qwen2-VL-2B, 896 px), and a prompt's last run shrinks it (:data:`SHRINK_ARENA`)."""
        if not Path(path).is_file():
            raise BlindSightError(f"{path} is missing from the export directory; run bs-export again")
        return make_session(path, provider=self.provider, threads=self.threads, native=self.native, arena=arena,
                            config=None if self.prepack else NO_PREPACK)

    # ------------------------------------------------------------- pieces

    def image_features(self, prompt: Prompt) -> np.ndarray:
        """[num_image_tokens, hidden] in prompt order, one vision call per image.

        The tower's attention stays within an image (a block-diagonal mask over
        all images of one call, or Qwen2.5-VL's windows inside each image), so
        per-image calls give the same features while the scores held at once are
        one image's, not every patch against every patch of the prompt (17 GB
        per layer for 4 images of 896 x 896 px at Qwen2-VL-2B's tower)."""
        self._timings.runs = []
        images = list(per_image(prompt))
        return np.concatenate([self._encode(pixels, grid, shrink=i == len(images) - 1)
                               for i, (pixels, grid) in enumerate(images)])

    def _encode(self, pixel_values, image_grid_thw, shrink: bool = True) -> np.ndarray:
        names = self.vision_inputs
        if self._vision_feeds is not None:
            feeds = self._vision_feeds(self.family, self.template["vision"], pixel_values, image_grid_thw)
        else:
            feeds = {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw}
        feeds = {k: v for k, v in feeds.items() if k in names}
        feeds["pixel_values"] = np.asarray(feeds["pixel_values"], dtype=self.dtype)
        t0 = time.perf_counter()
        out = self.vision.run(None, feeds, SHRINK_ARENA if shrink else None)[0]
        self.vision_runs_s.append(time.perf_counter() - t0)
        return out.reshape(-1, out.shape[-1])

    def embeddings(self, prompt: Prompt) -> np.ndarray:
        """[1, S, hidden]: token embeddings with the image features at the image-token positions."""
        embeds = self.embed.run(None, {"input_ids": prompt.input_ids[None]})[0]
        if prompt.num_images:
            where = np.flatnonzero(prompt.input_ids == int(self.template["image_token_id"]))
            feats = self.image_features(prompt)
            if len(feats) != len(where):
                raise BlindSightError(
                    f"the vision encoder gave {len(feats)} image tokens but the prompt holds {len(where)}; "
                    f"the export and its processor files disagree: export again")
            embeds = embeds.copy()
            embeds[0, where] = feats
        return embeds

    def position_ids(self, prompt: Prompt) -> tuple[np.ndarray, int]:
        """Prefill position ids ([3, 1, S] M-RoPE or [1, S]) and the offset of decode positions."""
        s = prompt.input_ids.size
        if self.template.get("position_ids") == "mrope3":
            grid = prompt.image_grid_thw if prompt.image_grid_thw is not None else np.zeros((0, 3), np.int64)
            pos, delta = mrope_position_ids(prompt.input_ids, int(self.template["image_token_id"]), grid,
                                            int(self.template["spatial_merge_size"]))
            return pos[:, None, :], delta
        return np.arange(s, dtype=np.int64)[None], 0

    def image_spans(self, input_ids) -> np.ndarray:
        return find_spans(input_ids, self.delimiters)

    def _empty_past(self) -> dict:
        kv, hd = int(self.template["num_kv_heads"]), int(self.template["head_dim"])
        empty = np.zeros((1, kv, 0, hd), dtype=self.dtype)
        return {f"past_key_values.{n}": empty for n in cache_names(self.num_layers)}

    def new_cache(self, capacity: int) -> KVBuffers:
        """An empty KV cache for an answer of ``capacity`` tokens (prompt and new tokens)."""
        return KVBuffers(cache_names(self.num_layers), int(self.template["num_kv_heads"]),
                         int(self.template["head_dim"]), capacity, self.dtype)

    def prefill(self, embeds, positions, spans, capacity: int | None = None) -> tuple[np.ndarray, KVBuffers, int]:
        """The last position's logits, the KV cache and the number of chunks of one
        prompt's prefill (in chunks of ``chunk_size`` tokens); ``capacity``: the tokens
        the cache is sized for (default: the prompt's)."""
        bounds = chunk_bounds(embeds.shape[1], self.chunk_size, spans, TOKEN_TYPE_INPUT in self.lm_inputs)
        cache = self.new_cache(capacity or embeds.shape[1])
        for i, (start, end) in enumerate(bounds):
            keep = self.keep_prefill_feeds and i == len(bounds) - 1
            logits = self._call(embeds[:, start:end], positions[..., start:end], cache, spans, keep)
        return logits, cache, len(bounds)

    def _call(self, embeds, positions, cache: KVBuffers, spans, keep: bool = False) -> np.ndarray:
        """One language-model call on top of ``cache`` (which then holds its tokens too);
        returns the last position's logits. ONNX Runtime writes the new cache
        straight into ``cache``'s buffers (:mod:`blindsight.runtime.kv_cache`)."""
        new = embeds.shape[1]
        total_len = cache.length + new
        feeds = {"inputs_embeds": embeds, "position_ids": positions,
                 "attention_mask": np.ones((1, total_len), dtype=np.int64)}
        if self.sparse:
            feeds[SPANS_INPUT] = spans
        if TOKEN_TYPE_INPUT in self.lm_inputs:  # Gemma 3: its image blocks, from the same spans
            feeds[TOKEN_TYPE_INPUT] = token_type_ids(spans, new, total_len - new, rows=1)
        feeds = {k: v for k, v in feeds.items() if k in self.lm_inputs}
        if keep:  # a copy: the buffers are overwritten as decoding goes on
            self.prefill_feeds = {**feeds, **{k: v.copy() for k, v in cache.past().items()}}
        logits = run_with_cache(self.lm, feeds, cache, new)["logits"]
        return logits[0, -1]

    def _run_lm(self, embeds, positions, past: dict, total_len: int, spans, keep: bool = False):
        """One call from a cache given as ``past_key_values.*`` arrays: (last logits,
        ``past_key_values.*`` of the new cache). ``total_len``: past and new tokens."""
        cache = self.new_cache(total_len)
        cache.load(past)
        if cache.length + embeds.shape[1] != total_len:
            raise BlindSightError(f"{cache.length} cached + {embeds.shape[1]} new tokens is not {total_len}")
        return self._call(embeds, positions, cache, spans, keep), cache.past()

    # ------------------------------------------------------------- generation

    def generate(self, images, prompt: str, max_new_tokens: int = 32, chat: bool = True, on_token=None) -> Result:
        """``on_token(token_id)``, when given, is called as each token is chosen (streaming);
        an exception it raises stops the generation and propagates."""
        if max_new_tokens < 1:
            raise BlindSightError(f"max_new_tokens is {max_new_tokens}; it must be at least 1")
        t0 = time.perf_counter()
        return self.generate_from(self.prompts.build(images, prompt, chat), max_new_tokens, t0, on_token)

    def generate_from(self, prompt: Prompt, max_new_tokens: int, t0: float | None = None, on_token=None) -> Result:
        t0 = time.perf_counter() if t0 is None else t0
        ids = prompt.input_ids
        spans = self.image_spans(ids)
        self._timings.runs = []
        embeds = self.embeddings(prompt)
        positions, delta = self.position_ids(prompt)
        # the pixels (0.3 GB for 16 images of 896 px) and the prompt's embeddings are not
        # needed past the prefill: drop them while the KV cache grows
        del prompt
        rows = positions.shape[0] if positions.ndim == 3 else 1
        tp = time.perf_counter()
        logits, cache, chunks = self.prefill(embeds, positions, spans, capacity=ids.size + max_new_tokens)
        del embeds, positions
        token = int(np.argmax(logits))
        t1 = time.perf_counter()
        tokens = [token]
        if on_token is not None:
            on_token(token)
        while len(tokens) < max_new_tokens and token not in self.eos:
            step = ids.size + len(tokens) - 1
            emb = self.embed.run(None, {"input_ids": np.array([[token]], dtype=np.int64)})[0]
            logits = self._call(emb, decode_position_ids(step + delta, rows), cache, spans)
            token = int(np.argmax(logits))
            tokens.append(token)
            if on_token is not None:
                on_token(token)
        t2 = time.perf_counter()
        decode_steps = len(tokens) - 1
        return Result(
            text=self.prompts.decode(tokens),
            token_ids=tokens,
            ttft_s=t1 - t0,
            prefill_s=t1 - tp,
            tokens_per_s=decode_steps / (t2 - t1) if decode_steps else 0.0,
            prefill_tokens=int(ids.size),
            prefill_chunks=chunks,
            image_spans=[tuple(map(int, s)) for s in spans.tolist()],
            prompt_ids=ids.tolist(),
            model=str(self.model_path),
            vision_runs_s=list(self.vision_runs_s),
        )
