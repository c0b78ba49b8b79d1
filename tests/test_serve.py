"""``moai serve``: the server runs on 127.0.0.1 and is driven with the official ``openai`` client.

Two servers run in a subprocess (``moai serve``, each started once per module):

* ``served`` -- batching on (``--max-batch-size 16``), the tiny experts, a small ``--max-image-bytes``: answers
  equal the in-process pipeline's, streaming, 16 concurrent clients batched, bad requests, disconnects;
* ``guarded`` -- ``--api-key``, no batching, ``--max-queue 2``, remote images allowed: 401s, remote images from a
  local HTTP server.

Overload (429) and ``request_timeout`` (504) run on :class:`HeldServer`: the same app under uvicorn in this process,
whose model thread the test holds until the outcome is certain, so no outcome depends on the CPU's speed.
"""

from __future__ import annotations

import base64
import functools
import http.server
import io
import os
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import allow_loopback_only

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from benchmarks.serve import ServerProcess, _free_port  # noqa: E402

from moai_sdk import PerceptionResult  # noqa: E402
from moai_sdk.testing import demo_image, tiny_pipeline  # noqa: E402

MODEL = "moai-tiny"
MAX_IMAGE_BYTES = 200_000
STARTUP_S = 240


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Loopback only (overrides the suite's no-network guard): the servers under test listen on 127.0.0.1, any
    other address fails loudly."""
    allow_loopback_only(monkeypatch)


def _png(word: str, size: tuple[int, int] = (320, 240)) -> bytes:
    buf = io.BytesIO()
    demo_image(word, size).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def _messages(prompt: str, url: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": url}}],
        }
    ]


class Server(ServerProcess):
    """``moai serve --tiny DIR ...`` in a subprocess (the benchmark's :class:`ServerProcess`), with the ``openai``
    client; a failed start fails the test with the server's log."""

    def __init__(self, tiny_dir: Path, log: Path, *flags: str, env: dict | None = None) -> None:
        self.log = log
        try:
            super().__init__(tiny_dir, log, flags, startup_s=STARTUP_S, env=env)
        except RuntimeError as exc:
            pytest.fail(f"{exc}:\n{log.read_text()[-4000:]}")

    def client(self, api_key: str = "unused", **kwargs) -> openai.OpenAI:
        options = {"max_retries": 0, "timeout": 300, **kwargs}
        return openai.OpenAI(base_url=self.base + "/v1", api_key=api_key, **options)

    def healthy(self) -> bool:
        return httpx.get(self.base + "/health", timeout=10).json()["status"] == "ok"


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        match = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve") / "tiny"


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    """The same tiny pipeline the servers load (built here first, so the servers reuse the folder)."""
    return tiny_pipeline(tiny_dir)


class HeldServer:
    """``create_app(pipe)`` served by uvicorn on 127.0.0.1 in this process, whose model thread can be held: while
    :attr:`hold` is set, a batch that reaches the model waits (:attr:`entered` says one is waiting) until
    :meth:`release`. Makes queue and timeout outcomes forced instead of depending on how fast the CPU is."""

    def __init__(self, pipe, **config) -> None:
        import uvicorn

        from moai_sdk.serve import create_app

        self.pipe, self.entered, self._go = pipe, threading.Event(), threading.Event()
        self._encode = pipe.model.encode_images

        def held_encode(pixel_values):  # the first step of the model in every batch
            self.entered.set()
            assert self._go.wait(STARTUP_S), "the test never released the model thread"
            return self._encode(pixel_values)

        pipe.model.encode_images = held_encode
        port = _free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(
            uvicorn.Config(create_app(pipe, **config), host="127.0.0.1", port=port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + STARTUP_S
        while not self.healthy():
            assert time.monotonic() < deadline and self.thread.is_alive(), "the in-process server did not start"
            time.sleep(0.1)

    def healthy(self) -> bool:
        try:
            return httpx.get(self.base + "/health", timeout=10).json()["status"] == "ok"
        except httpx.TransportError:
            return False

    def queue_depth(self) -> int:
        return httpx.get(self.base + "/health", timeout=10).json()["queue_depth"]

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        # 429 and 504 come within about a second; a request that hangs instead fails the test after 60 s
        return openai.OpenAI(base_url=self.base + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def metrics(self) -> str:
        return httpx.get(self.base + "/metrics", timeout=30).text

    def release(self) -> None:
        self._go.set()

    def stop(self) -> None:
        self.release()
        self.server.should_exit = True
        self.thread.join(60)
        self.pipe.model.encode_images = self._encode


@pytest.fixture(scope="module")
def served(pipe, tiny_dir, tmp_path_factory):
    server = Server(
        tiny_dir,
        tmp_path_factory.mktemp("logs") / "served.log",
        "--max-batch-size",
        "16",
        "--batch-timeout-ms",
        "300",
        "--max-image-bytes",
        str(MAX_IMAGE_BYTES),
    )
    yield server
    server.stop()


IMAGE = _png("MOAI")


def test_health_models_and_metrics(served):
    assert served.healthy()
    models = served.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    text = served.metrics()
    assert "moai_batch_size_bucket" in text and "moai_queue_depth" in text
    from test_cli import foreign_lines

    assert foreign_lines(served.log.read_text()) == []  # the start printed no third-party warnings


def test_answer_equals_the_pipeline_and_usage_counts_what_the_model_sees(served, pipe):
    prompt = "What is written in the image?"
    expected = pipe(IMAGE, prompt, max_new_tokens=6, do_sample=False)
    response = served.client().chat.completions.create(
        model=MODEL,
        messages=_messages(prompt, _data_url(IMAGE)),
        max_tokens=6,
        temperature=0,
        extra_body={"moai": {"return_perception": True}},
    )
    choice = response.choices[0]
    assert choice.message.content == expected.text and choice.message.role == "assistant"
    generated = expected.token_counts["generated"]
    ended = generated < 6 or expected.new_token_ids[-1] == pipe.tokenizer.eos_token_id
    assert choice.finish_reason == ("stop" if ended else "length")
    latents = pipe.model.config.structure.compressor_latents  # the compressed aux tokens the mixer reads
    assert response.usage.prompt_tokens == expected.token_counts["context"] + latents
    assert response.usage.completion_tokens == generated
    assert response.usage.total_tokens == response.usage.prompt_tokens + generated
    moai = response.model_extra["moai"]
    assert moai["aux_text"] == expected.aux_text and "MOAI" in moai["aux_text"]
    assert PerceptionResult.model_validate(moai["perception"]).text_lines[0].text == "MOAI"
    assert moai["timings"]["prefill"] > 0 and moai["token_counts"] == expected.token_counts


def test_streamed_chunks_concatenate_to_the_answer(served, pipe):
    prompt = "Describe the picture."
    expected = pipe(IMAGE, prompt, max_new_tokens=8, do_sample=False)
    stream = served.client().chat.completions.create(
        model=MODEL,
        messages=_messages(prompt, _data_url(IMAGE)),
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == expected.text and len(pieces) >= 2  # sent as it was generated, not at the end
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected.token_counts["generated"]
    assert all(c.usage is None for c in chunks[:-1])


def test_concurrent_clients_are_batched_and_each_gets_its_serial_answer(served, pipe):
    images = [IMAGE, _png("CAT")]
    prompts = [f"Question number {i}: what do you see?" for i in range(16)]
    serial = [pipe(images[i % 2], p, max_new_tokens=4, do_sample=False).text for i, p in enumerate(prompts)]
    before = served.metrics()
    client = served.client()

    def ask(i: int) -> str:
        out = client.chat.completions.create(
            model=MODEL, messages=_messages(prompts[i], _data_url(images[i % 2])), max_tokens=4, temperature=0
        )
        return out.choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert answers == serial
    after = served.metrics()
    batches = _metric(after, "moai_batch_size_count") - _metric(before, "moai_batch_size_count")
    single = _metric(after, "moai_batch_size_bucket", le="1.0") - _metric(before, "moai_batch_size_bucket", le="1.0")
    assert 1 <= batches < 16 and batches - single >= 1  # at least one call ran several requests together
    rows = _metric(after, "moai_batch_size_sum") - _metric(before, "moai_batch_size_sum")
    assert rows == 16  # every request ran exactly once


def test_seeded_sampling_reproduces_the_pipeline(served, pipe):
    prompt = "Tell me a story."
    expected = pipe(IMAGE, prompt, max_new_tokens=6, do_sample=True, temperature=0.8, top_p=0.9, seed=1234)
    response = served.client().chat.completions.create(
        model=MODEL,
        messages=_messages(prompt, _data_url(IMAGE)),
        max_tokens=6,
        temperature=0.8,
        top_p=0.9,
        seed=1234,
    )
    assert response.choices[0].message.content == expected.text


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"image": "data:image/png;base64,%%%not-base64"}, 400, "invalid_base64"),
        ({"image": _data_url(b"hello, not an image")}, 400, "invalid_image"),
        ({"image": _data_url(os.urandom(MAX_IMAGE_BYTES + 10))}, 400, "image_too_large"),
        ({"image": "https://example.com/a.png"}, 400, "remote_images_disabled"),
        ({"prompt": "word " * 1500}, 400, "context_length_exceeded"),
        ({"max_tokens": 5000}, 400, "context_length_exceeded"),
        ({"n": 17}, 400, None),  # n choices: 1..16
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, 400, None),
        ({"two_images": True}, 400, None),
        ({"system": True}, 400, None),
        ({"extra_body": {"best_of": 3}}, 400, "unsupported_field"),
        ({"temperature": 5}, 400, None),
        ({"model": "gpt-4o"}, 404, "model_not_found"),
    ],
)
def test_bad_requests_get_the_right_status_and_the_server_stays_healthy(served, change, status, code):
    url = change.get("image", _data_url(IMAGE))
    messages = _messages(change.get("prompt", "What is this?"), url)
    if change.get("two_images"):
        messages[0]["content"].append({"type": "image_url", "image_url": {"url": url}})
    if change.get("system"):
        messages.insert(0, {"role": "system", "content": "You are terse."})
    kwargs = {k: v for k, v in change.items() if k in ("n", "tools", "extra_body", "temperature", "max_tokens")}
    with pytest.raises(openai.APIStatusError) as info:
        served.client().chat.completions.create(
            model=change.get("model", MODEL), messages=messages, **{"max_tokens": 2, **kwargs}
        )
    err = info.value
    assert err.status_code == status
    assert set(err.body) == {"message", "type", "param", "code"} and err.body["message"]
    if code is not None:
        assert err.code == code
    assert served.healthy()


def test_body_size_is_bounded(served):
    big = b"x" * (int(MAX_IMAGE_BYTES * 4 / 3) + 2**20 + 10)
    response = httpx.post(
        served.base + "/v1/chat/completions", content=big, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
    assert served.healthy()


def test_perceive_endpoint_returns_the_perception(served, pipe):
    payload = {"image": base64.b64encode(IMAGE).decode()}
    response = httpx.post(served.base + "/v1/perceive", json=payload, timeout=300)
    assert response.status_code == 200, response.text
    result, expected = PerceptionResult.from_json(response.text), pipe.perceive(IMAGE)
    assert [t.text for t in result.text_lines] == [t.text for t in expected.text_lines] == ["MOAI"]
    assert [s.label for s in result.segments] == [s.label for s in expected.segments]
    assert [d.label for d in result.detections] == [d.label for d in expected.detections]
    bad = httpx.post(served.base + "/v1/perceive", json={"image": "!!"}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "image"


def test_a_client_that_disconnects_is_dropped(served):
    before = _metric(served.metrics(), "moai_requests_total", endpoint="/v1/chat/completions", status="499")
    # The answer is forced to run its 400 tokens (a grammar of 2,000 "x" allows no EOS before then): at least 0.4 s
    # even at 1 ms per token, while the client gives up after 0.1 s -- the disconnect is certain, not likely.
    client = served.client(timeout=0.1)
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(
            model=MODEL,
            messages=_messages("Talk for long.", _data_url(IMAGE)),
            max_tokens=400,
            temperature=0,
            extra_body={"structured_outputs": {"regex": "x{2000}"}},
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = _metric(served.metrics(), "moai_requests_total", endpoint="/v1/chat/completions", status="499")
        if now > before:
            break
        time.sleep(0.5)
    assert now == before + 1
    # a streaming client that stops reading early: its row is discarded, the server answers the next one
    stream = served.client().chat.completions.create(
        model=MODEL, messages=_messages("Talk for long.", _data_url(IMAGE)), max_tokens=400, temperature=0, stream=True
    )
    next(iter(stream))
    stream.close()
    quick = served.client().chat.completions.create(
        model=MODEL, messages=_messages("Short?", _data_url(IMAGE)), max_tokens=2, temperature=0
    )
    assert quick.choices[0].finish_reason in ("stop", "length") and served.healthy()


REPO = Path(__file__).resolve().parents[1]


def test_readme_snippet_works_as_written(served, pipe, tmp_path, monkeypatch, capsys):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Serving: `moai serve`") :]
    code = section[section.index("```python\n") + len("```python\n") :]
    code = code[: code.index("```")]
    assert "http://127.0.0.1:8000/v1" in code  # the default `moai serve` address; here the test server's
    demo_image("MOAI").save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("http://127.0.0.1:8000/v1", served.base + "/v1"), "README.md", "exec"), {})
    expected = pipe((tmp_path / "photo.jpg").read_bytes(), "What is written here?", max_new_tokens=64, do_sample=False)
    printed = capsys.readouterr().out
    assert printed.startswith(expected.text + " CompletionUsage(")


def test_openai_client_example(served, pipe, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("moai_example_openai_client", REPO / "examples" / "openai_client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text, streamed = module.main(["--base-url", served.base + "/v1", "--max-tokens", "5"])
    expected = pipe(_png("MOAI", (640, 480)), "What is written in the image?", max_new_tokens=5, do_sample=False)
    assert streamed == text == expected.text  # the example's default picture: demo_image("MOAI")
    out = capsys.readouterr().out
    assert f"answer:  {text}" in out and "text descriptions: MOAI" in out


def test_benchmark_load_generator(served):
    sys.path.insert(0, str(REPO))
    from benchmarks.serve import run_load, table

    row = run_load(served.base, 2, 4, 2, [_data_url(IMAGE)], served.metrics)
    assert row["completed"] == 4 and not row["errors"] and row["requests_per_s"] > 0
    assert 0 < row["p50_s"] <= row["p95_s"] and 1 <= row["mean_batch_size"] <= 2
    assert "| 2 | on |" in table([{**row, "mode": "off"}, {**row, "mode": "on"}])


# --------------------------------------------------------------------------------------------------------------
# API key, overload, remote images
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(pipe, tiny_dir, tmp_path_factory):
    server = Server(
        tiny_dir,
        tmp_path_factory.mktemp("logs") / "guarded.log",
        "--experts",
        "none",
        "--max-batch-size",
        "1",
        "--max-queue",
        "2",
        "--allow-remote-images",
        env={"MOAI_API_KEY": "s3cret"},
    )
    yield server
    server.stop()


def test_api_key_is_required(guarded):
    with pytest.raises(openai.AuthenticationError) as info:
        guarded.client(api_key="wrong").models.list()
    assert info.value.code == "invalid_api_key"
    assert httpx.post(guarded.base + "/v1/chat/completions", json={}).status_code == 401
    assert [m.id for m in guarded.client(api_key="s3cret").models.list().data] == [MODEL]
    assert guarded.healthy()  # probes need no key


def test_overload_gives_429_and_every_accepted_request_completes_once(pipe):
    """No batching, a queue of 2: while the model thread is held on the first request, two more wait in the queue
    and the other nine are refused with 429; once released, the three accepted ones are answered exactly once."""
    server = HeldServer(pipe, api_key="s3cret", max_batch_size=1, max_queue=2, served_model_name=MODEL)
    try:
        client = server.client(api_key="s3cret")
        before = server.metrics()

        def ask(i: int):
            try:
                out = client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=_messages(f"Question {i}?", _data_url(IMAGE)), max_tokens=3, temperature=0
                )
                return 200, out.parse().choices[0].message.content, None
            except openai.RateLimitError as exc:
                return 429, None, exc.response.headers.get("retry-after")

        with ThreadPoolExecutor(12) as pool:
            running = [pool.submit(ask, 0)]
            assert server.entered.wait(STARTUP_S)  # request 0 holds the model thread
            running += [pool.submit(ask, i) for i in (1, 2)]
            deadline = time.monotonic() + STARTUP_S
            while server.queue_depth() < 2:  # requests 1 and 2 wait in the queue
                assert time.monotonic() < deadline
                time.sleep(0.05)
            refused_early = [ask(i) for i in range(3, 12)]  # the queue is full: each is refused at once
            server.release()
            outcomes = [f.result() for f in running] + refused_early
        accepted = [o for o in outcomes if o[0] == 200]
        refused = [o for o in outcomes if o[0] == 429]
        assert len(accepted) == 3 and len(refused) == 9 and refused == refused_early
        assert all(isinstance(text, str) and text for _, text, _ in accepted)
        assert all(retry is not None and int(retry) >= 1 for _, _, retry in refused)
        after = server.metrics()
    finally:
        server.stop()
    endpoint = "/v1/chat/completions"

    def delta(name, **labels):
        return _metric(after, name, **labels) - _metric(before, name, **labels)

    assert delta("moai_requests_total", endpoint=endpoint, status="200") == 3
    assert delta("moai_requests_total", endpoint=endpoint, status="429") == 9
    assert delta("moai_batch_size_sum") == 3  # each accepted request ran exactly once
    assert _metric(after, "moai_queue_depth") == 0


def test_remote_images_when_allowed(guarded, tmp_path):
    (tmp_path / "photo.png").write_bytes(IMAGE)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=web.serve_forever, daemon=True)
    thread.start()
    try:
        client = guarded.client(api_key="s3cret")
        url = f"http://127.0.0.1:{web.server_address[1]}/photo.png"

        def answer(image_url: str) -> str:
            out = client.chat.completions.create(
                model=MODEL, messages=_messages("What is this?", image_url), max_tokens=4, temperature=0
            )
            return out.choices[0].message.content

        assert answer(url) == answer(_data_url(IMAGE))
        with pytest.raises(openai.BadRequestError) as info:
            answer(url.replace("photo.png", "missing.png"))
        assert info.value.code == "image_fetch"
    finally:
        web.shutdown()
        thread.join()


# --------------------------------------------------------------------------------------------------------------
# request timeout
# --------------------------------------------------------------------------------------------------------------


def test_request_timeout_gives_504(pipe):
    """The model thread is held until the client has its 504, so the answer cannot beat the 1 s timeout; released,
    the server answers the next request."""
    server = HeldServer(pipe, request_timeout=1.0, served_model_name=MODEL)
    try:
        with pytest.raises(openai.APIStatusError) as info:
            server.client().chat.completions.create(
                model=MODEL, messages=_messages("Talk for long.", _data_url(IMAGE)), max_tokens=5, temperature=0
            )
        assert server.entered.is_set()  # the request reached the model thread, which was still busy with it
        assert info.value.status_code == 504 and info.value.code == "timeout"
        server.release()
        assert server.healthy()
        text = server.metrics()
        assert _metric(text, "moai_requests_total", endpoint="/v1/chat/completions", status="504") == 1
        out = server.client().chat.completions.create(
            model=MODEL, messages=_messages("Hi", _data_url(IMAGE)), max_tokens=2, temperature=0
        )
        assert out.choices[0].message.content is not None
    finally:
        server.stop()
