"""Load test of ``moai serve``: dynamic batching on against off, at several concurrencies, in one run.

Usage::

    python -m benchmarks.serve                                   # tiny MoAI on CPU, concurrency 1, 4, 16
    python -m benchmarks.serve --max-tokens 16 --out benchmarks/results/serve-16.json

Two servers are started on 127.0.0.1 (``moai serve --tiny DIR``, same folder, same settings) -- ``on``
(``--max-batch-size`` 16, the default here) and ``off`` (``--max-batch-size 1``) -- and warmed with one request
per image (so the perception experts' results are cached, as for any image asked about twice: this measures the
serving and the language model, not the experts). Then for each concurrency ``c``, ``c`` client threads (the
official ``openai`` client, greedy, ``--max-tokens`` new tokens) send ``--requests`` requests in all, first to
``off`` then to ``on``. Reported per row: requests/s (completed / wall time), p50 and p95 latency (seconds, as the
client sees it), the mean batch size (rows per pipeline call, from the server's ``/metrics``) and the server
process's CPU seconds per request (all its threads; robust to other load on the machine, unlike wall time). The
last column is the requests/s of ``on`` over ``off`` at the same concurrency. ``--server-threads N`` sets torch's
threads in each server (``OMP_NUM_THREADS``); on a shared, oversubscribed machine ``1`` avoids OpenMP threads
waiting on each other.

Why the answer length matters on a CPU: a prompt is ~1,260 positions (1,225 of them image tokens), whose prefill
is compute-bound -- batching does not make it cheaper per row -- while each decoding step costs about the same for
16 rows as for one. Batching pays in proportion to the share of decoding in a request; ``--max-tokens 16`` shows
the prefill-bound end.
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


class ServerProcess:
    """``moai serve --tiny DIR`` in a subprocess (log in ``log``)."""

    def __init__(
        self,
        tiny: Path,
        log: Path,
        flags: Sequence[str],
        threads: Optional[int] = None,
        startup_s: float = 600.0,
        env: Optional[dict[str, str]] = None,
    ) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "moai_sdk.cli", "serve", "--tiny", str(tiny), "--port", str(self.port)]
        cmd += ["--log-level", "warning", *flags]
        self._log = open(log, "wb")  # closed in stop()
        self.log_path = log
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        if threads:  # torch's intra-op threads (OpenMP) in the server
            environment["OMP_NUM_THREADS"] = str(threads)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=environment)
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moai serve exited ({self.proc.returncode}); see {log}")
            try:
                if httpx.get(self.base + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"moai serve was not ready within {startup_s:.0f}s; see {log}")

    def metrics(self) -> str:
        return httpx.get(self.base + "/metrics", timeout=30).text

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far (all its threads, user + system)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


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


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", default=None, help="tiny model folder (default: a temporary folder)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=None, help="requests per run (default: max(8, 4 x concurrency))")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per answer (default: 128)")
    p.add_argument("--max-batch-size", type=int, default=16, help="of the batching server (default: 16)")
    p.add_argument("--batch-timeout-ms", type=float, default=50.0)
    p.add_argument("--images", type=int, default=4, help="distinct images the requests cycle through")
    p.add_argument("--experts", default="default", help="'default' (the tiny experts) or 'none'")
    p.add_argument("--server-threads", type=int, default=None, help="torch threads per server (default: torch's)")
    p.add_argument("--out", default=None, help="write the rows and settings as JSON here")
    args = p.parse_args(argv)

    work = Path(args.tiny) if args.tiny else Path(tempfile.mkdtemp(prefix="moai-serve-bench-"))
    from moai_sdk.testing import build_tiny_experts, build_tiny_moai

    build_tiny_moai(work / "moai")  # once, before two servers would race to build it
    if args.experts != "none":
        build_tiny_experts(work / "experts")
    urls = image_urls(args.images)
    common = ["--experts", args.experts, "--batch-timeout-ms", str(args.batch_timeout_ms), "--max-queue", "1024"]
    servers: dict[str, ServerProcess] = {}
    rows: list[dict[str, Any]] = []
    try:
        for mode, size in (("off", 1), ("on", args.max_batch_size)):
            flags = [*common, "--max-batch-size", str(size)]
            servers[mode] = ServerProcess(work, work / f"server-{mode}.log", flags, threads=args.server_threads)
            for url in urls:  # warm: experts run once per image, then come from the cache
                run_load(servers[mode].base, 1, 1, 2, [url])
        for c in args.concurrency:
            n = args.requests or max(8, 4 * c)
            for mode in ("off", "on"):
                server = servers[mode]
                row = run_load(server.base, c, n, args.max_tokens, urls, server.metrics, server.cpu_seconds)
                row["mode"] = mode
                rows.append(row)
                print(
                    f"c={c:<3} {mode:<3} {row['requests_per_s']:.3f} req/s  p50 {row['p50_s']:.2f}s  "
                    f"p95 {row['p95_s']:.2f}s  batch {row['mean_batch_size']:.2f}  "
                    f"cpu/req {row['server_cpu_s_per_request']:.2f}s  errors {len(row['errors'])}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        for server in servers.values():
            server.stop()
    print(table(rows))
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        info = {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"settings": settings, "system": info, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
