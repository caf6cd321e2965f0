"""The driver: prepare the checkpoint, convert it per engine, run the variants interleaved, report."""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.peers import checkpoint, convert, envs, report, variants
from benchmarks.peers.errors import PeersError

HERE = Path(__file__).resolve().parent
WORKERS = {"project": HERE / "worker_project.py", "genai": HERE / "worker_genai.py",
           "openvino": HERE / "worker_openvino.py", "llamacpp": HERE / "worker_llamacpp.py"}
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "blindsight-peers"
#: convert_hf_to_gguf.py fails on a shallower Qwen2-VL vision tower
#: ("Can not map tensor 'visual.merger.mlp.2.bias'" with 1 block)
LLAMACPP_MIN_DEPTH = 3
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
SPARSE_KEYS = ("num_last_dense_tokens_in_prefill", "num_retained_start_tokens_in_cache",
               "num_retained_recent_tokens_in_cache", "xattention_threshold", "xattention_block_size",
               "xattention_stride")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.peers",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time to first token of the project beside other engines on one checkpoint, the same "
                    "images, question and threads. Each engine converts the checkpoint with its own tool "
                    "(cached) and runs in its own process (onnxruntime-genai, OpenVINO and llama.cpp in venvs made on first "
                    "use); repeats "
                    "are interleaved across variants and the table shows medians.",
        epilog="variants (or the groups all, project, onnxruntime-genai, openvino, llamacpp):\n" + variants.describe() + "\n\n"
               "example: bs-checkpoint tiny-qwen2-vl -o tiny && python -m benchmarks.peers tiny "
               "--image a.png --image b.png --question 'What differs?' --variants all")
    p.add_argument("checkpoint", type=Path, help="a Qwen2-VL / Qwen2.5-VL checkpoint directory (e.g. written by bs-checkpoint)")
    p.add_argument("--image", action="append", type=Path, default=[], required=True, help="an image (repeat for several)")
    p.add_argument("--question", required=True, help="the question asked about the images (through each engine's chat template)")
    p.add_argument("--variants", default="all", help="comma-separated variants or groups (default: all)")
    p.add_argument("--threads", type=int, default=2, help="threads of every engine (default 2)")
    p.add_argument("--repeats", type=int, default=1, help="runs per variant, interleaved across variants (default 1)")
    p.add_argument("--chunk-size", type=int, default=2048,
                   help="prefill chunk in tokens: the project's --chunk-size and OpenVINO's max_num_batched_tokens "
                        "of the paged and sparse variants (default 2048; OpenVINO's SDPA variant prefills in one call)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="greedy tokens per answer (default 8)")
    p.add_argument("--first-tokens", type=int, default=8, help="how many first tokens the agreement check compares (default 8)")
    p.add_argument("--min-pixels", type=int, help="image processor's lower pixel bound, written for every engine "
                                                   "(default: the checkpoint's)")
    p.add_argument("--max-pixels", type=int, help="image processor's upper pixel bound, written for every engine "
                                                   "(default: the checkpoint's; 1003520 gives 896 x 896 px 1,024 tokens)")
    p.add_argument("--profile", type=Path, help="the project's head profile for the mix variant (default: a hand-made mix)")
    p.add_argument("--kernel", choices=("native", "bodies"), default="native",
                   help="where the project's compiled variants run attention: the native kernel (default) or the function bodies")
    p.add_argument("--prepack", choices=("auto", "on", "off"), default="auto",
                   help="ONNX Runtime's MatMul weight pre-packing in the project's variants, as bs-run's --prepack "
                        "(default auto: off where one copy of the weights would not fit in 60%% of the free memory)")
    p.add_argument("--sparse", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a field of OpenVINO's SparseAttentionConfig ({', '.join(SPARSE_KEYS)})")
    p.add_argument("--warmup", action="store_true", help="one untimed one-token answer in each run's process first")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one run may take (default 3600)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE / "conversions",
                   help=f"conversions and run logs (default {DEFAULT_CACHE / 'conversions'})")
    p.add_argument("--venvs", type=Path, default=DEFAULT_CACHE / "venvs", help=f"peer venvs (default {DEFAULT_CACHE / 'venvs'})")
    p.add_argument("--genai-python", type=Path, metavar="PYTHON",
                   help="an interpreter with onnxruntime-genai 0.18.0 and its model builder's requirements (torch, "
                        "transformers, onnx-ir) to run the genai variants with, instead of the venv made for them "
                        "(e.g. the project's own after pip install -e '.[genai,export]')")
    p.add_argument("-o", "--output", type=Path, default=Path("peers.json"), help="the JSON record (default peers.json)")
    p.add_argument("--quiet", action="store_true", help="print only the table and the checks")
    return p


def check_args(args) -> list[variants.Variant]:
    chosen = variants.select(args.variants)
    config = checkpoint.check_checkpoint(args.checkpoint)
    for image in args.image:
        if not image.is_file():
            raise PeersError(f"image {image} does not exist")
        try:
            from PIL import Image

            with Image.open(image) as im:
                im.verify()
        except Exception as exc:  # Pillow raises several types for a file that is not an image
            raise PeersError(f"{image} is not an image Pillow can read ({type(exc).__name__})") from None
    for name, value, low in (("--threads", args.threads, 1), ("--repeats", args.repeats, 1),
                             ("--chunk-size", args.chunk_size, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--first-tokens", args.first_tokens, 1)):
        if value < low:
            raise PeersError(f"{name} is {value}; it must be at least {low}")
    if args.profile is not None and not args.profile.is_file():
        raise PeersError(f"profile {args.profile} does not exist")
    if args.genai_python is not None and not args.genai_python.is_file():
        raise PeersError(f"--genai-python {args.genai_python} does not exist; name a Python interpreter")
    args.sparse_config = {}
    for item in args.sparse:
        key, sep, value = item.partition("=")
        if not sep or key not in SPARSE_KEYS:
            raise PeersError(f"--sparse {item!r}: expected KEY=VALUE with KEY one of {', '.join(SPARSE_KEYS)}")
        try:
            args.sparse_config[key] = float(value) if key == "xattention_threshold" else int(value)
        except ValueError:
            raise PeersError(f"--sparse {item!r}: {value!r} is not a number") from None
    depth = (config.get("vision_config") or {}).get("depth")
    llama = [v.name for v in chosen if v.engine == "llamacpp"]
    if llama and depth is not None and depth < LLAMACPP_MIN_DEPTH:
        why = (f"{args.checkpoint}'s vision tower has {depth} block(s); llama.cpp's converter maps one of at least "
               f"{LLAMACPP_MIN_DEPTH} (bs-checkpoint's tiny checkpoints have 1)")
        named = {item.strip() for item in args.variants.split(",")}
        if named & set(llama):
            raise PeersError(f"{why}: leave out the llamacpp variants or use a deeper checkpoint")
        # picked by a group: run the rest and say so
        chosen = [v for v in chosen if v.engine != "llamacpp"]
        if not chosen:
            raise PeersError(f"{why}, and no other variant is selected")
        print(f"peers: leaving out {', '.join(llama)}: {why}", file=sys.stderr)
    return chosen


def machine() -> dict:
    info = {"platform": platform.platform(), "cores": os.cpu_count(), "python": platform.python_version()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), None)
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
        info["isa"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
        mem = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        info["memory_gib"] = round(int(mem.split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return info


def spec_for(v: variants.Variant, conversion: dict, args) -> dict:
    shared = {"images": [str(p.resolve()) for p in args.image], "question": args.question, "threads": args.threads,
              "chunk_size": args.chunk_size, "max_new_tokens": args.max_new_tokens, "warmup": args.warmup}
    if v.engine == "project":
        export = Path(conversion["dir"]) / "export"
        model = v.settings["model"]
        shared["prepack"] = args.prepack
        if model == "raw":
            # no BlindSightAttention node: the kernel choice does not apply
            return dict(shared, export_dir=str(export), model="dense", native=None)
        return dict(shared, export_dir=str(export), model=str(export / convert.PROJECT_MODELS[model]),
                    native=args.kernel == "native")
    if v.engine == "genai":
        return dict(shared, model_dir=str(Path(conversion["dir"]) / v.settings["folder"]),
                    prompt=args.genai_prompt)
    if v.engine == "llamacpp":
        folder, outtype = Path(conversion["dir"]), v.settings["outtype"]
        files = {part: str(folder / name.format(outtype=outtype)) for part, name in convert.LLAMACPP_FILES.items()}
        return dict(shared, **files, kv_type=v.settings["kv_type"], flash_attn=v.settings["flash_attn"],
                    chat_template=checkpoint.chat_template(args.prepared), **checkpoint.token_bounds(args.processor))
    return dict(shared, model_dir=str(Path(conversion["dir"]) / "model"), sparse=args.sparse_config, **v.settings)


def genai_prompt(conversions: dict, args) -> str:
    """The question through the checkpoint's chat template, one image placeholder per image:
    the text genai's processor takes (it expands each placeholder to the image's tokens)."""
    from blindsight.runtime.prompt import PromptBuilder

    export = Path(conversions["project"]["dir"]) / "export"
    template = json.loads((export / "template.json").read_text())
    return PromptBuilder(export, template).render(args.question, len(args.image))


def openvino_memory_warning(patches: list[int], memory_gib: float | None) -> str | None:
    """A line when OpenVINO's vision merger mask alone would take over half of this machine's memory."""
    mask = checkpoint.openvino_merger_mask_bytes(patches)
    if not memory_gib or mask <= 0.5 * memory_gib * 2**30:
        return None
    return (f"OpenVINO GenAI's vision merger takes an f32 mask over all {sum(patches):,} patches of the "
            f"{len(patches)} images at once: {mask / 1e9:.1f} GB beside the weights on this {memory_gib} GiB "
            f"machine; its runs may be killed for memory")


def exit_reason(rc: int) -> str:
    """A worker's exit status in words; a kill by signal is named, SIGKILL with its usual cause."""
    if rc >= 0:
        return f"exit {rc}"
    try:
        name = signal.Signals(-rc).name
    except ValueError:
        name = f"signal {-rc}"
    if -rc == signal.SIGKILL:
        # a worker is never killed by the harness: a SIGKILL comes from outside, most often the kernel
        return f"exit {rc}, killed by {name} (the kernel's out-of-memory killer sends it; see dmesg)"
    return f"exit {rc}, killed by {name}"


def run_one(v: variants.Variant, spec: dict, python: Path, logs: Path, repeat: int, timeout: float) -> dict:
    """One worker process; its output goes to a log, a failure becomes the run's ``error``."""
    log = logs / f"{v.name}-r{repeat}.log"
    out = logs / f"{v.name}-r{repeat}.json"
    spec = dict(spec, out=str(out))
    spec_path = logs / f"{v.name}-r{repeat}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=1) + "\n")
    env = dict(os.environ, **{var: str(spec["threads"]) for var in THREAD_VARIABLES})
    t0 = time.perf_counter()
    try:
        with open(log, "w") as sink:
            rc = subprocess.run([str(python), str(WORKERS[v.engine]), str(spec_path)], stdout=sink,
                                stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return {"variant": v.name, "repeat": repeat, "error": f"timed out after {timeout:.0f} s (log: {log})"}
    wall = time.perf_counter() - t0
    if rc != 0 or not out.is_file():
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        last = f": {lines[-1][:300]}" if lines else ""
        return {"variant": v.name, "repeat": repeat, "error": f"{exit_reason(rc)}{last} (log: {log})"}
    return dict(json.loads(out.read_text()), variant=v.name, repeat=repeat, process_wall_s=round(wall, 2))


def set_up_engines(chosen, prepared: Path, args, say):
    """Per engine: its interpreter (venv made on first use), versions and cached conversion."""
    pythons, versions, conversions, setup = {}, {}, {}, {}
    engines = list(dict.fromkeys(v.engine for v in chosen))
    if "genai" in engines:
        # genai's folders hold the project's export (its vision tower, embedding and compiles)
        engines = ["project"] + [e for e in engines if e != "project"]
    for engine in engines:
        pythons[engine], venv_seconds = envs.python_of(engine, args.venvs, say,
                                                       args.genai_python if engine == "genai" else None)
        setup[engine] = {"interpreter": str(pythons[engine]), "venv_made_seconds": venv_seconds}
        versions[engine] = envs.versions(engine, pythons[engine])
        say(f"{engine}: " + ", ".join(f"{k} {v}" for k, v in versions[engine].items() if v))
        if engine == "project":
            extra = convert.project_code_digest() + (args.profile.read_text() if args.profile else "")
            make = lambda tmp: convert.project(prepared, tmp, args.profile)  # noqa: E731
        elif engine == "genai":
            folders = tuple(sorted({v.settings["folder"] for v in chosen if v.engine == engine}))
            export = Path(conversions["project"]["dir"]) / "export"
            native = args.kernel == "native"
            # a new project conversion, another kernel, other folders or builder options make new genai folders
            # (the genai folder writer's code too: the project's key leaves it out)
            extra = (f"{Path(conversions['project']['dir']).name} {' '.join(folders)} native={native} "
                     f"{json.dumps(convert.GENAI_BUILDS, sort_keys=True)} {convert.genai_code_digest()}")
            make = lambda tmp, e=engine, f=folders, x=export, n=native: convert.genai(  # noqa: E731
                prepared, tmp, pythons[e], x, f, n)
        elif engine == "llamacpp":
            # the GGUF types the chosen variants run; a changed launcher makes new files
            outtypes = tuple(sorted({v.settings["outtype"] for v in chosen if v.engine == engine}))
            extra = convert.LLAMACPP_CONVERT + " ".join(outtypes)
            make = lambda tmp, e=engine, o=outtypes: convert.llamacpp(prepared, tmp, pythons[e], o)  # noqa: E731
        else:
            extra = ""
            make = lambda tmp, e=engine: convert.openvino(prepared, tmp, pythons[e])  # noqa: E731
        say(f"{engine}: converting (cached after the first time)")
        c = conversions[engine] = convert.cached(args.cache, engine, prepared, versions[engine], make, extra)
        say(f"{engine}: conversion {c['dir']} ({'cached' if c['cached'] else 'made'}; {c['seconds']} s to make)")
    for weights, key in variants.INT8_CONVERSIONS.items():
        if not any(variants.conversion_of(v) == key for v in chosen):
            continue
        # bs-quantize on the project's export, then the same two compiles; keyed by that export
        source = Path(conversions["project"]["dir"])
        say(f"{key}: quantizing the project's export (cached after the first time)")
        c = conversions[key] = convert.cached(
            args.cache, key, prepared, versions["project"],
            lambda tmp, h=weights == "int8-lm-head": convert.project_int8(source / "export", tmp, lm_head=h), source.name)
        say(f"{key}: conversion {c['dir']} ({'cached' if c['cached'] else 'made'}; {c['seconds']} s to make)")
    return pythons, versions, conversions, setup


def run_interleaved(chosen, conversions, pythons, logs: Path, args, say) -> list[dict]:
    runs = []
    for repeat in range(args.repeats):
        # each repeat starts one variant further along, so no variant always runs first
        order = chosen[repeat % len(chosen):] + chosen[:repeat % len(chosen)]
        for v in order:
            run = run_one(v, spec_for(v, conversions[variants.conversion_of(v)], args), pythons[v.engine], logs, repeat,
                          args.timeout)
            say(f"repeat {repeat + 1}/{args.repeats} {v.name}: " +
                (run["error"] if "error" in run else f"TTFT {run['ttft_s']:.3f} s"))
            runs.append(run)
    return runs


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    chosen = check_args(args)
    # conversions and workers inherit it: torch, OpenMP and BLAS pools stay within --threads
    for var in THREAD_VARIABLES:
        os.environ[var] = str(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    prepared, processor = checkpoint.prepare(args.checkpoint, args.cache, args.min_pixels, args.max_pixels)
    args.processor, args.prepared = processor, prepared
    say(f"checkpoint {args.checkpoint} -> {prepared} (pixels {processor['min_pixels']}..{processor['max_pixels']})")

    patches = checkpoint.vision_patches(args.image, processor)
    host = machine()
    warning = openvino_memory_warning(patches, host.get("memory_gib"))
    if warning and any(v.engine == "openvino" for v in chosen):
        # not refused: a machine with swap or a later OpenVINO may still run it
        print(f"peers: {warning}", file=sys.stderr)
    pythons, versions, conversions, setup = set_up_engines(chosen, prepared, args, say)
    args.genai_prompt = genai_prompt(conversions, args) if any(v.engine == "genai" for v in chosen) else None
    logs = Path(tempfile.mkdtemp(prefix=time.strftime("run-%Y%m%d-%H%M%S-"), dir=args.cache))
    runs = run_interleaved(chosen, conversions, pythons, logs, args, say)

    summary = report.summarize(runs)
    counts = report.check_counts(summary)
    tokens = report.check_tokens(summary, [v.name for v in chosen if v.dense and v.precision == "fp32"], args.first_tokens)
    record = {
        "format": "blindsight-peers", "version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": host, "checkpoint": str(args.checkpoint.resolve()), "processor": processor,
        "images": [str(p.resolve()) for p in args.image], "question": args.question,
        "vision_patches": patches, "openvino_merger_mask_bytes": checkpoint.openvino_merger_mask_bytes(patches),
        "settings": {"threads": args.threads, "repeats": args.repeats, "chunk_size": args.chunk_size,
                     "max_new_tokens": args.max_new_tokens, "warmup": args.warmup, "kernel": args.kernel, "prepack": args.prepack,
                     "sparse": args.sparse_config, "profile": str(args.profile) if args.profile else None},
        "variants": {v.name: {"engine": v.engine, "what": v.what, "dense": v.dense, "precision": v.precision,
                              **summary.get(v.name, {"runs": 0})} for v in chosen},
        "checks": {"token_counts": counts, "greedy_tokens": tokens},
        "versions": versions, "setup": setup, "conversions": conversions, "runs": runs, "logs": str(logs),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=1) + "\n")
    print(report.table(summary, chosen, tokens, args.first_tokens))
    print(counts["line"])
    print(tokens["line"])
    precisions = {r["details"].get("cpu_default_precision") for r in runs if r.get("details", {}).get("cpu_default_precision")}
    if precisions and "ov-default-precision" in record["variants"]:
        print(f"OpenVINO's CPU default inference precision here: {', '.join(sorted(precisions))} (what ov-default-precision ran at)")
    print(f"record: {args.output}")
    failed = any("error" in r for r in runs)
    return 1 if failed or not counts["agree"] else 0


def entry(argv=None) -> int:
    """``main`` with bad input and failed steps as one line on stderr (exit 2), never a traceback."""
    try:
        return main(argv)
    except PeersError as exc:
        print(f"peers: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("peers: interrupted", file=sys.stderr)
        return 130
