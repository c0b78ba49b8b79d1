"""The InternLM2 decoder as MoAI uses it.

RMSNorm, rotary position embeddings (none / linear / dynamic-NTK scaling), grouped-query attention through the
fused ``wqkv`` projection in the official head-grouped layout, a SiLU-gated feed-forward (``w1``, ``w3``,
``w2``), and PLoRA on every one of those linears: the main linear everywhere plus a low-rank branch added only
at image-token positions. MoAI-Mixer layers run the mixer on the normed states right before ``wqkv``.

Numerics follow the official implementation: RMSNorm variance in float32; RoPE tables computed in float32 and
cast to the activation dtype; attention scores in the activation dtype with an additive mask holding the
dtype's minimum; softmax in float32. Attention itself runs through
:func:`torch.nn.functional.scaled_dot_product_attention`.

Speed (same function, fewer kernels and host syncs): the rotary tables are computed once per forward and
shared by all layers; whether any image position is present is checked once per forward (not in every PLoRA
linear); a prefill without padding uses causal SDPA (no [B, 1, L, L] additive mask is built, so the flash
kernels apply); a single-token decoding step folds the query heads of each key/value group into the query
axis, so grouped-query attention with a padding mask runs as one plain SDPA call.

Positions differ from the official code on purpose in one place: the official RoPE counts left padding (a
padded row is rotated as if the pads were text), so a sample's answer depends on what it is batched with.
We use each row's own positions (``cumsum(attention_mask) - 1``), which equals the official single-sample
computation for every row of a batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..devices import embedding
from ..errors import ConfigError, InputError
from .config import MoAIConfig


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) in float32 (one fused op on torch >= 2.4), back to x's dtype, times weight
        h = x.to(torch.float32)
        if _FUSED_RMS_NORM is not None:
            h = _FUSED_RMS_NORM(h, (h.shape[-1],), eps=self.eps)
        else:
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


_FUSED_RMS_NORM = getattr(F, "rms_norm", None)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE with optional linear or dynamic-NTK scaling, evaluated at arbitrary positions.

    Dynamic NTK scaling only changes the base when a sequence is longer than ``max_position_embeddings``
    (as in the official code, where it never triggers for MoAI-sized prompts). Unlike the official class, the
    enlarged base is not kept for later, shorter calls.
    """

    def __init__(self, dim: int, max_position_embeddings: int, base: float, scaling: dict | None = None):
        super().__init__()
        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.base = float(base)
        self.scaling_type = None if scaling is None else scaling.get("type", scaling.get("rope_type"))
        self.scaling_factor = 1.0 if scaling is None else float(scaling["factor"])
        self.register_buffer("inv_freq", self._inv_freq(self.base), persistent=False)

    def _inv_freq(self, base: float, device=None) -> torch.Tensor:
        target = torch.empty(0, device=device).device
        # On the meta device (the loader builds there) the values are placeholders: compute them on the CPU, since
        # meta-device arithmetic runs Python references that import torch._dynamo (~230 MiB) on first use.
        where = torch.device("cpu") if target.type == "meta" else target
        return (1.0 / (base ** (torch.arange(0, self.dim, 2, device=where).float() / self.dim))).to(target)

    def reset_buffers(self) -> None:
        """Recompute the (non-persistent) frequency buffer, e.g. after building on the meta device."""
        device = self.inv_freq.device if self.inv_freq.device.type != "meta" else torch.device("cpu")
        self.inv_freq = self._inv_freq(self.base, device)

    def varies_with_length(self, seq_len: int) -> bool:
        """True when the frequencies depend on the key length ``seq_len`` (dynamic scaling beyond the range)."""
        return self.scaling_type == "dynamic" and seq_len > self.max_position_embeddings

    def forward(self, positions: torch.Tensor, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape [B, 1, L, dim] for integer ``positions`` [B, L]; ``seq_len`` is the key length."""
        inv_freq = self.inv_freq
        if self.varies_with_length(seq_len):
            f = self.scaling_factor
            base = self.base * ((f * seq_len / self.max_position_embeddings) - (f - 1)) ** (self.dim / (self.dim - 2))
            inv_freq = self._inv_freq(base, positions.device)
        t = positions.to(torch.float32)
        if self.scaling_type == "linear":
            t = t / self.scaling_factor
        freqs = t[..., None] * inv_freq.to(positions.device)[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class PLoRALinear(nn.Module):
    """``Plora_main(x)`` plus ``Plora_B(Plora_A(x)) * scaling`` at image positions only (official key names)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, alpha: float):
        super().__init__()
        self.Plora_A = nn.Linear(in_features, rank, bias=False)
        self.Plora_B = nn.Linear(rank, out_features, bias=False)
        self.Plora_main = nn.Linear(in_features, out_features, bias=bias)
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor, im_mask: torch.Tensor | None) -> torch.Tensor:
        """``im_mask`` [B, L] bool; ``None`` means "no image position" (the decoder checks that once per pass)."""
        out = self.Plora_main(x)
        if im_mask is None:
            return out
        lora = self.Plora_B(self.Plora_A(x))
        if self.scaling != 1.0:
            lora = lora * self.scaling
        # out + lora * mask in one kernel (mask is 0/1, so this is bit-identical to the unfused form)
        return torch.addcmul(out, lora.to(out.dtype), im_mask[..., None].to(out.dtype))


