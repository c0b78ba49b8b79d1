"""Load test of ``moai serve``: continuous against static (request-level) batching, in one run.

Usage::

    python -m benchmarks.serve                                   # tiny MoAI on CPU, answers of 8 and 256 tokens
    python -m benchmarks.serve --output-lens 8,256 --clients 16 --num-prompts 48 --out benchmarks/results/serve.json

Two servers are started on 127.0.0.1 (``moai serve --tiny DIR``, same folder, same settings, ``--max-num-seqs``
rows) -- ``--scheduling static`` and ``--scheduling continuous`` -- and warmed with one request per image (so
the perception experts' results are cached, as for any image asked about twice: this measures the serving and the
language model, not the experts). Then, as vLLM's ``benchmark_serving`` does, with the official ``openai`` client
and streamed greedy answers whose ``max_tokens`` mix ``--output-lens``:

* a closed loop of ``--clients`` clients (each sends its next request when its answer is complete) -- the static
  server's requests/s here is its capacity;
* Poisson arrivals at ``--request-rate`` (default: 60% of the static server's capacity), each request on its own
  thread.

Reported per run: requests/s, output tokens/s, time to first token (TTFT), inter-token latency (ITL: the gaps
between streamed pieces) and end-to-end latency (E2E) at p50 and p99, and the E2E p50 of the short requests.
``--server-threads N`` sets torch's threads in each server (``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import httpx

MODEL = "moai-tiny"
WORDS = ("MOAI", "CAT", "DOG", "SUN")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_urls(n: int) -> list[str]:
    """``n`` distinct small PNG pictures as data: URLs."""
    from moai_sdk.testing import demo_image

    urls = []
    for i in range(n):
        buf = io.BytesIO()
        demo_image(WORDS[i % len(WORDS)] + ("" if i < len(WORDS) else str(i)), (320, 240)).save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


class MoaiProcess:
    """``python -m moai_sdk.cli ARGS --port P`` in a subprocess on a free 127.0.0.1 port (output in ``log``), reached
    at :attr:`base`; :meth:`wait_ready` waits for it to answer, :meth:`stop` ends it."""

    def __init__(
        self, args: Sequence[str], log: Path, startup_s: float = 600.0, env: Optional[dict[str, str]] = None
    ) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.name = f"moai {args[0]}"
        self.startup_s = startup_s
        self.log_path = log
        self._log = open(log, "wb")  # closed in stop()
        cmd = [sys.executable, "-m", "moai_sdk.cli", *args, "--port", str(self.port)]
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=environment)

    def wait_ready(self, path: str = "/") -> None:
        """Return once ``path`` answers 200; stop the process and raise ``RuntimeError`` if it exits or is not
        ready within ``startup_s``."""
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {self.log_path}")
            try:
                if httpx.get(self.base + path, timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} was not ready within {self.startup_s:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


class ServerProcess(MoaiProcess):
    """``moai serve --tiny DIR`` in a subprocess (log in ``log``); ready when constructed, or after
    :meth:`wait_ready` with ``wait=False`` (to start something else while the server loads)."""

    def __init__(
        self,
        tiny: Path,
        log: Path,
        flags: Sequence[str],
        threads: Optional[int] = None,
        startup_s: float = 600.0,
        env: Optional[dict[str, str]] = None,
        wait: bool = True,
    ) -> None:
        environment = dict(env or {})
        if threads:  # torch's intra-op threads (OpenMP) in the server
            environment["OMP_NUM_THREADS"] = str(threads)
        args = ["serve", "--tiny", str(tiny), "--log-level", "warning", *flags]
        super().__init__(args, log, startup_s=startup_s, env=environment)
        if wait:
            self.wait_ready()

    def wait_ready(self, path: str = "/health") -> None:
        super().wait_ready(path)

    def metrics(self) -> str:
        return httpx.get(self.base + "/metrics", timeout=30).text

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far (all its threads, user + system)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(text: str, name: str) -> float:
    """One unlabelled sample of a Prometheus text exposition (0 when absent)."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, flags=re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def run_load(
    base: str,
    concurrency: int,
    requests: int,
    max_tokens: int,
    urls: Sequence[str],
    metrics_text: Optional[Any] = None,
    cpu_seconds: Optional[Any] = None,
) -> dict[str, Any]:
    """``concurrency`` threads send ``requests`` greedy chat completions in all; latencies, throughput and (with
    ``metrics_text``, a callable returning the server's /metrics) the mean batch size of these requests and
    (with ``cpu_seconds``, a callable) the server's CPU seconds per request."""
    import openai

    lock = threading.Lock()
    sent = {"n": 0}
    latencies: list[float] = []
    errors: list[str] = []

    start = threading.Barrier(concurrency + 1)

    def worker() -> None:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=3600)
        start.wait()  # every client ready before the clock starts
        while True:
            with lock:
                i = sent["n"]
                if i >= requests:
                    return
                sent["n"] += 1
            content = [
                {"type": "text", "text": f"Question {i}: what do you see in this picture?"},
                {"type": "image_url", "image_url": {"url": urls[i % len(urls)]}},
            ]
            t0 = time.perf_counter()
            try:
                client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0
                )
            except openai.APIError as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    before = metrics_text() if metrics_text else ""
    cpu_before = cpu_seconds() if cpu_seconds else 0.0
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = metrics_text() if metrics_text else ""
    cpu = cpu_seconds() - cpu_before if cpu_seconds else float("nan")
    calls = metric(after, "moai_batch_size_count") - metric(before, "moai_batch_size_count")
    rows = metric(after, "moai_batch_size_sum") - metric(before, "moai_batch_size_sum")
    return {
        "concurrency": concurrency,
        "requests": requests,
        "completed": len(latencies),
        "errors": errors,
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall if wall > 0 else float("nan"),
        "p50_s": _percentile(latencies, 0.5),
        "p95_s": _percentile(latencies, 0.95),
        "mean_latency_s": statistics.fmean(latencies) if latencies else float("nan"),
        "mean_batch_size": rows / calls if calls else float("nan"),
        "server_cpu_s_per_request": cpu / len(latencies) if latencies else float("nan"),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of a run."""
    lines = [
        "| concurrency | batching | requests/s | p50 latency (s) | p95 latency (s) | mean batch size "
        "| server CPU s / request | on / off |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    off = {r["concurrency"]: r["requests_per_s"] for r in rows if r["mode"] == "off"}
    for r in rows:
        ratio = f"{r['requests_per_s'] / off[r['concurrency']]:.2f}x" if r["mode"] == "on" else ""
        lines.append(
            f"| {r['concurrency']} | {r['mode']} | {r['requests_per_s']:.3f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} "
            f"| {r['mean_batch_size']:.2f} | {r['server_cpu_s_per_request']:.2f} | {ratio} |"
        )
    return "\n".join(lines)


def stream_one(client: Any, url: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One streamed greedy request: time to first token, the gaps between streamed pieces (inter-token latency),
    end-to-end latency and the generated tokens (from ``usage``)."""
    import openai

    content = [{"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": url}}]
    t0 = time.perf_counter()
    times: list[float] = []
    tokens = 0
    try:
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": content}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                times.append(time.perf_counter())
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except openai.APIError as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "max_tokens": max_tokens}
    end = time.perf_counter()
    return {
        "ok": True,
        "max_tokens": max_tokens,
        "tokens": tokens,
        "ttft_s": (times[0] if times else end) - t0,
        "itl_s": [b - a for a, b in zip(times, times[1:])],
        "e2e_s": end - t0,
    }


