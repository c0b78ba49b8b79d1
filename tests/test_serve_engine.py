"""``moai serve`` on the continuous-batching engine, driven with the real ``openai`` client.

One ``moai serve --tiny`` subprocess without experts (``--scheduling continuous``, 4 rows): mixed-length answers
under concurrent load equal the in-process single runs, a short request finishes while a long one is still
decoding, streaming is token by token, a client that disconnects frees its row at the next step, and
``/metrics`` exposes the engine's series. A second, ``--scheduling static`` server gives the same answers.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from moai_sdk.testing import tiny_pipeline  # noqa: E402
from test_serve import IMAGE, MODEL, Server, _data_url, _messages, _metric, no_network  # noqa: E402,F401


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("serve-engine") / "tiny"


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return tiny_pipeline(tiny_dir, experts=None)


@pytest.fixture(scope="module")
def continuous(pipe, tiny_dir, tmp_path_factory):
    server = Server(
        tiny_dir,
        tmp_path_factory.mktemp("logs") / "continuous.log",
        "--experts",
        "none",
        "--max-num-seqs",
        "4",
        "--max-num-batched-tokens",
        "2048",
    )
    yield server
    server.stop()


def _ask(client, prompt: str, max_tokens: int, **extra):
    return client.chat.completions.create(
        model=MODEL, messages=_messages(prompt, _data_url(IMAGE)), max_tokens=max_tokens, temperature=0, **extra
    )


def _expected(pipe, prompt: str, max_tokens: int) -> str:
    import io

    from PIL import Image

    return pipe(Image.open(io.BytesIO(IMAGE)), prompt, max_new_tokens=max_tokens, do_sample=False).text


def test_mixed_lengths_under_load_equal_single_runs_and_short_ones_do_not_wait(continuous, pipe):
    client = continuous.client()
    jobs = [(f"Question {i}: what is shown?", 60 if i % 3 == 0 else 4) for i in range(9)]
    expected = [_expected(pipe, p, n) for p, n in jobs]
    done_at: dict[int, float] = {}

    generated: dict[int, int] = {}

    def ask(i: int) -> str:
        out = _ask(client, *jobs[i])
        done_at[i] = time.perf_counter()
        generated[i] = out.usage.completion_tokens
        return out.choices[0].message.content

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, range(len(jobs))))
    assert answers == expected
    long_done = max(done_at[i] for i in range(len(jobs)) if jobs[i][1] == 60)
    short_done = sorted(done_at[i] for i in range(len(jobs)) if jobs[i][1] == 4)
    assert short_done[0] < long_done  # a short answer did not wait for the long ones
    text = continuous.metrics()
    for series in (
        "moai_running_requests",
        "moai_waiting_requests",
        'moai_kv_cache_bytes{state="used"}',
        "moai_step_seconds_bucket",
        "moai_inter_token_seconds_bucket",
        "moai_time_to_first_token_seconds_bucket",
    ):
        assert series in text, series
    assert _metric(text, "moai_step_seconds_count") >= max(generated.values()) - 1  # one step per token
    assert _metric(text, "moai_inter_token_seconds_count") > 0


def test_streaming_is_token_by_token_and_equals_the_answer(continuous, pipe):
    client = continuous.client()
    prompt = "Describe the picture."
    expected = _expected(pipe, prompt, 24)
    stream = _ask(client, prompt, 24, stream=True)
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == expected
    assert len(pieces) >= 4  # streamed as generated, not as one block


def test_disconnected_client_frees_its_row(continuous):
    client = continuous.client(timeout=300)
    stream = _ask(client, "Talk for long.", 700, stream=True)
    got = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            got += 1
        if got >= 3:
            break
    stream.close()  # the client goes away mid-answer
    deadline = time.monotonic() + 60
    running = None
    while time.monotonic() < deadline:
        running = _metric(continuous.metrics(), "moai_running_requests")
        if running == 0:
            break
        time.sleep(0.2)
    assert running == 0
    assert _metric(continuous.metrics(), "moai_kv_cache_bytes", state="used") == 0
    assert httpx.get(continuous.base + "/health", timeout=10).json()["status"] == "ok"
    assert _ask(client, "Still there?", 3).choices[0].message.content is not None


def test_static_scheduling_gives_the_same_answers(pipe, tiny_dir, tmp_path_factory):
    server = Server(
        tiny_dir,
        tmp_path_factory.mktemp("logs") / "static.log",
        "--experts",
        "none",
        "--scheduling",
        "static",
        "--max-num-seqs",
        "4",
    )
    try:
        client = server.client()
        jobs = [(f"Static {i}?", 3 + 5 * (i % 2)) for i in range(4)]
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda j: _ask(client, *j).choices[0].message.content, jobs))
        assert answers == [_expected(pipe, p, n) for p, n in jobs]
    finally:
        server.stop()


def test_scheduling_flags_are_checked(tiny_dir):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "moai_sdk.cli", "serve", "--tiny", str(tiny_dir), "--kv-budget", "1.5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "--kv-budget" in out.stderr
