"""Generation options: sampling with seeds, top-k/top-p, repetition penalty, EOS, stop strings, settings checks."""

from __future__ import annotations

import pytest

from conftest import TINY, official_inputs

from moai_sdk import GenerationError
from moai_sdk.modeling import GenerationSettings


@pytest.fixture(scope="module")
def inputs(cases, cases_meta):
    return official_inputs("b_eval_template", cases, cases_meta)


@pytest.fixture(scope="module")
def greedy(tiny_model, inputs, cases):
    tokens = tiny_model.generate(**inputs, max_new_tokens=12, eos_token_id=[], return_dict=True).new_tokens[0]
    assert tokens == cases["b_eval_template.new_tokens"][0].tolist()
    return tokens


@pytest.fixture(scope="module")
def tokenizer():
    from moai_sdk import MoAITokenizer

    return MoAITokenizer.from_pretrained(TINY)


def test_sampling_is_reproducible_with_a_seed(tiny_model, inputs):
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.5, eos_token_id=[], return_dict=True)
    a = tiny_model.generate(**inputs, seed=7, **kw).new_tokens
    b = tiny_model.generate(**inputs, seed=7, **kw).new_tokens
    c = tiny_model.generate(**inputs, seed=8, **kw).new_tokens
    assert a == b
    assert a != c


def test_top_k_one_sampling_is_greedy(tiny_model, inputs, greedy):
    out = tiny_model.generate(**inputs, max_new_tokens=12, do_sample=True, top_k=1, seed=3, eos_token_id=[], return_dict=True)
    assert out.new_tokens[0] == greedy


def test_tiny_top_p_sampling_is_greedy(tiny_model, inputs, greedy):
    out = tiny_model.generate(**inputs, max_new_tokens=12, do_sample=True, top_p=1e-6, seed=3, eos_token_id=[], return_dict=True)
    assert out.new_tokens[0] == greedy


def test_repetition_penalty_avoids_repeats(tiny_model, inputs, greedy):
    assert len(set(greedy)) < len(greedy)  # greedy repeats tokens in this case
    out = tiny_model.generate(**inputs, max_new_tokens=12, repetition_penalty=1e6, eos_token_id=[], return_dict=True)
    tokens = out.new_tokens[0]
    assert tokens != greedy
    assert len(set(tokens)) == len(tokens)
    prompt = set(inputs["input_ids"][0].tolist())
    assert not prompt & set(tokens)


def test_eos_stops_and_pads(tiny_model, inputs, greedy):
    eos = greedy[4]
    first = greedy.index(eos)
    out = tiny_model.generate(**inputs, max_new_tokens=12, eos_token_id=eos, pad_token_id=2, return_dict=True)
    assert out.new_tokens[0] == greedy[: first + 1]
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + first + 1


def test_stop_strings(tiny_model, inputs, greedy, tokenizer):
    text = tokenizer.decode(greedy[:3])
    stop = text[-2:]
    assert stop not in tokenizer.decode(greedy[:2])
    out = tiny_model.generate(**inputs, max_new_tokens=12, eos_token_id=[], stop=[stop], decode=tokenizer.decode, return_dict=True)
    assert out.new_tokens[0] == greedy[:3]
    with pytest.raises(GenerationError, match="decode"):
        tiny_model.generate(**inputs, max_new_tokens=3, stop=["x"])


def test_streamer_sees_every_step(tiny_model, inputs, greedy):
    seen = []
    tiny_model.generate(**inputs, max_new_tokens=12, eos_token_id=[], streamer=lambda ids: seen.append(int(ids[0])))
    assert seen == greedy


def test_generation_settings_validation_and_hf_config():
    with pytest.raises(GenerationError, match="max_new_tokens"):
        GenerationSettings.from_any(max_new_tokens=0)
    with pytest.raises(GenerationError, match="top_p"):
        GenerationSettings.from_any(top_p=1.5)
    with pytest.raises(GenerationError, match="unknown generation options"):
        GenerationSettings.from_any(num_beam=3)
    with pytest.raises(GenerationError, match="beam sampling"):
        GenerationSettings.from_any(num_beams=2, do_sample=True)
    from transformers import GenerationConfig

    s = GenerationSettings.from_any(GenerationConfig(max_new_tokens=7, num_beams=3, repetition_penalty=1.2), temperature=0.5)
    assert (s.max_new_tokens, s.num_beams, s.repetition_penalty, s.temperature) == (7, 3, 1.2, 0.5)


def test_generate_needs_an_image(tiny_model, inputs):
    with pytest.raises(GenerationError, match="image"):
        tiny_model.generate(inputs["input_ids"], aux_embeds=inputs["aux_embeds"], max_new_tokens=2)