@dataclass
class LayerCache:
    """Pre-allocated keys/values of one layer: [B, kv_heads, capacity, head_dim]."""

    key: torch.Tensor
    value: torch.Tensor


class KVCache:
    """A static key/value cache for all decoder layers, filled left to right."""

    def __init__(self, layers: list[LayerCache], length: int = 0):
        self.layers = layers
        self.length = length

    @classmethod
    def allocate(cls, config: MoAIConfig, batch: int, capacity: int, dtype: torch.dtype, device) -> KVCache:
        shape = (batch, config.num_key_value_heads, capacity, config.head_dim)
        layers = [
            LayerCache(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
            for _ in range(config.num_hidden_layers)
        ]
        return cls(layers)

    @property
    def capacity(self) -> int:
        return self.layers[0].key.shape[2]

    @property
    def batch_size(self) -> int:
        return self.layers[0].key.shape[0]

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search); ``index`` is a 1-D LongTensor of row indices."""
        for layer in self.layers:
            layer.key = layer.key.index_select(0, index)
            layer.value = layer.value.index_select(0, index)

    def repeat_interleave(self, n: int) -> None:
        for layer in self.layers:
            layer.key = layer.key.repeat_interleave(n, dim=0)
            layer.value = layer.value.repeat_interleave(n, dim=0)


class InternLM2Attention(nn.Module):
    def __init__(self, config: MoAIConfig, mixer: nn.Module | None = None):
        super().__init__()
        s = config.structure
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.groups = config.num_key_value_groups
        self.head_dim = config.head_dim
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.wqkv = PLoRALinear(config.hidden_size, qkv_out, config.bias, s.plora_rank, s.plora_alpha)
        self.wo = PLoRALinear(
            self.num_heads * self.head_dim, config.hidden_size, config.bias, s.plora_rank, s.plora_alpha
        )
        self.rotary = RotaryEmbedding(
            self.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        #: "sdpa" (default) or "eager" (the official matmul-softmax-matmul; the benchmark baseline).
        self.attn_implementation = "sdpa"
        self.attach_mixer(mixer)

    def attach_mixer(self, mixer: nn.Module | None) -> None:
        """Run ``mixer`` (a :class:`~moai_sdk.modeling.mixer.MoAIMixer`, or ``None`` for none) before ``wqkv``.

        As in the released checkpoint, the mixer's experts and gates are this module's children under their
        official names (``attention.moai_CA_img_aux`` ...), so :attr:`mixer` is a plain attribute: registering
        the mixer itself would add a second name (``attention.mixer.*``) for the same weights.
        """
        if mixer is not None:
            for name, child in mixer.named_children():
                self.add_module(name, child)
        object.__setattr__(self, "mixer", mixer)

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        positions: torch.Tensor,
        attn_bias: torch.Tensor | None,
        im_mask: torch.Tensor | None,
        lang_mask: torch.Tensor | None,
        aux: torch.Tensor | None,
        cache: LayerCache | None,
        cache_start: int,
        kv_length: int,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        causal: bool = False,
        cache_index: torch.Tensor | None = None,
        cache_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One attention block.

        ``attn_bias`` is the additive mask [B, 1, L, past + L] (may be ``None`` when ``causal`` is set or for a
        single-token step without padding); ``causal=True`` means "no padding, no past": plain causal attention.
        ``rope`` = precomputed (cos, sin) for ``positions`` (computed here when absent). ``cache_index`` (a
        one-element LongTensor on the device) switches to fixed shapes: the new keys/values are written at that
        slot and the attention covers the whole cache, ``attn_bias`` masking the slots not written yet.
        ``cache_positions`` ([B] LongTensor, one new token per row) writes each row's keys/values at its own slot
        and attends over the first ``kv_length`` slots (rows of different lengths decode together).
        """
        if self.mixer is not None and aux is not None and im_mask is not None and lang_mask is not None:
            hidden_states = self.mixer(hidden_states, im_mask, lang_mask, aux)

        b, q_len, _ = hidden_states.shape
        qkv = self.wqkv(hidden_states, im_mask)
        # Official layout: for each kv head, its `groups` query heads, then its key, then its value.
        qkv = qkv.view(b, q_len, self.num_kv_heads, self.groups + 2, self.head_dim)
        q = qkv[:, :, :, : self.groups].reshape(b, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = qkv[:, :, :, -2].transpose(1, 2)
        v = qkv[:, :, :, -1].transpose(1, 2)

        cos, sin = rope if rope is not None else self.rotary(positions, kv_length, q.dtype)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)

        if cache is not None and cache_positions is not None:
            rows = torch.arange(b, device=k.device)
            cache.key[rows, :, cache_positions] = k[:, :, 0]
            cache.value[rows, :, cache_positions] = v[:, :, 0]
            k = cache.key[:, :, :kv_length]
            v = cache.value[:, :, :kv_length]
        elif cache is not None and cache_index is not None:
            cache.key.index_copy_(2, cache_index, k)
            cache.value.index_copy_(2, cache_index, v)
            k, v = cache.key, cache.value
        elif cache is not None:
            end = cache_start + q_len
            cache.key[:, :, cache_start:end] = k
            cache.value[:, :, cache_start:end] = v
            k = cache.key[:, :, :end]
            v = cache.value[:, :, :end]

        if self.attn_implementation == "eager":
            if attn_bias is None:
                attn_bias = _causal_bias(q_len, k.shape[2], q.dtype, q.device)
            out = eager_attention(q, k, v, attn_bias, self.groups)
        else:
            out = sdpa_attention(q, k, v, attn_bias, self.groups, causal)
        out = out.transpose(1, 2).reshape(b, q_len, self.num_heads * self.head_dim)
        return self.wo(out, im_mask)


