"""The tiny random MoAI checkpoint: the structure of the moai-tiny oracle fixture, random weights scaled so that
activations and logits stay in a sane range, saved in the official layout with a small sentencepiece tokenizer."""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
from importlib import resources
from pathlib import Path
from typing import Any, Union

import torch

from ..modeling import MoAIConfig, MoAIForCausalLM
from ..modeling.config import CLIP_L14_336_VISION_CONFIG

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

#: Version of the tiny recipe; a folder built with another version (or seed) is rebuilt.
TINY_RECIPE_VERSION = 1
_MARKER = "moai_sdk_tiny.json"

#: The tiny MoAI: the structure of the moai-tiny oracle fixture (InternLM2 8 x 32, CLIP 2 x 40 at 490 px).
TINY_MOAI_CONFIG: dict[str, Any] = {
    "architectures": ["MoAIModel"],
    "model_type": "internlm",
    "vocab_size": 1000,
    "hidden_size": 32,
    "intermediate_size": 56,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "pad_token_id": 2,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "bias": False,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "torch_dtype": "float32",
    "image_token_index": 1000,
    "moai_structure": {
        # CLIP ViT-L/14-336 as MoAI runs it (490 px, patch 14), narrowed and shallowed
        "vision_config": {
            **CLIP_L14_336_VISION_CONFIG,
            "hidden_size": 40,
            "intermediate_size": 60,
            "projection_dim": 24,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
        "image_size": 490,
        "patch_size": 14,
        "vision_select_layer": -1,
        "vision_select_feature": "patch",
        "vision_pos_interp_from_grid": 24,
        "vision_pos_interp_to_grid": 35,
        "mm_hidden_size": 40,
        "projector_type": "mlp2x_gelu",
        "mixer_every": 8,
        "mixer_layers": [7],
        "mixer_rank": 64,
        "mixer_heads": 4,
        "gate_outputs": 3,
        "gate_softmax_dtype": "float16",
        "compressor_depth": 4,
        "compressor_latents": 64,
        "compressor_heads": 4,
        "compressor_dim_head": 64,
        "compressor_ff_mult": 1,
        "compressor_dim": 32,
        "plora_rank": 256,
        "plora_alpha": 256,
        "image_mean_0_1": [0.48145466, 0.4578275, 0.40821073],
        "image_std_0_1": [0.26862954, 0.26130258, 0.27577711],
        "img_length": 1225,
    },
}

#: The tokenizer settings saved next to the tiny tokenizer (the official class defaults).
TINY_TOKENIZER_CONFIG: dict[str, Any] = {
    "tokenizer_class": "MoAITokenizer",
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "</s>",
    "add_bos_token": True,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
    "padding_side": "left",
}

#: Extra gain (on top of 1/sqrt(fan_in)) of a few weights, so that logits have a spread of a few units and
#: the mixer gates are not uniform.
_GAINS = {"output.weight": 3.0, "wqkv.Plora_main.weight": 2.5, "moai_GA_img.weight": 2.0, "moai_GA_lang.weight": 2.0}


def tiny_config() -> MoAIConfig:
    """The :class:`~moai_sdk.modeling.MoAIConfig` of the tiny MoAI."""
    return MoAIConfig.from_dict(copy.deepcopy(TINY_MOAI_CONFIG))


@torch.no_grad()
def init_tiny_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Fill every parameter of ``model`` from one generator seeded with ``seed`` (state-dict order).

    Norm weights ~ 1 + 0.1 N(0, 1); other 1-D parameters (biases, the CLIP class embedding) ~ 0.1 N(0, 1);
    token embeddings and compressor latents ~ N(0, 1); every other matrix ~ N(0, 1) / sqrt(fan_in) times a gain
    (3 for the LM head, 2.5 for the fused qkv projection, 2 for the mixer gates, else 1).
    """
    g = torch.Generator().manual_seed(int(seed))
    for name, param in model.named_parameters():
        shape = tuple(param.shape)
        if len(shape) == 1 and name.endswith(".weight"):
            value = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            value = 0.1 * torch.randn(shape, generator=g)
        elif name.endswith(("tok_embeddings.weight", "latents")):
            value = torch.randn(shape, generator=g)
        else:
            gain = next((v for k, v in _GAINS.items() if name.endswith(k)), 1.0)
            value = gain * torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        param.copy_(value.to(param.dtype))


def _marker_matches(directory: Path, seed: int) -> bool:
    marker = directory / _MARKER
    if not marker.is_file():
        return False
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    needed = ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json")
    return (
        data.get("version") == TINY_RECIPE_VERSION
        and data.get("seed") == seed
        and all((directory / n).is_file() for n in needed)
    )


def build_tiny_moai(directory: PathLike, seed: int = 0, *, overwrite: bool = False) -> Path:
    """Write a tiny random MoAI checkpoint (official layout, with tokenizer) to ``directory``; returns it.

    A folder already built by this function with the same ``seed`` is reused unless ``overwrite=True``.
    About 1.3 M parameters, 5 MB on disk, a second to build.
    """
    out = Path(directory)
    if not overwrite and _marker_matches(out, seed):
        logger.info("reusing the tiny MoAI in %s", out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    model = MoAIForCausalLM(tiny_config())
    init_tiny_weights(model, seed)
    model.eval()
    model.save_pretrained(str(out))
    tokenizer = resources.files("moai_sdk").joinpath("data", "tiny_tokenizer.model")
    with resources.as_file(tokenizer) as path:
        shutil.copyfile(path, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps(TINY_TOKENIZER_CONFIG, indent=2), encoding="utf-8")
    (out / _MARKER).write_text(json.dumps({"version": TINY_RECIPE_VERSION, "seed": seed}), encoding="utf-8")
    logger.info("built a tiny random MoAI in %s", out)
    return out


__all__ = [
    "TINY_MOAI_CONFIG",
    "TINY_RECIPE_VERSION",
    "TINY_TOKENIZER_CONFIG",
    "tiny_config",
    "init_tiny_weights",
    "build_tiny_moai",
]
