"""bs-bench's reports of a record: the tables (:func:`render`), the Markdown
report (:func:`markdown`, BENCHMARKS.md) and the plot of speed-up against FLOP
bound (:func:`plot`)."""

from __future__ import annotations

import os
from pathlib import Path

from blindsight.attention import DENSITY_ORDER
from blindsight.profile import MIXED
from blindsight.tables import fmt_table


def render(record: dict) -> str:
    """The tables of a bs-bench record (also used for BENCHMARKS.md)."""
    parts = []
    m = record["machine"]
    parts.append(f"machine: {m['cpu']}, {m['cores']} cores, onnxruntime {m['onnxruntime']}; {record['threads']} threads, "
                 f"medians of {record['repeats']} interleaved runs")
    for blocks in (False, True):
        op = [r for r in record.get("op") or () if bool(r.get("image_blocks")) == blocks]
        if not op:
            continue
        rows = []
        for r in op:
            mem = "" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f} / {r['baseline_peak_rss_mb']:.0f}"
            row = [r["category"], f"{r['N']}x{r['L']}", r["seq_len"], f"{r['baseline_s']:.3f}", f"{r['time_s']:.3f}",
                   f"{r['speedup']:.2f}x", f"{r['flop_bound']:.2f}x", f"{r['efficiency']:.2f}", mem]
            rows.append(row + [f"{r['causal_gqa_s']:.3f}"] if blocks else row)
        kinds = "; ".join(f"{d}, {p} provider" for d, p in sorted({(r.get("dtype", "float32"), r.get("provider", "cpu")) for r in op}))
        if blocks:
            parts.append("\nop level, Gemma 3 image blocks: BlindSightAttention (fast) vs the all-dense node with the blocks "
                         f"(exact dense; causal GroupQueryAttention, not exact here, timed beside), 28 q / 4 kv heads, head_dim 128, {kinds}; "
                         "FLOP bounds count the block pairs")
            head = ["category", "N x L", "S", "dense s", "ours s", "speed-up", "FLOP bound", "efficiency", "peak MB ours / dense",
                    "causal GQA s"]
        else:
            parts.append(f"\nop level: BlindSightAttention (fast) vs GroupQueryAttention, 28 q / 4 kv heads, head_dim 128, {kinds}")
            head = ["category", "N x L", "S", "GQA s", "ours s", "speed-up", "FLOP bound", "efficiency", "peak MB ours / GQA"]
        parts.append(fmt_table(head, rows))
        nat = [r for r in op if r.get("native_speedup") is not None]
        if nat:
            rows = [[r["category"], f"{r['N']}x{r['L']}", r["seq_len"], f"{r['baseline_s']:.3f}", f"{r['time_s']:.3f}",
                     f"{r['native_s']:.3f}", f"{r['native_speedup']:.2f}x", f"{r['flop_bound']:.2f}x",
                     f"{r['native_efficiency']:.2f}", f"{r['native_vs_function_body']:.2f}x",
                     "" if r.get("native_peak_rss_mb") is None else f"{r['native_peak_rss_mb']:.0f}"] for r in nat]
            parts.append(f"\nnative kernel on the same node ({record.get('native') or 'blindsight.native'}), "
                         f"timed in the same loop as the {'dense node' if blocks else 'GroupQueryAttention'} and the function body")
            parts.append(fmt_table(["category", "N x L", "S", "dense s" if blocks else "GQA s", "body s", "native s",
                                    "speed-up", "FLOP bound", "efficiency", "vs body", "peak MB"], rows))
    if record.get("op"):
        explained = [r for r in record["op"] if r.get("breakdown_ms")]
        if explained:
            classes = sorted({k for r in explained for k in r["breakdown_ms"]})
            rows = [[r["category"], f"{r['N']}x{r['L']}"] + [f"{r['breakdown_ms'].get(k, 0):.0f}" for k in classes] for r in explained]
            parts.append("\nwhere the time goes (ms per run, ORT profiler, one profiled session per case)")
            parts.append(fmt_table(["category", "N x L"] + classes, rows))
    pf = record.get("prefill")
    if pf:
        t = pf["time_s"]
        mem = pf.get("peak_rss_mb") or {}
        rows = [["raw export", f"{t['raw']:.2f}", "", "", "", f"{mem.get('raw', 0):.0f}" if mem else ""],
                ["compiled all-dense", f"{t['dense']:.2f}", f"{pf['dense_vs_raw_export']:.2f}x vs raw", "", "", f"{mem.get('dense', 0):.0f}" if mem else ""],
                ["compiled profile mix", f"{t['mix']:.2f}", f"{pf['speedup']:.2f}x vs dense", f"{pf['flop_bound']:.2f}x", f"{pf['efficiency']:.2f}",
                 f"{mem.get('mix', 0):.0f}" if mem else ""]]
        parts.append(f"\nprefill level: {pf['model']}, export form {pf['form']}, {pf['N']} images x {pf['L']} tokens = {pf['seq_len']} tokens "
                     f"(mix vs raw export: {pf['vs_raw_export']:.2f}x; attention FLOP bound {pf['attention_flop_bound']:.2f}x)")
        if "native_mix" in t:
            rows += [["compiled all-dense, native", f"{t['native_dense']:.2f}", f"{pf['native_dense_vs_dense']:.2f}x vs dense", "", "", ""],
                     ["compiled profile mix, native", f"{t['native_mix']:.2f}", f"{pf['native_speedup']:.2f}x vs dense",
                      f"{pf['flop_bound']:.2f}x", f"{pf['native_efficiency']:.2f}", ""]]
        parts.append(fmt_table(["graph", "seconds", "speed-up", "Amdahl bound", "efficiency", "peak MB"], rows))
    dec = record.get("decode")
    if dec:
        parts.append(f"\ndecode level: {dec[0]['model']}, one token after {dec[0]['images']} images (KV-cache export, eager form), "
                     "compiled with the profile mix vs the raw export; decode steps are text queries, dense for every category")
        rows = [[r["context"], f"{1000 * r['raw_s']:.1f}", f"{1000 * r['compiled_s']:.1f}", f"{r['raw_tokens_per_s']:.1f}",
                 f"{r['compiled_tokens_per_s']:.1f}", f"{r['ratio']:.2f}x"] for r in dec]
        parts.append(fmt_table(["context", "raw ms", "compiled ms", "raw tok/s", "compiled tok/s", "compiled vs raw"], rows))
    if record.get("model"):
        parts.append(render_model(record["model"]))
    if record.get("genai"):
        parts.append(render_genai(record["genai"]))
    return "\n".join(parts)


