"""The CLIP position-table interpolation 24x24 -> 35x35 matches the official routine (bicubic in float32, then
rounded to float16), to the last bit wherever the float32 arithmetic decides the float16 result."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES
from moai_sdk import InputError
from moai_sdk.modeling import interpolate_position_table

pytestmark = pytest.mark.numerics

#: Bound on the float32 bicubic result's error, in units of 2**-24 * max|table|: each output is a 16-term weighted sum
#: (4 x 4 taps, absolute weights summing to at most 1.19**2 = 1.41 for A = -0.75), so two summation orders / weight
#: evaluations differ by at most about 16 * 1.41 rounding errors of the largest input plus the weights' own rounding.
#: PyTorch's plain (``ATEN_CPU_CAPABILITY=default``) kernel differs from the AVX2 / AVX-512 one the fixture was made
#: with by up to 7.9 such units (1.3e-6 on this table); the vectorized kernels agree bit for bit. The error scales with
#: the table, not with each output (20 units of the 4 x 4 neighbourhood's largest input), hence the global maximum.
BICUBIC_ULPS = 32


@pytest.mark.parametrize("prefix", ["fp32", "fp16"])
def test_interpolation_matches_fixture(prefix):
    """Each float16 value equals the fixture's, except where the fixture's float32 bicubic value lies within the
    float32 error bound of a float16 rounding midpoint: there a neighbouring float16 value may be the official result
    on another CPU (60 of 29400 values differ on the plain kernels), and ours must round a value within the bound."""
    data = load_file(str(FIXTURES / "clip-pos-interp" / "pos_interp.safetensors"))
    table = data[f"{prefix}.input_position_embedding"]
    out = interpolate_position_table(table, 24, 35)
    expected = data[f"{prefix}.output_position_embedding"]
    assert out.shape == (1226, 24) and out.dtype == table.dtype
    assert torch.equal(out[0], table[0])  # class row untouched
    before = data[f"{prefix}.bicubic_float32_before_half_cast"].double()
    # the float16 rounding is part of the official result
    assert not torch.equal(out[1:].double(), before)
    bound = BICUBIC_ULPS * 2.0**-24 * table.double().abs().max()
    low, high = (before - bound).float().half(), (before + bound).float().half()  # monotone rounding
    decided = low == high
    # the exact comparison covers most values (89.8%; small ones have fine float16 steps)
    assert decided.double().mean() > 0.85
    ours = out[1:].half()
    assert torch.equal(ours[decided], expected[1:].half()[decided])
    assert bool(((low <= ours) & (ours <= high)).all())  # a float16 value the float32 bound allows


def test_interpolation_leaves_a_resized_table_alone_and_rejects_others():
    t = torch.randn(1226, 8)
    assert interpolate_position_table(t, 24, 35) is t
    with pytest.raises(InputError, match="rows"):
        interpolate_position_table(torch.randn(100, 8), 24, 35)