def _causal_bias(q_len: int, kv_len: int, dtype: torch.dtype, device) -> torch.Tensor | None:
    """The additive causal mask [1, 1, q_len, kv_len] (queries are the last ``q_len`` positions)."""
    if q_len == 1:
        return None
    return build_attention_bias(torch.ones(1, kv_len, dtype=torch.long, device=device), q_len, kv_len - q_len, dtype)


def sdpa_attention(q, k, v, attn_bias, groups: int, causal: bool, repeat_kv: bool | None = None) -> torch.Tensor:
    """Grouped-query attention through SDPA, picking a form the fused kernels accept.

    * ``causal`` (no padding, no past): ``is_causal=True`` with native GQA -- no mask tensor at all;
    * a single query position: the ``groups`` query heads sharing a key/value head become ``groups`` query
      rows of that head, so the call is plain multi-head attention with a [B, 1, 1, S] key mask;
    * otherwise: the additive mask, with keys/values repeated per query head on CUDA (the memory-efficient
      kernel takes masks but not GQA) and native GQA elsewhere (``repeat_kv`` overrides that choice).
    """
    b, h, q_len, d = q.shape
    if causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q_len > 1, enable_gqa=groups > 1)
    if q_len == 1 and groups > 1:
        kv_heads = k.shape[1]
        qg = q.reshape(b, kv_heads, groups, d)  # heads are kv-major: head = kv * groups + g
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=attn_bias, scale=1.0 / math.sqrt(d))
        return out.reshape(b, h, 1, d)
    if repeat_kv is None:
        repeat_kv = q.device.type == "cuda"
    if groups > 1 and repeat_kv:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, enable_gqa=groups > 1)


def eager_attention(q, k, v, attn_bias, groups: int) -> torch.Tensor:
    """The official attention: scores / sqrt(d) + mask, softmax in float32, cast back, times values."""
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])
    if attn_bias is not None:
        scores = scores + attn_bias
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