def _chunked(rec: dict) -> str:
    return f" (prefill in chunks of {rec['chunk']} tokens)" if rec.get("chunk") else ""


def render_model(rec: dict) -> str:
    """The model level's tables (bs-bench --level model): the graphs the run timed."""
    mem = rec.get("peak_rss_mb") or {}
    t = rec["ttft_s"]

    def mb(k):
        return f"{mem[k]:.0f}" if k in mem else ""

    rows = []
    if "raw" in t:
        rows.append(["raw export", f"{t['raw']:.2f}", "", "", "", mb("raw")])
    if "dense" in t:
        rows.append(["compiled all-dense", f"{t['dense']:.2f}", f"{rec['dense_vs_raw_export']:.2f}x vs raw" if "raw" in t else "",
                     "", "", mb("dense")])
        rows.append(["compiled profile mix", f"{t['mix']:.2f}", f"{rec['speedup']:.2f}x vs dense", f"{rec['flop_bound']:.2f}x",
                     f"{rec['efficiency']:.2f}", mb("mix")])
    else:
        rows.append(["compiled profile mix", f"{t['mix']:.2f}", f"{rec['vs_raw_export']:.2f}x vs raw", f"{rec['flop_bound']:.2f}x", "", mb("mix")])
    d = rec["decode_s"]
    notes = []
    if "vs_raw_export" in rec:
        notes.append(f"mix vs raw export: {rec['vs_raw_export']:.2f}x")
    notes.append(f"attention FLOP bound {rec['attention_flop_bound']:.2f}x")
    if rec.get("dense_vs_raw_max_abs_logit_diff") is not None:
        notes.append(f"all-dense vs raw logits max |diff| {rec['dense_vs_raw_max_abs_logit_diff']:.1e}")
    head = (f"\nmodel level: {rec['model']} ({rec['num_layers']} layers, vocab {rec['vocab_size']}, {rec['dtype']}, "
            f"{rec['weights_bytes'] / 2**30:.1f} GiB of weights), {rec['N']} images x {rec['L']} tokens = {rec['seq_len']} tokens{_chunked(rec)}; "
            f"attention on {rec['attention']}; time to first token ({'; '.join(notes)})")
    label = {"raw": "raw export", "dense": "compiled all-dense"}
    base = rec.get("decode_baseline", "raw")
    dec_rows = []
    if base:
        dec_rows.append([label[base], f"{1000 * d[base]:.1f}", f"{1 / d[base]:.2f}", ""])
    dec_rows.append(["compiled profile mix", f"{1000 * d['mix']:.1f}", f"{rec['compiled_tokens_per_s']:.2f}",
                     f"{rec['decode_ratio']:.2f}x" if base else ""])
    if "mix-plain" in d:
        dec_rows.append(["compiled profile mix, plain session.run", f"{1000 * d['mix-plain']:.1f}", f"{1 / d['mix-plain']:.2f}",
                         f"{d[base] / d['mix-plain']:.2f}x" if base else ""])
    dec = fmt_table(["graph", "ms per token", "tokens/s", f"vs {base}" if base else ""], dec_rows)
    if mem and rec.get("kv_cache_bytes"):
        budget = (rec["weights_bytes"] + rec["kv_cache_bytes"]) / 2**20 + 1536
        head += (f"\npeak MB: a fresh process per graph, its session and prefill; goal: weights "
                 f"{rec['weights_bytes'] / 2**20:.0f} + KV cache {rec['kv_cache_bytes'] / 2**20:.0f} + 1536 = {budget:.0f} MB")
    return "\n".join([head, fmt_table(["graph", "TTFT s", "speed-up", "Amdahl bound", "efficiency", "peak MB"], rows),
                      f"\ndecode: one token after the {rec['seq_len']}-token prompt (medians of {rec['decode_repeats']}"
                      + (f"; the cache in buffers ONNX Runtime writes into, as the pipeline runs it: "
                         f"{rec['bound_vs_plain_decode']:.2f}x as fast as a plain session.run" if "bound_vs_plain_decode" in rec else "")
                      + ")", dec])


