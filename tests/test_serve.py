"""bs-serve: the server in a subprocess on loopback, driven by the official openai
client as users would call it. The reference for every answer is ``Pipeline.generate`` called
directly on the same export; the reference for the FLOPs saved is ``count_flops`` over the
profile the model was compiled with."""

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import openai
import pytest
from PIL import Image

from blindsight.compiler.pipeline import compile_model
from blindsight.models.checkpoints import make_tiny_checkpoint
from blindsight.models.export_vlm import export_vlm
from blindsight.profile import Profile
from blindsight.runtime.pipeline import Pipeline
from blindsight.serve.load import free_port, wait_healthy

QUESTION = "compare <image> with <image>, which is brighter?"
LONG = "write a long story"  # the tiny checkpoint does not stop on its own for thousands of tokens


def _make_export(family, root):
    out = export_vlm(make_tiny_checkpoint(family, root / "ckpt"), root / "export", progress=False).out_dir
    t = json.loads((out / "template.json").read_text())
    cats = [["intra", "sink", "intra_sink", "dense"][: t["num_heads"]]] * t["num_layers"]
    compile_model(out / "language_model.onnx", Profile(cats, num_kv_heads=t["num_kv_heads"]),
                  out / "language_model.blindsight.onnx")
    images = root / "images"
    images.mkdir()
    paths = []
    for i, size in enumerate([(48, 60), (90, 40)]):
        rng = np.random.default_rng(i)
        paths.append(images / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (3, 3, 3), dtype=np.uint8)).resize(size[::-1], Image.NEAREST).save(paths[-1])
    return out, paths, cats, root


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny Qwen2-VL export, its sparse compiled model and profile, two PNGs."""
    return _make_export("qwen2_vl", tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def pipe(export):
    return Pipeline(export[0], compiled=True, threads=1)


class Server:
    def __init__(self, out, root, *args):
        self.cwd, self.tmp = root / "server_cwd", root / "server_tmp"  # must stay empty: nothing per request on disk
        self.cwd.mkdir(exist_ok=True)
        self.tmp.mkdir(exist_ok=True)
        port = free_port()
        env = {**os.environ, "TMPDIR": str(self.tmp)}
        self.proc = subprocess.Popen([sys.executable, "-m", "blindsight.serve", str(out), "--port", str(port),
                                      "--threads", "1", *map(str, args)], cwd=self.cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.url = f"http://127.0.0.1:{port}"
        self.lines: list[str] = []
        threading.Thread(target=lambda: [self.lines.append(l) for l in self.proc.stdout], daemon=True).start()
        wait_healthy(self.url, self.proc, timeout=180)
        self.files_at_start = self.files()
        self.model = os.path.basename(str(out))
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def files(self):
        return sorted(str(p) for d in (self.cwd, self.tmp) for p in d.rglob("*"))

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return r.read().decode()

    def health(self):
        return json.loads(self.get("/health"))

    def post(self, body: bytes, content_type="application/json"):
        req = urllib.request.Request(self.url + "/v1/chat/completions", data=body, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def metric(self, name):
        for line in self.get("/metrics").splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.split()[-1])
        raise KeyError(name)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def server(export):
    out, paths, _, root = export
    s = Server(out, root, "--max-queue", 1, "--max-images", 3, "--max-image-bytes", 100_000,
               "--max-image-pixels", 1_000_000, "--allow-local-images", paths[0].parent, "--max-context", 8192)
    yield s
    s.stop()
    assert "Traceback" not in "".join(s.lines), "".join(s.lines)[-3000:]


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()


def content(paths, url=data_url):
    """OpenAI content parts for QUESTION with the images where its markers are."""
    a, b = QUESTION.split("<image>")[0], QUESTION.split("<image>")[1]
    c = QUESTION.split("<image>")[2]
    return [{"type": "text", "text": a}, {"type": "image_url", "image_url": {"url": url(paths[0])}},
            {"type": "text", "text": b}, {"type": "image_url", "image_url": {"url": url(paths[1])}},
            {"type": "text", "text": c}]


def test_two_images_non_streaming_equals_pipeline(server, export, pipe):
    out, paths, cats, _ = export
    want = pipe.generate(paths, QUESTION, 8)
    got = server.client.chat.completions.create(model=server.model, max_tokens=8,
                                                messages=[{"role": "user", "content": content(paths)}])
    assert got.choices[0].message.content == want.text
    extra = got.model_extra["blindsight"]
    assert extra["token_ids"] == want.token_ids and len(extra["image_spans"]) == 2
    assert [tuple(s) for s in extra["image_spans"]] == want.image_spans
    assert got.usage.prompt_tokens == want.prefill_tokens and got.usage.completion_tokens == len(want.token_ids)
    assert got.choices[0].finish_reason == ("stop" if want.token_ids[-1] in pipe.eos else "length")
    # the FLOPs saved, against count_flops over the profile (not the graph's attributes the server reads)
    from blindsight.flops.dims import dims_from_config
    from blindsight.flops.report import count_flops

    dims = dims_from_config(json.loads((out / "config.json").read_text()))
    rep = count_flops(dims, cats, want.image_spans, want.prefill_tokens)
    assert extra["attention_flops_saved"] == rep.attention_dense - rep.attention_sparse > 0


def test_streaming_equals_pipeline(server, export, pipe):
    paths = export[1]
    want = pipe.generate(paths, QUESTION, 12)
    stream = server.client.chat.completions.create(model=server.model, max_tokens=12, stream=True,
                                                   stream_options={"include_usage": True},
                                                   messages=[{"role": "user", "content": content(paths)}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model_extra["blindsight"]["token_ids"] == want.token_ids
    assert chunks[-1].usage.prompt_tokens == want.prefill_tokens and chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_client_defaults_are_taken(server, pipe):
    """Fields clients send at their defaults (stop null, zero penalties, temperature 0, n 1) change nothing."""
    got = server.client.chat.completions.create(model=server.model, max_tokens=5, n=1, temperature=0, top_p=1,
                                                presence_penalty=0, frequency_penalty=0, stop=None, seed=7, user="u",
                                                messages=[{"role": "user", "content": "describe the sky"}])
    assert got.choices[0].message.content == pipe.generate([], "describe the sky", 5).text


def test_text_only_and_local_file_images(server, export, pipe):
    paths = export[1]
    got = server.client.chat.completions.create(model=server.model, max_tokens=6,
                                                messages=[{"role": "user", "content": "describe the sky"}])
    assert got.choices[0].message.content == pipe.generate([], "describe the sky", 6).text
    # local files, inside the --allow-local-images directory
    got = server.client.chat.completions.create(model=server.model, max_tokens=8, messages=[
        {"role": "user", "content": content(paths, lambda p: f"file://{p}")}])
    assert got.choices[0].message.content == pipe.generate(paths, QUESTION, 8).text


def _png(size, seed=0, noise=False) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (*size, 3), dtype=np.uint8) if noise else np.full((*size, 3), 90, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _user(*parts):
    return [{"role": "user", "content": list(parts)}]


def _img(url):
    return {"type": "image_url", "image_url": {"url": url}}


BAD_CLIENT = [  # (what, request kwargs, exception, HTTP status, words the message holds)
    ("unknown model", dict(model="no-such-model", messages=[{"role": "user", "content": "hi"}]),
     openai.NotFoundError, 404, "no-such-model"),
    ("too many images", dict(messages=_user(*[_img(_url(_png((8, 8))))] * 4, {"type": "text", "text": "hi"})),
     openai.BadRequestError, 400, "too many images"),
    ("oversize image", dict(messages=_user(_img(_url(_png((200, 200), noise=True))))),
     openai.APIStatusError, 413, "over 100000 bytes"),
    ("too many pixels", dict(messages=_user(_img(_url(_png((1200, 1000)))))),
     openai.APIStatusError, 413, "1000x1200 pixels"),
    ("undecodable image", dict(messages=_user(_img("data:image/png;base64," + base64.b64encode(b"not an image at all").decode()))),
     openai.BadRequestError, 400, "not an image"),
    ("truncated image", dict(messages=_user(_img(_url(_png((64, 64), noise=True)[:300])))),
     openai.BadRequestError, 400, "cannot be decoded"),
    ("bad base64", dict(messages=_user(_img("data:image/png;base64,@@@@")) ), openai.BadRequestError, 400, "base64"),
    ("remote url", dict(messages=_user(_img("https://example.invalid/a.png"))), openai.BadRequestError, 400, "not fetched"),
    ("local file outside the allow-list", dict(messages=_user(_img("file:///etc/hostname"))),
     openai.PermissionDeniedError, 403, "outside"),
    ("prompt over the context", dict(messages=[{"role": "user", "content": "word " * 9000}]),
     openai.BadRequestError, 400, "context length of 8192"),
    ("max_tokens over the context", dict(messages=[{"role": "user", "content": "hi"}], max_tokens=9000),
     openai.BadRequestError, 400, "ask for at most"),
    ("unknown field", dict(messages=[{"role": "user", "content": "hi"}], extra_body={"beam_width": 4}),
     openai.BadRequestError, 400, "unknown field 'beam_width'"),
    ("unknown part type", dict(messages=_user({"type": "input_audio", "input_audio": {}})),
     openai.BadRequestError, 400, "'input_audio'"),
    ("max_tokens 0", dict(messages=[{"role": "user", "content": "hi"}], max_tokens=0),
     openai.BadRequestError, 400, "max_tokens"),
    ("no messages", dict(messages=[]), openai.BadRequestError, 400, "messages"),
    ("stop sequences", dict(messages=[{"role": "user", "content": "hi"}], stop=["\n"]),
     openai.BadRequestError, 400, "stop sequences are not supported"),
    ("n 2", dict(messages=[{"role": "user", "content": "hi"}], n=2), openai.BadRequestError, 400, "n:"),
    ("image in an assistant message", dict(messages=[{"role": "assistant", "content": [_img("data:x")]}]),
     openai.BadRequestError, 400, "user messages only"),
]


@pytest.mark.parametrize("what,kwargs,exc,status,words", BAD_CLIENT, ids=[c[0] for c in BAD_CLIENT])
def test_bad_requests_are_one_clear_4xx(server, pipe, what, kwargs, exc, status, words):
    kwargs = {"model": server.model, "max_tokens": 4, **kwargs}
    with pytest.raises(exc) as info:
        server.client.chat.completions.create(**kwargs)
    assert info.value.status_code == status
    message = info.value.body["message"]
    assert words in message and "\n" not in message and "Traceback" not in message, message
    # and the server goes on serving, with the right answer
    assert server.health()["status"] == "ok"
    got = server.client.chat.completions.create(model=server.model, max_tokens=3, messages=[{"role": "user", "content": "ok?"}])
    assert got.choices[0].message.content == pipe.generate([], "ok?", 3).text


@pytest.mark.parametrize("body,words", [(b'{"model": "x", ', "not valid JSON"), (b"\xff\xfe", "not valid JSON"),
                                        (b"[1, 2]", "JSON object"), (b'{"messages": []}', "missing field 'model'")])
def test_malformed_bodies(server, body, words):
    status, doc = server.post(body)
    assert status == 400 and words in doc["error"]["message"], doc
    assert server.health()["status"] == "ok"


def test_unknown_route_and_method(server):
    try:
        urllib.request.urlopen(server.url + "/v1/completions", data=b"{}", timeout=10)
    except urllib.error.HTTPError as exc:
        assert exc.code == 404 and "no route" in json.loads(exc.read())["error"]["message"]
    else:
        pytest.fail("POST /v1/completions answered")


def test_queue_full_is_429_and_a_gone_client_frees_its_slot(server, pipe):
    """--max-queue 1, one worker: a long stream runs, one request waits, a third is refused;
    closing the stream stops its generation (cancelled, its slot taken by the waiting one)."""
    assert len(pipe.generate([], LONG, 4000).token_ids) == 4000  # the premise: it would run for seconds
    cancelled = server.metric("blindsight_requests_cancelled_total")
    generated = server.metric("blindsight_generated_tokens_total")
    holder = server.client.chat.completions.create(model=server.model, max_tokens=4000, stream=True,
                                                   messages=[{"role": "user", "content": LONG}])
    it = iter(holder)
    next(it), next(it)  # generating
    waiting: dict = {}

    def queued():
        waiting["got"] = server.client.chat.completions.create(model=server.model, max_tokens=4, messages=[
            {"role": "user", "content": "hello"}])

    t = threading.Thread(target=queued)
    t.start()
    deadline = time.monotonic() + 30
    while server.health()["waiting"] < 1:
        assert time.monotonic() < deadline, server.health()
        time.sleep(0.05)
    with pytest.raises(openai.RateLimitError) as info:
        server.client.chat.completions.create(model=server.model, max_tokens=4, messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 429 and "busy" in info.value.body["message"]
    holder.close()  # the client goes away mid-stream
    t.join(timeout=60)
    assert waiting["got"].choices[0].message.content == pipe.generate([], "hello", 4).text
    h = server.health()
    assert h["running"] == 0 and h["waiting"] == 0
    assert server.metric("blindsight_requests_cancelled_total") == cancelled + 1
    assert server.metric("blindsight_requests_rejected_total") >= 1
    # the closed stream stopped long before its 4000 tokens
    assert server.metric("blindsight_generated_tokens_total") - generated < 3000


def test_a_waiting_client_that_leaves_frees_its_queue_slot(server, pipe):
    """A request waiting behind a long stream whose client gives up leaves the queue at once."""
    cancelled = server.metric("blindsight_requests_cancelled_total")
    holder = server.client.chat.completions.create(model=server.model, max_tokens=4000, stream=True,
                                                   messages=[{"role": "user", "content": LONG}])
    it = iter(holder)
    next(it), next(it)
    impatient = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model=server.model, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    deadline = time.monotonic() + 10
    while (h := server.health())["waiting"]:
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    assert h["running"] == 1  # the stream still runs; only the waiting one left
    assert server.metric("blindsight_requests_cancelled_total") == cancelled + 1
    holder.close()
    deadline = time.monotonic() + 30
    while server.health()["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert server.metric("blindsight_requests_cancelled_total") == cancelled + 2
    got = server.client.chat.completions.create(model=server.model, max_tokens=3, messages=[{"role": "user", "content": "ok?"}])
    assert got.choices[0].message.content == pipe.generate([], "ok?", 3).text


def test_metrics(server):
    text = server.get("/metrics")
    for name in ("blindsight_requests_total", "blindsight_time_to_first_token_seconds_count",
                 "blindsight_prefill_seconds_count", "blindsight_decode_tokens_per_second_count",
                 "blindsight_attention_flops_saved_sum", "blindsight_queue_depth"):
        assert name in text
    assert server.metric("blindsight_attention_flops_saved_sum") > 0
    assert server.metric("blindsight_time_to_first_token_seconds_count") >= 4
    assert server.metric('blindsight_requests_total{code="400"}') >= 10


def test_nothing_written_to_disk(server):
    """Runs after the requests above: the server's working and temporary directories hold what
    they held once it had started (some library drops a session file in $TMPDIR at start-up)."""
    assert server.health()["status"] == "ok"
    assert server.metric("blindsight_requests_total{code=\"200\"}") >= 10
    assert server.files() == server.files_at_start and not list(server.cwd.iterdir())


def test_load_run_loses_nothing(export, pipe):
    """bs-serve-load against a bs-serve it starts (two workers on the one pipeline): a small
    bounded run, every answer Pipeline's."""
    out, paths, _, root = export
    from blindsight.serve.load import PROMPT, sample_images

    proc = subprocess.run([sys.executable, "-c", "import sys; from blindsight.entry import bs_serve_load; sys.exit(bs_serve_load())",
                           str(out), "--requests", "24", "--concurrency", "4", "--max-tokens", "6", "--json",
                           "--serve-arg=--threads=1", "--serve-arg=--concurrency=2"],  # two threads share the pipeline
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    rep = json.loads(proc.stdout)
    assert rep["ok"] == 24 and rep["failed"] == rep["lost"] == rep["mismatched"] == 0
    imgs = [Image.open(io.BytesIO(b)) for b in sample_images(2)]
    assert rep["answer"] == pipe.generate(imgs, PROMPT, 6).text  # no markers: the images go first, as sent
    assert rep["ttft_p50_s"] > 0 and rep["ttft_p99_s"] >= rep["ttft_p50_s"]


def test_bad_command_lines_are_one_line(export, tmp_path):
    out = export[0]
    for args, words in [([str(tmp_path)], "not a bs-export directory"), ([str(out), "--model", "nope.onnx"], "does not exist"),
                        ([str(out), "--max-images", "0"], "--max-images is 0")]:
        proc = subprocess.run([sys.executable, "-m", "blindsight.serve", *args, "--port", "1"], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and words in proc.stderr, proc.stderr
        assert proc.stderr.strip().count("\n") == 0, proc.stderr


def test_ray_serve_two_replicas_same_api(export, pipe):
    """bs-serve-ray with 2 replicas behind Ray Serve's proxy: both answer, with Pipeline.generate's
    answers, bad input is the same 4xx, and a bounded load run loses nothing."""
    import signal

    out, paths, _, root = export
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from blindsight.entry import bs_serve_ray; sys.exit(bs_serve_ray())",
                             str(out), "--replicas", "2", "--port", str(port), "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: [lines.append(l) for l in proc.stderr], daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout=300)
        # the proxy answers once one replica is up; the second may still be loading its sessions
        pids, deadline = set(), time.monotonic() + 300
        while len(pids) < 2 and time.monotonic() < deadline and proc.poll() is None:
            with urllib.request.urlopen(url + "/health", timeout=10) as r:
                pids.add(json.loads(r.read())["pid"])
            time.sleep(0.2)
        assert len(pids) == 2, (pids, lines[-20:])
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        model = os.path.basename(str(out))
        want = pipe.generate(paths, QUESTION, 8)
        got = client.chat.completions.create(model=model, max_tokens=8, messages=[{"role": "user", "content": content(paths)}])
        assert got.choices[0].message.content == want.text and got.model_extra["blindsight"]["token_ids"] == want.token_ids
        chunks = list(client.chat.completions.create(model=model, max_tokens=8, stream=True,
                                                     messages=[{"role": "user", "content": content(paths)}]))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
        with pytest.raises(openai.NotFoundError) as info:
            client.chat.completions.create(model="other", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
        assert "'other' is not served here" in info.value.body["message"]
        req = urllib.request.Request(url + "/v1/chat/completions", data=b'{"model": ', headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as http:
            urllib.request.urlopen(req, timeout=30)
        assert http.value.code == 400 and "not valid JSON" in json.loads(http.value.read())["error"]["message"]
        load = subprocess.run([sys.executable, "-c", "import sys; from blindsight.entry import bs_serve_load; sys.exit(bs_serve_load())",
                               url, "--requests", "24", "--concurrency", "4", "--max-tokens", "6", "--json"],
                              capture_output=True, text=True, timeout=300)
        assert load.returncode == 0, load.stderr + load.stdout
        rep = json.loads(load.stdout)
        assert rep["ok"] == 24 and rep["failed"] == rep["lost"] == rep["mismatched"] == 0
        from blindsight.serve.load import PROMPT, sample_images

        assert rep["answer"] == pipe.generate([Image.open(io.BytesIO(b)) for b in sample_images(2)], PROMPT, 6).text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what it started
            proc.wait(timeout=30)
    assert proc.returncode == 0, "".join(lines)[-3000:]
    assert "Traceback" not in "".join(lines), "".join(lines)[-3000:]


def test_triton_repository_models_run_in_onnxruntime(export, pipe, tmp_path):
    """bs-serve-triton's repository (no Triton server here: see blindsight.serve.triton): each
    config lists exactly the inputs and outputs ONNX Runtime reads off the copied model, the
    language model takes image_spans, and the copied models answer like the export."""
    import re

    import onnxruntime as ort

    out, paths, _, _ = export
    repo = tmp_path / "repo"
    proc = subprocess.run([sys.executable, "-c", "import sys; from blindsight.entry import bs_serve_triton; sys.exit(bs_serve_triton())",
                           str(out), "-o", str(repo), "--name", "tiny", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    written = {w["name"]: w for w in json.loads(proc.stdout)}
    assert set(written) == {"tiny_language_model", "tiny_embed", "tiny_vision"}
    types = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64"}
    for name, w in written.items():
        config = (repo / name / "config.pbtxt").read_text()
        assert f'name: "{name}"' in config and 'backend: "onnxruntime"' in config
        sess = ort.InferenceSession(w["file"], providers=["CPUExecutionProvider"])
        for kind, values in (("input", sess.get_inputs()), ("output", sess.get_outputs())):
            block = config.split(f"{kind} [")[1].split("\n]\n")[0]
            listed = re.findall(r'name: "([^"]+)"\s+data_type: (\w+)\s+dims: \[ ([^\]]*) \]', block)
            want = [(v.name, types[v.type], ", ".join(str(d) if isinstance(d, int) else "-1" for d in v.shape)) for v in values]
            assert listed == want, (name, kind)
    lm = written["tiny_language_model"]
    assert ("image_spans", "TYPE_INT64", [-1, 2]) in [(s["name"], s["data_type"], s["dims"]) for s in lm["inputs"]]
    for part in ("embed", "vision"):
        assert open(written[f"tiny_{part}"]["file"], "rb").read() == (out / f"{part}.onnx").read_bytes()
    copied = Pipeline(out, compiled=lm["file"], threads=1)
    assert copied.sparse and copied.generate(paths, QUESTION, 6).token_ids == pipe.generate(paths, QUESTION, 6).token_ids


def test_gemma3_image_blocks_through_the_server(tmp_path_factory):
    """Gemma 3 (token_type_ids from the spans, bidirectional image blocks): the server's answers,
    JSON and streamed, equal Pipeline.generate's, and the FLOPs saved count the image blocks."""
    from blindsight.flops.dims import dims_from_config
    from blindsight.flops.report import count_flops

    out, paths, cats, root = _make_export("gemma3", tmp_path_factory.mktemp("serve_gemma"))
    pipe = Pipeline(out, compiled=True, threads=1)
    assert "token_type_ids" in pipe.lm_inputs
    want = pipe.generate(paths, QUESTION, 8)
    s = Server(out, root)
    try:
        got = s.client.chat.completions.create(model=s.model, max_tokens=8, messages=[{"role": "user", "content": content(paths)}])
        assert got.choices[0].message.content == want.text
        assert got.model_extra["blindsight"]["token_ids"] == want.token_ids
        chunks = list(s.client.chat.completions.create(model=s.model, max_tokens=8, stream=True,
                                                      messages=[{"role": "user", "content": content(paths)}]))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
        dims = dims_from_config(json.loads((out / "config.json").read_text()))
        assert dims.image_blocks
        rep = count_flops(dims, cats, want.image_spans, want.prefill_tokens)
        assert got.model_extra["blindsight"]["attention_flops_saved"] == rep.attention_dense - rep.attention_sparse > 0
    finally:
        s.stop()


def test_flop_counter_without_config_reads_the_nodes(export, pipe):
    """Without config.json (no window here) the node attributes alone give count_flops' figure."""
    from blindsight.flops.dims import dims_from_config
    from blindsight.flops.report import count_flops
    from blindsight.serve.engine import FlopCounter

    out, paths, cats, _ = export
    r = pipe.generate(paths, QUESTION, 1)
    spans = np.asarray(r.image_spans, dtype=np.int64)
    alone = FlopCounter(pipe.model_path, int(pipe.template["head_dim"]))
    assert alone.dims is None
    rep = count_flops(dims_from_config(json.loads((out / "config.json").read_text())), cats, r.image_spans, r.prefill_tokens)
    assert alone.saved(spans, r.prefill_tokens) == rep.attention_dense - rep.attention_sparse > 0
    assert alone.saved(np.zeros((0, 2), np.int64), r.prefill_tokens) == 0


def test_ray_deployment_options_are_what_ray_serve_takes():
    """--replicas and --autoscale map onto a Ray Serve deployment that Ray itself validates."""
    from ray import serve

    from blindsight.errors import BlindSightError
    from blindsight.serve.ray_app import BlindSightReplica, build_parser, deployment_options

    fixed = build_parser().parse_args(["d", "--replicas", "3", "--concurrency", "2", "--max-queue", "5"])
    d = serve.deployment(serve.ingress()(BlindSightReplica), **deployment_options(fixed))
    assert d.num_replicas == 3 and d.max_ongoing_requests == 7 and d.ray_actor_options["num_cpus"] == 1
    auto = build_parser().parse_args(["d", "--autoscale", "1:4", "--target-ongoing-requests", "3"])
    d = serve.deployment(serve.ingress()(BlindSightReplica), **deployment_options(auto))
    cfg = d._deployment_config.autoscaling_config
    assert (cfg.min_replicas, cfg.max_replicas, cfg.target_ongoing_requests) == (1, 4, 3)
    for bad in ("4:1", "x", "1-2"):
        with pytest.raises(BlindSightError, match="--autoscale"):
            deployment_options(build_parser().parse_args(["d", "--autoscale", bad]))


PROTOCOL = [  # (message list, status, the exact one-line message, param)
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], 400,
     "missing field 'messages.0.content.0.image_url.url'", "messages.0.content.0.image_url.url"),
    ([{"role": "user", "content": [{"type": "text", "text": "a", "x": 1}]}], 400,
     "unknown field 'messages.0.content.0.x' (bs-serve takes the OpenAI chat-completions fields it documents)",
     "messages.0.content.0.x"),
    ([{"role": "user", "content": 5}], 400, "messages.0.content: must be a string or a list of content parts",
     "messages.0.content"),
    ([{"role": "robot", "content": "a"}], 400,
     "messages.0.role: Input should be 'system', 'developer', 'user' or 'assistant'", "messages.0.role"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png,abc"}}]}], 400,
     "messages.0.content.0.image_url: a data URL must be data:image/<format>;base64,<data>", "messages.0.content.0.image_url"),
]


@pytest.mark.parametrize("messages,status,message,param", PROTOCOL)
def test_protocol_messages_name_the_field(messages, status, message, param):
    from blindsight.serve.protocol import ApiError, ImageLimits, conversation, parse_request

    with pytest.raises(ApiError) as info:
        conversation(parse_request(json.dumps({"model": "m", "messages": messages}).encode()), ImageLimits())
    assert (info.value.status, info.value.message, info.value.param) == (status, message, param)
    assert info.value.body() == {"error": {"message": message, "type": "invalid_request_error", "param": param,
                                           "code": None}}


def test_text_stream_deltas_add_up_to_the_decoded_text(pipe):
    """TextStream against the tokenizer's decode of the whole answer, partial characters held back."""
    from blindsight.serve.engine import TextStream

    decode = pipe.prompts.decode
    for prompt in ("write a long story", "hello", "ümlaut 中文"):
        tokens = pipe.generate([], prompt, 40).token_ids
        stream = TextStream(decode)
        deltas = [stream.push(t) for t in tokens]
        text = "".join(deltas) + stream.finish(decode(tokens))
        assert text == decode(tokens)
        assert all(not d.endswith("\ufffd") for d in deltas if d)


def test_chunked_prefill_server_answers_like_one_call(export, pipe):
    """bs-serve --chunk-size 7: the prompt is prefilled through the KV cache in
    chunks, and the answer is the one-call pipeline's, token for token."""
    out, paths, _, root = export
    want = pipe.generate(paths, QUESTION, 8)
    assert want.prefill_tokens > 7 and want.prefill_chunks == 1
    srv = Server(out, root, "--chunk-size", "7")
    try:
        got = srv.client.chat.completions.create(model=srv.model, max_tokens=8,
                                                 messages=[{"role": "user", "content": content(paths)}])
        assert got.model_extra["blindsight"]["token_ids"] == want.token_ids
        assert got.choices[0].message.content == want.text
        assert any("prefill in chunks of 7 tokens" in line for line in srv.lines), srv.lines
    finally:
        srv.stop()
