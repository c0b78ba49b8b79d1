"""pipe.score: one perception and one prefill per prompt, continuations scored from the copied cache, agreeing
with the forward passes generation runs (float32 log-softmax, 1e-4)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moai_sdk.errors import InputError
from moai_sdk.modeling.internlm2 import KVCache
from moai_sdk.modeling.scoring import score_continuations
from moai_sdk.results import ScoreResult
from moai_sdk.testing import demo_image, tiny_pipeline

# Bound: the reference below runs the same positions one token at a time; the scored forward runs all tokens of
# all continuations at once. Both are float32 over the same weights, only the matmul shapes and summation order
# differ: logits (|x| <~ 20 on the tiny model) agree to ~1e-6, a log-softmax to ~1e-5 and a sum over <= 8 tokens
# to well under 1e-4.
TOL = 1e-4


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("score"), experts=None)


def _inputs(pipe, prompts):
    rows = pipe._prepare([demo_image()] * len(prompts), prompts, None, None, [], _timer(pipe))
    return rows.inputs.to(pipe.model.device)


def _timer(pipe):
    from moai_sdk.pipeline import _Timer

    return _Timer(pipe.device)


@torch.inference_mode()
def _encoded(pipe, inputs):
    model = pipe.model
    aux, aux_mask = model.build_aux_embeds(
        inputs.aux_input_ids, inputs.panoptic_pixel_values, inputs.aux_attention_mask
    )
    return model.encode_images(inputs.pixel_values), model.compress(aux, aux_mask)


@torch.inference_mode()
def _reference(pipe, inputs, encoded, row, ids):
    """Prefill the prompt alone, then feed the continuation one token at a time through the cache (the steps
    generation runs); the log-softmax of each step's float32 logits at the next token."""
    model = pipe.model
    sl = slice(row, row + 1)
    feats, comp = encoded[0][sl], encoded[1][sl]
    cache = KVCache.allocate(model.config, 1, inputs.input_ids.shape[1] + 1300 + len(ids), model.dtype, model.device)
    out = model(
        inputs.input_ids[sl],
        attention_mask=inputs.attention_mask[sl],
        im_mask=inputs.im_mask[sl],
        lang_mask=inputs.lang_mask[sl],
        image_features=feats,
        compressed_aux=comp,
        cache=cache,
        last_logits_only=True,
    )
    logits, mask, lps, greedy = out.logits[:, -1].float(), out.attention_mask, [], True
    for t in ids:
        lp = F.log_softmax(logits, -1)[0]
        lps.append(float(lp[t]))
        greedy = greedy and int(lp.argmax()) == t
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), 1)
        logits = (
            model(torch.tensor([[t]]), attention_mask=mask, cache=cache, last_logits_only=True).logits[:, -1].float()
        )
    return lps, greedy


@pytest.mark.numerics
def test_score_agrees_with_the_generation_forward_passes(pipe):
    prompts = ["What is in the image?", "Describe the colours, please."]
    conts = [["yes", "a red square and a blue disc"], ["red", ""]]
    results = pipe.score([demo_image()] * 2, prompts, continuations=conts)
    assert [type(r) for r in results] == [ScoreResult, ScoreResult]
    inputs = _inputs(pipe, prompts)
    encoded = _encoded(pipe, inputs)
    for i, r in enumerate(results):
        assert [c.text for c in r.continuations] == conts[i]
        for c in r.continuations:
            assert c.token_ids == pipe.tokenizer.encode_continuation(c.text)
            ref, greedy = _reference(pipe, inputs, encoded, i, c.token_ids)
            assert len(c.token_logprobs) == len(ref)
            assert max((abs(a - b) for a, b in zip(c.token_logprobs, ref)), default=0.0) < TOL
            assert abs(c.logprob - sum(ref)) < TOL
            assert c.is_greedy == greedy
    empty = results[1].continuations[1]
    assert empty.token_ids == [] and empty.logprob == 0.0 and empty.is_greedy


@pytest.mark.numerics
def test_greedy_answer_is_greedy_and_scores_its_generation_logits(pipe):
    inputs = _inputs(pipe, ["What is written here?"])
    model = pipe.model
    out = model.generate(
        inputs.input_ids,
        pixel_values=inputs.pixel_values,
        attention_mask=inputs.attention_mask,
        aux_input_ids=inputs.aux_input_ids,
        aux_attention_mask=inputs.aux_attention_mask,
        panoptic_pixel_values=inputs.panoptic_pixel_values,
        max_new_tokens=6,
        eos_token_id=[],
        return_dict=True,
        output_logits=True,
    )
    ids = out.new_tokens[0]
    feats = model.encode_images(inputs.pixel_values)
    aux, aux_mask = model.build_aux_embeds(
        inputs.aux_input_ids, inputs.panoptic_pixel_values, inputs.aux_attention_mask
    )
    other = [ids[0], (ids[1] + 1) % model.config.vocab_size]
    (scored,) = score_continuations(
        model,
        inputs.input_ids,
        inputs.attention_mask,
        [[ids, other]],
        image_features=feats,
        compressed_aux=model.compress(aux, aux_mask),
    )
    expected = [float(F.log_softmax(step[0], -1)[t]) for step, t in zip(out.step_logits, ids)]
    assert scored[0].is_greedy and max(abs(a - b) for a, b in zip(scored[0].token_logprobs, expected)) < TOL
    assert not scored[1].is_greedy


def test_one_perception_and_one_prefill_per_prompt(pipe, monkeypatch):
    model = pipe.model
    calls = {"vision": 0, "prefill": 0, "forward": 0}
    encode, forward = model.encode_images, type(model).forward

    def counting_encode(pixels):
        calls["vision"] += pixels.shape[0]
        return encode(pixels)

    def counting_forward(self, *args, **kwargs):
        calls["forward"] += 1
        calls["prefill"] += kwargs.get("image_features") is not None
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(model, "encode_images", counting_encode)
    monkeypatch.setattr(type(model), "forward", counting_forward)
    pipe.score([demo_image()] * 2, ["a?", "b?"], continuations=[["x", "yy", "zzz"], ["w", "v"]])
    # the vision tower sees each image and each panoptic map once; one batched prefill; one forward of the
    # five continuations
    assert calls == {"vision": 4, "prefill": 1, "forward": 2}


def test_shared_continuations_and_typed_errors(pipe):
    shared = pipe.score([demo_image()] * 2, ["a?", "b?"], continuations=["yes", "no"])
    assert [[c.text for c in r.continuations] for r in shared] == [["yes", "no"]] * 2
    with pytest.raises(InputError, match="list of strings"):
        pipe.score(demo_image(), "a?", continuations="yes")
    with pytest.raises(InputError, match="must be a str"):
        pipe.score(demo_image(), "a?", continuations=["yes", 3])
    with pytest.raises(InputError, match="lists of continuations"):
        pipe.score([demo_image()] * 2, ["a?", "b?"], continuations=[["x"], ["y"], ["z"]])
    with pytest.raises(InputError, match="context window"):
        pipe.score(demo_image(), "a?", continuations=["word " * 5000])
