"""Calibration report: category heatmap, per-category counts, FLOPs saved for a
template, and the threshold-sweep table and plot. PNGs are written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from blindsight.flops import Template, count_flops, model_dims
from blindsight.profile import Profile
from blindsight.attention import DENSITY_ORDER

COLOURS = dict(zip(DENSITY_ORDER, ("#3b4cc0", "#8db0fe", "#f4987a", "#b40426")))  # dense blue .. sparsest red
SHORT = {"intra_sink": "isink"}  # narrow table headers


def _save_png(fig, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(profile: Profile, path, title: str) -> Path:
    """Layers x query heads, one colour per category."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    grid = np.array([[DENSITY_ORDER.index(c) for c in layer] for layer in profile.layers]).T
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * profile.num_layers + 2), max(2.0, 0.35 * profile.num_heads + 1.2)))
    ax.imshow(grid, cmap=ListedColormap([COLOURS[c] for c in DENSITY_ORDER]), vmin=-0.5, vmax=len(DENSITY_ORDER) - 0.5,
              aspect="auto")
    ax.set_xlabel("layer")
    ax.set_ylabel("query head")
    ax.set_xticks(range(profile.num_layers))
    ax.set_yticks(range(profile.num_heads))
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)
    counts = profile.counts()
    ax.legend(
        handles=[Patch(color=COLOURS[c], label=f"{c} ({counts[c]})") for c in DENSITY_ORDER],
        loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=len(DENSITY_ORDER), fontsize=8, frameon=False,
    )
    _save_png(fig, path)
    plt.close(fig)
    return Path(path)


def parse_template(text: str) -> Template:
    """``N:L`` (N images of L tokens, docs/specification.md §6 text around them)."""
    from blindsight.errors import BlindSightError

    try:
        n, length = (int(x) for x in str(text).split(":"))
        if n < 0 or length < 1:
            raise ValueError
    except ValueError:
        raise BlindSightError(f"template {text!r} must be IMAGES:TOKENS_PER_IMAGE, e.g. 8:256") from None
    return Template(num_images=n, image_len=length)


def template_flops(profile: Profile, dims_spec, template: Template) -> dict:
    r = count_flops(model_dims(dims_spec), profile, template.spans, template.seq_len, sink_tokens=profile.sink_tokens)
    return {
        "template": f"{template.num_images} images x {template.image_len} tokens ({template.seq_len} tokens)",
        "attention_flop_reduction": r.attention_reduction,
        "prefill_flop_reduction": r.prefill_reduction,
        "attention_bound": r.attention_bound,
    }


SWEEP_COLUMNS = [
    ("threshold", "threshold", "{}"),
    ("/".join(SHORT.get(c, c) for c in DENSITY_ORDER), None, "{}"),
    ("attn FLOPs saved", "attention_flop_reduction", "{:.1%}"),
    ("prefill saved", "prefill_flop_reduction", "{:.1%}"),
    ("mean KL", "mean_kl", "{:.4f}"),
    ("top-1 agree", "top1_agreement", "{:.1%}"),
    ("accuracy", "masked_accuracy", "{:.1%}"),
]


def sweep_table(rows: list[dict]) -> str:
    head = [c[0] for c in SWEEP_COLUMNS]
    body = []
    for r in rows:
        cells = []
        for _, key, fmt in SWEEP_COLUMNS:
            if key is None:
                h = r["heads"]
                cells.append("/".join(str(h[c]) for c in DENSITY_ORDER))
            else:
                cells.append(fmt.format(r[key]))
        body.append(cells)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in body]
    if rows:
        lines.append(f"\ndense accuracy on the same prompts: {rows[0]['dense_accuracy']:.1%}")
    return "\n".join(lines)


def sweep_plot(rows: list[dict], path, title: str) -> Path:
    """Attention FLOPs saved (x) vs mean KL and accuracy (y), one point per threshold."""
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    x = [100 * r["attention_flop_reduction"] for r in rows]
    a1.plot(x, [r["mean_kl"] for r in rows], "o-")
    a1.set_xlabel("attention FLOPs saved (%)")
    a1.set_ylabel("mean KL(dense || masked)")
    a2.plot(x, [100 * r["masked_accuracy"] for r in rows], "o-", label="BlindSight")
    a2.plot(x, [100 * r["top1_agreement"] for r in rows], "s--", label="top-1 agreement")
    if rows:
        a2.axhline(100 * rows[0]["dense_accuracy"], color="grey", ls=":", label="dense accuracy")
    a2.set_xlabel("attention FLOPs saved (%)")
    a2.set_ylabel("%")
    a2.legend(fontsize=8)
    for r, xi, yi in zip(rows, x, [r["mean_kl"] for r in rows]):
        a1.annotate(r["threshold"], (xi, yi), fontsize=7, textcoords="offset points", xytext=(3, 3))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return Path(path)
