"""``moai batch --ray``: a local Ray (2 CPUs, started once for this module) against the local runner.

The Ray runner must write the local runner's rows (greedy answers, verbalizations, token counts, perception),
and a model actor killed mid-run must neither lose nor duplicate rows.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from moai_sdk.batch import read_rows, run
from moai_sdk.batch.output import journal_path, read_journal
from moai_sdk.batch.predictors import MoAIPredictor
from moai_sdk.testing import build_tiny_experts, demo_image, tiny_pipeline

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

GEN = {"max_new_tokens": 4}
PROMPT = "What is written in the image?"


#: Seconds one Ray test may take before it is failed (a stalled cluster must not stall CI).
TEST_LIMIT_S = 900


@pytest.fixture(autouse=True)
def bounded():
    """Fail a test that runs past TEST_LIMIT_S instead of letting it hang."""

    def expire(signum, frame):
        raise TimeoutError(f"Ray test ran past {TEST_LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_LIMIT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A dozen images, the tiny pipeline's settings, and the local runner's rows for them."""
    root = tmp_path_factory.mktemp("ray-batch")
    spec = build_tiny_experts(root / "tiny" / "experts")
    options = {"experts": {"segmentation": spec["segmentation"], "ocr": spec["ocr"]}}
    images = root / "images"
    images.mkdir()
    for i in range(12):
        demo_image(f"R{i}", size=(64 + 6 * i, 64)).save(images / f"{i:02d}.png")
    (images / "zz-broken.png").write_bytes(b"GIF89a and no image after it")
    pipe = tiny_pipeline(root / "tiny", **options)
    local = root / "local.jsonl"
    run(images, local, prompt=PROMPT, pipeline=pipe, generation=GEN, batch_size=4, save_perception=True, progress=False)
    return {"root": root, "images": images, "options": options, "local": read_rows(local)}


def comparable(rows):
    """Rows without wall-clock timings (the perception JSON without its per-expert seconds)."""
    out = []
    for r in rows:
        r = {k: v for k, v in r.items() if k != "timings"}
        if r.get("perception"):
            p = json.loads(r["perception"])
            p.pop("timings")
            r["perception"] = p
        out.append(r)
    return out


def close(a, b, rel: float = 1e-4) -> bool:
    """Equal JSON values, floats within ``rel``."""
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=rel)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, rel) for x, y in zip(a, b))
    return a == b


def ray_run(setup, images, output, **kwargs):
    return run(
        images,
        output,
        prompt=PROMPT,
        tiny=setup["root"] / "tiny",
        pipeline_options=setup["options"],
        generation=GEN,
        ray=True,
        num_gpus_per_actor=0,
        num_cpus_per_actor=0.5,
        progress=False,
        **kwargs,
    )


def test_ray_rows_equal_the_local_runner_rows(ray_cluster, setup, tmp_path):
    out = tmp_path / "ray.jsonl"
    # OCR in its own CPU stage, as on a GPU cluster: perception -> OCR -> LLM, three actor pools
    stats = ray_run(setup, setup["images"], out, batch_size=4, cpu_experts=["ocr"], save_perception=True)
    rows = read_rows(out)
    assert stats["rows"] == 13 and stats["errors"] == 1
    assert [r["id"] for r in rows] == [r["id"] for r in setup["local"]]
    for got, want in zip(comparable(rows), comparable(setup["local"])):
        assert list(got) == list(want)
        for key in want:
            if key == "perception" and want[key] is not None:
                # OCR confidences come from onnxruntime, whose sums depend on its thread count (1 in a Ray
                # worker, 2 here): equal to ~1e-6, everything else exactly
                assert close(got[key], want[key]), (got["id"], key)
            else:
                assert got[key] == want[key], (got["id"], key)
    assert all(r["error"] is None for r in rows if r["id"] != "zz-broken.png")
    assert {"expert.mask2former", "expert.rapidocr", "prefill", "decode"} <= set(rows[0]["timings"])


class HeldPredictor(MoAIPredictor):
    """The LLM stage, whose second call on an actor writes ``MARKER`` (its pid) and then blocks until ``GATE``
    exists. Set both on the class before the run: the class travels to the actors by value (see the test)."""

    MARKER = ""
    GATE = ""

    def __call__(self, batch):
        self._calls = getattr(self, "_calls", 0) + 1
        if self._calls == 2 and not os.path.exists(self.GATE):
            Path(self.MARKER).write_text(str(os.getpid()))
            while not os.path.exists(self.GATE):
                time.sleep(0.05)
        return super().__call__(batch)


