"""Deterministic synthetic PSGTR weights (the recipe the golden fixtures were generated with).

They let tests and demos run the full network without the 532 MB checkpoint: the numbers are meaningless but
reproducible bit for bit from a seed, and the weights are scaled so that the outputs stay in a sane range
(confident classes, a silent "no relation" column, positive mask logits).
"""

from __future__ import annotations

import math

import torch

from .checkpoint import to_checkpoint_keys
from .config import PSGTRConfig
from .modeling import PSGTR

#: Seed of the golden fixtures.
GOLDEN_SEED = 20240307


def synthetic_state_dict(config: PSGTRConfig | None = None, seed: int = GOLDEN_SEED) -> dict[str, torch.Tensor]:
    """A state dict in the checkpoint (mmcv-1) spelling, drawn key by key in state-dict order.

    Per key, with one ``torch.Generator`` seeded with ``seed``: ``num_batches_tracked`` -> 0 (no draw);
    ``running_mean`` -> 0.1 * randn; ``running_var`` -> 0.75 + 0.5 * rand; other 1-D ``weight`` -> 1 + 0.1 * randn;
    other 1-D tensors -> 0.02 * randn; ``bbox_head.query_embed.weight`` -> randn; everything else ->
    randn / sqrt(fan_in) with fan_in = prod(shape[1:]). Then the three classifier weights are multiplied by 8,
    the "no relation" bias is set to -20 and both mask heads' output bias to 1.
    """
    shapes = {name: tensor.shape for name, tensor in PSGTR(config or PSGTRConfig()).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in to_checkpoint_keys(shapes).items():
        if name.endswith("num_batches_tracked"):
            out[name] = torch.zeros((), dtype=torch.int64)
        elif name.endswith("running_mean"):
            out[name] = 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("running_var"):
            out[name] = 0.5 * torch.rand(shape, generator=g) + 0.75
        elif len(shape) == 1 and name.endswith(".weight"):
            out[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            out[name] = 0.02 * torch.randn(shape, generator=g)
        elif name == "bbox_head.query_embed.weight":
            out[name] = torch.randn(shape, generator=g)
        else:
            out[name] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    for head in ("sub_cls_embed", "obj_cls_embed", "rel_cls_embed"):
        out[f"bbox_head.{head}.weight"] *= 8
    out["bbox_head.rel_cls_embed.bias"][0] = -20.0
    for head in ("sub_mask_head", "obj_mask_head"):
        out[f"bbox_head.{head}.out_lay.bias"].fill_(1.0)
    return out


__all__ = ["GOLDEN_SEED", "synthetic_state_dict"]
