"""The ``"int4"`` quantization mode: the LLM's main weights in torchao's int4 weight-only format (tinygemm kernel).

``"int4"`` quantizes the same linears as ``"nf4"`` (every ``Plora_main`` linear: attention and feed-forward),
with a maintained CUDA kernel instead of bitsandbytes' NF4 dequantize-then-matmul: torchao's
``Int4TilePackedTo4dTensor``, i.e. what ``torchao.quantization.quantize_`` builds for
``Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d",
int4_choose_qparams_algorithm="tinygemm")``. Each weight is cast to bfloat16 and split into groups of 128 input
values along each output row; a group stores 4-bit codes ``q`` in 0..15 and a bfloat16 ``scale`` and ``zero``
(asymmetric min/max, zero point in the float domain), and ``w = (q - 8) * scale + zero``. The matmul is
``aten._weight_int4pack_mm`` (tinygemm): activations are cast to bfloat16, accumulated in float32, and the
result is cast back to the model dtype.

Requirements and choices:

* CUDA only, compute capability 8.0 or newer (Ampere, Ada, Hopper): the packed layout and its kernel exist only
  there (torchao 0.18: the "plain"/"preshuffled" formats need the separate ``mslk`` package and "plain_int32"
  has no CPU kernel). On another device the loader raises a :class:`~moai_sdk.ConfigError`; the pipeline,
  like for the bitsandbytes modes, loads the model unquantized there (logged).
* Input widths that are not a multiple of the group size: ``quantize_`` leaves such weights in 16 bit; this
  module calls the same ``Int4TilePackedTo4dTensor.from_hp`` that ``quantize_`` calls, which zero-pads the input
  width to a multiple of 1024 (the kernel pads activations alike), so every ``Plora_main`` linear of every
  model is quantized, the selection is exactly ``"nf4"``'s, and the padded zeros contribute nothing. MoAI-7B's
  input widths (4096 and 14336) are multiples of 1024: no padding there.
* Weights are quantized one at a time as the loader reads them (no full 16-bit copy of the decoder on the GPU).
* CUDA graphs: the forward is a pad, ``aten._weight_int4pack_mm`` and a slice -- no host synchronisation and no
  allocation that depends on values, so a decoding step should capture; not yet run on a GPU.

:func:`dequantized_int4_weight` computes, on any device, the weight the kernel multiplies with (same
quantization parameters, same codes), so the numerical effect of ``"int4"`` can be measured on CPU
(``benchmarks/quantization_error.py``, row ``int4 (simulated)``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DependencyError

logger = logging.getLogger(__name__)

#: Input values per (scale, zero) pair; tinygemm supports 32, 64, 128 and 256. 128 is torchao's default.
INT4_GROUP_SIZE = 128
#: ``Int4TilePackedTo4dTensor`` pads input widths to a multiple of this (and output widths to a multiple of 8).
INT4_PAD_IN = 1024
INT4_PAD_OUT = 8
#: Oldest torchao this module is written against (``Int4TilePackedTo4dTensor.from_hp`` with the tinygemm
#: qparams algorithm).
TORCHAO_MIN_VERSION = "0.18.0"
_INSTALL_HINT = "pip install 'moai-sdk[int4]' (torchao)"


def _torchao() -> Any:
    """``torchao.quantization``, or a :class:`~moai_sdk.DependencyError` that names the install command."""
    try:
        import torchao.quantization as aoq
    except ImportError as exc:
        raise DependencyError(f"quantization='int4' needs torchao >= {TORCHAO_MIN_VERSION}: {_INSTALL_HINT}") from exc
    if not hasattr(aoq, "Int4TilePackedTo4dTensor"):
        raise DependencyError(
            f"quantization='int4' needs torchao >= {TORCHAO_MIN_VERSION} (no Int4TilePackedTo4dTensor in the "
            f"installed one): {_INSTALL_HINT}"
        )
    return aoq


def check_int4_device(device: torch.device | str) -> None:
    """Raise a :class:`~moai_sdk.ConfigError` unless ``device`` can run the int4 (tinygemm) kernel."""
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ConfigError(
            f"quantization='int4' runs torchao's tinygemm kernel, which needs a CUDA GPU (got device {str(dev)!r}); "
            "load with device='cuda', or use quantization=None on this device"
        )
    if not torch.cuda.is_available():
        raise ConfigError("quantization='int4' needs a CUDA GPU, but torch sees none; use quantization=None")
    major, minor = torch.cuda.get_device_capability(dev)
    if major < 8:
        raise ConfigError(
            f"quantization='int4' needs a GPU of compute capability 8.0 or newer (Ampere or later); "
            f"{torch.cuda.get_device_name(dev)} has {major}.{minor}: use quantization='nf4' there"
        )


def int4_config() -> Any:
    """The torchao ``Int4WeightOnlyConfig`` whose weights this mode builds (for reference and for users who
    quantize their own modules with ``torchao.quantization.quantize_``)."""
    aoq = _torchao()
    return aoq.Int4WeightOnlyConfig(
        group_size=INT4_GROUP_SIZE,
        int4_packing_format="tile_packed_to_4d",
        int4_choose_qparams_algorithm="tinygemm",
        set_inductor_config=False,
    )


def mark_int4_linears(model: nn.Module, names: list[str]) -> set[str]:
    """Tag the linears ``names`` for int4: they stay ``nn.Linear`` (on the meta device until their weight is read)
    and :func:`quantize_int4_linear` replaces the weight. Checks that torchao is installed first."""
    _torchao()
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"quantization='int4' applies to nn.Linear modules; {name} is {type(module).__name__}")
        module.moai_quant_mode = "int4"
    return set(names)


def quantize_int4_linear(module: nn.Linear, weight: torch.Tensor, device: torch.device | str) -> None:
    """Set ``module.weight`` to ``weight`` quantized to int4 on ``device`` (a CUDA GPU, see :func:`check_int4_device`).

    The weight is cast to bfloat16 on the GPU (the only input the tinygemm packing takes) and packed there; the
    16-bit copy is freed right after.
    """
    check_int4_device(device)
    aoq = _torchao()
    expected = (module.out_features, module.in_features)
    if tuple(weight.shape) != expected:
        raise ConfigError(f"int4: weight of shape {tuple(weight.shape)} for a linear of shape {expected}")
    hp = weight.to(device=device, dtype=torch.bfloat16).contiguous()
    packed = aoq.Int4TilePackedTo4dTensor.from_hp(hp, [1, INT4_GROUP_SIZE], ntile_size=INT4_PAD_OUT)
    del hp
    module.weight = nn.Parameter(packed, requires_grad=False)


def _pad_to(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def int4_packed_bytes(out_features: int, in_features: int) -> int:
    """Bytes of one packed int4 weight: 4-bit codes of the padded weight plus a bfloat16 (scale, zero) pair per
    group of 128 (what :func:`stored_bytes` counts for a weight packed by :func:`quantize_int4_linear`)."""
    n, k = _pad_to(out_features, INT4_PAD_OUT), _pad_to(in_features, INT4_PAD_IN)
    return n * k // 2 + (k // INT4_GROUP_SIZE) * n * 2 * 2


def dequantized_int4_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight the int4 kernel multiplies with, computed on ``weight``'s device (CPU included).

    Same steps as ``Int4TilePackedTo4dTensor.from_hp`` before packing: bfloat16, zero padding of the input width
    to a multiple of 1024 and of the output width to a multiple of 8, per-group (128) asymmetric min/max
    parameters in the tinygemm (float zero point) domain, 4-bit codes; then decoded as ``(q - 8) * scale + zero``
    in float32 and cut back to ``weight``'s shape. Returns float32.
    """
    aoq = _torchao()
    from torchao.quantization import quant_primitives as qp  # the tinygemm variants are module-level helpers

    out_f, in_f = weight.shape
    hp = weight.detach().to(torch.bfloat16)
    hp = nn.functional.pad(hp, (0, _pad_to(in_f, INT4_PAD_IN) - in_f, 0, _pad_to(out_f, INT4_PAD_OUT) - out_f))
    block = [1, INT4_GROUP_SIZE]
    scale, zero = qp._choose_qparams_affine_tinygemm(
        hp,
        aoq.MappingType.ASYMMETRIC,
        tuple(block),
        torch.int32,
        quant_min=0,
        quant_max=15,
        scale_dtype=torch.bfloat16,
        zero_point_dtype=torch.bfloat16,
    )
    codes = qp._quantize_affine_tinygemm(hp, block, scale, zero, torch.int32, quant_min=0, quant_max=15)
    deq = qp._dequantize_affine_tinygemm(
        codes, block, scale, zero, torch.int32, quant_min=0, quant_max=15, output_dtype=torch.float32
    )
    return deq[:out_f, :in_f].contiguous()


