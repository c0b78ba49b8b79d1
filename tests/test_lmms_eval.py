"""MoAI inside lmms-eval: the ``lmms_eval.models`` plugin entry point, and lmms-eval itself running a small local
task (a task YAML over local JSON and images) on the tiny model end to end."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import unwrap_generation_output

from moai_sdk.errors import InputError
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

MC_TASK_YAML = """task: moai_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function moai_tiny_utils.doc_to_visual
doc_to_text: !function moai_tiny_utils.doc_to_text
doc_to_choice: !function moai_tiny_utils.doc_to_choice
doc_to_target: "gold"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""

CHOICES = ["yes", "no", "a red cat", "Paris, France"]  # one to four tokens: continuations of different lengths

TASK_UTILS = """from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"] + "\\nAnswer the question using a single word or phrase."


def doc_to_choice(doc):
    return doc["choices"]


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


PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="module")
def lmms_run(tmp_path_factory):
    """lmms-eval run ONCE (``--batch_size 2``, through the plugin entry point) on two local tasks over the same
    three images: ``moai_tiny`` (generate_until) and ``moai_tiny_mc`` (multiple_choice, four choices per doc)."""
    tmp = tmp_path_factory.mktemp("lmms")
    tiny = tmp / "tiny"
    pipe = tiny_pipeline(tiny, experts=None)
    images = []
    for i, word in enumerate(["CAT", "DOG", "SUN"]):
        path = tmp / f"img{i}.png"
        demo_image(word, size=(96, 80)).save(path)
        images.append(path)
    docs = [{"image": str(p), "question": f"What is written? ({i})", "answer": "x"} for i, p in enumerate(images)]
    # the multiple-choice docs: scored directly first, so the gold index can be set to the most likely choice
    # (docs 0 and 2) or the least likely (doc 1): lmms-eval's acc then says which choice it picked
    direct = [
        pipe.score(images[i], d["question"] + PROMPT_SUFFIX, [" " + c for c in CHOICES]) for i, d in enumerate(docs)
    ]
    lps = [[c.logprob for c in r.continuations] for r in direct]
    mc_docs = [
        {**d, "choices": CHOICES, "gold": int(np.argmin(lps[i]) if i == 1 else np.argmax(lps[i]))}
        for i, d in enumerate(docs)
    ]
    data, mc_data = tmp / "data.jsonl", tmp / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    mc_data.write_text("".join(json.dumps(d) + "\n" for d in mc_docs))
    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / "moai_tiny.yaml").write_text(TASK_YAML.format(data=data))
    (tasks / "moai_tiny_mc.yaml").write_text(MC_TASK_YAML.format(data=mc_data))
    (tasks / "moai_tiny_utils.py").write_text(TASK_UTILS)
    out = tmp / "out"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "moai", "--model_args", f"tiny={tiny},experts=none"]
    cmd += ["--tasks", "moai_tiny,moai_tiny_mc", "--include_path", str(tasks), "--batch_size", "2"]
    cmd += ["--log_samples", "--output_path", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_entry_point_env(tmp), timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    results = [json.loads(p.read_text()) for p in out.rglob("*_results.json")]
    assert len(results) == 1, proc.stdout + proc.stderr

    def samples(task: str) -> dict[int, dict]:
        rows = [json.loads(line) for p in out.rglob(f"*_samples_{task}.jsonl") for line in p.read_text().splitlines()]
        return {r["doc_id"]: r for r in rows}

    return SimpleNamespace(
        pipe=pipe, images=images, docs=docs, mc_docs=mc_docs, direct=direct, lps=lps,
        results=results[0]["results"], samples=samples, log=proc.stdout + proc.stderr,
    )  # fmt: skip


@pytest.mark.slow
def test_lmms_eval_runs_moai_through_the_plugin_on_a_local_task(lmms_run):
    assert lmms_run.results["moai_tiny"]["match,none"] == 0.0  # random answers: no "x"
    by_doc = lmms_run.samples("moai_tiny")
    assert sorted(by_doc) == [0, 1, 2]
    # lmms-eval's answers are the pipeline's answers for the same image and prompt (batched through the pipeline)
    for i, doc in enumerate(lmms_run.docs):
        got = by_doc[i]["filtered_resps"]
        got = got[0] if isinstance(got, list) else got
        assert got == lmms_run.pipe(lmms_run.images[i], doc["question"] + PROMPT_SUFFIX, max_new_tokens=3).text


@pytest.mark.slow
def test_lmms_eval_multiple_choice_goes_through_pipe_score(lmms_run):
    by_doc = lmms_run.samples("moai_tiny_mc")
    assert sorted(by_doc) == [0, 1, 2]
    assert "moai loglikelihood" in lmms_run.log  # the progress bar of the batched loglikelihood
    for i, doc in enumerate(lmms_run.mc_docs):
        sample = by_doc[i]
        # one response per choice, in choice order: (value, is_greedy) with value = -logprob (lmms-eval's
        # multiple_choice takes the argmin, as its models return a loss); the samples log writes them as strings
        # (repr of the float: exact round trip)
        pairs = [(float(v), {"True": True, "False": False}[g]) for v, g in sample["filtered_resps"]]
        assert len(pairs) == len(CHOICES)
        direct = lmms_run.direct[i].continuations
        for (value, is_greedy), want in zip(pairs, direct, strict=True):
            # lmms-eval scored two prompts per pipe.score call (--batch_size 2: prompts left-padded to the longer
            # one) and this test one prompt per call: the float32 sums run over other shapes and differ in the last
            # bits (seen: up to 7e-7 relative, summed over a few tokens and layers); masked positions add exact
            # zeros, so 1e-5 relative bounds it with a wide margin, and a real difference (another prompt, image or
            # token) is far larger
            assert -value == pytest.approx(want.logprob, rel=1e-5, abs=1e-5)
            assert is_greedy == want.is_greedy
        # the choice lmms-eval picks is the argmax of pipe.score's logprobs: gold is the argmax for docs 0 and 2
        # (acc 1) and the argmin for doc 1 (acc 0); the arg-max/-min margins exceed the tolerance above
        lps = sorted(lmms_run.lps[i])
        assert lps[-1] - lps[-2] > 1e-3 and lps[1] - lps[0] > 1e-3
        picked = int(np.argmin([v for v, _ in pairs]))
        assert picked == int(np.argmax(lmms_run.lps[i]))
        assert sample["acc"] == (1.0 if i != 1 else 0.0)
    assert lmms_run.results["moai_tiny_mc"]["acc,none"] == pytest.approx(2 / 3)


def test_loglikelihood_keeps_request_order_and_shares_one_prefill_per_prompt():
    """In process, over a recording pipe.score: requests of two docs interleaved, one doc with two contexts;
    batch_size 2 -> prompts (doc, context) in first-appearance order, two per call, answers in request order."""
    calls = []

    class Scored:
        def __init__(self, ctx, cont):
            self.logprob, self.token_ids, self.is_greedy = -float(len(ctx) + len(cont)), [1] * len(cont), cont == " a"

    class Pipe:
        def score(self, images, prompts, continuations):
            calls.append((list(images), list(prompts), [list(c) for c in continuations]))
            return [
                SimpleNamespace(continuations=[Scored(p, c) for c in conts]) for p, conts in zip(prompts, continuations)
            ]

    docs = {0: "img0", 1: "img1"}
    model = MoAI(pipeline=Pipe(), batch_size=2)
    model.task_dict = {"t": {"test": docs}}
    visual = lambda doc: [doc]  # noqa: E731
    reqs = [("q0", " a", 0), ("q1", " a", 1), ("q0", " bb", 0), ("q0b", " a", 0), ("q1", " ccc", 1)]
    requests = [SimpleNamespace(args=(ctx, cont, visual, doc, "t", "test")) for ctx, cont, doc in reqs]
    out = [unwrap_generation_output(x)[0] for x in model.loglikelihood(requests)]  # as lmms-eval's evaluator reads
    assert calls == [
        (["img0", "img1"], ["q0", "q1"], [[" a", " bb"], [" a", " ccc"]]),
        (["img0"], ["q0b"], [[" a"]]),
    ]
    assert out == [(float(len(c) + len(t)), t == " a") for c, t, _ in reqs]  # -logprob, request order
    for mode, want in (("logprob", [(-4.0, True)]), ("mean_nll", [(2.0, True)])):  # -(2 + 2) / 2 tokens
        other = MoAI(pipeline=Pipe(), loglikelihood=mode)
        other.task_dict = model.task_dict
        assert [unwrap_generation_output(x)[0] for x in other.loglikelihood(requests[:1])] == want
    with pytest.raises(InputError, match="loglikelihood must be one of"):
        MoAI(pipeline=Pipe(), loglikelihood="loss")


def test_loglikelihood_without_pipe_score_is_a_clear_error(tmp_path):
    from moai_sdk.errors import DependencyError

    class NoScore:
        pass

    model = MoAI(pipeline=NoScore())
    if hasattr(NoScore, "score"):  # pragma: no cover
        pytest.skip("score exists")
    with pytest.raises(DependencyError, match="MoAIPipeline.score"):
        model.loglikelihood([type("R", (), {"args": ("ctx", " cont", None, 0, "t", "test")})()])
