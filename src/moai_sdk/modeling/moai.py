"""`MoAIForCausalLM`: vision tower + projector, MoAI-Compressor, InternLM2 decoder with MoAI-Mixer, LM head.

The forward pass takes the official keyword inputs (``input_ids, pixel_values, aux_embeds, attention_mask,
im_mask, lang_mask``), so code written for the official ``MoAIModel`` can switch, and also the raw auxiliary
inputs our processor returns (``aux_input_ids``, ``aux_attention_mask``, ``panoptic_pixel_values``), from which
it builds ``aux_embeds`` exactly as the official code does (word embeddings of the verbalization followed by the
projected CLIP tokens of the panoptic colour map).

This module does no I/O itself: :meth:`MoAIForCausalLM.from_pretrained` builds the model and hands it to
:func:`~moai_sdk.modeling.loading.load_weights_into`; decoding lives in :mod:`moai_sdk.modeling.generation`.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..devices import resolve_device, resolve_dtype
from ..errors import InputError
from ..hub import HubOptions
from .compressor import MoAICompressor
from .config import DEFAULT_VISION_TOWER_ID, MoAIConfig, check_attn_implementation
from .generation import GenerateOutput, generate
from .int4 import stored_bytes
from .internlm2 import InternLM2Model, KVCache
from .loading import WeightReader, load_weights_into, resolve_checkpoint, save_moai
from .mixer import GateRecorder, GateWeights, MoAIMixer
from .quantization import check_quantization
from .vision import CLIPVisionTower, VisionProjector

logger = logging.getLogger(__name__)


@dataclass
class MoAIOutput:
    """What a forward pass returns. ``logits`` covers the merged sequence (or only its last position)."""

    logits: torch.Tensor
    attention_mask: torch.Tensor | None = None  # merged [B, M] mask (prefill) or the extended mask (decode)
    cache: KVCache | None = None
    image_features: torch.Tensor | None = None
    compressed_aux: torch.Tensor | None = None
    #: With ``forward(output_gates=True)``: the gate weights of every mixer layer that ran, in layer order
    #: (empty for a cached decoding step: generated tokens never reach the mixer); ``None`` otherwise.
    gate_weights: list[GateWeights] | None = None


_OFFICIAL_IGNORED = {"mode", "position_ids", "labels", "return_dict", "output_attentions", "output_hidden_states"}


class MoAIForCausalLM(nn.Module):
    """The MoAI model, its stages under the official parameter names:

    * ``vit`` + ``vision_proj`` -- CLIP tower and projector (:meth:`encode_images`);
    * ``moai_compressor`` (also :attr:`compressor`) -- the :class:`~moai_sdk.modeling.compressor.MoAICompressor`
      that turns the verbalization and the panoptic map into the auxiliary tokens (:meth:`compress`);
    * ``model`` -- the InternLM2 decoder; every layer in ``config.mixer_layer_indices`` runs a
      :class:`~moai_sdk.modeling.mixer.MoAIMixer` first (:attr:`mixers`);
    * ``output`` -- the LM head.
    """

    def __init__(self, config: MoAIConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.model = InternLM2Model(config, mixers={i: MoAIMixer(config) for i in config.mixer_layer_indices})
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.vit = CLIPVisionTower(config)
        self.vision_proj = VisionProjector(config)
        self.moai_compressor = MoAICompressor.from_config(config)
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
    def compressor(self) -> MoAICompressor:
        """The MoAI-Compressor (the module the checkpoint calls ``moai_compressor``)."""
        return self.moai_compressor

    @property
    def mixers(self) -> list[MoAIMixer]:
        """The MoAI-Mixer of every mixer layer, in layer order (the layers of ``config.mixer_layer_indices``).

        Their weights are the ``model.layers.<i>.attention.moai_*`` entries of the checkpoint.
        """
        return [layer.attention.mixer for layer in self.model.layers if layer.attention.mixer is not None]

    def set_attn_implementation(self, name: str) -> None:
        """How every decoder layer computes attention: ``"sdpa"`` (default) or ``"eager"``."""
        check_attn_implementation(name)
        for layer in self.model.layers:
            layer.attention.attn_implementation = name

    def mixers_by_layer(self) -> list[tuple[int, MoAIMixer]]:
        """(decoder-layer index, mixer) of every mixer layer, in layer order."""
        layers = enumerate(self.model.layers)
        return [(i, layer.attention.mixer) for i, layer in layers if layer.attention.mixer is not None]

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
            total += stored_bytes(t)  # torchao's int4 weights: their packed codes and scales
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
        mask = self.aux_key_mask(aux_attention_mask, aux.shape[1])
        return aux, mask

    def aux_key_mask(self, aux_attention_mask: torch.Tensor, aux_length: int) -> torch.Tensor:
        """Key mask of ``aux_embeds`` [B, aux_length]: the verbalization's mask, then True for every map token."""
        text = aux_attention_mask.to(self.device).bool()
        ones = torch.ones(text.shape[0], aux_length - text.shape[1], dtype=torch.bool, device=self.device)
        return torch.cat((text, ones), dim=1)

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
        output_gates: bool = False,
        **official_kwargs: Any,
    ) -> MoAIOutput:
        """Prefill (``pixel_values`` or ``image_features`` given) or a cached decoding step (``cache`` given).

        ``aux_embeds`` is the official precomputed compressor input; alternatively pass ``aux_input_ids``
        (+ ``aux_attention_mask``) and ``panoptic_pixel_values``. ``compressed_aux`` skips the compressor.
        ``output_gates=True`` returns the softmax weights the mixer gates applied in ``out.gate_weights`` (see
        :class:`~moai_sdk.modeling.mixer.GateWeights`); it changes nothing else.
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
            out = self._decode_step(embeds, attention_mask, cache, last_logits_only)
            out.gate_weights = [] if output_gates else None
            return out

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
                aux_mask = self.aux_key_mask(aux_attention_mask, aux_embeds.shape[1])
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
        recorder = GateRecorder() if output_gates else None
        with recorder.recording() if recorder is not None else nullcontext():
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
            gate_weights=None if recorder is None else recorder.collect(self.mixers_by_layer()),
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

    def decode_rows(
        self, tokens: torch.Tensor, cache: KVCache, lengths: torch.Tensor, kv_length: int | None = None
    ) -> torch.Tensor:
        """One decoding step for rows of different cached lengths: float32 logits [B, vocab] of the next token.

        ``tokens`` [B] are each row's newest token, ``lengths`` [B] how many keys/values row ``i`` holds in
        ``cache`` (see :meth:`InternLM2Model.decode_rows <moai_sdk.modeling.internlm2.InternLM2Model.decode_rows>`);
        the step writes each row's new keys/values at slot ``lengths[i]``. ``kv_length`` (default
        ``max(lengths) + 1``) is how many slots the attention reads.
        """
        if kv_length is None:
            kv_length = int(lengths.max()) + 1
        if kv_length > cache.capacity:
            raise InputError(f"the step needs {kv_length} cache slots; the cache holds {cache.capacity}")
        embeds = self.model.tok_embeddings(tokens.to(self.device)[:, None])
        hidden = self.model.decode_rows(embeds, cache, lengths.to(self.device), kv_length)
        return self.output(hidden)[:, -1].float()

    # ------------------------------------------------------------------ generation, loading and saving
    def generate(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> GenerateOutput:
        """Generate with a KV cache (positional order as the official: ``input_ids, pixel_values, aux_embeds,
        attention_mask, im_mask, lang_mask``); see :func:`moai_sdk.modeling.generation.generate`."""
        return generate(self, input_ids, *args, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        dtype: str | torch.dtype | None = "auto",
        device: str | torch.device | None = "auto",
        quantization: str | None = None,
        hub: HubOptions | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        vision_tower: str = DEFAULT_VISION_TOWER_ID,
        attn_implementation: str = "sdpa",
        progress: bool | None = None,
        check_weights: bool = True,
    ) -> MoAIForCausalLM:
        """Load a MoAI checkpoint (local directory or Hub repo) with the official key names.

        ``hub`` carries the Hub settings (:class:`~moai_sdk.hub.HubOptions`); ``revision``, ``cache_dir``,
        ``token`` and ``local_files_only`` still work and override it. ``dtype="auto"`` is float16 on CUDA and
        float32 elsewhere. ``quantization``: ``None`` (all weights in ``dtype``), ``"nf4"`` (the LLM's main
        weights ``Plora_main`` in 4-bit NF4 with double quantization; vision, projector, LoRA branches, mixer,
        compressor, embeddings and LM head stay in ``dtype``), ``"nf4-lora"`` (``"nf4"`` plus the PLoRA
        adapters), ``"int8"`` (the ``"nf4"`` weights in LLM.int8), ``"int4"`` (the ``"nf4"`` weights in torchao's
        int4 with the tinygemm kernel; CUDA, compute capability >= 8.0), or ``"official"`` (what the official
        loader's skip list quantizes -- in effect only the PLoRA adapters -- in NF4); see
        :mod:`~moai_sdk.modeling.quantization`. ``vision_tower`` is the Hub repo of the CLIP tower used when the
        checkpoint has no vision weights. ``check_weights`` (default) scans every weight for NaN and infinite
        values (about 0.6 s per GB on two CPU cores; ``False`` skips it); integer-typed weights are always refused.
        """
        check_quantization(quantization)
        check_attn_implementation(attn_implementation)
        hub = HubOptions.from_any(
            hub, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only or None
        )
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        check_quantization(quantization, dev)  # before any download: "int4" needs a CUDA GPU
        if quantization is not None and dt == torch.float32 and dev.type == "cuda":
            logger.info("quantized weights compute in float32 on CUDA; dtype='float16' is faster")
        files = resolve_checkpoint(path_or_repo_id, hub=hub)
        with torch.device("meta"):
            model = cls(MoAIConfig.from_dict(files.config))
        done = load_weights_into(
            model,
            WeightReader(files),
            dtype=dt,
            device=dev,
            quantization=quantization,
            vision_tower=vision_tower,
            hub=hub,
            progress=progress,
            check_weights=check_weights,
        )
        model.set_attn_implementation(attn_implementation)
        model.load_info = {
            "source": files.source,
            "revision": hub.revision,
            "format": files.format,
            "files": [str(p) for p in files.weight_files],
            "dtype": str(dt).replace("torch.", ""),
            "device": str(dev),
            "quantization": quantization,
            **done,
        }
        logger.info("loaded MoAI from %s (%s, %s, quantization=%s)", files.source, dt, dev, quantization)
        return model

    def save_pretrained(self, directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write ``config.json`` and the weights in the official layout; see :func:`moai_sdk.modeling.loading.save_moai`."""
        save_moai(self, directory, **kwargs)


def load_moai(path_or_repo_id: str | os.PathLike, **kwargs: Any) -> MoAIForCausalLM:
    """Load a MoAI checkpoint: the same as :meth:`MoAIForCausalLM.from_pretrained` (same keywords)."""
    return MoAIForCausalLM.from_pretrained(path_or_repo_id, **kwargs)


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


__all__ = ["MoAIForCausalLM", "MoAIOutput", "load_moai"]
