"""Threshold sweep: attention FLOPs saved vs output drift, one profile per threshold.

Each threshold re-categorises the calibration recalls (no new calibration
run); the masked model is transformers with each head's category mask applied
inside its eager attention (:func:`hooks.category_masker`, masks from
``semantics``). Drift is measured at the answer position of bs-eval-style task
prompts drawn from their own seed (not bs-eval's default), against the
unmasked model: KL(dense || masked), top-1 agreement over the whole
vocabulary, and the task's multiple-choice accuracy.
"""

from __future__ import annotations


import numpy as np
from tqdm.auto import tqdm

from blindsight.calibration.categorize import ThresholdSchedule, categorize
from blindsight.calibration.hooks import category_masker, hooked
from blindsight.calibration.runner import forward
from blindsight.flops import count_flops
from blindsight.prompts import Encoded, candidate_token_ids, encode, task_prompts
from blindsight.attention import DENSITY_ORDER

DEFAULT_SWEEP = "0.5,0.6,0.7,0.8,0.85,0.9,0.95,0.98"
SWEEP_SEED = 77  # task prompts for the sweep; bs-eval defaults to another seed


def parse_thresholds(text: str) -> list[ThresholdSchedule]:
    return [ThresholdSchedule.parse(t.strip()) for t in str(text).split(",") if t.strip()]


def _kl(p, q) -> float:
    lp = p.double().log_softmax(-1)
    lq = q.double().log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum())


def sweep(loaded, recalls: np.ndarray, schedules, min_fraction: float, num_prompts: int = 32,
          seed: int = SWEEP_SEED, sink_tokens: int = 1, progress: bool = True) -> list[dict]:
    """One row per threshold schedule (plus an all-dense baseline row first)."""
    tasks = task_prompts(num_prompts, seed)
    encoded = [Encoded(*encode(t.pieces, loaded.tokenizer, loaded.delimiters)) for t in tasks]
    cands = [candidate_token_ids(loaded.tokenizer, t.candidates) for t in tasks]
    dims = loaded.flop_dims()
    bar = tqdm(total=num_prompts * (1 + len(schedules)), desc="threshold sweep", unit="run", disable=not progress)
    dense = []
    for p in encoded:
        dense.append(forward(loaded, p))
        bar.update()
    dense_acc = float(np.mean([int(d[c].argmax()) == t.answer for d, c, t in zip(dense, cands, tasks)]))
    rows = []
    for schedule in schedules:
        layers = categorize(recalls, schedule, min_fraction).layers
        kls, agree, correct, attn, prefill = [], [], [], [], []
        for p, d, c, t in zip(encoded, dense, cands, tasks):
            with hooked(loaded.model, mask=category_masker(layers, p.spans, p.seq_len, sink_tokens)):
                m = forward(loaded, p)
            kls.append(_kl(d, m))
            agree.append(int(d.argmax()) == int(m.argmax()))
            correct.append(int(m[c].argmax()) == t.answer)
            f = count_flops(dims, layers, p.spans, p.seq_len, sink_tokens=sink_tokens)
            attn.append(f.attention_reduction)
            prefill.append(f.prefill_reduction)
            bar.update()
        counts = {k: sum(row.count(k) for row in layers) for k in DENSITY_ORDER}
        rows.append(
            dict(
                threshold=str(schedule),
                min_fraction=min_fraction,
                heads=counts,
                attention_flop_reduction=float(np.mean(attn)),
                prefill_flop_reduction=float(np.mean(prefill)),
                mean_kl=float(np.mean(kls)),
                top1_agreement=float(np.mean(agree)),
                dense_accuracy=dense_acc,
                masked_accuracy=float(np.mean(correct)),
            )
        )
    bar.close()
    return rows
