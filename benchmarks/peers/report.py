"""From runs to the record's summary: medians, the cross-engine checks, the printed table.

Every function here takes plain dicts (a run is what a worker wrote, plus
``variant`` and ``repeat``, or ``error`` when it failed), so the checks can be
tested on made-up runs without any engine installed.
"""

from __future__ import annotations

import statistics

#: the timed fields whose medians the summary reports
TIMED = ("ttft_s", "vision_s", "prefill_s", "decode_tokens_per_s", "peak_rss_mib")


def summarize(runs: list[dict]) -> dict:
    """Per variant: medians over its successful runs, its token counts and tokens, failures."""
    out: dict[str, dict] = {}
    for run in runs:
        entry = out.setdefault(run["variant"], {"runs": 0, "failed": [], "median": {}, "_values": {k: [] for k in TIMED},
                                                "_counts": set(), "_tokens": []})
        if "error" in run:
            entry["failed"].append(run["error"])
            continue
        entry["runs"] += 1
        for key in TIMED:
            if run.get(key) is not None:
                entry["_values"][key].append(run[key])
        entry["_counts"].add((run.get("prompt_tokens"), run.get("image_tokens")))
        entry["_tokens"].append(list(run.get("tokens") or []))
    for entry in out.values():
        values, counts, tokens = entry.pop("_values"), entry.pop("_counts"), entry.pop("_tokens")
        entry["median"] = {k: (statistics.median(v) if v else None) for k, v in values.items()}
        # counts and greedy tokens are deterministic: a variant that changes them between repeats is itself a finding
        entry["prompt_tokens"], entry["image_tokens"] = sorted(counts, key=str)[0] if counts else (None, None)
        entry["counts_stable"] = len(counts) <= 1
        entry["tokens"] = tokens[0] if tokens else None
        entry["tokens_stable"] = all(t == tokens[0] for t in tokens)
    return out


def check_counts(summary: dict) -> dict:
    """Whether every variant that ran saw the same prompt and image token counts."""
    seen = {name: (s["prompt_tokens"], s["image_tokens"]) for name, s in summary.items() if s["runs"]}
    distinct = set(seen.values())
    unstable = [name for name, s in summary.items() if s["runs"] and not s["counts_stable"]]
    agree = len(distinct) == 1 and None not in next(iter(distinct)) and not unstable if distinct else False
    if not seen:
        line = "token counts: no variant ran"
    elif agree:
        prompt, image = next(iter(distinct))
        line = f"token counts agree: every variant saw {prompt} prompt tokens, {image} of them image tokens"
    else:
        groups: dict = {}
        for name, pair in seen.items():
            groups.setdefault(pair, []).append(name)
        parts = [f"{'/'.join(names)}: {p} prompt, {i} image" for (p, i), names in groups.items()]
        line = "token counts DISAGREE: " + "; ".join(parts)
        if unstable:
            line += f"; changed between repeats: {', '.join(unstable)}"
    return {"agree": agree, "by_variant": {n: {"prompt_tokens": p, "image_tokens": i} for n, (p, i) in seen.items()},
            "line": line}


def common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def check_tokens(summary: dict, dense: list[str], first: int) -> dict:
    """Whether the dense variants (the same model computed exactly by each engine) pick
    the same first ``first`` greedy tokens; every variant is compared with the first
    dense one that ran (the reference)."""
    ran_dense = [n for n in dense if n in summary and summary[n]["runs"]]
    if not ran_dense:
        return {"reference": None, "agree": None, "matching_prefix": {}, "line": "greedy tokens: no dense variant ran"}
    ref = ran_dense[0]
    ref_tokens = summary[ref]["tokens"][:first]
    prefix = {n: common_prefix(ref_tokens, s["tokens"][:first]) for n, s in summary.items() if s["runs"]}
    # a shorter answer (an end-of-sequence token) agrees as far as it goes
    def same(name):
        theirs = summary[name]["tokens"][:first]
        return prefix[name] == min(len(ref_tokens), len(theirs))
    disagree = [n for n in ran_dense if not same(n)]
    unstable = [n for n, s in summary.items() if s["runs"] and not s["tokens_stable"]]
    agree = not disagree and not unstable
    if len(ran_dense) == 1:
        line = f"greedy tokens: only one dense variant ran ({ref}), nothing to compare them with"
    elif agree:
        line = f"greedy tokens: the dense variants ({', '.join(ran_dense)}) agree on the first {len(ref_tokens)} tokens"
    else:
        detail = [f"{n} matches {prefix[n]} of {len(ref_tokens)}" for n in disagree]
        if unstable:
            detail.append(f"changed between repeats: {', '.join(unstable)}")
        line = f"greedy tokens: the dense variants DISAGREE with {ref}: " + "; ".join(detail)
    return {"reference": ref, "agree": agree, "compared": ran_dense, "first": len(ref_tokens),
            "matching_prefix": prefix, "line": line}


def _num(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(summary: dict, variants: list, tokens_check: dict, first: int) -> str:
    """One row per variant: medians, counts, the first tokens and how many match the reference."""
    ref = tokens_check.get("reference")
    head = ["variant", "runs", "TTFT s", "vision s", "prefill s", "decode tok/s", "peak RSS MiB",
            "prompt tok", "image tok", f"first {first} tokens", f"= {ref}" if ref else "= ref"]
    rows = []
    for v in variants:
        s = summary.get(v.name)
        if s is None or not s["runs"]:
            error = (s or {}).get("failed", ["did not run"])[:1] or ["did not run"]
            rows.append([v.name, "0", "failed: " + error[0][:80]] + [""] * (len(head) - 3))
            continue
        m = s["median"]
        match = tokens_check["matching_prefix"].get(v.name)
        rows.append([v.name, str(s["runs"]), _num(m["ttft_s"], 3), _num(m["vision_s"], 3), _num(m["prefill_s"], 3),
                     _num(m["decode_tokens_per_s"], 1), _num(m["peak_rss_mib"], 0),
                     str(s["prompt_tokens"]), str(s["image_tokens"]),
                     " ".join(map(str, (s["tokens"] or [])[:first])),
                     "-" if match is None else f"{match}/{len((s['tokens'] or [])[:first])}"])
    widths = [max(len(r[i]) for r in [head] + rows if not (r[2].startswith("failed") and i == 2)) for i in range(len(head))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    for r in rows:
        if r[2].startswith("failed"):
            lines.append(f"{r[0].ljust(widths[0])}  {r[1].ljust(widths[1])}  {r[2]}")
        else:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    return "\n".join(lines)
