"""``moai batch`` locally: inputs, the crash-safe output, the local runner (errors, resume after SIGKILL), video."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moai_sdk import InputError
from moai_sdk.batch import OutputWriter, read_inputs, read_rows, run
from moai_sdk.batch.inputs import image_source
from moai_sdk.batch.output import journal_path, read_journal
from moai_sdk.testing import build_tiny_experts, demo_image, tiny_pipeline

GEN = {"max_new_tokens": 4}


def light_experts(root: Path) -> dict:
    """A tiny segmentation expert (masks -> the panoptic map) and the real offline OCR: cheap, yet both kinds."""
    spec = build_tiny_experts(root / "experts")
    return {"segmentation": spec["segmentation"], "ocr": spec["ocr"]}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("batch-tiny")


@pytest.fixture(scope="module")
def pipe(tiny_root):
    return tiny_pipeline(tiny_root, experts=light_experts(tiny_root))


def write_images(folder: Path, n: int, *, corrupt: bool = False) -> list[str]:
    """``n`` small distinct pictures (some in a sub-folder) and, with ``corrupt``, one file that is no image."""
    ids = []
    for i in range(n):
        rel = f"{i:02d}.png" if i % 3 else f"sub/{i:02d}.jpg"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        demo_image(f"A{i}", size=(72 + 4 * i, 64)).save(folder / rel)
        ids.append(rel)
    if corrupt:
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing an image decoder can use")
        ids.append("broken.png")
    return sorted(ids)


def strip_timings(rows: list[dict]) -> list[dict]:
    """Rows without the wall-clock columns (timings differ from run to run)."""
    return [{k: v for k, v in r.items() if k != "timings"} for r in rows]


# ------------------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------------------


def test_folder_is_read_recursively_with_relative_ids(tmp_path):
    ids = write_images(tmp_path, 4)
    (tmp_path / "notes.txt").write_text("not an image")
    inputs = read_inputs(tmp_path, prompt="Q?")
    items = list(inputs)
    assert inputs.kind == "folder" and inputs.total == 4
    assert [it.id for it in items] == ids and "sub/00.jpg" in ids
    assert all(it.prompt == "Q?" and Path(it.image).is_file() for it in items)
    with pytest.raises(InputError, match="--prompt"):
        read_inputs(tmp_path)
    with pytest.raises(InputError, match="--every samples videos"):
        read_inputs(tmp_path, prompt="Q?", every=2)


def test_manifests_carry_columns_and_resolve_every_image_form(tmp_path):
    img = tmp_path / "pics" / "a.png"
    img.parent.mkdir()
    demo_image("X", size=(64, 64)).save(img)
    raw = img.read_bytes()
    b64 = base64.b64encode(raw).decode()
    records = [
        {"id": "r1", "image": "pics/a.png", "prompt": "one?", "label": "yes"},
        {"id": 2, "image": "data:image/png;base64," + b64, "label": "no"},
        {"id": "r3", "image": b64, "prompt": "three?", "label": "no", "extra": 1.5},
        {"id": "r4", "image": "https://example.org/x.png", "prompt": "four?", "label": "yes"},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    items = list(read_inputs(manifest, prompt="default?"))
    assert [it.id for it in items] == ["r1", "2", "r3", "r4"]
    assert items[0].image == str(img) and items[0].extra == {"label": "yes"}
    assert items[1].image == raw and items[1].prompt == "default?"
    assert items[2].image == raw and items[2].extra == {"label": "no", "extra": 1.5}
    assert items[3].image == "https://example.org/x.png"

    csv_path = tmp_path / "m.csv"
    csv_path.write_text("image,prompt,label\npics/a.png,q?,yes\n")
    (item,) = read_inputs(csv_path)
    assert (item.id, item.image, item.extra) == ("0", str(img), {"label": "yes"})

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["p"], "image": [raw], "prompt": ["q?"], "label": ["no"]}), tmp_path / "m.parquet")
    (item,) = read_inputs(tmp_path / "m.parquet")
    assert item.image == raw and item.extra == {"label": "no"}


def test_manifest_mistakes_are_input_errors(tmp_path):
    def manifest(*records):
        path = tmp_path / "bad.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
        return path

    with pytest.raises(InputError, match="twice"):
        read_inputs(manifest({"id": 1, "image": "a.png"}, {"id": 1, "image": "b.png"}), prompt="q")
    with pytest.raises(InputError, match="'answer'.*rename"):
        read_inputs(manifest({"image": "a.png", "answer": "yes"}), prompt="q")
    with pytest.raises(InputError, match="no 'image' column"):
        read_inputs(manifest({"picture": "a.png"}), prompt="q")
    with pytest.raises(InputError, match="no 'prompt'"):
        read_inputs(manifest({"image": "a.png"}))
    (tmp_path / "notes.txt").write_text("a.png")
    with pytest.raises(InputError, match="suffix"):
        read_inputs(tmp_path / "notes.txt", prompt="q")
    assert image_source("missing/file.png", tmp_path) == str(tmp_path / "missing/file.png")


# ------------------------------------------------------------------------------------------------------------
# output: journal, atomic finalize, resume
# ------------------------------------------------------------------------------------------------------------


def test_a_torn_journal_write_loses_only_that_batch_and_resume_repairs_it(tmp_path):
    out = tmp_path / "o.jsonl"
    w = OutputWriter(out)
    w.append([{"id": "a", "answer": "x"}, {"id": "b", "answer": "y"}])
    with journal_path(out).open("ab") as fh:  # a batch whose write was cut off by SIGKILL
        fh.write(b'{"id": "c", "answer": "z"}\n{"id": "d", "ans')
    assert not out.exists()  # nothing but the journal until the run ends
    rows, _ = read_journal(journal_path(out))
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    with pytest.raises(InputError, match="--resume"):
        OutputWriter(out)
    w = OutputWriter(out, resume=True)
    assert w.done_ids == {"a", "b", "c"}
    w.append([{"id": "d", "answer": "w"}])
    w.finalize()
    assert [r["id"] for r in read_rows(out)] == ["a", "b", "c", "d"]
    assert not journal_path(out).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_parquet_output_unites_columns_and_resumes_from_a_finished_file(tmp_path):
    out = tmp_path / "o.parquet"
    w = OutputWriter(out)
    w.append([{"id": "a", "timings": {"load": 1.0, "total": 2.0}, "label": 1}])
    w.append([{"id": "b", "timings": {"total": 3.0}, "label": "two", "extra": None}])
    w.finalize()
    rows = read_rows(out)
    assert [r["id"] for r in rows] == ["a", "b"]
    assert rows[1]["timings"] == {"load": None, "total": 3.0}  # a struct: absent keys read back as null
    assert [r["label"] for r in rows] == ["1", '"two"']  # mixed types: written as JSON text
    w = OutputWriter(out, resume=True)
    assert w.done_ids == {"a", "b"}
    w.append([{"id": "c", "timings": {"total": 1.0}, "label": 3}])
    w.finalize()
    assert [r["id"] for r in read_rows(out)] == ["a", "b", "c"]
    with pytest.raises(InputError, match="suffix"):
        OutputWriter(tmp_path / "o.csv")


# ------------------------------------------------------------------------------------------------------------
# the local runner
# ------------------------------------------------------------------------------------------------------------


def test_local_rows_equal_single_calls_and_a_corrupt_image_is_one_error_row(tmp_path, pipe):
    ids = write_images(tmp_path / "in", 4, corrupt=True)
    out = tmp_path / "answers.jsonl"
    stats = run(
        tmp_path / "in",
        out,
        prompt="What is written?",
        pipeline=pipe,
        generation=GEN,
        batch_size=3,
        save_perception=True,
        progress=False,
    )
    rows = read_rows(out)
    assert [r["id"] for r in rows] == ids and stats["rows"] == 5 and stats["errors"] == 1
    bad = next(r for r in rows if r["id"] == "broken.png")
    assert bad["answer"] is None and "InputError" in bad["error"] and "broken.png" in bad["error"]
    for row in rows:
        if row["id"] == "broken.png":
            continue
        single = pipe(str(tmp_path / "in" / row["id"]), "What is written?", **GEN)
        assert row["error"] is None
        assert row["answer"] == single.text and row["verbalization"] == single.aux_text
        assert row["token_counts"] == single.token_counts
        assert set(row["timings"]) >= {"vision", "prefill", "decode", "total"}
        assert json.loads(row["perception"])["sources"] == json.loads(single.perception.to_json())["sources"]
    assert list(rows[0])[:7] == ["id", "prompt", "answer", "verbalization", "token_counts", "timings", "error"]


# `moai batch` (the default continuous runner: rows go through the engine, whose perception worker prepares each row
# with `MoAIPipeline.prepare`) whose third row's preparation never returns: rows 1 and 2 finish and are journaled,
# row 3 can never be admitted, so the process is certain to be alive with exactly two rows in its journal when the
# test kills it (no race between the journal check and the kill on a fast CPU).
HOLD_THIRD_CALL = """
import sys, threading
from pathlib import Path
from moai_sdk.pipeline import MoAIPipeline

