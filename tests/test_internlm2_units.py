"""Unit checks of the decoder building blocks: RoPE scaling, the wqkv head layout, PLoRA masking, the cache."""

from __future__ import annotations

import pytest
import torch

from moai_sdk.modeling.internlm2 import PLoRALinear, RotaryEmbedding, build_attention_bias

pytestmark = pytest.mark.numerics


def _angles(rope: RotaryEmbedding, positions: torch.Tensor, seq_len: int) -> torch.Tensor:
    cos, sin = rope(positions, seq_len, torch.float64)
    return torch.atan2(sin, cos)[0, 0]


def test_rope_plain_and_linear_scaling():
    pos = torch.arange(10)[None]
    plain = RotaryEmbedding(8, 2048, 10000.0)
    linear = RotaryEmbedding(8, 2048, 10000.0, {"type": "linear", "factor": 2.0})
    cos, sin = plain(pos, 10, torch.float32)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 8, 2).float() / 8))
    expected = torch.cat((pos[0, :, None] * inv, pos[0, :, None] * inv), -1)
    assert torch.allclose(cos[0, 0], expected.cos()) and torch.allclose(sin[0, 0], expected.sin())
    # linear scaling = positions divided by the factor
    assert torch.allclose(linear(pos, 10, torch.float32)[0], plain(pos / 2.0, 10, torch.float32)[0])


def test_dynamic_ntk_only_beyond_max_positions():
    plain = RotaryEmbedding(8, 16, 10000.0)
    dyn = RotaryEmbedding(8, 16, 10000.0, {"type": "dynamic", "factor": 2.0})
    pos = torch.arange(16)[None]
    assert torch.equal(dyn(pos, 16, torch.float32)[0], plain(pos, 16, torch.float32)[0])
    long_pos = torch.arange(32)[None]
    a, b = dyn(long_pos, 32, torch.float32)[0], plain(long_pos, 32, torch.float32)[0]
    assert not torch.allclose(a, b)
    base = 10000.0 * ((2.0 * 32 / 16) - 1) ** (8 / 6)
    inv = 1.0 / (base ** (torch.arange(0, 8, 2).float() / 8))
    assert torch.allclose(a[0, 0, 5, :4], (5 * inv).cos(), atol=1e-6)


def test_plora_adds_low_rank_branch_only_at_image_positions():
    torch.manual_seed(0)
    lin = PLoRALinear(6, 5, bias=False, rank=4, alpha=8)
    x = torch.randn(2, 7, 6)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 2:5] = True
    out = lin(x, mask)
    main = lin.Plora_main(x)
    lora = lin.Plora_B(lin.Plora_A(x)) * 2.0
    assert torch.allclose(out[mask], (main + lora)[mask])
    assert torch.equal(out[~mask], main[~mask])
    assert torch.equal(lin(x, torch.zeros_like(mask)), main)
    assert torch.equal(lin(x, None), main)


def test_attention_bias_is_causal_and_masks_padding():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    bias = build_attention_bias(mask, 3, 0, torch.float32)
    allowed = bias == 0
    assert allowed.shape == (2, 1, 3, 3)
    assert not allowed[0, 0, :, 0].any()  # padding key never attended
    assert allowed[1, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    step = build_attention_bias(torch.tensor([[0, 1, 1, 1]]), 1, 3, torch.float32)
    assert (step == 0).tolist() == [[[[False, True, True, True]]]]


def test_wqkv_head_grouped_layout(tiny_model):
    """Official layout: per kv head, its query heads, then the key, then the value."""
    attn = tiny_model.model.layers[0].attention
    assert (attn.num_heads, attn.num_kv_heads, attn.groups, attn.head_dim) == (4, 2, 2, 8)
    assert attn.wqkv.Plora_main.weight.shape == ((4 + 2 * 2) * 8, 32)
