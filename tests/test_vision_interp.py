"""The CLIP position-table interpolation 24x24 -> 35x35 matches the official routine bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES
from moai_sdk import InputError
from moai_sdk.modeling import interpolate_position_table


@pytest.mark.parametrize("prefix", ["fp32", "fp16"])
def test_interpolation_matches_fixture(prefix):
    data = load_file(str(FIXTURES / "clip-pos-interp" / "pos_interp.safetensors"))
    table = data[f"{prefix}.input_position_embedding"]
    out = interpolate_position_table(table, 24, 35)
    expected = data[f"{prefix}.output_position_embedding"]
    assert out.shape == (1226, 24) and out.dtype == table.dtype
    assert torch.equal(out, expected.to(out.dtype))
    assert torch.equal(out[0], table[0])  # class row untouched
    # the float16 rounding is part of the official result
    before = data[f"{prefix}.bicubic_float32_before_half_cast"]
    assert not torch.equal(out[1:].float(), before)


def test_interpolation_leaves_a_resized_table_alone_and_rejects_others():
    t = torch.randn(1226, 8)
    assert interpolate_position_table(t, 24, 35) is t
    with pytest.raises(InputError, match="rows"):
        interpolate_position_table(torch.randn(100, 8), 24, 35)
