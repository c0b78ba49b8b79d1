"""`MoAIConfig`: every hyper-parameter of a MoAI model, and the MoAI-7B structural defaults.

A MoAI checkpoint's ``config.json`` is an InternLM2 config (layers, heads, vocabulary, RoPE, ...). The official
code hard-codes the MoAI parts (mixer, compressor, projector, CLIP tower); our tiny fixtures record them in a
``moai_structure`` block. :meth:`MoAIConfig.from_dict` reads that block when it is there and falls back to the
values of the released MoAI-7B otherwise.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..defaults import DEFAULT_VISION_TOWER_ID
from ..errors import ConfigError
from ..imageops import CLIP_MEAN, CLIP_STD, MOAI_IMAGE_SIZE

#: CLIP ViT-L/14-336 (``openai/clip-vit-large-patch14-336``), the tower MoAI-7B uses, with the image size MoAI
#: feeds it (490; the position table is interpolated from 24x24 to 35x35 when the weights are loaded).
CLIP_L14_336_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "projection_dim": 768,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_channels": 3,
    "patch_size": 14,
    "image_size": MOAI_IMAGE_SIZE,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
}

#: How the decoder computes attention: ``"sdpa"`` (PyTorch's fused kernel) or ``"eager"`` (explicit softmax).
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


def check_attn_implementation(name: str) -> str:
    """``name`` if it is one of :data:`ATTN_IMPLEMENTATIONS`, else a :class:`~moai_sdk.ConfigError`.

    The one check of the ``attn_implementation=`` setting, used by the model, the loader and the pipeline.
    """
    if name not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"attn_implementation must be 'sdpa' or 'eager'; got {name!r}")
    return name


@dataclass
class MoAIStructure:
    """The MoAI-specific structure (the ``moai_structure`` block). Defaults are MoAI-7B's."""

    vision_config: dict[str, Any] = field(default_factory=lambda: dict(CLIP_L14_336_VISION_CONFIG))
    image_size: int = MOAI_IMAGE_SIZE
    patch_size: int = 14
    vision_select_layer: int = -1
    vision_select_feature: str = "patch"
    vision_pos_interp_from_grid: int = 24
    vision_pos_interp_to_grid: int = 35
    mm_hidden_size: int = 1024
    projector_type: str = "mlp2x_gelu"
    mixer_every: int = 8
    mixer_layers: list[int] | None = None  # None: every layer i with (i + 1) % mixer_every == 0
    mixer_rank: int = 64
    mixer_heads: int = 4
    gate_outputs: int = 3
    gate_softmax_dtype: str = "float16"
    compressor_depth: int = 4
    compressor_latents: int = 64
    compressor_heads: int = 4
    compressor_dim_head: int = 64
    compressor_ff_mult: float = 1
    plora_rank: int = 256
    plora_alpha: int = 256
    image_mean_0_1: tuple[float, float, float] = CLIP_MEAN
    image_std_0_1: tuple[float, float, float] = CLIP_STD

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


_STRUCTURE_FIELDS = {f for f in MoAIStructure.__dataclass_fields__}


# ---------------------------------------------------------------------------------------------- schema
#: Positive integer fields of the decoder and of ``moai_structure`` (``config.json`` names).
_POSITIVE_INTS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
)
_STRUCTURE_POSITIVE_INTS = (
    "image_size",
    "patch_size",
    "vision_pos_interp_from_grid",
    "vision_pos_interp_to_grid",
    "mm_hidden_size",
    "mixer_every",
    "mixer_rank",
    "mixer_heads",
    "gate_outputs",
    "compressor_depth",
    "compressor_latents",
    "compressor_heads",
    "compressor_dim_head",
    "plora_rank",
    "plora_alpha",
)
_VISION_POSITIVE_INTS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "patch_size",
    "image_size",
)
#: Activations the decoder (InternLM2: SiLU) and the CLIP tower (transformers' ACT2FN names) support.
DECODER_ACTIVATIONS = ("silu",)
VISION_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu")
_SOFTMAX_DTYPE_NAMES = ("float16", "bfloat16", "float32")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ConfigError(f"config field {name!r} must be a positive integer, got {value}")


def _positive_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"config field {name!r} must be a finite number > 0, got {value!r}")


