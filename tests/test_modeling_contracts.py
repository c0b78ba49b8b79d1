"""The model's named parts and the one-place checks other layers rely on (quantization, attention, devices)."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, official_inputs, rel_err
from moai_sdk import ConfigError
from moai_sdk.devices import DTYPE_NAMES, parse_dtype, resolve_device, resolve_dtype, synchronize
from moai_sdk.modeling import (
    ATTN_IMPLEMENTATIONS,
    QUANTIZATION_MODES,
    MoAIForCausalLM,
    check_attn_implementation,
    check_quantization,
)
from moai_sdk.modeling.compressor import MoAICompressor, PerceiverResampler
from moai_sdk.modeling.mixer import MoAIMixer


def test_quantization_and_attention_checks():
    for mode in QUANTIZATION_MODES:
        assert check_quantization(mode) == mode
    for name in ATTN_IMPLEMENTATIONS:
        assert check_attn_implementation(name) == name
    with pytest.raises(ConfigError, match="quantization must be one of") as info:
        check_quantization("int3")
    assert isinstance(info.value, ValueError)  # callers catching ValueError keep working
    with pytest.raises(ConfigError, match="attn_implementation must be 'sdpa' or 'eager'"):
        check_attn_implementation("flash")
    with pytest.raises(ConfigError, match="attn_implementation"):
        MoAIForCausalLM.from_pretrained(TINY, device="cpu", attn_implementation="flash")


def test_dtype_names_devices_and_synchronize():
    assert parse_dtype("FP16") is torch.float16 and parse_dtype("torch.bfloat16") is torch.bfloat16
    assert all(parse_dtype(name) is dtype for name, dtype in DTYPE_NAMES.items())
    assert parse_dtype(torch.float32) is torch.float32
    with pytest.raises(ConfigError, match="unsupported normalize_dtype"):
        parse_dtype("int8", what="normalize_dtype")
    with pytest.raises(ConfigError, match="unsupported dtype"):
        parse_dtype(torch.int64)
    cpu = resolve_device("cpu")
    assert resolve_dtype("auto", cpu) is torch.float32 and resolve_dtype("bf16", cpu) is torch.bfloat16
    synchronize(cpu)  # CPU work is synchronous: nothing to wait for, and no error
    synchronize("cpu")


def test_mixers_and_compressor_are_reachable_by_name(tiny_model):
    config = tiny_model.config
    mixers = tiny_model.mixers
    assert len(mixers) == len(config.mixer_layer_indices) >= 1
    assert all(isinstance(m, MoAIMixer) for m in mixers)
    for index, mixer in zip(config.mixer_layer_indices, mixers):
        attention = tiny_model.model.layers[index].attention
        assert attention.mixer is mixer
        # the mixer's weights are the official ``attention.moai_*`` entries, not a second copy
        assert attention.moai_GA_img is mixer.moai_GA_img
    keys = tiny_model.state_dict().keys()
    assert not any(".mixer." in k for k in keys)
    assert any(k.startswith(f"model.layers.{config.mixer_layer_indices[0]}.attention.moai_CA_img_aux.") for k in keys)
    assert tiny_model.compressor is tiny_model.moai_compressor
    assert isinstance(tiny_model.compressor, MoAICompressor) and PerceiverResampler is MoAICompressor


def test_attention_implementations_agree(tiny_model, cases, cases_meta):
    inputs = official_inputs("b_eval_template", cases, cases_meta)
    with torch.no_grad():
        sdpa = tiny_model(**inputs).logits[:, -1]
        tiny_model.set_attn_implementation("eager")
        try:
            assert {layer.attention.attn_implementation for layer in tiny_model.model.layers} == {"eager"}
            eager = tiny_model(**inputs).logits[:, -1]
        finally:
            tiny_model.set_attn_implementation("sdpa")
    assert rel_err(eager, sdpa) < 1e-5


def test_aux_key_mask_marks_only_verbalization_padding(tiny_model):
    text_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    mask = tiny_model.aux_key_mask(text_mask, 4 + 3)
    assert mask.dtype == torch.bool and mask.shape == (2, 7)
    assert mask.tolist() == [[False, False, True, True, True, True, True], [True] * 7]