def _lengths(output_lens: Sequence[int], n: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    lens = [output_lens[i % len(output_lens)] for i in range(n)]
    rng.shuffle(lens)
    return lens


def run_poisson(
    base: str, rate: float, num: int, output_lens: Sequence[int], urls: Sequence[str], seed: int = 0
) -> tuple[list[dict[str, Any]], float]:
    """``num`` requests arriving as a Poisson process of ``rate`` requests/s (each on its own thread), answer
    lengths drawn from ``output_lens``; returns the per-request records and the wall time."""
    import random

    import openai

    rng = random.Random(seed)
    gaps = [rng.expovariate(rate) for _ in range(num)]
    lens = _lengths(output_lens, num, seed)
    records: list[dict[str, Any]] = []
    lock = threading.Lock()
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=3600)

    def one(i: int) -> None:
        rec = stream_one(client, urls[i % len(urls)], f"Question {i}: what do you see in this picture?", lens[i])
        with lock:
            records.append(rec)

    threads = []
    t0 = time.perf_counter()
    due = t0
    for i in range(num):
        due += gaps[i]
        time.sleep(max(0.0, due - time.perf_counter()))
        t = threading.Thread(target=one, args=(i,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    return records, time.perf_counter() - t0


def run_closed(
    base: str, clients: int, num: int, output_lens: Sequence[int], urls: Sequence[str], seed: int = 0
) -> tuple[list[dict[str, Any]], float]:
    """``clients`` threads, each sending its next request when the previous answer is complete, ``num`` in all."""
    import openai

    lens = _lengths(output_lens, num, seed)
    records: list[dict[str, Any]] = []
    lock = threading.Lock()
    sent = {"n": 0}
    start = threading.Barrier(clients + 1)

    def worker() -> None:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=3600)
        start.wait()
        while True:
            with lock:
                i = sent["n"]
                if i >= num:
                    return
                sent["n"] += 1
            rec = stream_one(client, urls[i % len(urls)], f"Question {i}: what do you see in this picture?", lens[i])
            with lock:
                records.append(rec)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    return records, time.perf_counter() - t0


def summarize(records: list[dict[str, Any]], wall: float, short_len: int) -> dict[str, Any]:
    """vLLM benchmark_serving's metrics: requests/s, output tokens/s, TTFT / ITL / E2E p50 and p99, and the E2E
    p50 of the short requests (``max_tokens == short_len``)."""
    ok = [r for r in records if r["ok"]]
    itl = [g for r in ok for g in r["itl_s"]]
    short = [r["e2e_s"] for r in ok if r["max_tokens"] == short_len]
    return {
        "completed": len(ok),
        "errors": len(records) - len(ok),
        "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall > 0 else float("nan"),
        "output_tokens_per_s": sum(r["tokens"] for r in ok) / wall if wall > 0 else float("nan"),
        "ttft_p50_s": _percentile([r["ttft_s"] for r in ok], 0.5),
        "ttft_p99_s": _percentile([r["ttft_s"] for r in ok], 0.99),
        "itl_p50_s": _percentile(itl, 0.5),
        "itl_p99_s": _percentile(itl, 0.99),
        "e2e_p50_s": _percentile([r["e2e_s"] for r in ok], 0.5),
        "e2e_p99_s": _percentile([r["e2e_s"] for r in ok], 0.99),
        "short_e2e_p50_s": _percentile(short, 0.5),
    }


def engine_table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of a continuous-vs-static run."""
    lines = [
        "| load | scheduling | req/s | out tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | E2E p50 | E2E p99 "
        "| short E2E p50 | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['load']} | {r['scheduling']} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} "
            f"| {r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} | {r['itl_p50_s'] * 1000:.0f} ms "
            f"| {r['itl_p99_s'] * 1000:.0f} ms | {r['e2e_p50_s']:.2f} | {r['e2e_p99_s']:.2f} "
            f"| {r['short_e2e_p50_s']:.2f} | {r['errors']} |"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", default=None, help="tiny model folder (default: a temporary folder)")
    p.add_argument("--output-lens", default="8,256", help="answer lengths (max_tokens) the requests mix")
    p.add_argument("--clients", type=int, default=16, help="closed-loop clients (default: 16)")
    p.add_argument("--num-prompts", type=int, default=48, help="requests per closed-loop / Poisson run")
    p.add_argument(
        "--request-rate",
        type=float,
        default=None,
        help="Poisson arrivals per second (default: 60%% of the static server's closed-loop requests/s)",
    )
    p.add_argument("--max-num-seqs", type=int, default=16, help="rows decoding together, both servers (default 16)")
    p.add_argument("--batch-timeout-ms", type=float, default=50.0, help="the static server's companion window")
    p.add_argument("--images", type=int, default=4, help="distinct images the requests cycle through")
    p.add_argument("--experts", default="default", help="'default' (the tiny experts) or 'none'")
    p.add_argument("--server-threads", type=int, default=None, help="torch threads per server (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the rows and settings as JSON here")
    args = p.parse_args(argv)
    output_lens = [int(x) for x in args.output_lens.split(",")]
    short_len = min(output_lens)

    work = Path(args.tiny) if args.tiny else Path(tempfile.mkdtemp(prefix="moai-serve-bench-"))
    from moai_sdk.testing import build_tiny_experts, build_tiny_moai

    build_tiny_moai(work / "moai")  # once, before two servers would race to build it
    if args.experts != "none":
        build_tiny_experts(work / "experts")
    urls = image_urls(args.images)
    common = ["--experts", args.experts, "--max-queue", "4096", "--max-num-seqs", str(args.max_num_seqs)]
    common += ["--batch-timeout-ms", str(args.batch_timeout_ms)]
    rows: list[dict[str, Any]] = []

    def record(load: str, scheduling: str, records: list[dict[str, Any]], wall: float) -> dict[str, Any]:
        row = {"load": load, "scheduling": scheduling, **summarize(records, wall, short_len)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        return row

    servers: dict[str, ServerProcess] = {}
    try:
        for mode in ("static", "continuous"):
            flags = [*common, "--scheduling", mode]
            servers[mode] = ServerProcess(work, work / f"server-{mode}.log", flags, threads=args.server_threads)
            for url in urls:  # warm: experts run once per image, then come from the cache
                run_load(servers[mode].base, 1, 1, 2, [url])
        closed = f"closed loop, {args.clients} clients"
        static_closed = record(
            closed,
            "static",
            *run_closed(servers["static"].base, args.clients, args.num_prompts, output_lens, urls, args.seed),
        )
        record(
            closed,
            "continuous",
            *run_closed(servers["continuous"].base, args.clients, args.num_prompts, output_lens, urls, args.seed),
        )
        rate = args.request_rate or 0.6 * static_closed["requests_per_s"]
        load = f"Poisson {rate:.2f} req/s"
        for mode in ("static", "continuous"):
            record(load, mode, *run_poisson(servers[mode].base, rate, args.num_prompts, output_lens, urls, args.seed))
    finally:
        for server in servers.values():
            server.stop()
    print(engine_table(rows))
    by = {(r["load"], r["scheduling"]): r for r in rows}
    for load in dict.fromkeys(r["load"] for r in rows):
        s, c = by[(load, "static")], by[(load, "continuous")]
        print(
            f"{load}: continuous / static requests/s {c['requests_per_s'] / s['requests_per_s']:.2f}x; "
            f"TTFT p50 static / continuous {s['ttft_p50_s'] / c['ttft_p50_s']:.2f}x; short E2E p50 static / "
            f"continuous {s['short_e2e_p50_s'] / c['short_e2e_p50_s']:.2f}x"
        )
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        info = {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"settings": settings, "system": info, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
