"""Generation options: sampling with seeds, top-k/top-p, repetition penalty, EOS, stop strings, settings checks."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, assert_greedy_rows_agree, decided_argmax, official_inputs
from moai_sdk import GenerationError
from moai_sdk.modeling import GenerationSettings
from oracle_gates import UNPINNED_TOL

pytestmark = pytest.mark.numerics  # float comparisons: .ci/run reruns them under each ATEN_CPU_CAPABILITY


@pytest.fixture(scope="module")
def inputs(cases, cases_meta):
    return official_inputs("b_eval_template", cases, cases_meta)


@pytest.fixture(scope="module")
def greedy(tiny_model, inputs, cases):
    # exact tokens against the oracle without pinned gates: justified because every step of case b has a top-1
    # margin decided at UNPINNED_TOL, the float16-gate bound (oracle_gates.py; thinnest 2.2x it)
    assert bool(decided_argmax(cases["b_eval_template.decode_step_logits"], UNPINNED_TOL).all())
    tokens = tiny_model.generate(**inputs, max_new_tokens=12, eos_token_id=[], return_dict=True).new_tokens[0]
    assert tokens == cases["b_eval_template.new_tokens"][0].tolist()
    return tokens


@pytest.fixture(scope="module")
def processor_batch(cases_meta):
    """Cases a and b as one left-padded batch (prompt and verbalization padded)."""
    from moai_sdk import MoAIProcessor
    from test_modeling_batch import process

    batch = process(MoAIProcessor.from_pretrained(TINY), [cases_meta[n] for n in ("a_demo_full", "b_eval_template")])
    assert batch.attention_mask.min() == 0
    return batch


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
    out = tiny_model.generate(
        **inputs, max_new_tokens=12, do_sample=True, top_k=1, seed=3, eos_token_id=[], return_dict=True
    )
    assert out.new_tokens[0] == greedy


def test_tiny_top_p_sampling_is_greedy(tiny_model, inputs, greedy):
    out = tiny_model.generate(
        **inputs, max_new_tokens=12, do_sample=True, top_p=1e-6, seed=3, eos_token_id=[], return_dict=True
    )
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
    out = tiny_model.generate(
        **inputs, max_new_tokens=12, eos_token_id=[], stop=[stop], decode=tokenizer.decode, return_dict=True
    )
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

    s = GenerationSettings.from_any(
        GenerationConfig(max_new_tokens=7, num_beams=3, repetition_penalty=1.2), temperature=0.5
    )
    assert (s.max_new_tokens, s.num_beams, s.repetition_penalty, s.temperature) == (7, 3, 1.2, 0.5)


def test_generate_needs_an_image(tiny_model, inputs):
    with pytest.raises(GenerationError, match="image"):
        tiny_model.generate(inputs["input_ids"], aux_embeds=inputs["aux_embeds"], max_new_tokens=2)


def test_fixed_shape_steps_equal_growing_mask_steps(tiny_model, processor_batch, cases):
    """cuda_graphs=True decodes with fixed-shape steps (run without a graph off CUDA): same tokens and logits as
    the usual growing-mask steps, for a left-padded batch, greedy and seeded sampling."""
    kw = dict(max_new_tokens=10, eos_token_id=[], return_dict=True, output_logits=True)
    plain = tiny_model.generate(**processor_batch, **kw)
    fixed = tiny_model.generate(**processor_batch, cuda_graphs=True, **kw)
    # the two paths attend over differently shaped (masked) keys: float32 noise apart, bounded elementwise; tokens
    # compared wherever that noise cannot reorder the top two (conftest.assert_greedy_rows_agree)
    assert_greedy_rows_agree(fixed.new_tokens, plain.new_tokens, plain.step_logits, fixed.step_logits, 1e-5, 1e-5)
    # seeded sampling draws the same uniforms in both: a token changes only if one lands within ~1e-5 of a
    # boundary of the cumulative distribution (odds about 1e-5 per step)
    sample = dict(max_new_tokens=10, do_sample=True, temperature=1.3, seed=5, eos_token_id=[], return_dict=True)
    assert (
        tiny_model.generate(**processor_batch, cuda_graphs=True, **sample).new_tokens
        == tiny_model.generate(**processor_batch, **sample).new_tokens
    )
    # eos handling and beam search (which decodes without fixed shapes) keep working with the option on
    eos = plain.new_tokens[0][3]
    stopped = tiny_model.generate(
        **processor_batch, max_new_tokens=10, eos_token_id=eos, cuda_graphs=True, return_dict=True
    )
    assert (
        stopped.new_tokens
        == tiny_model.generate(**processor_batch, max_new_tokens=10, eos_token_id=eos, return_dict=True).new_tokens
    )
    beams = tiny_model.generate(
        **processor_batch, max_new_tokens=4, num_beams=2, cuda_graphs=True, eos_token_id=[], return_dict=True
    )
    assert (
        beams.new_tokens
        == tiny_model.generate(
            **processor_batch, max_new_tokens=4, num_beams=2, eos_token_id=[], return_dict=True
        ).new_tokens
    )


def test_fixed_shape_decoder_state(tiny_model, inputs):
    from moai_sdk.modeling.generation import FixedShapeDecoder
    from moai_sdk.modeling.internlm2 import KVCache

    with torch.inference_mode():
        cache = KVCache.allocate(tiny_model.config, 1, 1300, tiny_model.dtype, "cpu")
        for layer in cache.layers:  # what an uninitialised allocation may hold
            layer.key.fill_(float("nan"))
            layer.value.fill_(float("nan"))
        out = tiny_model(**inputs, cache=cache, last_logits_only=True)
        used = cache.length
        decoder = FixedShapeDecoder(tiny_model, cache, out.attention_mask)
        assert decoder.mask.shape == (1, 1300) and int(decoder.mask.sum()) == int(out.attention_mask.sum())
        token = out.logits[:, -1].argmax(-1)
        for _ in range(3):
            logits = decoder(token)
            assert torch.isfinite(logits).all()
            token = logits.argmax(-1)
        assert int(decoder.index) == used + 3 and int(decoder.mask[0, used:].sum()) == 3
        decoder.finish()
        assert cache.length == used + 3
        full = KVCache.allocate(tiny_model.config, 1, used, tiny_model.dtype, "cpu")
        tiny_model(**inputs, cache=full, last_logits_only=True)
        with pytest.raises(GenerationError, match="no room"):
            FixedShapeDecoder(tiny_model, full, out.attention_mask)


def test_fixed_shape_steps_fall_back_under_dynamic_rope_beyond_its_range(tiny_model, inputs, caplog, monkeypatch):
    from moai_sdk.modeling.generation import FixedShapeDecoder

    rotary = tiny_model.model.layers[0].attention.rotary
    assert FixedShapeDecoder.supported(tiny_model, 100)
    monkeypatch.setattr(rotary, "scaling_type", "dynamic")
    monkeypatch.setattr(rotary, "max_position_embeddings", 1000)
    assert not FixedShapeDecoder.supported(tiny_model, 1400)
    built = []
    monkeypatch.setattr(FixedShapeDecoder, "__init__", lambda self, *a: built.append(a))  # must not be used
    with caplog.at_level("INFO", logger="moai_sdk.modeling.generation"):
        out = tiny_model.generate(**inputs, max_new_tokens=3, eos_token_id=[], cuda_graphs=True, return_dict=True)
    assert len(out.new_tokens[0]) == 3 and built == []
    assert "dynamic RoPE scaling" in caplog.text
