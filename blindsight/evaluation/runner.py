"""bs-eval as a function: the dense export and the compiled model (fast lowering)
in ONNX Runtime on the task's prompts; accuracy, agreement, KL, FLOPs saved."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from tqdm.auto import tqdm

from blindsight.errors import BlindSightError
from blindsight import families
from blindsight.families import FAMILIES
from blindsight.evaluation.onnx_models import WEIGHTS, compile_with, export_dense, quantized
from blindsight.flops import count_flops
from blindsight.models import pretrained
from blindsight.profile import Profile
from blindsight.records import cache_root, record_path, scrub
from blindsight.prompts import TASK_SEED, candidate_token_ids, encode, task_prompts
from blindsight.attention.schema import SPANS_INPUT, TOKEN_TYPE_INPUT
from blindsight.attention.spans import token_type_ids
from blindsight.runtime.placement import node_placement
from blindsight.runtime.session import CompiledSession, make_session

DEFAULT_PROMPTS = 200


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(p || q) of two next-token distributions given as logits."""
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float(np.sum(np.exp(lp) * (lp - lq)))


def onnx_feeds(loaded: pretrained.LoadedModel, ids: np.ndarray, spans=()) -> dict[str, np.ndarray]:
    """Inputs of the exported prefill: embeddings from the model's own embedding
    module (Gemma scales them there), positions 0..S-1, no padding, and for
    Gemma 3 the ``token_type_ids`` of the (surrogate) images' soft tokens."""
    with torch.no_grad():
        embeds = loaded.model.get_input_embeddings()(torch.from_numpy(ids)[None]).float().numpy()
    s = ids.shape[0]
    feeds = {
        "inputs_embeds": embeds,
        "position_ids": np.arange(s, dtype=np.int64)[None],
        "attention_mask": np.ones((1, s), dtype=np.int64),
    }
    if families.image_blocks(loaded.family):
        feeds[TOKEN_TYPE_INPUT] = token_type_ids(spans if loaded.image_blocks else (), s, rows=1)
    return feeds


def wilson(successes: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion: honest at small n and near 0 or 1."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [float(centre - half), float(centre + half)]


def work_dir_for(name: str, work_dir: Path | None) -> Path:
    return Path(work_dir) if work_dir is not None else cache_root() / "onnx" / name


def evaluate(
    profile: Profile,
    model: str | pretrained.LoadedModel = pretrained.DEFAULT_MODEL,
    *,
    num_prompts: int = DEFAULT_PROMPTS,
    seed: int = TASK_SEED,
    work_dir: Path | None = None,
    threads: int | None = None,
    provider: str = "cpu",
    progress: bool = True,
    native: bool | None = None,
    mask: str = "image",
    weights: str = "fp32",
) -> dict:
    """Dense vs compiled accuracy on ``num_prompts`` task prompts (a record for ``--json``);
    ``mask`` as :func:`pretrained.load` (a loaded model keeps its own); ``weights``
    "int8": the compiled model's MatMuls get bs-quantize's int8 weights (the dense stays fp32);
    "int8-lm-head": its LM head too (bs-quantize --lm-head int8)."""
    if weights not in WEIGHTS:
        raise BlindSightError(f"unknown weights {weights!r}; choose one of {', '.join(WEIGHTS)}")
    loaded = model if isinstance(model, pretrained.LoadedModel) else pretrained.load(model, mask=mask)
    if not loaded.surrogate or loaded.family not in FAMILIES:
        # the task's segments are text: it needs text-only weights with an ONNX export
        raise BlindSightError(f"bs-eval runs the built-in Gemma 3 weights (gemma3-270m); {loaded.name} is {loaded.family}")
    folder = work_dir_for(loaded.name, work_dir)
    dense_path = export_dense(loaded.family, loaded.directory, folder)
    # the compiled nodes carry Gemma 3's image blocks themselves: off under the causal mask
    compiled_path = compile_with(dense_path, profile, "fast", image_blocks=loaded.image_blocks)
    if weights != "fp32":
        compiled_path = quantized(compiled_path, lm_head=weights == "int8-lm-head")
    dense = make_session(dense_path, provider=provider, threads=threads)
    compiled = CompiledSession(compiled_path, provider=provider, threads=threads, native=native)
    placement = None
    dims = loaded.flop_dims()

    prompts = task_prompts(num_prompts, seed)
    rows = []
    for tp in tqdm(prompts, desc="evaluating", unit="prompt", disable=not progress):
        ids, spans = encode(tp.pieces, loaded.tokenizer, loaded.delimiters)
        feeds = onnx_feeds(loaded, ids, spans)
        d = dense.run(None, feeds)[0][0, -1]
        c = compiled.run(feeds, spans, len(ids))[0][0, -1]
        if provider != "cpu" and placement is None:
            # a GPU provider that hands nodes back to the CPU costs the speed: say which
            placement = node_placement(compiled_path, {**feeds, SPANS_INPUT: spans}, provider, threads)
            print(placement.summary(), file=sys.stderr)
        cand = candidate_token_ids(loaded.tokenizer, tp.candidates)
        flops = count_flops(dims, profile, spans, len(ids), sink_tokens=profile.sink_tokens)
        rows.append(
            dict(
                dense_correct=int(np.argmax(d[cand])) == tp.answer,
                compiled_correct=int(np.argmax(c[cand])) == tp.answer,
                agree=int(np.argmax(d)) == int(np.argmax(c)),
                kl=kl(d, c),
                attention_reduction=flops.attention_reduction,
                prefill_reduction=flops.prefill_reduction,
                tokens=len(ids),
                segments=tp.num_segments,
            )
        )
    mean = lambda k: float(np.mean([r[k] for r in rows]))  # noqa: E731
    n = len(rows)
    return {
        "model": scrub(loaded.describe()),
        "surrogate_images": loaded.surrogate,
        "mask": loaded.mask_description,
        "task": "colour of the object one segment shows; multiple choice over the prompt's segment colours",
        "num_prompts": len(rows),
        "seed": seed,
        "segments_per_prompt": [min(r["segments"] for r in rows), max(r["segments"] for r in rows)],
        "mean_tokens": mean("tokens"),
        "chance_accuracy": float(np.mean([1.0 / r["segments"] for r in rows])),
        "dense_accuracy": mean("dense_correct"),
        "compiled_accuracy": mean("compiled_correct"),
        "dense_accuracy_ci95": wilson(sum(r["dense_correct"] for r in rows), n),
        "compiled_accuracy_ci95": wilson(sum(r["compiled_correct"] for r in rows), n),
        "accuracy_delta_points": 100.0 * (mean("compiled_correct") - mean("dense_correct")),
        "top1_agreement": mean("agree"),
        "mean_kl": mean("kl"),
        "max_kl": float(max(r["kl"] for r in rows)),
        "attention_flop_reduction": mean("attention_reduction"),
        "prefill_flop_reduction": mean("prefill_reduction"),
        "profile_counts": profile.counts(),
        "lowering": "fast",
        "weights": weights,
        "attention": compiled.attention,
        "runtime": f"onnxruntime {ort.__version__} {provider.upper()}",
        "placement": placement.to_dict() if placement is not None else None,
        "compiled_model": record_path(compiled_path),
    }
