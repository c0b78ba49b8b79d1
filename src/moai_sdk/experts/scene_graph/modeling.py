"""The PSGTR network (OpenPSG, ECCV 2022) in plain PyTorch, inference only.

ResNet backbone -> 1x1 input projection of C5 -> DETR encoder/decoder (post-norm, sine positional encoding)
over learned triplet queries -> per query: subject/object class and box, predicate class, and subject/object
mask logits from a DETR-panoptic mask head (attention maps + FPN-style upsampling over C4, C3, C2).

Module and parameter names follow the mmdet-3 spelling MoAI uses in memory (``self_attn``/``cross_attn``/``ffn``),
so a state dict in that spelling loads as is; :mod:`.checkpoint` maps the mmcv-1 spelling of the released
checkpoint (``attentions.0``/``attentions.1``/``ffns.0``) onto it. The module registration order reproduces the
order of the original state dict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import DependencyError, InputError
from .config import PSGTRConfig


# --------------------------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------------------------
class ResNetBackbone(nn.Module):
    """torchvision's ResNet (stride on the 3x3 conv, plain BatchNorm) returning the four stage outputs.

    With the module in eval mode BatchNorm uses the running statistics stored in the checkpoint, as mmdet's
    ``norm_eval=True`` does. Parameter names equal torchvision's minus ``fc``.
    """

    def __init__(self, depth: int = 50, norm_eps: float = 1e-5):
        super().__init__()
        try:
            from torchvision import models
        except ImportError as exc:  # pragma: no cover - torchvision ships with the SDK's image code
            raise DependencyError("the PSGTR backbone needs torchvision: pip install torchvision") from exc
        net = getattr(models, f"resnet{depth}")(weights=None)
        self.depth = depth
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eps = norm_eps

    @property
    def out_channels(self) -> tuple[int, int, int, int]:
        # bottleneck ResNets (50, 101) widen each stage 4x; basic-block ones (18, 34) do not
        return (256, 512, 1024, 2048) if self.depth >= 50 else (64, 128, 256, 512)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return c2, c3, c4, c5


# --------------------------------------------------------------------------------------------------------------
# Positional encoding
# --------------------------------------------------------------------------------------------------------------
def sine_position_encoding(
    mask: torch.Tensor, num_feats: int, temperature: float = 10000.0, eps: float = 1e-6
) -> torch.Tensor:
    """DETR's normalised sine encoding of a padding mask (True = padded) -> [B, 2*num_feats, H, W].

    Cumulative sums of the valid positions along H and W are normalised to (0, 2*pi] by the last row/column,
    divided by ``temperature ** (2*floor(i/2)/num_feats)``, and expanded as sin/cos interleaved
    (sin on even channels, cos on odd ones); the y half comes first.
    """
    not_mask = (~mask).to(torch.int32)
    y = not_mask.cumsum(1, dtype=torch.float32)
    x = not_mask.cumsum(2, dtype=torch.float32)
    scale = 2 * math.pi
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    b, h, w = mask.shape

    def expand(coord: torch.Tensor) -> torch.Tensor:
        pos = coord[:, :, :, None] / dim_t
        return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4).view(b, h, w, -1)

    return torch.cat((expand(y), expand(x)), dim=3).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------------------------------
# Transformer
# --------------------------------------------------------------------------------------------------------------
class PositionalAttention(nn.Module):
    """Multi-head attention with positional encodings added to queries and keys (not values) and a residual.

    Wraps ``nn.MultiheadAttention`` under the name ``attn`` (as mmcv does) and runs it sequence-first, which
    keeps PyTorch's fused fast path out of the way.
    """

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        query_pos: torch.Tensor,
        key_pos: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q = (query + query_pos).transpose(0, 1)
        k = (key + key_pos).transpose(0, 1)
        v = value.transpose(0, 1)
        out = self.attn(q, k, v, key_padding_mask=key_padding_mask)[0]
        return query + out.transpose(0, 1)


class FeedForward(nn.Module):
    """Linear -> ReLU -> Linear with a residual; parameter names follow mmcv's ``FFN``."""

    def __init__(self, embed_dim: int, hidden_dim: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.ReLU(inplace=True)),
            nn.Linear(hidden_dim, embed_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


class EncoderLayer(nn.Module):
    """Post-norm DETR encoder layer: norm(x + self-attention), norm(x + FFN)."""

    def __init__(self, config: PSGTRConfig):
        super().__init__()
        self.self_attn = PositionalAttention(config.embed_dim, config.num_heads)
        self.ffn = FeedForward(config.embed_dim, config.ffn_dim)
        self.norms = nn.ModuleList(nn.LayerNorm(config.embed_dim, eps=config.norm_eps) for _ in range(2))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        x = self.norms[0](self.self_attn(x, x, x, pos, pos, key_padding_mask))
        return self.norms[1](self.ffn(x))


class DecoderLayer(nn.Module):
    """Post-norm DETR decoder layer: self-attention, cross-attention to the memory, FFN, each followed by a norm."""

    def __init__(self, config: PSGTRConfig):
        super().__init__()
        self.self_attn = PositionalAttention(config.embed_dim, config.num_heads)
        self.cross_attn = PositionalAttention(config.embed_dim, config.num_heads)
        self.ffn = FeedForward(config.embed_dim, config.ffn_dim)
        self.norms = nn.ModuleList(nn.LayerNorm(config.embed_dim, eps=config.norm_eps) for _ in range(3))

    def forward(
        self,
        target: torch.Tensor,
        query_pos: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        key_padding_mask: torch.Tensor,
    ) -> torch.Tensor:
        t = self.norms[0](self.self_attn(target, target, target, query_pos, query_pos))
        t = self.norms[1](self.cross_attn(t, memory, memory, query_pos, memory_pos, key_padding_mask))
        return self.norms[2](self.ffn(t))


class TransformerEncoder(nn.Module):
    def __init__(self, config: PSGTRConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_encoder_layers))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, pos, key_padding_mask)
        return x


