"""Calibration: recall against a brute-force sum, planted head patterns, the categorisation rule,
the attention hook against transformers' own attention weights."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _util import templates
from blindsight.calibration.categorize import ThresholdSchedule, categorize, choose_per_prompt
from blindsight.calibration.recall import RECALL_CATEGORIES, head_recalls
from blindsight.errors import BlindSightError
from blindsight.attention import CATEGORIES


def image_of(spans, t):
    for i, (s, e) in enumerate(spans):
        if s <= t < e:
            return i
    return None


def literal_keep(category, spans, q, k):
    """docs/specification.md §2 for one (q, k) pair with sink_tokens = 1, written out independently."""
    if k > q:
        return False
    qi, ki = image_of(spans, q), image_of(spans, k)
    if qi is None or category == "dense" or ki is None:
        return True
    own = ki == qi
    sink = k == spans[ki][0]
    return {"sink": sink, "intra": own, "intra_sink": own or sink}[category]


def brute_force_recall(probs, spans, seq):
    rows = [q for q in range(seq) if image_of(spans, q) is not None]
    out = np.zeros((probs.shape[0], len(RECALL_CATEGORIES)))
    for h in range(probs.shape[0]):
        for j, c in enumerate(RECALL_CATEGORIES):
            total = 0.0
            for q in rows:
                total += sum(probs[h, q, k] for k in range(seq) if literal_keep(c, spans, q, k))
            out[h, j] = total / len(rows)
    return out


def random_causal_probs(rng, heads, seq):
    logits = rng.standard_normal((heads, seq, seq))
    logits = np.where(np.tril(np.ones((seq, seq), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


SPANS = [(2, 7), (9, 14), (15, 21), (23, 27)]
SEQ = 30


def planted(kind, seq=SEQ, spans=SPANS, leak=0.02):
    """Attention of one head whose image rows follow ``kind``: 'sink' (text + every image's
    first token), 'intra' (text + own image), 'intra_sink' (own image + other images' sinks),
    'dense' (mostly other images' non-sink tokens). ``leak`` of each row goes anywhere causal."""
    p = np.zeros((seq, seq))
    for q in range(seq):
        qi = image_of(spans, q)
        keys = np.arange(q + 1)
        if qi is None:
            pick = keys
        elif kind == "sink":
            pick = [k for k in keys if image_of(spans, k) is None or k == spans[image_of(spans, k)][0]]
        elif kind == "intra":
            pick = [k for k in keys if image_of(spans, k) in (None, qi)]
        elif kind == "intra_sink":
            own = [k for k in keys if image_of(spans, k) == qi]
            sinks = [s for s, _ in spans if s < spans[qi][0]]
            pick = own + sinks
            # weight other images' sinks heavily so intra alone loses them
            w = np.array([1.0] * len(own) + [6.0] * len(sinks))
            p[q, pick] = (1 - leak) * w / w.sum()
            p[q, keys] += leak / len(keys)
            continue
        else:  # dense: look at earlier images' non-sink tokens
            pick = [k for k in keys if image_of(spans, k) not in (None, qi) and k != spans[image_of(spans, k)][0]]
            pick = pick or list(keys)
        p[q, pick] = (1 - leak) / len(pick)
        p[q, keys] += leak / len(keys)
    return p


def test_recall_equals_brute_force_on_planted_heads():
    kinds = ["sink", "intra", "intra_sink", "dense"]
    probs = np.stack([planted(k) for k in kinds])
    got = head_recalls(probs, SPANS, SEQ)
    np.testing.assert_allclose(got, brute_force_recall(probs, SPANS, SEQ), rtol=0, atol=1e-12)
    import torch

    np.testing.assert_allclose(head_recalls(torch.from_numpy(probs).float(), SPANS, SEQ), got, atol=1e-6)


def test_planted_heads_are_categorised_as_built():
    kinds = ["sink", "intra", "intra_sink", "dense"]
    probs = np.stack([planted(k) for k in kinds])
    recalls = head_recalls(probs, SPANS, SEQ)[None, None]  # one prompt, one layer
    assert categorize(recalls, "0.9", 1.0).layers == [kinds]


@settings(max_examples=25, deadline=None)
@given(templates(max_images=4, max_len=6), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_recall_equals_brute_force_on_random_maps(template, heads, seed):
    spans, seq = template
    spans = [tuple(s) for s in spans.tolist()]
    probs = random_causal_probs(np.random.default_rng(seed), heads, seq)
    got = head_recalls(probs, spans, seq)
    if not any(image_of(spans, q) is not None for q in range(seq)):
        np.testing.assert_array_equal(got, np.ones((heads, len(RECALL_CATEGORIES))))
    else:
        np.testing.assert_allclose(got, brute_force_recall(probs, spans, seq), atol=1e-12)


def recall_table(rows):
    """Hand-made [P, L=1, H, C] table from per-prompt lists of {category: recall} per head."""
    return np.array([[[[head[c] for c in RECALL_CATEGORIES] for head in prompt]] for prompt in rows])


def r(sink, intra, intra_sink):
    return {"dense": 1.0, "sink": sink, "intra": intra, "intra_sink": intra_sink}


def test_per_prompt_choice_is_the_sparsest_above_threshold():
    table = recall_table([[r(0.95, 0.97, 0.99), r(0.5, 0.92, 0.93), r(0.5, 0.6, 0.91), r(0.5, 0.6, 0.7)]])
    choice = choose_per_prompt(table, ThresholdSchedule.parse("0.9"))
    from blindsight.attention import DENSITY_ORDER

    assert [DENSITY_ORDER[i] for i in choice[0, 0]] == ["sink", "intra", "intra_sink", "dense"]


def test_min_fraction_falls_back_to_the_next_denser_category():
    # head 0: sink in 2 of 4 prompts, intra in the others -> "intra or sparser" in 4/4
    # head 1: intra in 1 of 4, intra_sink in 2 of 4, dense in 1 -> intra_sink or sparser in 3/4
    # head 2: sink in 1 of 4, dense in 3 -> nothing reaches 3/4
    prompts = [
        [r(0.95, 0.99, 0.99), r(0.1, 0.95, 0.96), r(0.95, 0.2, 0.3)],
        [r(0.95, 0.99, 0.99), r(0.1, 0.5, 0.95), r(0.1, 0.2, 0.3)],
        [r(0.50, 0.95, 0.96), r(0.1, 0.5, 0.95), r(0.1, 0.2, 0.3)],
        [r(0.50, 0.95, 0.96), r(0.1, 0.5, 0.6), r(0.1, 0.2, 0.3)],
    ]
    table = recall_table(prompts)
    result = categorize(table, "0.9", 0.75)
    assert result.layers == [["intra", "intra_sink", "dense"]]
    np.testing.assert_allclose(result.support[0], [1.0, 0.75, 1.0])
    assert categorize(table, "0.9", 0.5).layers == [["sink", "intra_sink", "dense"]]
    assert categorize(table, "0.9", 0.25).layers == [["sink", "intra", "sink"]]


def test_linear_schedule_raises_the_bar_with_depth():
    schedule = ThresholdSchedule.parse("0.8:0.96")
    np.testing.assert_allclose(schedule.for_layers(5), [0.8, 0.84, 0.88, 0.92, 0.96])
    # the same head in 5 layers: intra recall 0.9 passes 0.8..0.88 only
    table = np.array([[[[1.0, 0.1, 0.9, 0.9]] for _ in range(5)]])  # columns RECALL_CATEGORIES
    assert RECALL_CATEGORIES == CATEGORIES
    assert [layer[0] for layer in categorize(table, schedule, 1.0).layers] == ["intra"] * 3 + ["dense"] * 2
    assert str(schedule) == "0.8:0.96" and str(ThresholdSchedule.parse(0.9)) == "0.9"


@pytest.mark.parametrize("bad", ["1.5", "a", "0.8:0.9:1", "-0.1", ""])
def test_bad_thresholds_are_rejected(bad):
    with pytest.raises(BlindSightError, match="threshold"):
        ThresholdSchedule.parse(bad)


def test_hook_recalls_equal_transformers_attention_weights():
    """Recalls taken inside the hooked forward equal those of transformers' own eager
    attention weights (output_attentions) on a tiny Gemma 3 with a sliding window."""
    import torch
    from transformers import Gemma3ForCausalLM

    from blindsight.calibration.hooks import hooked
    from blindsight.models.configs import tiny_config

    torch.manual_seed(0)
    model = Gemma3ForCausalLM._from_config(tiny_config("gemma3"), attn_implementation="eager").eval()
    ids = torch.randint(5, 100, (1, 24))
    spans = [(3, 9), (11, 17), (18, 22)]
    seen = {}
    with torch.no_grad():
        with hooked(model, observe=lambda layer, p: seen.__setitem__(layer, head_recalls(p, spans, 24))):
            hooked_logits = model(input_ids=ids).logits
        ref = model(input_ids=ids, output_attentions=True)
    assert sorted(seen) == list(range(len(ref.attentions)))
    torch.testing.assert_close(hooked_logits, ref.logits)
    for layer, attn in enumerate(ref.attentions):
        np.testing.assert_allclose(seen[layer], brute_force_recall(attn[0].double().numpy(), spans, 24), atol=1e-5)
    assert model.config._attn_implementation == "eager"  # restored
