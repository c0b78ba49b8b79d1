"""CUDA checks (marked ``cuda``; skipped without a GPU): parity with the moai-tiny oracle in float32, float16
and quantized generation, the CUDA-only attention and decoding paths, and the 7B-shape benchmark builder.

Run on a GPU machine with ``python -m pytest -m cuda tests/test_cuda.py`` (``benchmarks/gpu_check.sh`` does).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CASE_NAMES, TINY, official_inputs, rel_err

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOL = 1e-3


@pytest.fixture(scope="module")
def no_tf32():
    """Full float32 matmuls and convolutions (TF32 off) for the parity checks; restored afterwards."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.fixture(scope="module")
def cuda_fp32(no_tf32):
    from moai_sdk.modeling import MoAIForCausalLM

    return MoAIForCausalLM.from_pretrained(TINY, device="cuda", dtype="float32")


@pytest.fixture(scope="module")
def processor():
    from moai_sdk import MoAIProcessor

    return MoAIProcessor.from_pretrained(TINY)


def _raw_inputs(processor, metas):
    images = [np.array(Image.open(TINY / m["image_files"][0])) for m in metas]
    maps = [np.array(Image.open(TINY / m["panoptic_map_files"][0])) for m in metas]
    return processor(
        images,
        [m["prompt"][0] for m in metas],
        [m["verbalization"][0]["aux"] for m in metas],
        maps,
        template=["chat" if m["template"] != "demo" else "demo" for m in metas],
    )


@pytest.mark.parametrize("name", CASE_NAMES)
def test_float32_parity_with_the_oracle(cuda_fp32, cases, cases_meta, name):
    inputs = official_inputs(name, cases, cases_meta)
    with torch.no_grad():
        out = cuda_fp32(**inputs)
    assert out.logits.device.type == "cuda"
    assert rel_err(out.image_features, cases[f"{name}.image_features"]) < TOL
    assert rel_err(out.compressed_aux, cases[f"{name}.compressed_aux"]) < TOL
    assert rel_err(out.logits[:, -1], cases[f"{name}.logits_last"]) < TOL
    text = torch.gather(
        out.logits.cpu(), 1, cases[f"{name}.text_positions"][..., None].expand(-1, -1, out.logits.shape[-1])
    )
    assert rel_err(text, cases[f"{name}.logits_text_positions"]) < TOL
    gen = cuda_fp32.generate(**inputs, max_new_tokens=12, eos_token_id=[], return_dict=True, output_logits=True)
    assert gen.new_tokens == cases[f"{name}.new_tokens"].tolist()
    assert rel_err(torch.stack(gen.step_logits, 1), cases[f"{name}.decode_step_logits"]) < TOL


def test_float32_reference_mode_agrees_on_cuda(cuda_fp32, cases, cases_meta):
    inputs = official_inputs("a_demo_full", cases, cases_meta)
    with torch.no_grad():
        fast = cuda_fp32(**inputs).logits
        cuda_fp32.set_mixer_mode("reference")
        for layer in cuda_fp32.model.layers:
            layer.attention.attn_implementation = "eager"
        try:
            ref = cuda_fp32(**inputs).logits
        finally:
            cuda_fp32.set_mixer_mode("batched")
            for layer in cuda_fp32.model.layers:
                layer.attention.attn_implementation = "sdpa"
    assert rel_err(fast, ref) < 1e-4


def test_padded_batch_equals_single_rows_on_cuda(cuda_fp32, processor, cases_meta):
    """Left padding takes the masked CUDA attention paths (keys repeated per head at prefill, grouped query
    rows while decoding) and the lagged end-of-generation check."""
    metas = [cases_meta[n] for n in ("a_demo_full", "b_eval_template")]
    batch = _raw_inputs(processor, metas)
    assert batch.attention_mask.min() == 0
    gen_b = cuda_fp32.generate(**batch, max_new_tokens=8, eos_token_id=[], return_dict=True, output_logits=True)
    for i, meta in enumerate(metas):
        gen_s = cuda_fp32.generate(
            **_raw_inputs(processor, [meta]), max_new_tokens=8, eos_token_id=[], return_dict=True, output_logits=True
        )
        assert gen_b.new_tokens[i] == gen_s.new_tokens[0]
        for step_b, step_s in zip(gen_b.step_logits, gen_s.step_logits):
            assert rel_err(step_b[i], step_s[0]) < TOL