def render_genai(rec: dict) -> str:
    """The genai level's table (bs-bench --level genai)."""
    v = rec["versions"]
    head = (f"\ngenai level: onnxruntime-genai {v['onnxruntime-genai']} (onnxruntime {v['onnxruntime']}) running {rec['model']}'s "
            f"decoder as its builder writes it ({rec['num_layers']} layers, vocab {rec['vocab_size']}, last-position logits) vs "
            f"the same decoder compiled; {rec['N']} images x {rec['L']} tokens = {rec['seq_len']} tokens; attention on "
            f"{rec['attention']}; FLOP bound of the mix {rec['flop_bound']:.2f}x (attention {rec['attention_flop_bound']:.2f}x); "
            f"decode: median of {rec['decode_steps']} steps")
    rows = []
    names = {"genai": "builder's decoder", "dense": "compiled all-dense", "mix": "compiled profile mix"}
    for precision, r in rec["precisions"].items():
        s, tps = r["seconds"], r["decode_tokens_per_s"]
        for k, label in names.items():
            speed = {"genai": "", "dense": f"{r['dense_vs_genai']:.2f}x vs builder",
                     "mix": f"{r['speedup_mix_vs_dense']:.2f}x vs dense, {r['speedup_mix_vs_genai']:.2f}x vs builder"}[k]
            eff = f"{r['efficiency']:.2f}" if k == "mix" else ""
            rows.append([precision, label, f"{s[k]['ttft']:.2f}", speed, f"{rec['flop_bound']:.2f}x" if k == "mix" else "", eff,
                         f"{1000 * s[k]['decode']:.0f}", f"{tps[k]:.2f}"])
    same = ", ".join(f"{p}: {'yes' if r['dense_tokens_equal_genai'] else 'NO'}" for p, r in rec["precisions"].items())
    return "\n".join([head, fmt_table(["precision", "graph", "TTFT s", "speed-up", "bound", "efficiency", "ms/token", "tokens/s"], rows),
                      f"all-dense greedy tokens equal the builder's: {same}"])


def markdown(record: dict, plot: str | None = None) -> str:
    """BENCHMARKS.md: the machine, the tables, the plot and how to reproduce them."""
    m = record["machine"]
    lines = [
        "# Benchmarks",
        "",
        f"Measured on {m['cpu']}, {m['cores']} cores, onnxruntime {m['onnxruntime']}, Python {m['python']}; "
        f"{record['threads']} intra-op threads, fp32, medians of {record['repeats']} interleaved runs after a warm-up "
        "(docs/specification.md §6). The machine is shared, so absolute seconds drift between runs; the ratios come from variants "
        "timed in the same loop.",
        "",
        "Reproduce (about 25 minutes on 2 cores; the prefill level needs the `export` extra):",
        "",
        "```bash",
        "bs-bench --level op --output op.json && bs-bench --level prefill --output prefill.json",
        "bs-bench --merge op.json prefill.json --markdown BENCHMARKS.md --plot docs/bench/speedup.png",
        "```",
        "",
        "```",
        render(record),
        "```",
        "",
    ]
    if plot:
        lines += [f"![measured speed-up against FLOP bound]({plot})", ""]
    return "\n".join(lines)


def plot(record: dict, path: Path) -> None:
    """A PNG of the op level's speed-ups against their FLOP bounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.0))
    # sparsest first, then the mixed layer, then dense
    markers = {c: m for c, m in zip((*reversed(DENSITY_ORDER[1:]), MIXED, DENSITY_ORDER[0]), "os^Dv")}
    top = 1.0
    for r in record["op"]:
        top = max(top, r["flop_bound"], r["speedup"])
        ax.scatter(r["flop_bound"], r["speedup"], marker=markers.get(r["category"], "o"), s=50,
                   label=r["category"], color=f"C{list(markers).index(r['category'])}")
        ax.annotate(f"{r['N']}x{r['L']}", (r["flop_bound"], r["speedup"]), fontsize=7, xytext=(4, -3), textcoords="offset points")
    xs = [1, top * 1.05]
    ax.plot(xs, xs, "k-", lw=0.8, label="FLOP bound")
    ax.plot(xs, [0.8 * x for x in xs], "k--", lw=0.8, label="0.8 x bound (target)")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")  # bounds span 1x to ~50x
    ax.set_xlabel("FLOP bound (dense / allowed attention pairs)")
    ax.set_ylabel("measured speed-up vs GroupQueryAttention")
    ax.set_title(f"BlindSightAttention (fast lowering), {record['threads']} threads, fp32")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
