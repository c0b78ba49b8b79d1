"""`MoAIForCausalLM`: vision tower + projector, MoAI-Compressor, InternLM2 decoder with MoAI-Mixer, LM head.

The forward pass takes the official keyword inputs (``input_ids, pixel_values, aux_embeds, attention_mask,
im_mask, lang_mask``), so code written for the official ``MoAIModel`` can switch, and also the raw auxiliary
inputs our processor returns (``aux_input_ids``, ``aux_attention_mask``, ``panoptic_pixel_values``), from which
it builds ``aux_embeds`` exactly as the official code does (word embeddings of the verbalization followed by the
projected CLIP tokens of the panoptic colour map).

This module does no I/O: loading lives in :mod:`moai_sdk.modeling.loading`, decoding in
:mod:`moai_sdk.modeling.generation`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from .compressor import PerceiverResampler
from .config import MoAIConfig
from .internlm2 import InternLM2Model, KVCache
from .mixer import MoAIMixer
from .vision import CLIPVisionTower, VisionProjector


@dataclass
class MoAIOutput:
    """What a forward pass returns. ``logits`` covers the merged sequence (or only its last position)."""

    logits: torch.Tensor
    attention_mask: torch.Tensor | None = None  # merged [B, M] mask (prefill) or the extended mask (decode)
    cache: KVCache | None = None
    image_features: torch.Tensor | None = None
    compressed_aux: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def past_key_values(self) -> KVCache | None:
        return self.cache


_OFFICIAL_IGNORED = {"mode", "position_ids", "labels", "return_dict", "output_attentions", "output_hidden_states"}


class MoAIForCausalLM(nn.Module):
    """The MoAI model (official parameter names: ``model.*``, ``output``, ``vit.*``, ``vision_proj``,
    ``moai_compressor``)."""

    def __init__(self, config: MoAIConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.model = InternLM2Model(config, mixer_factory=MoAIMixer)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.vit = CLIPVisionTower(config)
        self.vision_proj = VisionProjector(config)
        self.moai_compressor = PerceiverResampler.from_config(config)
        #: Filled by the loader: where the weights came from and how they were quantized.
        self.load_info: dict[str, Any] = {}

    # ------------------------------------------------------------------ small helpers
    @property
    def device(self) -> torch.device:
        return self.output.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    @property
    def mixers(self) -> list[MoAIMixer]:
        return [layer.attention.mixer for layer in self.model.layers if layer.attention.mixer is not None]

    def set_mixer_mode(self, mode: str) -> None:
        """``"batched"`` (default) or ``"reference"`` (the official per-sample loop)."""
        if mode not in ("batched", "reference"):
            raise InputError(f"mixer mode must be 'batched' or 'reference', got {mode!r}")
        for m in self.mixers:
            m.mode = mode

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.tok_embeddings

    def reset_buffers(self) -> None:
        """Recreate non-persistent buffers (RoPE frequencies, CLIP position ids) after meta-device loading."""
        for layer in self.model.layers:
            layer.attention.rotary.reset_buffers()
        self.vit.reset_buffers()

    def parameter_bytes(self) -> int:
        """Bytes held by parameters and buffers (quantized weights count their packed size and statistics)."""
        total = 0
        for t in list(self.parameters()) + list(self.buffers()):
            total += t.numel() * t.element_size()
            state = getattr(t, "quant_state", None)
            if state is not None:
                total += _quant_state_bytes(state)
        return total

    # ------------------------------------------------------------------ building blocks
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP patch features -> projector: [B, 1225, hidden]."""
        feats = self.vit(pixel_values.to(self.device))
        return self.vision_proj(feats.to(self.vision_proj[0].weight.dtype))

    def build_aux_embeds(
        self,
        aux_input_ids: torch.Tensor,
        panoptic_pixel_values: torch.Tensor,
        aux_attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The official ``aux_embeds`` = [verbalization word embeddings ; projected panoptic-map tokens].

        Returns the embeddings and their key mask (padding of the verbalization = False).
        """
        ids = aux_input_ids.to(self.device)
        words = self.model.tok_embeddings(ids)
        map_tokens = self.encode_images(panoptic_pixel_values)
        aux = torch.cat((words, map_tokens.to(words.dtype)), dim=1)
        if aux_attention_mask is None:
            aux_attention_mask = torch.ones_like(ids)
        ones = torch.ones(map_tokens.shape[:2], dtype=torch.bool, device=self.device)
        mask = torch.cat((aux_attention_mask.to(self.device).bool(), ones), dim=1)
        return aux, mask

    def compress(self, aux_embeds: torch.Tensor, aux_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.moai_compressor(aux_embeds.to(self.device, self.moai_compressor.latents.dtype), aux_mask)

    def merge_image_features(
        self,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor,
        image_features: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Replace each row's single ``<image>`` token by its image features.

        Returns merged embeddings [B, M, H], the merged attention mask [B, M] and the image-position mask.
        """
        b, t = input_ids.shape
        n = image_features.shape[1]
        is_image = input_ids == self.config.image_token_id
        counts = is_image.sum(-1)
        if bool((counts != 1).any()):
            raise InputError(
                f"every prompt row must hold exactly one <image> token (id {self.config.image_token_id}); "
                f"found {counts.tolist()}. Build inputs with MoAIProcessor."
            )
        if image_features.shape[0] != b:
            raise InputError(f"{image_features.shape[0]} images for {b} prompt rows; pass one image per prompt")
        p = is_image.float().argmax(-1)  # index of <image> per row
        m = t - 1 + n
        j = torch.arange(m, device=input_ids.device)[None, :].expand(b, m)
        img_pos = (j >= p[:, None]) & (j < p[:, None] + n)
        text_idx = torch.where(j < p[:, None], j, j - n + 1).clamp(0, t - 1)
        img_idx = (j - p[:, None]).clamp(0, n - 1)
        text = torch.gather(inputs_embeds, 1, text_idx[..., None].expand(-1, -1, inputs_embeds.shape[-1]))
        imgs = torch.gather(
            image_features.to(inputs_embeds.dtype), 1, img_idx[..., None].expand(-1, -1, inputs_embeds.shape[-1])
        )
        merged = torch.where(img_pos[..., None], imgs, text)
        merged_mask = torch.where(
            img_pos, torch.ones_like(attention_mask[:, :1]), torch.gather(attention_mask, 1, text_idx)
        )
        return merged, merged_mask, img_pos

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        aux_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        im_mask: torch.Tensor | None = None,
        lang_mask: torch.Tensor | None = None,
        *,
        aux_attention_mask: torch.Tensor | None = None,
        aux_input_ids: torch.Tensor | None = None,
        panoptic_pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        compressed_aux: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_logits_only: bool = False,
        **official_kwargs: Any,
    ) -> MoAIOutput:
        """Prefill (``pixel_values`` or ``image_features`` given) or a cached decoding step (``cache`` given).

        ``aux_embeds`` is the official precomputed compressor input; alternatively pass ``aux_input_ids``
        (+ ``aux_attention_mask``) and ``panoptic_pixel_values``. ``compressed_aux`` skips the compressor.
        """
        unknown = set(official_kwargs) - _OFFICIAL_IGNORED
        if unknown:
            raise InputError(f"unexpected forward arguments: {sorted(unknown)}")
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            raise InputError("input_ids must be a 2-D LongTensor [batch, length]")
        device = self.device
        input_ids = input_ids.to(device)
        # The official model embeds -100 (its pad id while generating) as id 2.
        input_ids = torch.where(input_ids == -100, torch.full_like(input_ids, self.config.pad_token_id), input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(device).long()
        embeds = self.model.tok_embeddings(input_ids)

        prefill = pixel_values is not None or image_features is not None
        if not prefill:
            return self._decode_step(embeds, attention_mask, cache, last_logits_only)

        if image_features is None:
            image_features = self.encode_images(pixel_values)
        if compressed_aux is None:
            aux_mask = None
            if aux_embeds is None:
                if aux_input_ids is None or panoptic_pixel_values is None:
                    raise InputError(
                        "MoAI needs its auxiliary inputs: pass aux_embeds (official) or aux_input_ids and "
                        "panoptic_pixel_values (as MoAIProcessor returns them)"
                    )
                aux_embeds, aux_mask = self.build_aux_embeds(aux_input_ids, panoptic_pixel_values, aux_attention_mask)
            elif aux_attention_mask is not None:
                n_map = aux_embeds.shape[1] - aux_attention_mask.shape[1]
                ones = torch.ones(aux_embeds.shape[0], n_map, dtype=torch.bool, device=device)
                aux_mask = torch.cat((aux_attention_mask.to(device).bool(), ones), dim=1)
            compressed_aux = self.compress(aux_embeds, aux_mask).to(image_features.dtype)

        merged, merged_mask, img_pos = self.merge_image_features(input_ids, embeds, image_features, attention_mask)
        b, m = merged_mask.shape
        if im_mask is None:
            im_mask = img_pos
        if lang_mask is None:
            lang_mask = merged_mask.bool() & ~img_pos
        im_mask = im_mask.to(device).bool()
        lang_mask = lang_mask.to(device).bool()
        if im_mask.shape != (b, m) or lang_mask.shape != (b, m):
            raise InputError(
                f"im_mask/lang_mask must have the merged shape {(b, m)} (text length - 1 + {image_features.shape[1]}); "
                f"got {tuple(im_mask.shape)} and {tuple(lang_mask.shape)}"
            )
        positions = (merged_mask.cumsum(-1) - 1).clamp_min(0)
        if cache is not None:
            if cache.length != 0:
                raise InputError("a prefill needs an empty cache")
        hidden = self.model(
            merged,
            attention_mask=merged_mask,
            positions=positions,
            im_mask=im_mask,
            lang_mask=lang_mask,
            aux=compressed_aux,
            cache=cache,
        )
        if last_logits_only:
            hidden = hidden[:, -1:]
        logits = self.output(hidden)
        return MoAIOutput(
            logits=logits,
            attention_mask=merged_mask,
            cache=cache,
            image_features=image_features,
            compressed_aux=compressed_aux,
        )

    def _decode_step(
        self, embeds: torch.Tensor, attention_mask: torch.Tensor, cache: KVCache | None, last_only: bool
    ) -> MoAIOutput:
        if cache is None or cache.length == 0:
            raise InputError(
                "a forward without pixel_values/image_features is a decoding step and needs a filled cache"
            )
        q_len = embeds.shape[1]
        if attention_mask.shape[1] != cache.length + q_len:
            raise InputError(
                f"attention_mask must cover the cache ({cache.length}) plus the new tokens ({q_len}); got {attention_mask.shape[1]}"
            )
        positions = (attention_mask.cumsum(-1) - 1)[:, -q_len:].clamp_min(0)
        hidden = self.model(embeds, attention_mask=attention_mask, positions=positions, cache=cache)
        if last_only:
            hidden = hidden[:, -1:]
        return MoAIOutput(logits=self.output(hidden), attention_mask=attention_mask, cache=cache)

    # ------------------------------------------------------------------ generation and loading entry points
    def generate(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any):
        """Generate with a KV cache (positional order as the official: ``input_ids, pixel_values, aux_embeds,
        attention_mask, im_mask, lang_mask``); see :func:`moai_sdk.modeling.generation.generate`."""
        from .generation import generate

        return generate(self, input_ids, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str, **kwargs: Any) -> MoAIForCausalLM:
        """Load a MoAI checkpoint (local directory or Hub repo); see :func:`moai_sdk.modeling.loading.load_moai`."""
        from .loading import load_moai

        return load_moai(path_or_repo_id, **kwargs)

    def save_pretrained(self, directory: str, **kwargs: Any) -> None:
        """Write ``config.json`` and the weights in the official layout; see :func:`moai_sdk.modeling.loading.save_moai`."""
        from .loading import save_moai

        save_moai(self, directory, **kwargs)


def _quant_state_bytes(state: Any) -> int:
    total = 0
    for name in ("absmax", "code", "offset"):
        t = getattr(state, name, None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += _quant_state_bytes(nested)
    return total


__all__ = ["MoAIForCausalLM", "MoAIOutput"]