def test_lagged_stop_check_gives_the_same_tokens(cuda_fp32, processor, cases_meta, monkeypatch):
    from moai_sdk.modeling import generation

    metas = [cases_meta[n] for n in ("a_demo_full", "b_eval_template")]
    inputs = _raw_inputs(processor, metas)
    free = cuda_fp32.generate(**inputs, max_new_tokens=10, eos_token_id=[], return_dict=True).new_tokens
    eos = free[0][4]  # row 0 stops at step 5 at the latest; row 1 wherever it meets that id
    lagged = cuda_fp32.generate(**inputs, max_new_tokens=10, eos_token_id=eos, return_dict=True)
    original = generation._AllFinishedFlag
    monkeypatch.setattr(generation, "_AllFinishedFlag", lambda device: original(device, lagged=False))
    immediate = cuda_fp32.generate(**inputs, max_new_tokens=10, eos_token_id=eos, return_dict=True)
    assert lagged.new_tokens == immediate.new_tokens
    assert torch.equal(lagged.sequences, immediate.sequences)
    assert lagged.new_tokens[0][-1] == eos and len(lagged.new_tokens[0]) <= 5


def _count_replays(monkeypatch) -> dict[str, int]:
    """Count CUDA graph captures and replays made by the fixed-shape decoder."""
    from moai_sdk.modeling import generation

    counts = {"captured": 0, "replayed": 0}
    original_capture = generation.FixedShapeDecoder._capture_and_run

    def capture(self):
        logits = original_capture(self)
        counts["captured"] += self.graph is not None
        return logits

    original_call = generation.FixedShapeDecoder.__call__

    def call(self, tokens):
        counts["replayed"] += self.graph is not None
        return original_call(self, tokens)

    monkeypatch.setattr(generation.FixedShapeDecoder, "_capture_and_run", capture)
    monkeypatch.setattr(generation.FixedShapeDecoder, "__call__", call)
    return counts


def test_cuda_graph_decoding_matches_plain_decoding(cuda_fp32, processor, cases_meta, monkeypatch):
    counts = _count_replays(monkeypatch)
    inputs = _raw_inputs(processor, [cases_meta[n] for n in ("a_demo_full", "b_eval_template")])
    kw = dict(max_new_tokens=10, eos_token_id=[], return_dict=True, output_logits=True)
    plain = cuda_fp32.generate(**inputs, **kw)
    graphed = cuda_fp32.generate(**inputs, cuda_graphs=True, **kw)
    assert counts == {"captured": 1, "replayed": 7}  # step 1 warms up, step 2 is captured, 3..9 replay
    assert graphed.new_tokens == plain.new_tokens
    for a, b in zip(graphed.step_logits, plain.step_logits):
        assert rel_err(a, b) < TOL
    eos = plain.new_tokens[0][4]
    stop = dict(max_new_tokens=10, eos_token_id=eos, return_dict=True)
    assert (
        cuda_fp32.generate(**inputs, cuda_graphs=True, **stop).new_tokens
        == cuda_fp32.generate(**inputs, **stop).new_tokens
    )


def test_cuda_graph_decoding_with_nf4(cases, cases_meta, monkeypatch):
    """bitsandbytes' 4-bit kernels inside a captured graph: captured, replayed, same tokens as without."""
    pytest.importorskip("bitsandbytes")
    from moai_sdk.modeling import MoAIForCausalLM

    counts = _count_replays(monkeypatch)
    model = MoAIForCausalLM.from_pretrained(TINY, device="cuda", dtype="float16", quantization="nf4")
    inputs = official_inputs("a_demo_full", cases, cases_meta)
    plain = model.generate(**inputs, max_new_tokens=12, eos_token_id=[], return_dict=True)
    graphed = model.generate(**inputs, max_new_tokens=12, eos_token_id=[], cuda_graphs=True, return_dict=True)
    assert counts["captured"] == 1 and counts["replayed"] == 9
    assert graphed.new_tokens == plain.new_tokens