def _token_id(name: str, value: Any, vocab_size: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= vocab_size:
        raise ConfigError(
            f"config field {name!r} must be a token id in 0..{vocab_size} (vocab_size {vocab_size}), got {value!r}"
        )


def check_config_schema(cfg: MoAIConfig) -> None:
    """Types and ranges of every field, before anything is built: :class:`ConfigError` naming the field."""
    for name in _POSITIVE_INTS:
        _positive_int(name, getattr(cfg, name))
    for name in ("rms_norm_eps", "rope_theta"):
        _positive_float(name, getattr(cfg, name))
    if cfg.hidden_act not in DECODER_ACTIVATIONS:
        raise ConfigError(f"config field 'hidden_act' must be one of {DECODER_ACTIVATIONS}, got {cfg.hidden_act!r}")
    if not isinstance(cfg.bias, bool):
        raise ConfigError(f"config field 'bias' must be true or false, got {cfg.bias!r}")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        _token_id(name, getattr(cfg, name), cfg.vocab_size - 1)
    _token_id("image_token_index", cfg.image_token_index, cfg.vocab_size, allow_none=True)
    if cfg.rope_scaling is not None:
        if not isinstance(cfg.rope_scaling, dict):
            raise ConfigError(f"config field 'rope_scaling' must be an object or null, got {cfg.rope_scaling!r}")
        _positive_float("rope_scaling.factor", cfg.rope_scaling.get("factor"))
    s = cfg.structure
    for name in _STRUCTURE_POSITIVE_INTS:
        _positive_int(f"moai_structure.{name}", getattr(s, name))
    _positive_float("moai_structure.compressor_ff_mult", s.compressor_ff_mult)
    if s.gate_softmax_dtype not in _SOFTMAX_DTYPE_NAMES:
        raise ConfigError(
            f"config field 'moai_structure.gate_softmax_dtype' must be one of {_SOFTMAX_DTYPE_NAMES}, "
            f"got {s.gate_softmax_dtype!r}"
        )
    if s.mixer_layers is not None and (
        not isinstance(s.mixer_layers, list) or not all(type(i) is int for i in s.mixer_layers)
    ):
        raise ConfigError(
            f"config field 'moai_structure.mixer_layers' must be a list of integers, got {s.mixer_layers!r}"
        )
    for name in ("image_mean_0_1", "image_std_0_1"):
        value = getattr(s, name)
        if not isinstance(value, (list, tuple)) or len(value) != 3:
            raise ConfigError(f"config field 'moai_structure.{name}' must hold 3 numbers, got {value!r}")
        for v in value:
            (_positive_float if name == "image_std_0_1" else _finite)(f"moai_structure.{name}", v)
    v = s.vision_config
    for name in _VISION_POSITIVE_INTS:
        _positive_int(f"moai_structure.vision_config.{name}", v.get(name))
    if v.get("hidden_act") not in VISION_ACTIVATIONS:
        raise ConfigError(
            f"config field 'moai_structure.vision_config.hidden_act' must be one of {VISION_ACTIVATIONS}, "
            f"got {v.get('hidden_act')!r}"
        )
    _positive_float("moai_structure.vision_config.layer_norm_eps", v.get("layer_norm_eps"))
    if v["hidden_size"] % v["num_attention_heads"]:
        raise ConfigError(
            f"moai_structure.vision_config: hidden_size {v['hidden_size']} is not divisible by num_attention_heads "
            f"{v['num_attention_heads']}"
        )
    if s.image_size % s.patch_size:
        raise ConfigError(f"moai_structure: image_size {s.image_size} is not a multiple of patch_size {s.patch_size}")


def _finite(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"config field {name!r} must be a finite number, got {value!r}")


@dataclass
class MoAIConfig:
    """Hyper-parameters of a MoAI model (InternLM2 decoder + MoAI parts)."""

    vocab_size: int = 92544
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None
    bias: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 2
    image_token_index: int | None = None  # default: vocab_size (the row added for "<image>")
    torch_dtype: str | None = None
    structure: MoAIStructure = field(default_factory=MoAIStructure)

    # ------------------------------------------------------------------ derived values
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def image_token_id(self) -> int:
        return self.vocab_size if self.image_token_index is None else int(self.image_token_index)

    @property
    def context_window(self) -> int:
        """Most positions (prompt + image tokens + new tokens) one sequence may use.

        ``max_position_embeddings``, times the ``factor`` of linear or dynamic RoPE scaling: linear scaling
        divides positions by the factor; dynamic (NTK) scaling raises the rotary base once a sequence passes
        ``max_position_embeddings``, which keeps up to ``factor`` times as many positions within the range the
        scaling was designed for (quality still degrades gradually past ``max_position_embeddings``).
        """
        factor = 1.0
        if self.rope_scaling:
            factor = max(1.0, float(self.rope_scaling.get("factor", 1.0)))
        return int(self.max_position_embeddings * factor)

    @property
    def mixer_layer_indices(self) -> list[int]:
        s = self.structure
        if s.mixer_layers is not None:
            return sorted(int(i) for i in s.mixer_layers)
        return [i for i in range(self.num_hidden_layers) if (i + 1) % s.mixer_every == 0]

    def validate(self) -> MoAIConfig:
        check_config_schema(self)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
                f"{self.num_key_value_heads}"
            )
        if self.hidden_size % self.structure.mixer_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by mixer_heads {self.structure.mixer_heads}"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ("linear", "dynamic"):
                raise ConfigError(f"rope_scaling type {kind!r} is not supported; use 'linear', 'dynamic' or none")
            if float(self.rope_scaling.get("factor", 0)) <= 0:
                raise ConfigError("rope_scaling needs a positive 'factor'")
        bad = [i for i in self.mixer_layer_indices if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ConfigError(f"mixer layers {bad} lie outside the {self.num_hidden_layers} decoder layers")
        if self.structure.projector_type != "mlp2x_gelu":
            raise ConfigError(f"projector_type {self.structure.projector_type!r} is not supported (only 'mlp2x_gelu')")
        if self.structure.vision_select_feature != "patch":
            raise ConfigError("only vision_select_feature='patch' (CLS dropped) is supported")
        return self

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoAIConfig:
        """Build from a ``config.json`` dictionary (official InternLM2 keys plus optional ``moai_structure``)."""
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a JSON object, got {type(data).__name__}")
        kwargs: dict[str, Any] = {}
        for name in cls.__dataclass_fields__:
            if name == "structure":
                continue
            if name in data and data[name] is not None:
                kwargs[name] = data[name]
        if "rope_scaling" in data:
            kwargs["rope_scaling"] = data["rope_scaling"]
        # The official loader sets pad_token_id to -100 after loading; the tokenizer pads with </s> (id 2).
        pad = kwargs.get("pad_token_id", 2)
        if pad is None or (isinstance(pad, int) and not isinstance(pad, bool) and pad < 0):
            kwargs["pad_token_id"] = data.get("eos_token_id", 2)
        structure = MoAIStructure()
        block = data.get("moai_structure")
        if block is not None:
            if not isinstance(block, dict):
                raise ConfigError("'moai_structure' in config.json must be an object")
            known = {k: v for k, v in block.items() if k in _STRUCTURE_FIELDS}
            structure = MoAIStructure(**{**asdict(MoAIStructure()), **known})
            if "vision_config" in block:
                structure.vision_config = _clean_vision_config(block["vision_config"])
        try:
            cfg = cls(**kwargs, structure=structure)
        except TypeError as exc:
            raise ConfigError(f"config.json: {exc}") from exc
        cfg.validate()
        if block is not None and "compressor_dim" in block and block["compressor_dim"] != cfg.hidden_size:
            raise ConfigError("moai_structure.compressor_dim must equal hidden_size")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("structure")
        out["model_type"] = "internlm"
        out["architectures"] = ["MoAIModel"]
        out["image_token_index"] = self.image_token_id
        out["moai_structure"] = asdict(self.structure)
        out["moai_structure"]["image_mean_0_1"] = list(self.structure.image_mean_0_1)
        out["moai_structure"]["image_std_0_1"] = list(self.structure.image_std_0_1)
        out["moai_structure"]["num_patches"] = self.structure.num_patches
        out["moai_structure"]["img_length"] = self.structure.num_patches
        out["moai_structure"]["compressor_dim"] = self.hidden_size
        return out

    def copy(self) -> MoAIConfig:
        return copy.deepcopy(self)


_VISION_KEYS = set(CLIP_L14_336_VISION_CONFIG) | {"model_type"}


def _clean_vision_config(raw: dict[str, Any]) -> dict[str, Any]:
    """Keep the structural keys of a stored CLIP vision config (drop generation/pretrained noise)."""
    if not isinstance(raw, dict):
        raise ConfigError("moai_structure.vision_config must be an object")
    out = dict(CLIP_L14_336_VISION_CONFIG)
    out.update({k: v for k, v in raw.items() if k in _VISION_KEYS and k != "model_type"})
    return out


__all__ = [
    "MoAIConfig",
    "MoAIStructure",
    "CLIP_L14_336_VISION_CONFIG",
    "DEFAULT_VISION_TOWER_ID",
    "CLIP_MEAN",
    "CLIP_STD",
    "ATTN_IMPLEMENTATIONS",
    "check_attn_implementation",
]
