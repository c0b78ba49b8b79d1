"""quantization="int4" (torchao's int4 weight-only, tinygemm kernel).

On CPU: the mode is accepted everywhere a mode is named, selects exactly the "nf4" linears, fails clearly where it
cannot run (no CUDA, no torchao), counts its packed bytes, and -- with torchao's quantization primitives -- the
weights the kernel multiplies with are checked and simulated on the tiny oracle. The tests marked ``cuda`` load
the tiny model and the 7B-shape builder in "int4" on a GPU (``benchmarks/gpu_check.sh`` runs them).
"""

from __future__ import annotations

import argparse
import logging
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import TINY, official_inputs, rel_err
from moai_sdk import ConfigError, DependencyError
from moai_sdk.cli_options import add_model_options
from moai_sdk.modeling import QUANTIZATION_MODES, MoAIConfig, MoAIForCausalLM, check_quantization
from moai_sdk.modeling.int4 import (
    INT4_GROUP_SIZE,
    int4_packed_bytes,
    int4_reference_linear,
    stored_bytes,
)
from moai_sdk.modeling.quantization import (
    quantized_module_names,
    replace_linears_for_quantization,
    select_linears,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.shapes import build_random_moai, moai_7b_config


def _meta_model(config: MoAIConfig) -> MoAIForCausalLM:
    with torch.device("meta"):
        return MoAIForCausalLM(config)


def _tiny_config() -> MoAIConfig:
    import json

    return MoAIConfig.from_dict(json.loads((TINY / "config.json").read_text()))


# ---------------------------------------------------------------------------------------------- the mode itself
def test_int4_is_a_mode_of_the_library_and_the_cli():
    assert "int4" in QUANTIZATION_MODES and check_quantization("int4") == "int4"
    parser = argparse.ArgumentParser()
    add_model_options(parser)
    assert parser.parse_args(["--quantization", "int4"]).quantization == "int4"
    (action,) = [a for a in parser._actions if a.dest == "quantization"]
    assert set(action.choices) == {m for m in QUANTIZATION_MODES if m} | {"none"}  # the CLI offers every mode


def test_int4_selects_exactly_the_nf4_linears():
    for config in (_tiny_config(), moai_7b_config()):
        model = _meta_model(config)
        nf4 = select_linears(model, "nf4")
        assert select_linears(model, "int4") == nf4
        assert len(nf4) == config.num_hidden_layers * 5
    model = _meta_model(_tiny_config())
    pytest.importorskip("torchao")
    chosen = replace_linears_for_quantization(model, "int4", compute_dtype=torch.float16)
    assert chosen == set(select_linears(model, "nf4"))
    assert quantized_module_names(model) == {name: "int4" for name in chosen}
    assert all(type(model.get_submodule(n)) is nn.Linear for n in chosen)  # packed later, weight by weight


def test_int4_on_cpu_is_a_clear_config_error():
    with pytest.raises(ConfigError, match="needs a CUDA GPU.*device='cuda'"):
        check_quantization("int4", "cpu")
    with pytest.raises(ConfigError, match="CUDA GPU"):
        MoAIForCausalLM.from_pretrained(TINY, device="cpu", quantization="int4")
    pytest.importorskip("torchao")
    config = moai_7b_config(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    config.structure.vision_config.update(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2
    )
    config.structure.mm_hidden_size = 32
    config.structure.mixer_layers = [0]
    with pytest.raises(ConfigError, match="CUDA GPU"):  # the benchmark's builder packs weights the same way
        build_random_moai(config, device="cpu", dtype="float32", quantization="int4")


def test_pipeline_on_cpu_loads_int4_unquantized(caplog):
    from moai_sdk import MoAIPipeline

    with caplog.at_level(logging.WARNING, logger="moai_sdk.pipeline"):
        pipe = MoAIPipeline.from_pretrained(TINY, device="cpu", quantization="int4", experts=None)
    assert pipe.quantization is None
    assert "quantization='int4' needs a CUDA GPU" in caplog.text
    assert pipe.model.load_info["quantization"] is None and not quantized_module_names(pipe.model)


def test_without_torchao_int4_names_the_install_command(monkeypatch):
    model = _meta_model(_tiny_config())
    monkeypatch.setitem(sys.modules, "torchao", None)  # makes `import torchao...` raise ImportError
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(DependencyError, match=r"pip install 'moai-sdk\[int4\]'"):
        replace_linears_for_quantization(model, "int4", compute_dtype=torch.float16)
    old = types.ModuleType("torchao")  # a torchao without the packed int4 tensor (too old)
    old.quantization = types.ModuleType("torchao.quantization")
    monkeypatch.setitem(sys.modules, "torchao", old)
    monkeypatch.setitem(sys.modules, "torchao.quantization", old.quantization)
    with pytest.raises(DependencyError, match=r"torchao >= 0\.18.*moai-sdk\[int4\]"):
        replace_linears_for_quantization(model, "int4", compute_dtype=torch.float16)


# ---------------------------------------------------------------------------------------------- bytes
def _packed_by_hand(out_features: int, in_features: int):
    """An ``Int4TilePackedTo4dTensor`` with the layout ``from_hp`` produces (built on CPU; values irrelevant)."""
    aoq = pytest.importorskip("torchao.quantization")
    n, k = -(-out_features // 8) * 8, -(-in_features // 1024) * 1024
    qdata = torch.zeros(n // 8, k // (8 * 16), 32, 4, dtype=torch.int32)
    scale_and_zero = torch.zeros(k // INT4_GROUP_SIZE, n, 2, dtype=torch.bfloat16)
    return aoq.Int4TilePackedTo4dTensor(
        qdata, scale_and_zero, [1, INT4_GROUP_SIZE], torch.Size([out_features, in_features])
    )


def test_parameter_bytes_count_packed_int4_weights(tiny_model):
    packed = _packed_by_hand(56, 32)
    assert packed.numel() * packed.element_size() == 56 * 32 * 2  # what a naive count would say (bfloat16)
    assert stored_bytes(packed) == int4_packed_bytes(56, 32) == 56 * 1024 // 2 + 8 * 56 * 2 * 2
    assert int4_packed_bytes(4096, 14336) == 4096 * 14336 // 2 + 112 * 4096 * 4  # 7B: no padding, 4.25 bits/weight
    model = MoAIForCausalLM.from_pretrained(TINY, device="cpu", dtype="float32")
    linear = model.get_submodule("model.layers.0.feed_forward.w2.Plora_main")
    assert (linear.out_features, linear.in_features) == (32, 56)
    before = model.parameter_bytes()
    linear.weight = nn.Parameter(_packed_by_hand(32, 56), requires_grad=False)
    assert model.parameter_bytes() == before - 32 * 56 * 4 + int4_packed_bytes(32, 56)


# ---------------------------------------------------------------------------------------------- numerics (CPU)
def test_dequantized_weight_is_exact_on_the_int4_grid():
    """A weight whose every group of 128 spans exactly the 16 levels (q - 8) * s + z is reproduced exactly:
    the tinygemm domain (float zero point, mid-point 8) and the grouping along the input axis are right."""
    from moai_sdk.modeling.int4 import dequantized_int4_weight

    gen = torch.Generator().manual_seed(0)
    out_f, groups = 6, 4
    q = torch.randint(0, 16, (out_f, groups * INT4_GROUP_SIZE), generator=gen)
    q[:, ::INT4_GROUP_SIZE] = 0  # every group holds both extremes
    q[:, 1::INT4_GROUP_SIZE] = 15
    s = 2.0 ** torch.randint(-8, -2, (out_f, groups, 1), generator=gen)
    z = torch.randint(-4, 5, (out_f, groups, 1), generator=gen) * s
    w = ((q.view(out_f, groups, -1) - 8) * s + z).view(out_f, -1)
    assert torch.equal(dequantized_int4_weight(w), w)


def test_dequantized_weight_error_is_bounded_per_group():
    from moai_sdk.modeling.int4 import dequantized_int4_weight

    gen = torch.Generator().manual_seed(1)
    w = torch.randn(24, 4 * INT4_GROUP_SIZE, generator=gen)
    w *= (10.0 ** -torch.arange(4.0)).repeat_interleave(INT4_GROUP_SIZE)  # groups four orders of magnitude apart
    deq = dequantized_int4_weight(w)
    assert deq.dtype == torch.float32 and deq.shape == w.shape
    hp = w.to(torch.bfloat16).float().view(24, 4, -1)
    step = (hp.amax(-1) - hp.amin(-1)) / 15
    err = (deq.view(24, 4, -1) - hp).abs().amax(-1)
    # half a step, plus the bfloat16 rounding of scale, zero and the arithmetic (torchao quantizes in bfloat16);
    # with the groups taken along the wrong axis the small groups would be off by the large groups' steps
    assert bool((err <= 0.5 * step + 2**-6 * hp.abs().amax(-1)).all())  # measured: at most 0.56 steps
    assert all(len(row.unique()) <= 16 for row in deq.view(-1, INT4_GROUP_SIZE))
    narrow = dequantized_int4_weight(torch.randn(56, 32, generator=gen))  # padded to 1024 inputs like the kernel
    assert narrow.shape == (56, 32) and all(len(row.unique()) <= 16 for row in narrow)


def test_reference_linear_rounds_like_the_kernel():
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(3, 256, generator=gen), torch.randn(40, 256, generator=gen)
    y = int4_reference_linear(x.half(), w)
    assert y.dtype == torch.float16
    exact = x.half().to(torch.bfloat16).double() @ w.double().t()
    assert rel_err(y.float(), exact.float()) < 8e-3  # one bfloat16 rounding of the output
    assert torch.equal(y.float(), y.float().to(torch.bfloat16).float())  # the output went through bfloat16


def _dequantized_int4_model(dtype: str, device: str = "cpu") -> MoAIForCausalLM:
    """The tiny model in ``dtype`` with each int4 linear's weight replaced by the checkpoint weight as the int4
    kernel would see it (:func:`dequantized_int4_weight`): only the kernel's arithmetic differs from int4."""
    from safetensors.torch import load_file

    from moai_sdk.modeling.int4 import dequantized_int4_weight

    state = load_file(str(TINY / "model.safetensors"))
    model = MoAIForCausalLM.from_pretrained(TINY, device=device, dtype=dtype)
    with torch.no_grad():
        for name in select_linears(model, "int4"):
            model.get_submodule(name).weight.copy_(dequantized_int4_weight(state[f"{name}.weight"].to(device)))
    return model


# The simulated int4 model against the float32 model holding the same dequantized weights: they differ only in
# the int4 kernel's arithmetic (activations and outputs of each linear rounded to bfloat16, unit roundoff 2^-8),
# amplified through 8 layers of this tiny random oracle, which is very sensitive (float16 against float32 is
# 0.04-0.07 here). Measured on the last logits: 0.113 (a_demo_full), 0.056 (b_eval_template); float16 models:
# 0.103, 0.044. Random logits of the same norm are at 1.36, and int4 against the unquantized model at 0.64.
INT4_MODEL_BOUND = 0.25


def test_simulated_int4_on_the_tiny_oracle(tiny_model, cases, cases_meta):
    from moai_sdk.modeling.int4 import SimulatedInt4Linear, simulate_int4

    model = MoAIForCausalLM.from_pretrained(TINY, device="cpu", dtype="float32")
    names = select_linears(model, "int4")
    simulate_int4(model, names)
    assert all(isinstance(model.get_submodule(n), SimulatedInt4Linear) for n in names) and len(names) == 40
    reference = _dequantized_int4_model("float32")
    inputs = official_inputs("a_demo_full", cases, cases_meta)
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1]
        expected = reference(**inputs).logits[:, -1]
        full = tiny_model(**inputs).logits[:, -1]
    assert torch.isfinite(logits).all()
    assert rel_err(logits, expected) < INT4_MODEL_BOUND
    assert rel_err(logits, full) > 0.3  # the weights really are quantized (0.64)
    out = model.generate(**inputs, max_new_tokens=4, eos_token_id=[], return_dict=True)
    assert len(out.new_tokens[0]) == 4


# ---------------------------------------------------------------------------------------------- CUDA
@pytest.fixture(scope="module")
def int4_cuda():
    pytest.importorskip("torchao")
    return MoAIForCausalLM.from_pretrained(TINY, device="cuda", dtype="float16", quantization="int4")


@pytest.fixture(scope="module")
def fp16_cuda():
    return MoAIForCausalLM.from_pretrained(TINY, device="cuda", dtype="float16")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_int4_cuda_load_packs_the_nf4_linears(int4_cuda, fp16_cuda):
    import torchao.quantization as aoq

    names = quantized_module_names(int4_cuda)
    assert set(names) == set(select_linears(fp16_cuda, "nf4")) and set(names.values()) == {"int4"}
    weight = int4_cuda.get_submodule(next(iter(names))).weight
    assert isinstance(weight, aoq.Int4TilePackedTo4dTensor) and weight.device.type == "cuda"
    assert int4_cuda.load_info["quantization"] == "int4"
    expected = fp16_cuda.parameter_bytes()
    for n in names:
        linear = fp16_cuda.get_submodule(n)
        expected += int4_packed_bytes(linear.out_features, linear.in_features) - linear.weight.numel() * 2
    assert int4_cuda.parameter_bytes() == expected


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_int4_kernel_computes_the_cpu_simulation(int4_cuda, fp16_cuda, cases, cases_meta):
    """The tinygemm kernel of every packed linear against :func:`int4_reference_linear` on the checkpoint's
    weights (what ``quantization_error`` simulates on CPU), and the whole model against the simulated one."""
    from safetensors.torch import load_file

    from moai_sdk.modeling.int4 import dequantized_int4_weight, simulate_int4

    state = load_file(str(TINY / "model.safetensors"))
    x = torch.randn(5, 56, device="cuda", dtype=torch.float16)
    for name in quantized_module_names(int4_cuda):
        linear = int4_cuda.get_submodule(name)
        xi = x[:, : linear.in_features]
        with torch.no_grad():
            kernel = linear(xi)
        reference = int4_reference_linear(xi, dequantized_int4_weight(state[f"{name}.weight"].cuda()))
        assert kernel.dtype == torch.float16 and rel_err(kernel.float(), reference.float()) < 1e-2, name
    inputs = official_inputs("a_demo_full", cases, cases_meta)
    simulated = MoAIForCausalLM.from_pretrained(TINY, device="cuda", dtype="float16")
    simulate_int4(simulated, select_linears(simulated, "int4"), weights=state)  # packed from the same tensors
    with torch.no_grad():
        got = int4_cuda(**inputs).logits[:, -1].float()
        sim = simulated(**inputs).logits[:, -1].float()
        fp16 = fp16_cuda(**inputs).logits[:, -1].float()
    assert torch.isfinite(got).all()
    # this oracle amplifies any rounding difference (float16 against float32: 0.07), so the model-level check is
    # relative: the kernel is far closer to its simulation than int4 is to float16
    assert rel_err(got, sim) < 0.5 * rel_err(sim, fp16)
    # against float32 with the same dequantized weights (TF32 off): the float16 model and the kernel's bfloat16
    # rounding, which the CPU simulation in float16 gives at 0.10 (see INT4_MODEL_BOUND)
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            expected = _dequantized_int4_model("float32", "cuda")(**inputs).logits[:, -1]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    assert rel_err(got, expected) < INT4_MODEL_BOUND
    assert rel_err(got, fp16) > 0.3  # the weights really are quantized
    greedy = int4_cuda.generate(**inputs, max_new_tokens=8, eos_token_id=[], return_dict=True, output_logits=True)
    assert len(greedy.new_tokens[0]) == 8 and all(torch.isfinite(s).all() for s in greedy.step_logits)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decoding_with_int4(int4_cuda, cases, cases_meta, monkeypatch):
    """torchao's int4 kernel inside a captured graph: captured, replayed, same tokens as without."""
    from test_cuda import _count_replays

    counts = _count_replays(monkeypatch)
    inputs = official_inputs("a_demo_full", cases, cases_meta)
    kw = dict(max_new_tokens=12, eos_token_id=[], return_dict=True, output_logits=True)
    plain = int4_cuda.generate(**inputs, **kw)
    graphed = int4_cuda.generate(**inputs, cuda_graphs=True, **kw)
    assert counts["captured"] == 1 and counts["replayed"] == 9
    assert graphed.new_tokens == plain.new_tokens
    for a, b in zip(graphed.step_logits, plain.step_logits):
        assert rel_err(a.float(), b.float()) < 1e-2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_7b_shape_builder_packs_int4_on_cuda():
    """The benchmark's random MoAI-7B builder (two decoder layers) in int4: 7B widths need no padding."""
    pytest.importorskip("torchao")
    config = moai_7b_config(num_hidden_layers=2)
    config.structure.mixer_layers = [1]
    model = build_random_moai(config, device="cuda", dtype="float16", quantization="int4")
    names = model.load_info["quantized_modules"]
    assert len(names) == 2 * 5
    for n in names:
        linear = model.get_submodule(n)
        assert stored_bytes(linear.weight) == int4_packed_bytes(linear.out_features, linear.in_features)
    ids = torch.tensor([[1, 100, config.image_token_id, 200, 300]], device="cuda")
    pixels = torch.randn(1, 3, 490, 490, device="cuda")
    out = model.generate(
        ids,
        pixels,
        aux_input_ids=torch.tensor([[5, 6, 7]]),
        panoptic_pixel_values=pixels,
        max_new_tokens=4,
        eos_token_id=[],
        cuda_graphs=True,
        return_dict=True,
        output_logits=True,
    )
    assert len(out.new_tokens[0]) == 4 and all(torch.isfinite(s).all() for s in out.step_logits)


# ---------------------------------------------------------------------------------------------- benchmark
def test_benchmark_judges_int4_against_nf4_from_the_same_run():
    from benchmarks import run as bench

    def setup(name: str, tok_s: float) -> dict:
        stages = {"decode_tok_s": {"median": tok_s}}
        entry = {"batch_size": 1, "modes": {"default": {"stages": stages}}}
        return {"name": name, "batches": [entry], "info": {"gpu": "NVIDIA H200", "layers": bench.FULL_DEPTH}}

    assert "int4" in bench.parse_args(["--config", "7b-cuda", "--quantization", "nf4", "int4"]).quantization
    verdicts = {
        c["target"]: (c["ok"], c["value"])
        for c in bench.evaluate_targets([setup("7b-nf4", 40.0), setup("7b-int4", 120.0)])
    }
    assert verdicts["7b int4 batch 1: decode >= 100 tokens/s"] == (True, 120.0)
    assert verdicts["7b nf4 batch 1: decode >= 30 tokens/s"] == (True, 40.0)
    assert verdicts["7b batch 1: int4 decodes faster than nf4 (ratio, same run)"] == (True, 3.0)
    slow = {c["target"]: c["ok"] for c in bench.evaluate_targets([setup("7b-nf4", 40.0), setup("7b-int4", 35.0)])}
    assert slow["7b int4 batch 1: decode >= 100 tokens/s"] is False
    assert slow["7b batch 1: int4 decodes faster than nf4 (ratio, same run)"] is False
    alone = [c["target"] for c in bench.evaluate_targets([setup("7b-int4", 120.0)])]
    assert alone == ["7b int4 batch 1: decode >= 100 tokens/s"]  # no nf4 in the run: no comparison
