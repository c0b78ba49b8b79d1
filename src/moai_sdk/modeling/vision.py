"""The CLIP vision tower, its position-table interpolation, and the projector into the LLM width.

MoAI feeds 490x490 images (35 x 35 = 1225 patches of 14 px) to CLIP ViT-L/14-336, whose position table has a
24 x 24 grid. The official code resizes that table once (:func:`interpolate_position_table`) and takes the
hidden states of the last encoder layer *before* the post-layernorm, dropping the CLS token.

Module names follow the official checkpoint: ``vit.vision_tower.vision_model.{embeddings, pre_layrnorm,
encoder, post_layernorm}``. The CLIP blocks themselves are transformers' (``CLIPVisionModel``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .config import MoAIConfig


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


def _clip_vision_model(vision_config: dict) -> nn.Module:
    """transformers' CLIP vision model built from a config dict (random weights, no download)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(**vision_config)
    cfg._attn_implementation = "sdpa"
    return CLIPVisionModel(cfg)


class _VisionTowerHolder(nn.Module):
    """Gives the CLIP transformer the official path ``vision_tower.vision_model`` on any transformers version."""

    def __init__(self, vision_config: dict):
        super().__init__()
        model = _clip_vision_model(vision_config)
        # transformers < 5 wraps the transformer in `.vision_model`; 5.x puts its parts on the model itself.
        self.vision_model = getattr(model, "vision_model", model)


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
        if self.select_layer == -1:
            h = vm.encoder(inputs_embeds=h).last_hidden_state
        else:
            h = vm.encoder(inputs_embeds=h, output_hidden_states=True).hidden_states[self.select_layer]
        return h[:, 1:]


class VisionProjector(nn.Sequential):
    """Linear(mm_hidden -> hidden), exact GELU, Linear(hidden -> hidden) (keys ``vision_proj.0`` and ``.2``)."""

    def __init__(self, config: MoAIConfig):
        super().__init__(
            nn.Linear(config.structure.mm_hidden_size, config.hidden_size),
            nn.GELU(),
            nn.Linear(config.hidden_size, config.hidden_size),
        )


__all__ = ["CLIPVisionTower", "VisionProjector", "interpolate_position_table"]