class InternLM2MLP(nn.Module):
    def __init__(self, config: MoAIConfig):
        super().__init__()
        s = config.structure
        h, i = config.hidden_size, config.intermediate_size
        self.w1 = PLoRALinear(h, i, False, s.plora_rank, s.plora_alpha)
        self.w3 = PLoRALinear(h, i, False, s.plora_rank, s.plora_alpha)
        self.w2 = PLoRALinear(i, h, False, s.plora_rank, s.plora_alpha)
        if config.hidden_act != "silu":
            raise ConfigError(f"unsupported hidden_act {config.hidden_act!r}; InternLM2 uses 'silu'")

    def forward(self, x: torch.Tensor, im_mask: torch.Tensor | None) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x, im_mask)) * self.w3(x, im_mask), im_mask)


class InternLM2DecoderLayer(nn.Module):
    def __init__(self, config: MoAIConfig, mixer: nn.Module | None = None):
        super().__init__()
        self.attention = InternLM2Attention(config, mixer)
        self.feed_forward = InternLM2MLP(config)
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, *, im_mask, **attn_kwargs) -> torch.Tensor:
        h = hidden_states + self.attention(self.attention_norm(hidden_states), im_mask=im_mask, **attn_kwargs)
        return h + self.feed_forward(self.ffn_norm(h), im_mask)


