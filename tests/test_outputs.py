"""pipe(...) outputs for apps and harnesses: logprobs (raw distribution, typed), response_format (parsed
answers, constrained and free rows in one batch), n choices from one prefill that reproduce single seeded calls."""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

import pytest
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from moai_sdk.errors import GenerationError, InputError
from moai_sdk.results import MoAIResult, TokenLogprob
from moai_sdk.testing import demo_image, tiny_pipeline

TOL = 1e-4  # float32 log-softmax of the same logits, computed in two places: equal to ~1e-6


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("outputs"), experts=None)


@pytest.fixture(scope="module")
def image():
    return demo_image()


class Scene(BaseModel):
    """Bounded everywhere, so that even the random tiny model's answer completes within max_new_tokens."""

    kind: Literal["street", "room", "field"]
    count: int = Field(ge=0, le=99)
    tags: list[Annotated[str, Field(max_length=8)]] = Field(max_length=3)


def _step_logits(pipe, image, prompt, **options):
    """The raw float32 logits of every generation step (generate's output_logits) and the new tokens."""
    from moai_sdk.pipeline import _Timer

    rows = pipe._prepare(image, prompt, None, None, [], _Timer(pipe.device))
    inputs = rows.inputs
    out = pipe.model.generate(
        inputs.input_ids,
        pixel_values=inputs.pixel_values,
        attention_mask=inputs.attention_mask,
        aux_input_ids=inputs.aux_input_ids,
        aux_attention_mask=inputs.aux_attention_mask,
        panoptic_pixel_values=inputs.panoptic_pixel_values,
        return_dict=True,
        output_logits=True,
        **options,
    )
    return out.step_logits, out.new_tokens[0]


@pytest.mark.numerics
@pytest.mark.parametrize("k", [0, 3, 20])
def test_logprobs_are_the_raw_distribution_with_top_k(pipe, image, k):
    options = dict(max_new_tokens=6, do_sample=True, seed=3, temperature=0.7, repetition_penalty=1.3)
    result = pipe(image, "What is it?", logprobs=k, **options)
    steps, tokens = _step_logits(pipe, image, "What is it?", **options)
    assert tokens == result.new_token_ids and len(result.logprobs) == len(tokens)
    for entry, logits, token in zip(result.logprobs, steps, tokens):
        assert isinstance(entry, TokenLogprob) and entry.token_id == token
        logp = F.log_softmax(logits[0], -1)  # before penalty and temperature (vLLM's default)
        assert abs(entry.logprob - float(logp[token])) < TOL
        assert len(entry.top_logprobs) == k
        top = torch.topk(logp, k)
        assert [t.token_id for t in entry.top_logprobs] == top.indices.tolist()
        assert max((abs(t.logprob - v) for t, v in zip(entry.top_logprobs, top.values.tolist())), default=0) < TOL
        assert bytes(entry.bytes) == pipe.structured.vocab.tokens[token] or token in pipe.structured.vocab.special
    assert result.finish_reason in ("stop", "length")
    assert MoAIResult.from_json(result.to_json()).logprobs == result.logprobs


@pytest.mark.parametrize("bad", [-1, 21, 1.5, True, "3"])
def test_logprobs_bounds_are_generation_errors(pipe, image, bad):
    with pytest.raises(GenerationError, match="logprobs"):
        pipe(image, "x", logprobs=bad, max_new_tokens=2)


def test_pydantic_response_format_gives_a_validated_instance(pipe, image):
    result = pipe(image, "Describe the scene as JSON.", response_format=Scene, max_new_tokens=120)
    assert result.finish_reason == "stop"
    assert isinstance(result.parsed, Scene)
    assert Scene.model_validate_json(result.text) == result.parsed


def test_choice_regex_and_json_schema_forms(pipe, image):
    assert pipe(image, "Yes or no?", response_format={"choice": ["yes", "no"]}).parsed in ("yes", "no")
    r = pipe(image, "Code?", response_format={"regex": r"[0-9]{2}-[a-c]{3}"}, max_new_tokens=20)
    assert re.fullmatch(r"[0-9]{2}-[a-c]{3}", r.text)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 999}}, "required": ["n"]}
    r = pipe(image, "Count.", response_format=schema, max_new_tokens=60)
    assert isinstance(r.parsed, dict) and isinstance(json.loads(r.text)["n"], int)


def test_invalid_response_format_is_an_input_error_before_compute(pipe, image, monkeypatch):
    monkeypatch.setattr(pipe, "_prepare", lambda *a, **k: pytest.fail("computed before the check"))
    with pytest.raises(InputError, match="strnig"):
        pipe(image, "x", response_format={"type": "strnig"})


def test_constrained_and_free_rows_share_a_batch(pipe, image):
    from moai_sdk.pipeline import _Timer

    rows = pipe._prepare([image, image], ["a?", "b?"], None, None, [], _Timer(pipe.device))
    inputs = rows.inputs
    kw = dict(
        pixel_values=inputs.pixel_values,
        attention_mask=inputs.attention_mask,
        aux_input_ids=inputs.aux_input_ids,
        aux_attention_mask=inputs.aux_attention_mask,
        panoptic_pixel_values=inputs.panoptic_pixel_values,
        return_dict=True,
        max_new_tokens=12,
    )
    choice = pipe.structured.constraint({"choice": ["red", "blue disc"]})
    mixed = pipe.model.generate(inputs.input_ids, constraints=[choice, None], **kw)
    free = pipe.model.generate(inputs.input_ids, **kw)
    assert choice.is_terminated() and choice.text in ("red", "blue disc")
    assert mixed.new_tokens[1] == free.new_tokens[1]  # the free row decodes as without the other row's grammar


@pytest.mark.numerics
def test_n_choices_reproduce_single_seeded_calls_from_one_prefill(pipe, image, monkeypatch):
    options = dict(do_sample=True, seed=11, max_new_tokens=8, temperature=1.2)
    model = pipe.model
    prefills = []
    forward = type(model).forward

    def counting(self, *args, **kwargs):
        prefills.append(kwargs.get("image_features") is not None or kwargs.get("pixel_values") is not None)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", counting)
    choices = pipe(image, "Tell me.", n=3, logprobs=1, **options)
    assert sum(prefills) == 1
    monkeypatch.undo()
    assert [c.index for c in choices] == [0, 1, 2] and [c.seed for c in choices] == [11, 12, 13]
    for c in choices:
        single = pipe(image, "Tell me.", logprobs=1, **{**options, "seed": c.seed})
        assert single.new_token_ids == c.new_token_ids and single.text == c.text
        assert max(abs(a.logprob - b.logprob) for a, b in zip(single.logprobs, c.logprobs)) < TOL
    batch = pipe([image, image], ["a?", "b?"], n=2, max_new_tokens=4)
    assert [(r.prompt, r.index) for r in batch] == [("a?", 0), ("a?", 1), ("b?", 0), ("b?", 1)]
    assert batch[0].new_token_ids == batch[1].new_token_ids  # greedy choices agree
    with pytest.raises(GenerationError, match="n must be"):
        pipe(image, "x", n=0)
    with pytest.raises(GenerationError, match="num_beams=1"):
        pipe(image, "x", n=2, num_beams=2)
