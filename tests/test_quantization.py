"""bitsandbytes quantization modes on CPU: which modules are quantized, and that the model still generates."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, official_inputs, rel_err

pytest.importorskip("bitsandbytes")

from moai_sdk.modeling import MoAIForCausalLM
from moai_sdk.modeling.quantization import quantized_module_names


@pytest.fixture(scope="module")
def quantized_models():
    return {
        mode: MoAIForCausalLM.from_pretrained(TINY, device="cpu", quantization=mode)
        for mode in ("nf4", "nf4-lora", "int8", "official")
    }


def test_nf4_quantizes_exactly_the_main_llm_weights(quantized_models):
    names = quantized_module_names(quantized_models["nf4"])
    assert len(names) == 8 * 5  # 8 layers x (wqkv, wo, w1, w2, w3)
    assert all(n.endswith("Plora_main") and n.startswith("model.layers.") for n in names)
    assert set(names.values()) == {"nf4"}
    model = quantized_models["nf4"]
    # everything else stays a plain 16/32-bit tensor
    assert model.output.weight.dtype == torch.float32
    assert model.vision_proj[0].weight.dtype == torch.float32
    assert model.model.layers[7].attention.moai_CA_img_aux.linear_q[0].weight.dtype == torch.float32
    assert model.model.layers[0].attention.wqkv.Plora_A.weight.dtype == torch.float32
    assert model.model.layers[0].attention.wqkv.Plora_main.weight.dtype == torch.uint8


def test_official_mode_reproduces_the_official_skip_list(quantized_models):
    names = quantized_module_names(quantized_models["official"])
    # the official skip list keeps Plora_main, moai*, vision*, output: only the PLoRA adapters remain
    assert len(names) == 8 * 5 * 2
    assert all(n.endswith(("Plora_A", "Plora_B")) for n in names)
    assert not any("Plora_main" in n or "moai" in n or "vision" in n for n in names)


def test_nf4_lora_adds_the_plora_adapters(quantized_models):
    names = quantized_module_names(quantized_models["nf4-lora"])
    main = set(quantized_module_names(quantized_models["nf4"]))
    adapters = set(quantized_module_names(quantized_models["official"]))
    assert set(names) == main | adapters and len(names) == 8 * 5 * 3
    assert set(names.values()) == {"nf4"}
    model = quantized_models["nf4-lora"]
    assert model.model.layers[0].attention.wqkv.Plora_A.weight.dtype == torch.uint8
    assert model.output.weight.dtype == torch.float32 and model.vision_proj[0].weight.dtype == torch.float32


def test_int8_quantizes_main_weights(quantized_models):
    names = quantized_module_names(quantized_models["int8"])
    assert set(names.values()) == {"int8"} and len(names) == 40
    assert quantized_models["int8"].model.layers[0].feed_forward.w1.Plora_main.weight.dtype == torch.int8


@pytest.mark.parametrize("mode", ["nf4", "nf4-lora", "int8", "official"])
def test_quantized_models_generate(quantized_models, tiny_model, cases, cases_meta, mode):
    model = quantized_models[mode]
    inputs = official_inputs("a_demo_full", cases, cases_meta)
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1]
    assert torch.isfinite(logits).all()
    err = rel_err(logits, cases["a_demo_full.logits_last"])
    assert 1e-3 < err < 2.0  # lossy (this tiny oracle is very sensitive), but finite and related
    out = model.generate(**inputs, max_new_tokens=4, eos_token_id=[], return_dict=True)
    assert len(out.new_tokens[0]) == 4
    assert model.parameter_bytes() < tiny_model.parameter_bytes()


def test_parameter_bytes_shrink_in_expected_order(quantized_models, tiny_model):
    full = tiny_model.parameter_bytes()
    assert quantized_models["official"].parameter_bytes() < quantized_models["nf4"].parameter_bytes() < full
    assert quantized_models["nf4-lora"].parameter_bytes() < quantized_models["nf4"].parameter_bytes()
