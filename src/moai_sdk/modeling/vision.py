"""The CLIP vision tower, its position-table interpolation, and the projector into the LLM width.

MoAI feeds 490x490 images (35 x 35 = 1225 patches of 14 px) to CLIP ViT-L/14-336, whose position table has a
24 x 24 grid. The official code resizes that table once (:func:`interpolate_position_table`) and takes the
hidden states of the last encoder layer *before* the post-layernorm, dropping the CLS token.

Module names follow the official checkpoint: ``vit.vision_tower.vision_model.{embeddings, pre_layrnorm,
encoder, post_layernorm}``. The CLIP blocks are written here with transformers' ``CLIPVisionModel`` parameter
names and registration order and the same torch operations in the same order as its ``sdpa`` path (patch conv,
class token, position table; pre-LN blocks with quick-GELU MLPs; ``scaled_dot_product_attention`` with
``scale=head_dim**-0.5``), so outputs are identical bit for bit (``tests/test_vision_tower.py`` compares them with
transformers) while building or loading a MoAI model imports no transformers (and, through it, no torchao or
torchvision: about 330 MiB of resident memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..devices import embedding
from ..errors import ConfigError, InputError
from .config import MoAIConfig

#: transformers' ``CLIPVisionConfig`` defaults, for keys a checkpoint's ``vision_config`` leaves out.
_CLIP_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}


def interpolate_position_table(table: torch.Tensor, from_grid: int, to_grid: int) -> torch.Tensor:
    """Resize a CLIP position table [1 + from_grid**2, D] to [1 + to_grid**2, D] the way MoAI does.

    The class row is kept bit for bit; the grid rows (row-major) are resized in float32 with bicubic
    interpolation (``align_corners=False``), rounded to float16, and the result is stored in the table's dtype.
    A table that already has ``1 + to_grid**2`` rows is returned unchanged.
    """
    n, d = table.shape
    if n == 1 + to_grid * to_grid:
        return table
    if n != 1 + from_grid * from_grid:
        raise InputError(
            f"position table has {n} rows; expected {1 + from_grid**2} (grid {from_grid}) or {1 + to_grid**2}"
        )
    cls_row = table[:1]
    grid = table[1:].reshape(1, from_grid, from_grid, d).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(to_grid, to_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(to_grid * to_grid, d).half()
    return torch.cat((cls_row.to(torch.float32), grid.to(torch.float32)), dim=0).to(table.dtype)


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": _quick_gelu, "gelu": F.gelu}


class CLIPEmbeddings(nn.Module):
    """Patch embedding (conv, no bias), class token and learned position table."""

    def __init__(self, c: dict):
        super().__init__()
        width, patch = c["hidden_size"], c["patch_size"]
        self.image_size = c["image_size"]
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.patch_embedding = nn.Conv2d(c["num_channels"], width, kernel_size=patch, stride=patch, bias=False)
        positions = (self.image_size // patch) ** 2 + 1
        self.position_embedding = embedding(positions, width)
        # counted on the CPU and moved: arange on the meta device (where the loader builds) imports sympy (~110 MiB)
        ids = torch.arange(positions, device="cpu").to(self.class_embedding.device)
        self.register_buffer("position_ids", ids.expand((1, -1)), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = pixel_values.shape
        if (height, width) != (self.image_size, self.image_size):
            raise InputError(f"the CLIP tower takes {self.image_size}x{self.image_size} images; got {height}x{width}")
        patches = self.patch_embedding(pixel_values.to(dtype=self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)
        embeddings = torch.cat([self.class_embedding.expand(batch, 1, -1), patches], dim=1)
        return embeddings + self.position_embedding(self.position_ids)


class CLIPAttention(nn.Module):
    """Multi-head self-attention (no mask) through ``scaled_dot_product_attention``."""

    def __init__(self, c: dict):
        super().__init__()
        width = c["hidden_size"]
        self.head_dim = width // c["num_attention_heads"]
        self.scale = self.head_dim**-0.5
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape[:-1]
        heads = (*shape, -1, self.head_dim)
        q = self.q_proj(hidden).view(heads).transpose(1, 2)
        k = self.k_proj(hidden).view(heads).transpose(1, 2)
        v = self.v_proj(hidden).view(heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, scale=self.scale, is_causal=False)
        out = out.reshape(out.shape[0], -1, shape[-1], v.shape[-1]).transpose(1, 2).contiguous()
        return self.out_proj(out.reshape(*shape, -1).contiguous())


class CLIPMLP(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.activation = _ACTIVATIONS[c["hidden_act"]]
        self.fc1 = nn.Linear(c["hidden_size"], c["intermediate_size"])
        self.fc2 = nn.Linear(c["intermediate_size"], c["hidden_size"])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(hidden)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, c: dict):
        super().__init__()
        self.self_attn = CLIPAttention(c)
        self.layer_norm1 = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])
        self.mlp = CLIPMLP(c)
        self.layer_norm2 = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.layer_norm1(hidden))
        return hidden + self.mlp(self.layer_norm2(hidden))


class CLIPEncoder(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(c) for _ in range(c["num_hidden_layers"]))

    def forward(self, hidden: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        """The hidden states after layer ``select_layer`` (-1: the last; 0 would be the input), computing no
        layer past it."""
        n = len(self.layers)
        stop = select_layer if select_layer >= 0 else n + 1 + select_layer
        if not 0 <= stop <= n:
            raise ConfigError(f"vision_select_layer {select_layer} is outside the {n}-layer CLIP tower")
        for layer in self.layers[:stop]:
            hidden = layer(hidden)
        return hidden


class CLIPVisionModel(nn.Module):
    """The CLIP ViT (``embeddings``, ``pre_layrnorm``, ``encoder``, ``post_layernorm``) from a vision config dict."""

    def __init__(self, vision_config: dict):
        super().__init__()
        c = {**_CLIP_DEFAULTS, **vision_config}
        if c["hidden_act"] not in _ACTIVATIONS:
            raise ConfigError(f"CLIP hidden_act {c['hidden_act']!r} is not supported; use one of {list(_ACTIVATIONS)}")
        self.embeddings = CLIPEmbeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])
        self.encoder = CLIPEncoder(c)
        self.post_layernorm = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])


class _VisionTowerHolder(nn.Module):
    """Gives the CLIP transformer the official path ``vision_tower.vision_model``."""

    def __init__(self, vision_config: dict):
        super().__init__()
        self.vision_model = CLIPVisionModel(vision_config)


class CLIPVisionTower(nn.Module):
    """CLIP patch features of the last encoder layer (pre post-layernorm), CLS dropped: [B, N, width]."""

    def __init__(self, config: MoAIConfig):
        super().__init__()
        s = config.structure
        self.vision_tower = _VisionTowerHolder(s.vision_config)
        self.select_layer = s.vision_select_layer

    @property
    def vision_model(self) -> nn.Module:
        return self.vision_tower.vision_model

    def reset_buffers(self) -> None:
        emb = self.vision_model.embeddings
        n = emb.position_embedding.weight.shape[0]
        device = emb.position_embedding.weight.device
        emb.register_buffer("position_ids", torch.arange(n, device=device).expand((1, -1)), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vm = self.vision_model
        dtype = vm.embeddings.patch_embedding.weight.dtype
        h = vm.pre_layrnorm(vm.embeddings(pixel_values.to(dtype)))
        return vm.encoder(h, self.select_layer)[:, 1:]


class VisionProjector(nn.Sequential):
    """Linear(mm_hidden -> hidden), exact GELU, Linear(hidden -> hidden) (keys ``vision_proj.0`` and ``.2``)."""

    def __init__(self, config: MoAIConfig):
        super().__init__(
            nn.Linear(config.structure.mm_hidden_size, config.hidden_size),
            nn.GELU(),
            nn.Linear(config.hidden_size, config.hidden_size),
        )


__all__ = ["CLIPVisionTower", "VisionProjector", "interpolate_position_table"]
