"""MoAI-Compressor: condenses the auxiliary tokens into 64 learned latents, the way a Perceiver resampler does.

Input ("media"): the word embeddings of the verbalized expert outputs followed by the 1225 projected CLIP
tokens of the panoptic colour map. Each block: LayerNorm on media and on latents; queries from the latents,
keys/values from [media; latents]; heads x dim_head attention with the query scaled by dim_head ** -0.5 and the
row maximum subtracted before the softmax; output projection; residual. Then LayerNorm-Linear-GELU-Linear
(no biases) with a residual. A final LayerNorm. Module names follow the official checkpoint.

The official resampler attends to padding rows of a batched verbalization; ``media_mask`` lets a batch give
each sample exactly its single-sample result (padding keys are masked out).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MoAIConfig


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = dim_head**-0.5
        inner = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        media = self.norm_media(media)
        latents = self.norm_latents(latents)
        b, n_lat, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((media, latents), dim=1)).chunk(2, dim=-1)
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        q = q * self.scale
        sim = q @ k.transpose(-1, -2)
        if key_mask is not None:
            sim = sim.masked_fill(~key_mask[:, None, None, :], torch.finfo(sim.dtype).min)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        out = sim.softmax(dim=-1) @ v
        return self.to_out(out.transpose(1, 2).reshape(b, n_lat, -1))


def _feed_forward(dim: int, mult: float) -> nn.Sequential:
    inner = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False)
    )


class MoAICompressor(nn.Module):
    """The MoAI-Compressor: ``media`` [B, N, D] (verbalization embeddings + panoptic-map tokens) -> [B, 64, D].

    A Perceiver resampler: learned latents attend to [media; latents] in ``depth`` blocks (see the module text).
    """

    def __init__(
        self, dim: int, depth: int = 4, dim_head: int = 64, heads: int = 4, num_latents: int = 64, ff_mult: float = 1
    ):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), _feed_forward(dim, ff_mult)]) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    @classmethod
    def from_config(cls, config: MoAIConfig) -> MoAICompressor:
        s = config.structure
        return cls(
            config.hidden_size,
            s.compressor_depth,
            s.compressor_dim_head,
            s.compressor_heads,
            s.compressor_latents,
            s.compressor_ff_mult,
        )

    def forward(self, media: torch.Tensor, media_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``media`` [B, N, D] -> [B, num_latents, D]; ``media_mask`` [B, N] bool (True = real token)."""
        b = media.shape[0]
        latents = self.latents.to(media.dtype).unsqueeze(0).expand(b, -1, -1)
        key_mask = None
        if media_mask is not None and not bool(media_mask.all()):
            ones = torch.ones(b, latents.shape[1], dtype=torch.bool, device=media.device)
            key_mask = torch.cat((media_mask.bool(), ones), dim=1)
        for attn, ff in self.layers:
            latents = attn(media, latents, key_mask) + latents
            latents = ff(latents) + latents
        return self.norm(latents)


#: The former name of :class:`MoAICompressor` (the Perceiver is how it works, not what it is); kept as an alias.
PerceiverResampler = MoAICompressor

__all__ = ["MoAICompressor", "PerceiverResampler", "PerceiverAttention"]
