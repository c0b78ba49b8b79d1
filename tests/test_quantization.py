"""bitsandbytes quantization modes on CPU: which modules are quantized, and that the model still generates."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import TINY, official_inputs, rel_err

pytest.importorskip("bitsandbytes")

from moai_sdk.modeling import MoAIForCausalLM
from moai_sdk.modeling.quantization import quantized_module_names


@pytest.fixture(scope="module")
def quantized_and_dequantized():
    """Each mode's model and ``{quantized linear: its dequantized float32 weight}``, taken right after loading:
    the first forward may repack the 4-bit weights for the CPU kernel (bitsandbytes on AVX512-BF16) and moves
    LLM.int8's row scales, after which the stored tensors no longer dequantize this way."""
    out = {}
    for mode in ("nf4", "nf4-lora", "int8", "official"):
        model = MoAIForCausalLM.from_pretrained(TINY, device="cpu", quantization=mode)
        names = quantized_module_names(model)
        out[mode] = (model, {name: _dequantized_weight(model.get_submodule(name)) for name in names})
    return out


@pytest.fixture(scope="module")
def quantized_models(quantized_and_dequantized):
    return {mode: model for mode, (model, _) in quantized_and_dequantized.items()}


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


def _dequantized_weight(module: torch.nn.Module) -> torch.Tensor:
    """The float32 weight a bitsandbytes linear stands for: NF4 codes times their (double-quantized) block absmax,
    or LLM.int8's int8 rows times row absmax / 127."""
    import bitsandbytes as bnb

    w = module.weight
    if isinstance(w, bnb.nn.Params4bit):
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    return w.data.float() * w.SCB.float()[:, None] / 127


def _dequantized_model(tiny_model, weights):
    """The float32 model with every quantized linear's weight replaced by its dequantized weight."""
    reference = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for name, weight in weights.items():
            reference.get_submodule(name).weight.copy_(weight)
    return reference


# NF4: bitsandbytes' CPU kernels multiply with the dequantized weight: the generic one holds it in float16 (the
# weights are cast to float16 before quantizing, moai_sdk.modeling.quantization; unit roundoff 4.9e-4, measured
# 1.9e-4), the one for AVX512-BF16 CPUs (whole 64-wide blocks) computes in bfloat16 (unit roundoff 3.9e-3,
# measured 3.3e-3): the bound is twice bfloat16's unit roundoff. int8 (LLM.int8, threshold 6): the activations are
# int8-quantized per row too, each element rounded by up to absmax / 254, so the product is within about 1/127
# of the dequantized-weight product (measured 5.2e-3). Random outputs of the same norm are at 1.4.
LINEAR_BOUND = {"nf4": 2**-7, "nf4-lora": 2**-7, "official": 2**-7, "int8": 2 / 127}


@pytest.mark.numerics
@pytest.mark.parametrize("mode", ["nf4", "nf4-lora", "int8", "official"])
def test_each_quantized_linear_multiplies_by_its_dequantized_weight(quantized_and_dequantized, mode):
    model, weights = quantized_and_dequantized[mode]
    gen = torch.Generator().manual_seed(0)
    for name, weight in weights.items():
        module = model.get_submodule(name)
        x = torch.randn(2, 5, module.in_features, generator=gen)
        with torch.no_grad():
            out = module(x)
        reference = torch.nn.functional.linear(x, weight, module.bias)
        assert rel_err(out, reference) < LINEAR_BOUND[mode], name


# Whole model against the float32 model holding the same dequantized weights: only the kernels' arithmetic differs
# (the per-linear bounds above), amplified through 8 layers of this tiny random oracle, which is very sensitive
# (measured on the last logits: nf4 0.008, official 0.043, nf4-lora 0.081, int8 0.29). The bounds keep about 3x
# (nf4 modes) and 2x (int8) margin and stay far below random logits of the same norm (1.35); the quantized model
# also differs from the unquantized one (0.63-0.87 here), so a mode that quantized nothing would fail too.
MODEL_BOUND = {"nf4": 0.25, "nf4-lora": 0.25, "official": 0.25, "int8": 0.6}


@pytest.mark.numerics
@pytest.mark.parametrize("mode", ["nf4", "nf4-lora", "int8", "official"])
def test_quantized_models_generate(quantized_and_dequantized, tiny_model, cases, cases_meta, mode):
    model, weights = quantized_and_dequantized[mode]
    inputs = official_inputs("a_demo_full", cases, cases_meta)
    reference = _dequantized_model(tiny_model, weights)
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1]
        expected = reference(**inputs).logits[:, -1]
    assert torch.isfinite(logits).all()
    assert rel_err(logits, expected) < MODEL_BOUND[mode]
    assert rel_err(logits, cases["a_demo_full.logits_last"]) > 0.1  # the weights really are quantized
    out = model.generate(**inputs, max_new_tokens=4, eos_token_id=[], return_dict=True)
    assert len(out.new_tokens[0]) == 4
    assert model.parameter_bytes() < tiny_model.parameter_bytes()


def test_parameter_bytes_shrink_in_expected_order(quantized_models, tiny_model):
    full = tiny_model.parameter_bytes()
    assert quantized_models["official"].parameter_bytes() < quantized_models["nf4"].parameter_bytes() < full
    assert quantized_models["nf4-lora"].parameter_bytes() < quantized_models["nf4"].parameter_bytes()