def _held_actors() -> list[dict]:
    """The cluster's actor table rows of the held LLM stage (Ray Data names the actors after the class)."""
    from ray._private import state

    return [a for a in state.actors().values() if "HeldPredictor" in str(a.get("ActorClassName"))]


def _wait(condition, what: str, limit_s: float = 600.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not seen within {limit_s} s")
        time.sleep(0.05)


def test_an_actor_killed_mid_run_loses_and_duplicates_no_row(ray_cluster, setup, tmp_path, monkeypatch):
    """The LLM actor is killed while it provably holds a batch: its second call blocks until the test opens the
    gate, which the test opens only after killing it. The rerun batches (on the rebuilt actor) and the rows still
    to come must each be written exactly once."""
    from ray import cloudpickle

    from moai_sdk.batch import ray_runner

    images = tmp_path / "six"
    images.mkdir()
    for name in sorted(os.listdir(setup["images"]))[:6]:
        shutil.copy(setup["images"] / name, images / name)
    out = tmp_path / "killed.jsonl"
    journal = journal_path(out)
    marker, gate = tmp_path / "held.pid", tmp_path / "gate"
    monkeypatch.setattr(HeldPredictor, "MARKER", str(marker))
    monkeypatch.setattr(HeldPredictor, "GATE", str(gate))
    monkeypatch.setattr(ray_runner, "MoAIPredictor", HeldPredictor)
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)  # the actors cannot import this test module
    killed: dict = {}

    def killer():
        try:
            _wait(marker.exists, "the held second call")
            pid = int(marker.read_text())
            live = [int(a["Pid"]) for a in _held_actors() if a.get("State") == "ALIVE"]
            killed.update(written=len(read_journal(journal)[0]), alive=live)
            os.kill(pid, signal.SIGKILL)
            killed["pid"] = pid
        finally:
            gate.touch()  # the rebuilt actor (or, on a failure above, the held one) goes on

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        stats = ray_run(setup, images, out, batch_size=1)
    finally:
        cloudpickle.unregister_pickle_by_value(module)
        gate.touch()
    thread.join(timeout=5)
    assert killed.get("pid") in killed["alive"], killed  # the held process was the live LLM actor
    # rows come back in input order and the second one's call never returned: at most the first was written (Ray
    # Data may hold it back until the task's other batches are done)
    assert killed["written"] <= 1
    assert max(a["NumRestarts"] for a in _held_actors()) >= 1  # Ray rebuilt the killed actor (and reran its batch)
    rows = read_rows(out)
    assert [r["id"] for r in rows] == sorted(os.listdir(images))  # each id exactly once
    assert stats["rows"] == 6
    local = {r["id"]: r for r in comparable(setup["local"])}
    assert [{k: v for k, v in r.items() if k != "perception"} for r in comparable(rows)] == [
        {k: v for k, v in local[r["id"]].items() if k != "perception"} for r in rows
    ]


def test_ray_resume_skips_rows_already_written(ray_cluster, setup, tmp_path):
    out = tmp_path / "resume.jsonl"
    first = setup["local"][:10]
    from moai_sdk.batch import OutputWriter

    w = OutputWriter(out)
    w.append(first)  # as if an earlier run had written these before it was killed
    stats = ray_run(setup, setup["images"], out, batch_size=4, resume=True)
    assert stats["skipped"] == 10 and stats["rows"] == 3
    rows = read_rows(out)
    assert [r["id"] for r in rows] == [r["id"] for r in setup["local"]]
    assert [r["answer"] for r in rows] == [r["answer"] for r in setup["local"]]


def test_the_predictors_work_in_a_users_own_map_batches(ray_cluster, setup):
    from moai_sdk.batch import MoAIPredictor, PipelineSpec

    spec = PipelineSpec(tiny=str(Path(setup["root"]) / "tiny"), options=setup["options"])
    items = [
        {"image": str(setup["images"] / r["id"]), "prompt": PROMPT, "label": i}
        for i, r in enumerate(setup["local"][:2])
    ]
    ds = ray.data.from_items(items).map_batches(
        MoAIPredictor,
        fn_constructor_kwargs={"pipeline": spec, "generation": GEN},
        batch_size=2,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.5,
        batch_format="numpy",
    )
    out = ds.take_all()
    assert [o["label"] for o in out] == [0, 1]
    assert [o["answer"] for o in out] == [r["answer"] for r in setup["local"][:2]]
    assert json.loads(out[0]["token_counts"]) == setup["local"][0]["token_counts"]