calls, original = [], MoAIPipeline.prepare

def held(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        Path(sys.argv[1]).write_text("held")
        threading.Event().wait()
    return original(self, *args, **kwargs)

MoAIPipeline.prepare = held
from moai_sdk.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow  # a subprocess run killed mid-way; the journal and resume logic are tested in process above
def test_sigkill_then_resume_gives_the_uninterrupted_file(tmp_path, tiny_root, pipe):
    ids = write_images(tmp_path / "in", 5)
    experts = json.dumps(light_experts(tiny_root))
    killed = tmp_path / "killed.jsonl"
    held = tmp_path / "held"
    cmd = [
        sys.executable,
        "-c",
        HOLD_THIRD_CALL,
        str(held),
        "batch",
        str(tmp_path / "in"),
        str(killed),
        "--prompt",
        "Q?",
        "--tiny",
        str(tiny_root),
        "--experts",
        experts,
        "--max-new-tokens",
        "4",
        "--batch-size",
        "1",
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = journal_path(killed)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if held.exists() and journal.exists() and journal.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # held in its third call
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not killed.exists()  # the output is written only when a run ends: never half a file
    before, _ = read_journal(journal)
    assert len(before) == 2  # the two rows answered before the kill, each journaled before the next started

    resumed = run(
        tmp_path / "in", killed, prompt="Q?", pipeline=pipe, generation=GEN, batch_size=2, resume=True, progress=False
    )
    assert resumed["skipped"] == len(before) and resumed["rows"] == 5 - len(before)
    reference = tmp_path / "reference.jsonl"
    run(tmp_path / "in", reference, prompt="Q?", pipeline=pipe, generation=GEN, batch_size=5, progress=False)
    final = read_rows(killed)
    assert [r["id"] for r in final] == ids  # every id exactly once, in input order
    assert strip_timings(final) == strip_timings(read_rows(reference))


# ------------------------------------------------------------------------------------------------------------
# video
# ------------------------------------------------------------------------------------------------------------


def write_video(path: Path, seconds: int = 5, fps: int = 4) -> None:
    """A synthetic video whose frame k is a flat grey of brightness 10 * k."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.qscale = 1
        for k in range(seconds * fps):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 10 * k, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_video_is_sampled_every_n_seconds_at_the_expected_timestamps(tmp_path, pipe):
    video = tmp_path / "clip.mp4"
    write_video(video)  # 5 s, 4 fps
    inputs = read_inputs(video, prompt="Describe.", every=1.5)
    items = list(inputs)
    assert inputs.kind == "video" and inputs.total == 4
    assert [it.id for it in items] == ["0.000", "1.500", "3.000", "4.500"]
    # the frame on screen at T is frame floor(4 T): 0, 6, 12, 18
    assert [it.extra["frame_time"] for it in items] == [0.0, 1.5, 3.0, 4.5]
    for it, k in zip(items, (0, 6, 12, 18)):
        assert it.image.shape == (48, 64, 3) and abs(float(it.image.mean()) - 10 * k) < 4
    out = tmp_path / "video.jsonl"
    run(video, out, prompt="Describe.", every=2.5, pipeline=pipe, generation=GEN, progress=False)
    rows = read_rows(out)
    assert [(r["id"], r["timestamp"]) for r in rows] == [("0.000", 0.0), ("2.500", 2.5)]
    assert all(r["error"] is None and isinstance(r["answer"], str) for r in rows)


def test_cli_batch_and_score_end_to_end(tmp_path, tiny_root, capsys):
    from moai_sdk.cli import main

    img = tmp_path / "a.png"
    demo_image("Y", size=(64, 64)).save(img)
    manifest = tmp_path / "q.jsonl"
    rows = [
        {"id": "q1", "image": "a.png", "prompt": "Is there a cat?", "label": "yes"},
        {"id": "q2", "image": base64.b64encode(img.read_bytes()).decode(), "prompt": "A dog?", "label": "no"},
        {"id": "q3", "image": "https://example.org/cat.png", "prompt": "A cow?", "label": "no"},
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.parquet"
    argv = ["batch", str(manifest), str(out), "--tiny", str(tiny_root), "--experts", "none", "--max-new-tokens", "3"]
    assert main(argv + ["--no-progress"]) == 0
    assert "3 rows written (1 with an error" in capsys.readouterr().err
    got = read_rows(out)
    assert [(r["id"], r["label"]) for r in got] == [("q1", "yes"), ("q2", "no"), ("q3", "no")]
    assert got[0]["error"] is None and got[1]["error"] is None
    assert "--allow-remote-images" in got[2]["error"]  # nothing is fetched unless asked
    assert got[0]["verbalization"] == "   "  # no experts: the official empty verbalization
    assert main(["score", str(out), "--task", "pope", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n"] == 2 and "1 row(s) with an error" in captured.err
    assert main(argv) == 1  # the output exists: refused without --resume / --overwrite
    assert "--resume" in capsys.readouterr().err