def test_float16_generation(processor, cases, cases_meta):
    from moai_sdk.modeling import MoAIForCausalLM

    model = MoAIForCausalLM.from_pretrained(TINY, device="cuda", dtype="float16")
    assert model.dtype == torch.float16 and model.load_info["device"].startswith("cuda")
    inputs = official_inputs("a_demo_full", cases, cases_meta)
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1].float()
    assert torch.isfinite(logits).all()
    assert (
        rel_err(logits, cases["a_demo_full.logits_last"]) < 0.25
    )  # the tiny oracle is very sensitive (CPU fp16: 0.07)
    greedy = model.generate(**inputs, max_new_tokens=16, eos_token_id=[], return_dict=True)
    assert len(greedy.new_tokens[0]) == 16 and all(0 <= t < 1000 for t in greedy.new_tokens[0])
    assert greedy.timings["prefill"] > 0 and greedy.timings["decode"] > 0
    batch = _raw_inputs(processor, [cases_meta[n] for n in ("a_demo_full", "b_eval_template")])
    sampled = model.generate(
        **batch, max_new_tokens=8, do_sample=True, seed=0, top_p=0.9, eos_token_id=[], return_dict=True
    )
    again = model.generate(
        **batch, max_new_tokens=8, do_sample=True, seed=0, top_p=0.9, eos_token_id=[], return_dict=True
    )
    assert sampled.new_tokens == again.new_tokens and [len(r) for r in sampled.new_tokens] == [8, 8]


# The quantized float16 model against the float32 model holding the same dequantized weights (TF32 off): on CUDA,
# bitsandbytes' NF4 linears dequantize to float16 and multiply there, so only float16 arithmetic differs (measured
# on CPU for this oracle: float16 against float32 with the same weights 0.036-0.042, with int4's bfloat16 linears
# 0.10); LLM.int8 also rounds the activations to int8 per row (measured on CPU in float32: 0.29, see
# test_quantization.MODEL_BOUND). Random logits of the same norm are at 1.35.
QUANTIZED_MODEL_BOUND = {"nf4": 0.25, "official": 0.25, "int8": 0.75}


@pytest.mark.parametrize("mode,count", [("nf4", 40), ("int8", 40), ("official", 80)])
def test_quantized_load_and_generate(no_tf32, cases, cases_meta, mode, count):
    pytest.importorskip("bitsandbytes")
    from moai_sdk.modeling import MoAIForCausalLM
    from moai_sdk.modeling.quantization import quantized_module_names
    from test_quantization import _dequantized_weight

    model = MoAIForCausalLM.from_pretrained(TINY, device="cuda", dtype="float16", quantization=mode)
    assert model.load_info["quantization"] == mode
    names = quantized_module_names(model)
    assert len(names) == count
    weights = {name: _dequantized_weight(model.get_submodule(name)) for name in names}  # before the first forward
    first = model.get_submodule(next(iter(names)))
    assert first.weight.device.type == "cuda" and first.weight.dtype in (torch.uint8, torch.int8)
    inputs = official_inputs("a_demo_full", cases, cases_meta)
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1].float()
    assert torch.isfinite(logits).all()
    reference = MoAIForCausalLM.from_pretrained(TINY, device="cuda", dtype="float32")
    with torch.no_grad():
        for name, weight in weights.items():
            reference.get_submodule(name).weight.copy_(weight)
        expected = reference(**inputs).logits[:, -1]
    del reference
    assert rel_err(logits, expected) < QUANTIZED_MODEL_BOUND[mode]
    assert rel_err(logits, cases["a_demo_full.logits_last"]) > 0.1  # the weights really are quantized
    out = model.generate(**inputs, max_new_tokens=6, eos_token_id=[], return_dict=True)
    assert len(out.new_tokens[0]) == 6
    reference = MoAIForCausalLM.from_pretrained(TINY, device="cuda", dtype="float16")
    assert model.parameter_bytes() < reference.parameter_bytes()


def test_7b_shape_builder_quantizes_on_cuda():
    """The benchmark's random MoAI-7B builder (two decoder layers here) in nf4 on the GPU."""
    pytest.importorskip("bitsandbytes")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.shapes import build_random_moai, moai_7b_config

    config = moai_7b_config(num_hidden_layers=2)
    config.structure.mixer_layers = [1]
    model = build_random_moai(config, device="cuda", dtype="float16", quantization="nf4")
    assert len(model.load_info["quantized_modules"]) == 2 * 5
    ids = torch.tensor([[1, 100, config.image_token_id, 200, 300]], device="cuda")
    pixels = torch.randn(1, 3, 490, 490, device="cuda")
    out = model.generate(
        ids,
        pixels,
        aux_input_ids=torch.tensor([[5, 6, 7]]),
        panoptic_pixel_values=pixels,
        max_new_tokens=4,
        eos_token_id=[],
        return_dict=True,
        output_logits=True,
    )
    assert len(out.new_tokens[0]) == 4
    assert all(torch.isfinite(s).all() for s in out.step_logits)
