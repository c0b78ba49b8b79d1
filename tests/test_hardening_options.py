"""Generation options: one typed validation (types, finiteness, ranges, bool is not an int, seed range, stop strings,
beam count) and the context-window bound, checked before any compute."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moai_sdk import GenerationError, InputError
from moai_sdk.modeling.generation import MAX_NEW_TOKENS_LIMIT, MAX_NUM_BEAMS, GenerationSettings

BAD_OPTIONS = [
    ({"temperature": "0.7"}, "temperature must be a number"),
    ({"temperature": math.nan, "do_sample": True}, "temperature must be a finite number"),
    ({"temperature": math.inf}, "finite"),
    ({"top_p": math.nan}, "top_p must be a finite"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"repetition_penalty": math.nan}, "repetition_penalty must be a finite"),
    ({"repetition_penalty": 0}, "repetition_penalty must be > 0"),
    ({"length_penalty": -math.inf}, "length_penalty must be a finite"),
    ({"num_beams": 2.0}, "num_beams must be an integer"),
    ({"num_beams": MAX_NUM_BEAMS + 1}, "num_beams must be between 1 and"),
    ({"num_beams": True}, "num_beams must be an integer"),
    ({"max_new_tokens": True}, "max_new_tokens must be an integer"),
    ({"max_new_tokens": 10**9}, "max_new_tokens must be between 1 and"),
    ({"max_new_tokens": 0}, "max_new_tokens must be between 1"),
    ({"max_new_tokens": 3.0}, "max_new_tokens must be an integer"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"top_k": 1.5}, "top_k must be an integer"),
    ({"seed": 2**64}, "seed must be between 0 and"),
    ({"seed": -1}, "seed must be between 0 and"),
    ({"seed": "7"}, "seed must be an integer"),
    ({"do_sample": 1}, "do_sample must be True or False"),
    ({"do_sample": "yes"}, "do_sample must be True or False"),
    ({"stop": ""}, "stop strings must not be empty"),
    ({"stop": ["ok", ""]}, "stop strings must not be empty"),
    ({"stop": [1]}, "stop must be a string or a list of strings"),
    ({"stop": "\ud800"}, "not valid Unicode"),
    ({"eos_token_id": -5}, "eos_token_id must be >= 0"),
    ({"eos_token_id": [2, "x"]}, "eos_token_id must be an integer"),
    ({"pad_token_id": 1.0}, "pad_token_id must be an integer"),
    ({"num_beams": 2, "do_sample": True}, "beam sampling"),
]


@pytest.mark.parametrize("options, message", BAD_OPTIONS, ids=[repr(o) for o, _ in BAD_OPTIONS])
def test_bad_options_raise_generation_error_naming_the_option(options, message):
    with pytest.raises(GenerationError, match=message):
        GenerationSettings.from_any(None, **options)


def test_valid_options_are_normalised():
    s = GenerationSettings.from_any(
        None,
        max_new_tokens=np.int64(5),
        temperature=1,
        top_p=np.float32(0.5),
        seed=2**64 - 1,
        stop="END",
        do_sample=np.True_,
    )
    assert type(s.max_new_tokens) is int and s.max_new_tokens == 5
    assert type(s.temperature) is float and s.top_p == 0.5 and s.do_sample is True
    assert s.stop == ["END"] and s.seed == 2**64 - 1
    assert GenerationSettings.from_any(None, eos_token_id=[]).eos_token_id == []  # never stop at EOS
    assert MAX_NEW_TOKENS_LIMIT >= 2**20


def test_window_bounds_max_new_tokens():
    with pytest.raises(GenerationError, match="the model's context window"):
        GenerationSettings(max_new_tokens=4097).validate(window=4096)
    assert GenerationSettings(max_new_tokens=4096).validate(window=4096).max_new_tokens == 4096


def _inputs(tiny_model, prompt_len: int):
    n = tiny_model.config.structure.image_size
    ids = torch.full((1, prompt_len), 5, dtype=torch.long)
    ids[0, 0] = 1
    ids[0, 1] = tiny_model.config.image_token_id
    return {"input_ids": ids, "pixel_values": torch.zeros(1, 3, n, n)}


def test_generate_refuses_a_request_beyond_the_window_before_compute(tiny_model, monkeypatch):
    window = tiny_model.config.context_window
    n_image = tiny_model.config.structure.num_patches
    assert window == tiny_model.config.max_position_embeddings  # no RoPE scaling in the tiny config

    def no_forward(*args, **kwargs):
        raise AssertionError("the model ran although the request cannot fit")

    monkeypatch.setattr(tiny_model, "forward", no_forward)
    prompt_len = 10
    too_many = window - (prompt_len - 1) - n_image + 1
    with pytest.raises(InputError) as info:
        tiny_model.generate(**_inputs(tiny_model, prompt_len), max_new_tokens=too_many)
    text = str(info.value)
    assert f"prompt {prompt_len - 1} tokens" in text and f"image {n_image:,}" in text
    assert f"context window is {window:,}" in text
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        tiny_model.generate(**_inputs(tiny_model, prompt_len), max_new_tokens=1, eos_token_id=10**6)


def test_context_window_includes_rope_scaling_factor(tiny_model):
    cfg = tiny_model.config.copy()
    cfg.rope_scaling = {"type": "dynamic", "factor": 2.0}
    assert cfg.context_window == 2 * cfg.max_position_embeddings


@pytest.mark.parametrize(
    "ids, mask, message",
    [
        (torch.ones(5, dtype=torch.long), None, "2-D integer tensor"),
        (torch.ones(1, 5), None, "2-D integer tensor"),
        ([[1, 2]], None, "2-D integer tensor"),
        (torch.ones(1, 0, dtype=torch.long), None, "empty"),
        (torch.ones(1, 5, dtype=torch.long), torch.ones(1, 4, dtype=torch.long), "shape of input_ids"),
    ],
)
def test_generate_checks_its_tensors(tiny_model, ids, mask, message):
    n = tiny_model.config.structure.image_size
    with pytest.raises(InputError, match=message):
        tiny_model.generate(ids, pixel_values=torch.zeros(1, 3, n, n), attention_mask=mask, max_new_tokens=1)