class TransformerDecoder(nn.Module):
    """Decoder returning every layer's output passed through the shared final LayerNorm ``post_norm``."""

    def __init__(self, config: PSGTRConfig):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_decoder_layers))
        self.post_norm = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)

    def forward(
        self, query_pos: torch.Tensor, memory: torch.Tensor, memory_pos: torch.Tensor, key_padding_mask: torch.Tensor
    ) -> torch.Tensor:
        target = torch.zeros_like(query_pos)
        outputs = []
        for layer in self.layers:
            target = layer(target, query_pos, memory, memory_pos, key_padding_mask)
            outputs.append(self.post_norm(target))
        return torch.stack(outputs)


class DetrTransformer(nn.Module):
    """Encoder over the flattened feature map, decoder over the learned queries (no final encoder norm)."""

    def __init__(self, config: PSGTRConfig):
        super().__init__()
        self.encoder = TransformerEncoder(config)
        self.decoder = TransformerDecoder(config)

    def forward(
        self, src: torch.Tensor, mask: torch.Tensor, query_embed: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """src/pos [B, C, H, W], mask [B, H, W] -> (decoder outputs [L, B, Q, C], memory [B, C, H, W])."""
        b, c, h, w = src.shape
        x = src.view(b, c, -1).permute(0, 2, 1)
        pos = pos.view(b, c, -1).permute(0, 2, 1)
        key_padding_mask = mask.view(b, -1)
        query_pos = query_embed.unsqueeze(0).expand(b, -1, -1)
        memory = self.encoder(x, pos, key_padding_mask)
        hidden = self.decoder(query_pos, memory, pos, key_padding_mask)
        return hidden, memory.permute(0, 2, 1).reshape(b, c, h, w)


# --------------------------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class AttentionMaps(nn.Module):
    """Per-query, per-head attention maps over the encoder memory (DETR's ``MHAttentionMap``).

    The key projection is the Linear's weight applied as a 1x1 convolution; the softmax runs jointly over
    heads x H x W.
    """

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(embed_dim, embed_dim)
        self.k_linear = nn.Linear(embed_dim, embed_dim)
        self.scale = float(embed_dim / num_heads) ** -0.5

    def forward(self, query: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """query [B, Q, C], memory [B, C, H, W], mask [B, H, W] (True = ignore) -> [B, Q, heads, H, W]."""
        q = self.q_linear(query)
        k = F.conv2d(memory, self.k_linear.weight[:, :, None, None], self.k_linear.bias)
        head_dim = q.shape[-1] // self.num_heads
        qh = q.view(q.shape[0], q.shape[1], self.num_heads, head_dim)
        kh = k.view(k.shape[0], self.num_heads, head_dim, k.shape[-2], k.shape[-1])
        weights = torch.einsum("bqnc,bnchw->bqnhw", qh * self.scale, kh)
        if mask is not None:
            weights = weights.masked_fill(mask[:, None, None], float("-inf"))
        return F.softmax(weights.flatten(2), dim=-1).view(weights.shape)


class MaskHead(nn.Module):
    """DETR-panoptic ``MaskHeadSmallConv``: conv/GroupNorm stack upsampled through C4, C3 and C2 adapters.

    Input per query: the projected C5 map concatenated with the query's attention maps. Output: one mask logit
    map per query at stride 4 of the (padded) input.
    """

    def __init__(self, dims: tuple[int, int, int, int, int], fpn_dims: tuple[int, int, int], chunk: int | None):
        super().__init__()
        d0, d1, d2, d3, d4 = dims
        self.lay1 = nn.Conv2d(d0, d0, 3, padding=1)
        self.gn1 = nn.GroupNorm(8, d0)
        self.lay2 = nn.Conv2d(d0, d1, 3, padding=1)
        self.gn2 = nn.GroupNorm(8, d1)
        self.lay3 = nn.Conv2d(d1, d2, 3, padding=1)
        self.gn3 = nn.GroupNorm(8, d2)
        self.lay4 = nn.Conv2d(d2, d3, 3, padding=1)
        self.gn4 = nn.GroupNorm(8, d3)
        self.lay5 = nn.Conv2d(d3, d4, 3, padding=1)
        self.gn5 = nn.GroupNorm(8, d4)
        self.out_lay = nn.Conv2d(d4, 1, 3, padding=1)
        self.adapter1 = nn.Conv2d(fpn_dims[0], d1, 1)
        self.adapter2 = nn.Conv2d(fpn_dims[1], d2, 1)
        self.adapter3 = nn.Conv2d(fpn_dims[2], d3, 1)
        self.chunk = chunk

    @staticmethod
    def _add_fpn(fpn: torch.Tensor, x: torch.Tensor, batch: int) -> torch.Tensor:
        """fpn [B, C, H, W] + nearest-upsampled x [B*q, C, h, w] broadcast over the q queries of each image."""
        up = F.interpolate(x, size=fpn.shape[-2:], mode="nearest")
        up = up.view(batch, -1, *up.shape[1:])
        return (fpn.unsqueeze(1) + up).flatten(0, 1)

    def _run(
        self, src: torch.Tensor, maps: torch.Tensor, fpns: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        b, q = maps.shape[:2]
        x = torch.cat([src.unsqueeze(1).expand(-1, q, -1, -1, -1).flatten(0, 1), maps.flatten(0, 1)], 1)
        x = F.relu(self.gn1(self.lay1(x)))
        x = F.relu(self.gn2(self.lay2(x)))
        x = F.relu(self.gn3(self.lay3(self._add_fpn(fpns[0], x, b))))
        x = F.relu(self.gn4(self.lay4(self._add_fpn(fpns[1], x, b))))
        x = F.relu(self.gn5(self.lay5(self._add_fpn(fpns[2], x, b))))
        x = self.out_lay(x)
        return x.view(b, q, *x.shape[-2:])

    def forward(
        self, src: torch.Tensor, attention_maps: torch.Tensor, c4: torch.Tensor, c3: torch.Tensor, c2: torch.Tensor
    ) -> torch.Tensor:
        """src [B, C, h, w], attention_maps [B, Q, heads, h, w] -> mask logits [B, Q, H/4, W/4]."""
        fpns = (self.adapter1(c4), self.adapter2(c3), self.adapter3(c2))
        num_queries = attention_maps.shape[1]
        chunk = self.chunk or num_queries
        parts = [
            self._run(src, attention_maps[:, start : start + chunk], fpns) for start in range(0, num_queries, chunk)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


@dataclass
class PSGTROutput:
    """Raw network outputs.

    ``*_logits`` and ``*_boxes`` hold every decoder layer ([L, B, Q, ...]; inference reads the last one);
    boxes are sigmoid (cx, cy, w, h) relative to the resized, unpadded image; mask logits cover the padded input
    at stride 4. ``features`` (C2..C5) is filled only when asked for.
    """

    sub_logits: torch.Tensor
    obj_logits: torch.Tensor
    rel_logits: torch.Tensor
    sub_boxes: torch.Tensor
    obj_boxes: torch.Tensor
    sub_mask_logits: torch.Tensor | None = None
    obj_mask_logits: torch.Tensor | None = None
    features: tuple[torch.Tensor, ...] | None = None


class PSGTRHead(nn.Module):
    """Input projection, transformer and the per-query triplet heads (``bbox_head`` in the checkpoint)."""

    def __init__(self, config: PSGTRConfig, in_channels: tuple[int, int, int, int]):
        super().__init__()
        c = config.embed_dim
        self.config = config
        self.transformer = DetrTransformer(config)
        self.input_proj = nn.Conv2d(in_channels[3], c, kernel_size=1)
        self.query_embed = nn.Embedding(config.num_queries, c)
        self.obj_cls_embed = nn.Linear(c, config.num_classes + 1)
        self.obj_box_embed = MLP(c, c, 4, 3)
        self.sub_cls_embed = nn.Linear(c, config.num_classes + 1)
        self.sub_box_embed = MLP(c, c, 4, 3)
        self.rel_cls_embed = nn.Linear(c, config.num_relations + 1)
        self.sub_bbox_attention = AttentionMaps(c, config.num_heads)
        self.obj_bbox_attention = AttentionMaps(c, config.num_heads)
        fpn_dims = (in_channels[2], in_channels[1], in_channels[0])
        self.sub_mask_head = MaskHead(config.mask_head_dims, fpn_dims, config.mask_head_chunk)
        self.obj_mask_head = MaskHead(config.mask_head_dims, fpn_dims, config.mask_head_chunk)

    def forward(
        self, feats: tuple[torch.Tensor, ...], padding_mask: torch.Tensor, with_masks: bool = True
    ) -> PSGTROutput:
        c2, c3, c4, c5 = feats
        src = self.input_proj(c5)
        mask = F.interpolate(padding_mask[:, None].to(src.dtype), size=src.shape[-2:]).to(torch.bool)[:, 0]
        pos = sine_position_encoding(mask, self.config.embed_dim // 2, self.config.pos_temperature, self.config.pos_eps)
        hidden, memory = self.transformer(src, mask, self.query_embed.weight, pos.to(src.dtype))
        out = PSGTROutput(
            sub_logits=self.sub_cls_embed(hidden),
            obj_logits=self.obj_cls_embed(hidden),
            rel_logits=self.rel_cls_embed(hidden),
            sub_boxes=self.sub_box_embed(hidden).sigmoid(),
            obj_boxes=self.obj_box_embed(hidden).sigmoid(),
        )
        if with_masks:
            last = hidden[-1]
            sub_maps = self.sub_bbox_attention(last, memory, mask)
            obj_maps = self.obj_bbox_attention(last, memory, mask)
            out.sub_mask_logits = self.sub_mask_head(src, sub_maps, c4, c3, c2)
            out.obj_mask_logits = self.obj_mask_head(src, obj_maps, c4, c3, c2)
        return out


class PSGTR(nn.Module):
    """The whole PSGTR network. Build it, load weights (:mod:`.checkpoint`), call it in eval mode."""

    def __init__(self, config: PSGTRConfig | None = None):
        super().__init__()
        self.config = config or PSGTRConfig()
        self.backbone = ResNetBackbone(self.config.depth, self.config.norm_eps)
        self.bbox_head = PSGTRHead(self.config, self.backbone.out_channels)
        self.eval()

    def forward(
        self,
        pixel_values: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        *,
        with_masks: bool = True,
        return_features: bool = False,
    ) -> PSGTROutput:
        """pixel_values [B, 3, H, W] (normalised, padded); padding_mask [B, H, W] True on ignored pixels.

        ``padding_mask=None`` attends to every pixel, which is what MoAI's patched pipeline does.
        """
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise InputError(f"PSGTR expects pixel values [B, 3, H, W]; got {tuple(pixel_values.shape)}")
        b, _, h, w = pixel_values.shape
        if padding_mask is None:
            padding_mask = torch.zeros((b, h, w), dtype=torch.bool, device=pixel_values.device)
        elif padding_mask.shape != (b, h, w):
            raise InputError(f"padding_mask must have shape {(b, h, w)}; got {tuple(padding_mask.shape)}")
        feats = self.backbone(pixel_values)
        out = self.bbox_head(feats, padding_mask, with_masks=with_masks)
        if return_features:
            out.features = feats
        return out


__all__ = [
    "PSGTR",
    "PSGTROutput",
    "PSGTRHead",
    "ResNetBackbone",
    "DetrTransformer",
    "MaskHead",
    "AttentionMaps",
    "MLP",
    "sine_position_encoding",
]
