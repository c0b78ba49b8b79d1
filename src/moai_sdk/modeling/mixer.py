"""MoAI-Mixer: six low-rank attention experts and two softmax gates, in every 8th decoder layer.

Given the RMS-normed hidden states of a mixer layer, with ``h_img`` the image-token states, ``h_lang`` the
language-token states and ``aux`` the 64 compressed auxiliary tokens of the same sample:

    new h_img  = g0 * CA_img_aux(h_img, aux)   + g1 * CA_img_lang(h_img, h_lang) + g2 * SA_img(h_img, h_img)
    new h_lang = g0 * CA_lang_aux(h_lang, aux) + g1 * CA_lang_img(h_lang, h_img) + g2 * SA_lang(h_lang, h_lang)

with (g0, g1, g2) = softmax of a Linear(hidden -> 3) gate computed in float16, as in the released model. Both
results are computed from the states before mixing; padding positions are left untouched.

The official code loops over the samples of a batch; here a batch runs at once. Every sample has the same
number of image positions (one image each), so image tokens gather into a dense [B, N_img, H] block; the
text positions gather into [B, N_text, H] with a validity mask, and padded text positions are masked out as
keys and never written back.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..devices import parse_dtype
from .config import MoAIConfig

EXPERT_NAMES = (
    "moai_CA_img_aux",
    "moai_CA_img_lang",
    "moai_SA_img",
    "moai_CA_lang_aux",
    "moai_CA_lang_img",
    "moai_SA_lang",
)
GATE_NAMES = ("moai_GA_img", "moai_GA_lang")


@dataclass
class GateWeights:
    """The softmax weights the two gates of one mixer layer applied during one prefill (detached, in the gate
    softmax dtype: float16 for the released model).

    * ``image`` [B, N_image, 3]: row j = the j-th image token; columns in the order of the official
      ``moai_GA_img`` outputs: image->aux (``moai_CA_img_aux``), image->language (``moai_CA_img_lang``), image
      self (``moai_SA_img``).
    * ``language`` [B, N_text, 3]: row j = the j-th non-image position of the merged row, i.e. ``input_ids``
      without its ``<image>`` token, left padding included; columns in the order of ``moai_GA_lang``:
      language->aux, language->image, language self.
    * ``image_mask`` [B, N_image], ``language_mask`` [B, N_text] (bool): True where the gate was applied.
      Rows where the mask is False (left padding, or positions outside ``lang_mask``) are **masked**: they hold
      zeros and must be ignored. ``image_mask`` is all True unless rows have different image-token counts.
    """

    layer: int
    image: torch.Tensor
    language: torch.Tensor
    image_mask: torch.Tensor
    language_mask: torch.Tensor

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean weights per row over the applied positions: (image [B, 3], language [B, 3]), float32."""
        return _masked_mean(self.image, self.image_mask), _masked_mean(self.language, self.language_mask)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].float()
    return (x.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


_ACTIVE_RECORDER: ContextVar[GateRecorder | None] = ContextVar("moai_gate_recorder", default=None)


class GateRecorder:
    """Collects the gate weights of the mixers that run while :meth:`recording` is active.

    The active recorder lives in a context variable, so concurrent forwards in other threads are not
    recorded, and a mixer run with no recorder active pays one context-variable read.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @contextmanager
    def recording(self) -> Iterator[GateRecorder]:
        token = _ACTIVE_RECORDER.set(self)
        try:
            yield self
        finally:
            _ACTIVE_RECORDER.reset(token)

    def add(
        self,
        mixer: nn.Module,
        image: torch.Tensor,
        image_mask: torch.Tensor,
        language: torch.Tensor,
        language_mask: torch.Tensor,
    ) -> None:
        self._entries[id(mixer)] = (image.detach(), image_mask, language.detach(), language_mask)

    def collect(self, mixers: Iterable[tuple[int, nn.Module]]) -> list[GateWeights]:
        """One :class:`GateWeights` per (layer index, mixer) that ran, in the given (layer) order."""
        out = []
        for layer, mixer in mixers:
            entry = self._entries.get(id(mixer))
            if entry is not None:
                image, image_mask, language, language_mask = entry
                out.append(GateWeights(layer, image, language, image_mask, language_mask))
        return out


def _low_rank(dim: int, rank: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, rank, bias=False), nn.Linear(rank, dim, bias=False))


class LowRankAttentionExpert(nn.Module):
    """Multi-head attention whose q/k/v/o projections are rank-r bottlenecks, each followed by exact GELU.

    Returns ``query + o(attention(q, k, v))`` (a residual on the query input).
    """

    def __init__(self, dim: int, rank: int = 64, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.linear_q = _low_rank(dim, rank)
        self.linear_k = _low_rank(dim, rank)
        self.linear_v = _low_rank(dim, rank)
        self.linear_o = _low_rank(dim, rank)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(
        self, query: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``query`` [B, Nq, D], ``context`` [B, Nk, D], ``context_mask`` [B, Nk] bool (True = a real token)."""
        q = self._split(F.gelu(self.linear_q(query)))
        k = self._split(F.gelu(self.linear_k(context)))
        v = self._split(F.gelu(self.linear_v(context)))
        mask = None if context_mask is None else context_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(q.shape[-1]))
        y = y.transpose(1, 2).reshape(query.shape)
        return query + F.gelu(self.linear_o(y))

    def forward_reference(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The official computation for one sample (2-D inputs, eager softmax); used by the reference mode."""
        q, k, v = (F.gelu(self.linear_q(query)), F.gelu(self.linear_k(context)), F.gelu(self.linear_v(context)))
        n, d = q.shape
        sub = d // self.heads
        q, k, v = (t.reshape(-1, self.heads, sub).permute(1, 0, 2) for t in (q, k, v))
        scores = q.matmul(k.transpose(-2, -1)) / math.sqrt(sub)
        y = F.softmax(scores, dim=-1).matmul(v)
        y = y.permute(1, 0, 2).reshape(n, -1)
        return query + F.gelu(self.linear_o(y))


class MoAIMixer(nn.Module):
    """The six experts and two gates of one mixer layer (children carry the official names)."""

    def __init__(self, config: MoAIConfig):
        super().__init__()
        s = config.structure
        for name in EXPERT_NAMES:
            self.add_module(name, LowRankAttentionExpert(config.hidden_size, s.mixer_rank, s.mixer_heads))
        for name in GATE_NAMES:
            self.add_module(name, nn.Linear(config.hidden_size, s.gate_outputs))
        self.gate_dtype = parse_dtype(s.gate_softmax_dtype, what="gate_softmax_dtype")
        #: "batched" (default) or "reference" (the official per-sample loop, for benchmarks and checks).
        self.mode = "batched"

    def _gate(self, gate: nn.Linear, h: torch.Tensor) -> torch.Tensor:
        return F.softmax(gate(h), dim=-1, dtype=self.gate_dtype)

    def forward(
        self, hidden: torch.Tensor, im_mask: torch.Tensor, lang_mask: torch.Tensor, aux: torch.Tensor
    ) -> torch.Tensor:
        if not bool(im_mask.any()) and not bool(lang_mask.any()):
            return hidden  # cached decoding steps: the released model never mixes generated tokens
        if self.mode == "reference":
            return self.forward_reference(hidden, im_mask, lang_mask, aux)
        b, _, d = hidden.shape
        n_img = im_mask.sum(-1)
        if bool((n_img != n_img[0]).any()):
            return self.forward_reference(hidden, im_mask, lang_mask, aux)
        n_img = int(n_img[0])
        aux = aux.to(hidden.dtype)
        h_img = hidden[im_mask].view(b, n_img, d)
        not_img = ~im_mask
        h_txt = hidden[not_img].view(b, -1, d)
        txt_valid = lang_mask[not_img].view(b, -1)

        g_img = self._gate(self.moai_GA_img, h_img)
        g_txt = self._gate(self.moai_GA_lang, h_txt)
        recorder = _ACTIVE_RECORDER.get()
        if recorder is not None:
            image_mask = torch.ones(g_img.shape[:2], dtype=torch.bool, device=g_img.device)
            recorder.add(self, g_img, image_mask, g_txt.masked_fill(~txt_valid[..., None], 0), txt_valid)
        new_img = (
            g_img[..., 0:1] * self.moai_CA_img_aux(h_img, aux)
            + g_img[..., 1:2] * self.moai_CA_img_lang(h_img, h_txt, txt_valid)
            + g_img[..., 2:3] * self.moai_SA_img(h_img, h_img)
        )
        new_txt = (
            g_txt[..., 0:1] * self.moai_CA_lang_aux(h_txt, aux)
            + g_txt[..., 1:2] * self.moai_CA_lang_img(h_txt, h_img)
            + g_txt[..., 2:3] * self.moai_SA_lang(h_txt, h_txt, txt_valid)
        )
        out = hidden.clone()
        out[im_mask] = new_img.reshape(-1, d).to(out.dtype)
        out[lang_mask] = new_txt[txt_valid].to(out.dtype)
        return out

    def forward_reference(
        self, hidden: torch.Tensor, im_mask: torch.Tensor, lang_mask: torch.Tensor, aux: torch.Tensor
    ) -> torch.Tensor:
        """The official per-sample loop with masked indexing (slow; kept as the benchmark baseline)."""
        out = hidden.clone()
        aux = aux.to(hidden.dtype)
        recorder = _ACTIVE_RECORDER.get()
        gates = []
        for i in range(hidden.shape[0]):
            h_img = hidden[i][im_mask[i]]
            h_lang = hidden[i][lang_mask[i]]
            g_img = self._gate(self.moai_GA_img, h_img)
            g_lang = self._gate(self.moai_GA_lang, h_lang)
            if recorder is not None:
                gates.append((g_img, g_lang))
            new_img = (
                g_img[..., 0:1] * self.moai_CA_img_aux.forward_reference(h_img, aux[i])
                + g_img[..., 1:2] * self.moai_CA_img_lang.forward_reference(h_img, h_lang)
                + g_img[..., 2:3] * self.moai_SA_img.forward_reference(h_img, h_img)
            )
            new_lang = (
                g_lang[..., 0:1] * self.moai_CA_lang_aux.forward_reference(h_lang, aux[i])
                + g_lang[..., 1:2] * self.moai_CA_lang_img.forward_reference(h_lang, h_img)
                + g_lang[..., 2:3] * self.moai_SA_lang.forward_reference(h_lang, h_lang)
            )
            out[i][im_mask[i]] = new_img.to(out.dtype)
            out[i][lang_mask[i]] = new_lang.to(out.dtype)
        if recorder is not None:
            recorder.add(self, *_per_sample_gates(gates, im_mask, lang_mask))
        return out


def _per_sample_gates(
    gates: list[tuple[torch.Tensor, torch.Tensor]], im_mask: torch.Tensor, lang_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference loop's per-sample gate rows laid out as :class:`GateWeights` (image, image_mask,
    language, language_mask); rows shorter than the longest are padded at the end and masked."""
    b = len(gates)
    ref = gates[0][0]
    not_img = ~im_mask
    n_img = max(g.shape[0] for g, _ in gates)
    n_txt = int(not_img.sum(-1).max())
    image = ref.new_zeros(b, n_img, 3)
    image_mask = torch.zeros(b, n_img, dtype=torch.bool, device=ref.device)
    language = ref.new_zeros(b, n_txt, 3)
    language_mask = torch.zeros(b, n_txt, dtype=torch.bool, device=ref.device)
    for i, (g_img, g_lang) in enumerate(gates):
        image[i, : g_img.shape[0]] = g_img
        image_mask[i, : g_img.shape[0]] = True
        valid = lang_mask[i][not_img[i]]  # language positions among the non-image positions of row i
        rows = ref.new_zeros(valid.shape[0], 3)
        rows[valid] = g_lang[not_img[i][lang_mask[i]]]
        language[i, : valid.shape[0]] = rows
        language_mask[i, : valid.shape[0]] = valid
    return image, image_mask, language, language_mask


__all__ = [
    "MoAIMixer",
    "LowRankAttentionExpert",
    "EXPERT_NAMES",
    "GATE_NAMES",
    "GateWeights",
    "GateRecorder",
]