class InternLM2Model(nn.Module):
    """Token embeddings (vocabulary + the ``<image>`` row), decoder layers, final norm.

    ``mixers`` maps a layer index to the mixer that layer runs before its attention (MoAI passes one
    :class:`~moai_sdk.modeling.mixer.MoAIMixer` per index in ``config.mixer_layer_indices``).
    """

    def __init__(self, config: MoAIConfig, mixers: dict[int, nn.Module] | None = None):
        super().__init__()
        self.config = config
        self.tok_embeddings = embedding(config.vocab_size + 1, config.hidden_size)
        mixers = mixers or {}
        self.layers = nn.ModuleList(
            InternLM2DecoderLayer(config, mixers.get(i)) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        *,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        im_mask: torch.Tensor | None = None,
        lang_mask: torch.Tensor | None = None,
        aux: torch.Tensor | None = None,
        cache: KVCache | None = None,
        cache_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the decoder.

        ``attention_mask`` is the 2-D key mask [B, past + L] (1 = attend); ``positions`` [B, L] the rotary
        positions of the new tokens; ``cache`` (optional) receives the new keys/values after its current length.

        With ``cache_index`` (one new token, a one-element LongTensor on the device) the pass has fixed shapes
        and reads nothing back to the host, so it can be captured in a CUDA graph: ``attention_mask`` covers
        the whole cache [B, capacity], the token's keys/values go to slot ``cache_index`` and ``cache.length``
        is left to the caller.
        """
        if cache_index is not None:
            return self._fixed_shape_step(inputs_embeds, attention_mask, positions, cache, cache_index)
        q_len = inputs_embeds.shape[1]
        past = cache.length if cache is not None else 0
        kv_length = past + q_len
        if attention_mask.shape[-1] != kv_length:
            raise InputError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected {kv_length}")
        dtype = inputs_embeds.dtype
        # One host check per pass (prefill only): no image position -> PLoRA and mixer are skipped everywhere.
        if im_mask is not None and not bool(im_mask.any()):
            im_mask = None
        # Causal SDPA without a mask tensor when nothing is padded (checked once, only for multi-token passes).
        causal = past == 0 and q_len > 1 and bool(attention_mask.all())
        needs_bias = not causal or any(layer.attention.attn_implementation == "eager" for layer in self.layers)
        attn_bias = build_attention_bias(attention_mask, q_len, past, dtype) if needs_bias else None
        rope = self.layers[0].attention.rotary(positions, kv_length, dtype) if self.layers else None
        h = self._run_layers(
            inputs_embeds,
            cache,
            im_mask=im_mask,
            positions=positions,
            attn_bias=attn_bias,
            lang_mask=lang_mask,
            aux=aux,
            cache_start=past,
            kv_length=kv_length,
            rope=rope,
            causal=causal,
        )
        if cache is not None:
            cache.length = kv_length
        return h

    def _fixed_shape_step(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None,
        cache_index: torch.Tensor,
    ) -> torch.Tensor:
        if cache is None or inputs_embeds.shape[1] != 1:
            raise InputError("a fixed-shape step takes one new token and a cache")
        capacity = cache.capacity
        if attention_mask.shape[-1] != capacity:
            raise InputError(
                f"attention_mask covers {attention_mask.shape[-1]} positions, expected the capacity {capacity}"
            )
        rotary = self.layers[0].attention.rotary if self.layers else None
        if rotary is not None and rotary.varies_with_length(capacity):
            raise ConfigError("dynamic RoPE scaling depends on the running length; fixed-shape steps cannot follow it")
        dtype = inputs_embeds.dtype
        attn_bias = build_attention_bias(attention_mask, 1, capacity - 1, dtype)
        rope = rotary(positions, capacity, dtype) if rotary is not None else None
        return self._run_layers(
            inputs_embeds,
            cache,
            im_mask=None,
            positions=positions,
            attn_bias=attn_bias,
            lang_mask=None,
            aux=None,
            cache_start=0,
            kv_length=capacity,
            rope=rope,
            cache_index=cache_index,
        )

    def decode_rows(
        self,
        inputs_embeds: torch.Tensor,
        cache: KVCache,
        lengths: torch.Tensor,
        kv_length: int,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One decoding step for rows of different lengths (the continuous-batching engine's step).

        ``inputs_embeds`` [B, 1, H] are the rows' newest tokens; row ``i`` holds ``lengths[i]`` keys/values in
        ``cache`` (left-aligned, no holes), its new token gets rotary position ``lengths[i]`` and its keys/values go
        to slot ``lengths[i]``; attention covers the first ``kv_length`` slots (at least ``max(lengths) + 1``),
        each row masked to its own ``lengths[i] + 1``. ``attention_mask`` [B, kv_length] may be passed when the
        caller already has it. Row ``i``'s result equals a single-row step with ``lengths[i]`` cached tokens up to
        float rounding. ``cache.length`` is left to the caller.
        """
        if inputs_embeds.shape[1] != 1:
            raise InputError("decode_rows takes one new token per row")
        rotary = self.layers[0].attention.rotary if self.layers else None
        if rotary is not None and rotary.varies_with_length(kv_length):
            raise ConfigError("dynamic RoPE scaling depends on the running length; rows cannot decode together")
        device = inputs_embeds.device
        if attention_mask is None:
            attention_mask = torch.arange(kv_length, device=device)[None, :] <= lengths[:, None]
        dtype = inputs_embeds.dtype
        attn_bias = build_attention_bias(attention_mask, 1, kv_length - 1, dtype)
        positions = lengths[:, None]
        rope = rotary(positions, kv_length, dtype) if rotary is not None else None
        return self._run_layers(
            inputs_embeds,
            cache,
            im_mask=None,
            positions=positions,
            attn_bias=attn_bias,
            lang_mask=None,
            aux=None,
            cache_start=0,
            kv_length=kv_length,
            rope=rope,
            cache_positions=lengths,
        )

    def _run_layers(self, h: torch.Tensor, cache: KVCache | None, **layer_kwargs) -> torch.Tensor:
        """Every decoder layer in order (layer i reads and writes ``cache.layers[i]``), then the final norm."""
        for i, layer in enumerate(self.layers):
            h = layer(h, cache=cache.layers[i] if cache is not None else None, **layer_kwargs)
        return self.norm(h)


def build_attention_bias(attention_mask: torch.Tensor, q_len: int, past: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, q_len, past + q_len]: 0 where a query may attend, the dtype's minimum elsewhere."""
    kv_len = past + q_len
    if attention_mask.shape[-1] != kv_len:
        raise InputError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected {kv_len}")
    device = attention_mask.device
    allowed = attention_mask[:, None, None, :].bool()
    if q_len > 1:  # causal part (a single new token may see every key)
        q_pos = torch.arange(past, kv_len, device=device)[:, None]
        k_pos = torch.arange(kv_len, device=device)[None, :]
        allowed = (k_pos <= q_pos)[None, None] & allowed
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


__all__ = [
    "RMSNorm",
    "RotaryEmbedding",
    "PLoRALinear",
    "KVCache",
    "InternLM2Attention",
    "InternLM2MLP",
    "InternLM2DecoderLayer",
    "InternLM2Model",
    "build_attention_bias",
    "eager_attention",
    "sdpa_attention",
]
