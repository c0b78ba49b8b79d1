"""MoAI inside lmms-eval: the ``lmms_eval.models`` plugin entry point, and lmms-eval itself running a small local
task (a task YAML over local JSON and images) on the tiny model end to end."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

from moai_sdk.integrations.lmms_eval import MoAI, generation_options
from moai_sdk.testing import demo_image, tiny_pipeline

TASK_YAML = """task: moai_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function moai_tiny_utils.doc_to_visual
doc_to_text: !function moai_tiny_utils.doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 3
  num_beams: 1
  do_sample: false
process_results: !function moai_tiny_utils.process_results
metric_list:
  - metric: match
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""

TASK_UTILS = """from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"] + "\\nAnswer the question using a single word or phrase."


def process_results(doc, results):
    return {"match": float(results[0].strip().lower() == doc["answer"])}
"""


def test_generation_kwargs_map_to_pipeline_options():
    assert generation_options({"max_new_tokens": 8, "temperature": 0, "num_beams": 3, "until": ["\n\n"]}) == {
        "stop": ["\n\n"],
        "max_new_tokens": 8,
        "num_beams": 3,
    }
    assert generation_options({"temperature": 0.7, "top_p": 0.9}) == {
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
    }
    assert generation_options({"until": "###"}) == {"stop": ["###"]}


def _entry_point_env(tmp_path: Path) -> dict[str, str]:
    """The environment for a subprocess that finds moai's ``lmms_eval.models`` entry point: the installed one, or
    (when this checkout is newer than the installed metadata) a dist-info that declares the same entry point."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    if any(ep.name == "moai" for ep in md.entry_points(group="lmms_eval.models")):
        return env
    info = tmp_path / "ep" / "moai_sdk_lmms_entry-0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: moai-sdk-lmms-entry\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[lmms_eval.models]\nmoai = moai_sdk.integrations.lmms_eval:manifest\n")
    env["PYTHONPATH"] = os.pathsep.join([str(info.parent), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.slow
def test_lmms_eval_runs_moai_through_the_plugin_on_a_local_task(tmp_path):
    tiny = tmp_path / "tiny"
    pipe = tiny_pipeline(tiny, experts=None)
    images = []
    for i, word in enumerate(["CAT", "DOG", "SUN"]):
        path = tmp_path / f"img{i}.png"
        demo_image(word, size=(96, 80)).save(path)
        images.append(path)
    data = tmp_path / "data.jsonl"
    docs = [{"image": str(p), "question": f"What is written? ({i})", "answer": "x"} for i, p in enumerate(images)]
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "moai_tiny.yaml").write_text(TASK_YAML.format(data=data))
    (tasks / "moai_tiny_utils.py").write_text(TASK_UTILS)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "moai", "--model_args", f"tiny={tiny},experts=none"]
    cmd += ["--tasks", "moai_tiny", "--include_path", str(tasks), "--batch_size", "2", "--log_samples"]
    cmd += ["--output_path", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_entry_point_env(tmp_path), timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    results = [json.loads(p.read_text()) for p in out.rglob("*_results.json")]
    assert results and results[0]["results"]["moai_tiny"]["match,none"] == 0.0  # random answers: no "x"
    samples = [json.loads(line) for p in out.rglob("*moai_tiny*.jsonl") for line in p.read_text().splitlines()]
    assert len(samples) == 3
    # lmms-eval's answers are the pipeline's answers for the same image and prompt (batched through the pipeline)
    by_doc = {s["doc_id"]: s["filtered_resps"] for s in samples}
    by_doc = {k: v[0] if isinstance(v, list) else v for k, v in by_doc.items()}
    for i, doc in enumerate(docs):
        expected = pipe(images[i], doc["question"] + "\nAnswer the question using a single word or phrase.",
                        max_new_tokens=3)  # fmt: skip
        assert by_doc[i] == expected.text


def test_loglikelihood_without_pipe_score_is_a_clear_error(tmp_path):
    from moai_sdk.errors import DependencyError

    class NoScore:
        pass

    model = MoAI(pipeline=NoScore())
    if hasattr(NoScore, "score"):  # pragma: no cover
        pytest.skip("score exists")
    with pytest.raises(DependencyError, match="MoAIPipeline.score"):
        model.loglikelihood([type("R", (), {"args": ("ctx", " cont", None, 0, "t", "test")})()])
