"""Weight quantization with bitsandbytes: which linears, and how each weight is quantized while loading.

Modes (``quantization=``):

* ``None`` -- nothing is quantized.
* ``"nf4"`` -- the LLM's main weights (every ``Plora_main`` linear: attention and feed-forward) in 4-bit NF4 with
  double quantization and compute in the model dtype. Vision tower, projector, PLoRA branches, mixer,
  compressor, embeddings and LM head stay in 16 bit. This is what makes MoAI-7B fit a consumer GPU.
* ``"nf4-lora"`` -- ``"nf4"`` plus the PLoRA adapters (``Plora_A`` / ``Plora_B``) in NF4: the union of ``"nf4"``
  and what the official loader quantizes. The adapters only act on image positions during the prompt, so decode
  speed is unchanged; it saves another ~0.85 GB at the MoAI-7B shapes for a GPU that cannot spare it.
* ``"int8"`` -- the same weights as ``"nf4"`` in LLM.int8 (threshold 6.0).
* ``"int4"`` -- the same weights as ``"nf4"`` in torchao's int4 weight-only format (groups of 128, tinygemm
  kernel; CUDA with compute capability >= 8.0 only, needs ``torchao``); see :mod:`~moai_sdk.modeling.int4`.
* ``"official"`` -- exactly the official loader's choice: NF4 for every linear whose dotted name contains none
  of ``vision_tower``, ``vision_proj``, ``Plora_main``, ``moai``, ``output``. Because ``Plora_main`` is on that
  skip list, only the PLoRA adapters end up quantized and the official "4-bit" model is in fact ~16-bit.
"""

from __future__ import annotations

import torch
from torch import nn

from ..defaults import QUANTIZATION_MODES
from ..errors import ConfigError, DependencyError
from .int4 import check_int4_device, mark_int4_linears, quantize_int4_linear

OFFICIAL_SKIP_SUBSTRINGS = ("vision_tower", "vision_proj", "Plora_main", "moai", "output")


def check_quantization(mode: str | None, device: torch.device | str | None = None) -> str | None:
    """``mode`` if it is one of :data:`QUANTIZATION_MODES`, else a :class:`~moai_sdk.ConfigError`.

    The one check of the ``quantization=`` setting, used by the loader and the pipeline alike. With ``device``
    it also checks that the mode can run there (``"int4"`` needs a CUDA GPU of compute capability >= 8.0).
    """
    if mode not in QUANTIZATION_MODES:
        raise ConfigError(f"quantization must be one of {list(QUANTIZATION_MODES)}; got {mode!r}")
    if mode == "int4" and device is not None:
        check_int4_device(device)
    return mode


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise DependencyError("quantization needs bitsandbytes and accelerate: pip install 'moai-sdk[quant]'") from exc
    return bnb


def select_linears(model: nn.Module, mode: str) -> list[str]:
    """Dotted names of the ``nn.Linear`` modules that ``mode`` quantizes."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if mode in ("nf4", "int8", "int4"):
        return [n for n in names if n.endswith("Plora_main")]
    if mode == "nf4-lora":
        return [n for n in names if n.endswith(("Plora_main", "Plora_A", "Plora_B"))]
    if mode == "official":
        return [n for n in names if not any(s in n for s in OFFICIAL_SKIP_SUBSTRINGS)]
    raise ConfigError(f"quantization mode {mode!r} quantizes nothing; use one of {list(QUANTIZATION_MODES[1:])}")


def replace_linears_for_quantization(model: nn.Module, mode: str, compute_dtype: torch.dtype) -> set[str]:
    """Swap the selected linears for bitsandbytes modules (on the meta device, before loading); ``"int4"`` keeps
    them ``nn.Linear`` and only tags them (their weights are packed by :func:`quantize_linear_weight`)."""
    if mode == "int4":
        return mark_int4_linears(model, select_linears(model, mode))
    bnb = _bnb()
    chosen = select_linears(model, mode)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old: nn.Linear = getattr(parent, child)
        bias = old.bias is not None
        if mode == "int8":
            new = bnb.nn.Linear8bitLt(
                old.in_features, old.out_features, bias=bias, has_fp16_weights=False, threshold=6.0, device="meta"
            )
        else:
            new = bnb.nn.Linear4bit(
                old.in_features,
                old.out_features,
                bias=bias,
                compute_dtype=compute_dtype,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
        if (
            mode != "int8"
            and hasattr(new, "support_avx512bf16_for_cpu")
            and (old.in_features % 64 or old.out_features % 32)
        ):
            # bitsandbytes' CPU weight repacking assumes whole 64-wide blocks; keep the generic kernel otherwise
            new.support_avx512bf16_for_cpu = False
        new.moai_quant_mode = "int8" if mode == "int8" else "nf4"
        setattr(parent, child, new)
    return set(chosen)


def quantize_linear_weight(module: nn.Module, weight: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
    """Quantize ``weight`` into the bitsandbytes ``module`` on ``device`` (one tensor at a time); for ``"int4"``
    into torchao's packed int4 format on the GPU (``dtype`` does not matter there: tinygemm takes bfloat16)."""
    if getattr(module, "moai_quant_mode", None) == "int4":
        quantize_int4_linear(module, weight, device)
        return
    bnb = _bnb()
    w = weight.to(dtype if dtype != torch.float32 else torch.float16).contiguous()
    if getattr(module, "moai_quant_mode", "nf4") == "int8":
        param = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        param = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4")
    module.weight = param.to(device)  # moving the parameter to its device quantizes it


def quantized_module_names(model: nn.Module) -> dict[str, str]:
    """``{dotted name: "nf4" | "int8" | "int4"}`` for every quantized linear in ``model``."""
    return {n: m.moai_quant_mode for n, m in model.named_modules() if hasattr(m, "moai_quant_mode")}


__all__ = [
    "QUANTIZATION_MODES",
    "OFFICIAL_SKIP_SUBSTRINGS",
    "check_quantization",
    "select_linears",
    "replace_linears_for_quantization",
    "quantize_linear_weight",
    "quantized_module_names",
]