def int4_reference_linear(x: torch.Tensor, dequantized: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the int4 linear computes, written with plain torch ops: ``x`` in bfloat16 times the dequantized weight,
    accumulated in float32, rounded to bfloat16 (the kernel's output), then cast to ``x``'s dtype."""
    y = (x.to(torch.bfloat16).float() @ dequantized.float().t()).to(torch.bfloat16)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype)


class SimulatedInt4Linear(nn.Module):
    """A CPU stand-in for an int4 linear: :func:`int4_reference_linear` with a precomputed dequantized weight.

    For measuring the numerical effect of ``"int4"`` without a GPU (see :func:`simulate_int4`); not a fast path.
    ``weight`` is the weight to quantize (default: ``linear``'s own), e.g. the checkpoint's float32 tensor when
    ``linear`` was loaded in float16: the loader packs from the checkpoint's tensor, and rounding it to float16
    first can move 4-bit codes.
    """

    def __init__(self, linear: nn.Linear, weight: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        source = linear.weight if weight is None else weight.to(linear.weight.device)
        self.register_buffer("weight", dequantized_int4_weight(source))
        self.bias = linear.bias
        self.moai_quant_mode = "int4-simulated"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_reference_linear(x, self.weight, self.bias)


def simulate_int4(model: nn.Module, names: list[str], weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Replace the linears ``names`` of an unquantized ``model`` by :class:`SimulatedInt4Linear` (in place);
    ``weights`` (optional) maps ``"<name>.weight"`` to the tensor to quantize, e.g. a checkpoint's state dict."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        source = None if weights is None else weights[f"{name}.weight"]
        setattr(parent, child, SimulatedInt4Linear(getattr(parent, child), source))
    return model


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes ``t`` holds: its elements for a plain tensor; the inner tensors for a tensor subclass that stores its
    data elsewhere (torchao's packed int4 weights report the bfloat16 shape, but hold 4-bit codes and scales)."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None:
        return t.numel() * t.element_size()
    names, _ = flatten()
    return sum(stored_bytes(getattr(t, n)) for n in names if getattr(t, n, None) is not None)


__all__ = [
    "INT4_GROUP_SIZE",
    "TORCHAO_MIN_VERSION",
    "check_int4_device",
    "int4_config",
    "mark_int4_linears",
    "quantize_int4_linear",
    "int4_packed_bytes",
    "dequantized_int4_weight",
    "int4_reference_linear",
    "SimulatedInt4Linear",
    "simulate_int4",
    "stored_bytes",
]
