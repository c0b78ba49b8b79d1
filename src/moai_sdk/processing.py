"""`MoAIProcessor`: images, prompts and verbalized perception -> the tensors a MoAI model consumes.

It reproduces what the official ``demo_process`` / ``eval_process`` build around the model call, minus
running the perception experts (their verbalization and panoptic colour map come in as ``aux_texts`` and
``panoptic_maps``):

* ``input_ids`` / ``attention_mask``: system prompt + template, tokenized with BOS, left padded with id 2;
* ``pixel_values``: the 490x490 uint8 image minus 255*mean, divided by 255*std (CLIP mean/std);
* ``im_mask`` / ``lang_mask``: on the merged sequence (``<image>`` expanded to ``img_length`` positions);
* ``aux_input_ids``: the verbalization tokenized with BOS, left padded, not truncated;
* ``panoptic_pixel_values``: the [0, 1] panoptic colour map cast to float16, then normalised with the same
  0-255 mean/std -- a quirk of the official code the released weights expect.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .devices import parse_dtype
from .errors import ConfigError, InputError
from .hub import HubOptions, read_json_object
from .imageops import CLIP_MEAN, CLIP_STD, MOAI_IMAGE_SIZE, load_image_chw, per_row, prepare_image, split_images
from .modeling.generation import check_context_length
from .prompts import DEFAULT_TEMPLATE, build_prompt, check_template, prompt_parts
from .tokenization import MoAITokenizer, resolve_model_file
from .verbalization import EMPTY_VERBALIZATION

logger = logging.getLogger(__name__)

#: MoAI-7B image settings: 490 px, 14 px patches -> 35 x 35 = 1225 image tokens.
DEFAULT_IMAGE_SIZE = MOAI_IMAGE_SIZE
DEFAULT_PATCH_SIZE = 14

_TENSOR_FIELDS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "im_mask",
    "lang_mask",
    "aux_input_ids",
    "aux_attention_mask",
    "panoptic_pixel_values",
)


# ----------------------------------------------------------------------------------------------------------
# the processor output
# ----------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class MoAIInputs:
    """Model inputs for a batch of B samples (tensors, plus the strings they came from).

    Shapes: ``input_ids``/``attention_mask`` [B, T] int64; ``pixel_values`` and ``panoptic_pixel_values``
    [B, 3, S, S] float; ``im_mask``/``lang_mask`` [B, M] bool with M = T - 1 + ``num_image_tokens``;
    ``aux_input_ids``/``aux_attention_mask`` [B, Lv] int64.

    Behaves like a read-only mapping of the tensor fields (``inputs["input_ids"]``, ``**inputs``).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    im_mask: torch.Tensor
    lang_mask: torch.Tensor
    aux_input_ids: torch.Tensor
    aux_attention_mask: torch.Tensor
    panoptic_pixel_values: torch.Tensor
    image_token_index: int
    num_image_tokens: int
    texts: list[str] = field(default_factory=list)
    aux_texts: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ mapping protocol (tensor fields)
    def keys(self) -> tuple[str, ...]:
        return _TENSOR_FIELDS

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in _TENSOR_FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_TENSOR_FIELDS)

    def __len__(self) -> int:
        return len(_TENSOR_FIELDS)

    def __contains__(self, key: object) -> bool:
        return key in _TENSOR_FIELDS

    def items(self) -> list[tuple[str, torch.Tensor]]:
        return [(k, getattr(self, k)) for k in _TENSOR_FIELDS]

    def values(self) -> list[torch.Tensor]:
        return [getattr(self, k) for k in _TENSOR_FIELDS]

    def to_dict(self) -> dict[str, torch.Tensor]:
        """The tensor fields as a plain dict."""
        return dict(self.items())

    # ------------------------------------------------------------------ convenience
    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def merged_length(self) -> int:
        """Length of a row once ``<image>`` is expanded (the masks' width)."""
        return int(self.im_mask.shape[1])

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def to(
        self,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        non_blocking: bool = False,
    ) -> MoAIInputs:
        """A copy on ``device``; ``dtype`` (if given) applies to the floating tensors only.

        Casting already-normalised float32 pixels to float16 is *not* the official fp16 numerics; build the
        inputs with ``MoAIProcessor(normalize_dtype=torch.float16)`` for that.
        """
        moved: dict[str, torch.Tensor] = {}
        for name in _TENSOR_FIELDS:
            tensor = getattr(self, name)
            target = dtype if (dtype is not None and tensor.is_floating_point()) else None
            moved[name] = tensor.to(device=device, dtype=target, non_blocking=non_blocking)
        return replace(self, **moved)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(getattr(self, k).shape)}" for k in _TENSOR_FIELDS)
        return f"MoAIInputs({shapes}, image_token_index={self.image_token_index})"


# ----------------------------------------------------------------------------------------------------------
# numerics shared with the model side
# ----------------------------------------------------------------------------------------------------------


def normalize_pixels(
    images: torch.Tensor,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The official ``image_processor``: ``(images - 255 * mean) / (255 * std)`` for [B, 3, H, W] input.

    ``mean``/``std`` are built in ``dtype`` and scaled by 255 in that dtype (the official constants follow the
    default dtype the model is loaded with). The arithmetic then follows torch's type promotion between
    ``images`` and the constants, exactly like the official expression: uint8 images give ``dtype``; float16
    panoptic maps give float32 with float32 constants, float16 with float16 constants.
    """
    if images.ndim != 4 or images.shape[1] != len(mean):
        raise InputError(f"expected images of shape [B, {len(mean)}, H, W]; got {tuple(images.shape)}")
    m = torch.tensor(list(mean), dtype=dtype, device=images.device).view(1, -1, 1, 1) * 255
    s = torch.tensor(list(std), dtype=dtype, device=images.device).view(1, -1, 1, 1) * 255
    return (images - m) / s


def merged_image_masks(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int, num_image_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``im_mask`` and ``lang_mask`` [B, T - 1 + num_image_tokens] for left-padded rows with one ``<image>``.

    Per row (official layout): the left padding belongs to neither mask; the text before ``<image>`` and
    after it is language; the ``num_image_tokens`` positions that replace ``<image>`` are image.
    """
    if input_ids.shape != attention_mask.shape or input_ids.ndim != 2:
        raise InputError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must both be [B, T]"
        )
    batch, width = input_ids.shape
    merged = width - 1 + num_image_tokens
    im_mask = torch.zeros(batch, merged, dtype=torch.bool)
    lang_mask = torch.zeros(batch, merged, dtype=torch.bool)
    counts = (input_ids == image_token_id).sum(dim=1)
    for row in range(batch):
        if int(counts[row]) != 1:
            raise InputError(
                f"row {row} holds {int(counts[row])} image tokens (id {image_token_id}); MoAI needs exactly one"
            )
        valid = attention_mask[row].bool()
        n_pad = width - int(valid.sum())
        if bool(valid[:n_pad].any()) or not bool(valid[n_pad:].all()):
            raise InputError(f"row {row} is not left padded: its attention mask has zeros after the first one")
        pos = int((input_ids[row] == image_token_id).nonzero()[0, 0])
        if pos < n_pad:
            raise InputError(f"row {row}: the image token sits inside the padding")
        lang_mask[row, n_pad:pos] = True
        im_mask[row, pos : pos + num_image_tokens] = True
        lang_mask[row, pos + num_image_tokens :] = True
    return im_mask, lang_mask


# ----------------------------------------------------------------------------------------------------------
# the processor
# ----------------------------------------------------------------------------------------------------------


class MoAIProcessor:
    """Turns images, prompts and perception outputs into :class:`MoAIInputs` with the official numerics.

    ``normalize_dtype`` is the dtype of the normalisation constants: float32 (default, what the float32
    oracle fixtures use) or float16 / bfloat16 to reproduce the official half-precision deployment, where the
    constants follow the model's load dtype.
    """

    def __init__(
        self,
        tokenizer: MoAITokenizer,
        *,
        image_size: int = DEFAULT_IMAGE_SIZE,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        img_length: int | None = None,
        patch_size: int = DEFAULT_PATCH_SIZE,
        normalize_dtype: torch.dtype | str = torch.float32,
    ) -> None:
        if not isinstance(tokenizer, MoAITokenizer):
            raise ConfigError(f"tokenizer must be a MoAITokenizer; got {type(tokenizer).__name__}")
        if not isinstance(image_size, int) or image_size <= 0:
            raise ConfigError(f"image_size must be a positive int; got {image_size!r}")
        if not isinstance(patch_size, int) or patch_size <= 0 or image_size % patch_size:
            raise ConfigError(f"image_size {image_size} must be a multiple of patch_size {patch_size!r}")
        if img_length is None:
            img_length = (image_size // patch_size) ** 2
        if not isinstance(img_length, int) or img_length <= 0:
            raise ConfigError(f"img_length must be a positive int; got {img_length!r}")
        mean, std = tuple(float(v) for v in image_mean), tuple(float(v) for v in image_std)
        if len(mean) != 3 or len(std) != 3 or any(v <= 0 for v in std):
            raise ConfigError(f"image mean/std must be 3 values each, std > 0; got {mean} / {std}")
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.patch_size = patch_size
        self.image_mean = mean
        self.image_std = std
        self.img_length = img_length
        self.normalize_dtype = parse_dtype(normalize_dtype, what="normalize_dtype")

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        hub: HubOptions | None = None,
        normalize_dtype: torch.dtype | str = torch.float32,
        **hub_keywords: Any,
    ) -> MoAIProcessor:
        """Tokenizer + image settings of a model folder or Hub repo (``hub`` and the legacy Hub keywords as in
        :meth:`MoAITokenizer.from_pretrained <moai_sdk.tokenization.MoAITokenizer.from_pretrained>`).

        Image settings come from ``config.json``'s ``moai_structure`` block (``image_size``, ``patch_size``,
        ``image_mean_0_1``, ``image_std_0_1``, ``img_length``); absent values fall back to MoAI-7B's.
        """
        hub = HubOptions.from_any(hub, **hub_keywords)
        tokenizer = MoAITokenizer.from_pretrained(path_or_repo_id, hub=hub)
        config_path = resolve_model_file(path_or_repo_id, "config.json", required=False, hub=hub)
        settings: dict[str, Any] = {}
        if config_path is None:
            logger.info("no config.json next to the tokenizer; using the MoAI-7B image settings")
        else:
            settings = cls._read_image_settings(config_path, tokenizer)
        return cls(tokenizer, normalize_dtype=normalize_dtype, **settings)

    @staticmethod
    def _read_image_settings(path: Path, tokenizer: MoAITokenizer) -> dict[str, Any]:
        config = read_json_object(path)
        wanted = config.get("image_token_index")
        if wanted is not None and int(wanted) != tokenizer.image_token_id:
            raise ConfigError(
                f"config.json sets image_token_index {wanted} but the tokenizer gives <image> id "
                f"{tokenizer.image_token_id}; the tokenizer and the model do not belong together"
            )
        structure = config.get("moai_structure") or {}
        if not isinstance(structure, dict):
            raise ConfigError(f"'moai_structure' in {str(path)!r} must be an object")
        settings: dict[str, Any] = {}
        for key, name in (
            ("image_size", "image_size"),
            ("patch_size", "patch_size"),
            ("img_length", "img_length"),
            ("image_mean_0_1", "image_mean"),
            ("image_std_0_1", "image_std"),
        ):
            if structure.get(key) is not None:
                settings[name] = structure[key]
        return settings

    # ------------------------------------------------------------------ properties
    @property
    def image_token_index(self) -> int:
        """Id of ``<image>`` in ``input_ids``."""
        return self.tokenizer.image_token_id

    @property
    def num_image_tokens(self) -> int:
        """Positions ``<image>`` expands to inside the language model (1225 for MoAI-7B)."""
        return self.img_length

    def __repr__(self) -> str:
        return (
            f"MoAIProcessor(image_size={self.image_size}, img_length={self.img_length}, "
            f"normalize_dtype={self.normalize_dtype}, tokenizer={self.tokenizer!r})"
        )

    # ------------------------------------------------------------------ pieces
    def load_images(self, images: Sequence[Any], *, resize: bool = True) -> torch.Tensor:
        """uint8 [B, 3, S, S]: each image loaded as RGB(A), officially resized (or checked), first 3 channels."""
        out = []
        for idx, image in enumerate(images):
            try:
                chw = prepare_image(image, self.image_size) if resize else load_image_chw(image)
            except InputError as exc:
                if len(images) == 1:
                    raise
                raise InputError(f"image {idx} of the batch: {exc}") from exc
            if not resize:
                if tuple(chw.shape[1:]) != (self.image_size, self.image_size):
                    raise InputError(
                        f"image {idx} is {chw.shape[2]}x{chw.shape[1]} but resize=False needs exactly "
                        f"{self.image_size}x{self.image_size}; pass resize=True to apply the official resize"
                    )
                chw = chw[:3]
            out.append(chw)
        return torch.stack(out).contiguous()

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """The official pixel normalisation of a uint8 [B, 3, S, S] batch (in ``normalize_dtype``)."""
        if images_uint8.dtype != torch.uint8:
            raise InputError(f"normalize expects uint8 pixels; got {images_uint8.dtype}")
        return normalize_pixels(images_uint8, self.image_mean, self.image_std, self.normalize_dtype)

    def panoptic_map_array(self, panoptic_map: Any) -> np.ndarray:
        """One panoptic colour map as the official float64 H x W x 3 array in [0, 1].

        Accepted: ``None`` (all black), an object with ``panoptic_color_map()`` (a ``PerceptionResult``),
        a float numpy array H x W x 3 in [0, 1], a uint8 numpy array H x W x 3 (colour x 255), a torch
        tensor 3 x H x W (float in [0, 1] or uint8), or a PNG as path / bytes / PIL image (colour x 255).
        """
        size = self.image_size
        if panoptic_map is None:
            return np.zeros((size, size, 3), dtype=np.float64)
        if callable(getattr(panoptic_map, "panoptic_color_map", None)):
            panoptic_map = panoptic_map.panoptic_color_map()
        if isinstance(panoptic_map, torch.Tensor):
            t = panoptic_map.detach().cpu()
            if t.ndim != 3 or t.shape[0] != 3:
                raise InputError(f"a torch panoptic map must be 3 x H x W; got shape {tuple(t.shape)}")
            panoptic_map = t.permute(1, 2, 0).numpy()
        if isinstance(panoptic_map, np.ndarray):
            arr = panoptic_map
            if arr.ndim != 3 or arr.shape[2] != 3:
                raise InputError(f"a numpy panoptic map must be H x W x 3; got shape {arr.shape}")
            if arr.dtype == np.uint8:
                arr = arr.astype(np.float64) / 255.0
            elif np.issubdtype(arr.dtype, np.floating):
                arr = arr.astype(np.float64)
                if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
                    raise InputError(
                        "a float panoptic map must hold colours in [0, 1]; for 0-255 values pass a uint8 array"
                    )
            else:
                raise InputError(f"a panoptic map must be uint8 (0-255) or float in [0, 1]; got {arr.dtype}")
        else:
            chw = load_image_chw(panoptic_map)  # path, bytes or PIL: uint8 colour x 255
            arr = chw[:3].permute(1, 2, 0).numpy().astype(np.float64) / 255.0
        if arr.shape[:2] != (size, size):
            raise InputError(
                f"the panoptic map is {arr.shape[1]}x{arr.shape[0]} but must match the {size}x{size} frame the "
                "experts run on (it is not resized)"
            )
        return arr

    def panoptic_pixel_values(self, panoptic_maps: Sequence[Any]) -> torch.Tensor:
        """Official map preprocessing: [0, 1] float64 maps -> float16 -> normalised with the 0-255 mean/std."""
        maps = [
            torch.from_numpy(np.ascontiguousarray(self.panoptic_map_array(m))).permute(2, 0, 1) for m in panoptic_maps
        ]
        stacked = torch.stack(maps).to(torch.float16)
        return normalize_pixels(stacked, self.image_mean, self.image_std, self.normalize_dtype)

    def image_masks(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``im_mask`` / ``lang_mask`` for a left-padded batch (see :func:`merged_image_masks`)."""
        return merged_image_masks(input_ids, attention_mask, self.image_token_index, self.img_length)

    def prompt_lengths(
        self, prompts: Sequence[str], template: str | Sequence[str] = DEFAULT_TEMPLATE, raw: bool = False
    ) -> list[int]:
        """Text tokens of each full prompt (BOS included, the ``<image>`` placeholder not), as :meth:`__call__`
        tokenizes it (``raw`` = ``allow_special_tokens``): what the context-window check counts."""
        templates = self._broadcast_strings(template, len(prompts), "template", allow_none=False)
        lengths = []
        for prompt, name in zip(prompts, templates, strict=True):
            parts = prompt_parts(prompt, check_template(name))
            ids = self.tokenizer.encode("".join(t for t, _ in parts)) if raw else self.tokenizer.encode_parts(parts)
            lengths.append(len(ids) - 1)
        return lengths

    def check_context(
        self, prompts: Sequence[str], template: str | Sequence[str], max_new_tokens: int, config: Any, raw: bool = False
    ) -> None:
        """Refuse, before any compute, prompts whose longest one + the image tokens + ``max_new_tokens`` exceed the
        context window of the model ``config`` (:func:`~moai_sdk.modeling.generation.check_context_length`)."""
        longest = max(self.prompt_lengths(prompts, template, raw), default=0)
        check_context_length(longest, self.num_image_tokens, max_new_tokens, config)

    # ------------------------------------------------------------------ main entry point
    def __call__(
        self,
        images: Any,
        prompts: str | Sequence[str],
        aux_texts: str | Sequence[str | None] | None = None,
        panoptic_maps: Any = None,
        *,
        template: str | Sequence[str] = DEFAULT_TEMPLATE,
        resize: bool = True,
        allow_special_tokens: bool = False,
    ) -> MoAIInputs:
        """Build the model inputs of a batch.

        Args:
            images: one image or a list (PIL, path, bytes, numpy HWC uint8, torch CHW uint8; any size), or a
                uint8 batch tensor [B, C, H, W] / array [B, H, W, C].
            prompts: one prompt per image, or a single prompt used for every image.
            aux_texts: the verbalized perception per image (``None`` = the official empty verbalization
                ``"   "``).
            panoptic_maps: the panoptic colour map per image (see :meth:`panoptic_map_array`); ``None`` = black.
            template: ``"chat"`` (the benchmarks' InternLM2 template) or ``"demo"``; a list gives one per row.
            resize: apply the official resize (torchvision bilinear, no antialias); with ``False`` images
                must already be ``image_size`` square.
            allow_special_tokens: with ``False`` (default) control strings written in a prompt or an aux text
                (``</s>``, ``<s>``, ``[UNUSED_TOKEN_145]``, ...) are tokenized as plain text, so a prompt cannot
                end its turn; ``True`` makes them control tokens, for callers who build raw prompts.
        """
        image_list = self._as_image_list(images)
        batch = len(image_list)
        template_list = [
            check_template(t) for t in self._broadcast_strings(template, batch, "template", allow_none=False)
        ]
        prompt_list = self._broadcast_strings(prompts, batch, "prompts", allow_none=False)
        if aux_texts is None:
            aux_list = [EMPTY_VERBALIZATION] * batch
        else:
            given = self._broadcast_strings(aux_texts, batch, "aux_texts", allow_none=True)
            aux_list = [EMPTY_VERBALIZATION if t is None else t for t in given]
        if panoptic_maps is None:
            map_list: list[Any] = [None] * batch
        elif isinstance(panoptic_maps, (list, tuple)):
            map_list = list(panoptic_maps)
            if len(map_list) != batch:
                raise InputError(f"got {len(map_list)} panoptic maps for {batch} images; pass one per image (or None)")
        elif batch == 1:
            map_list = [panoptic_maps]
        else:
            raise InputError(f"pass a list of {batch} panoptic maps (one per image)")

        texts = [build_prompt(p, t) for p, t in zip(prompt_list, template_list, strict=True)]
        if allow_special_tokens:
            text, aux = self.tokenizer(texts), self.tokenizer(aux_list)
        else:
            encode = self.tokenizer.encode_parts
            parts = [prompt_parts(p, t) for p, t in zip(prompt_list, template_list, strict=True)]
            text = self.tokenizer.pad([encode(part) for part in parts])
            aux = self.tokenizer.pad([encode([(a, False)]) for a in aux_list])
        im_mask, lang_mask = self.image_masks(text["input_ids"], text["attention_mask"])
        pixel_values = self.normalize(self.load_images(image_list, resize=resize))
        panoptic = self.panoptic_pixel_values(map_list)
        return MoAIInputs(
            input_ids=text["input_ids"],
            attention_mask=text["attention_mask"],
            pixel_values=pixel_values,
            im_mask=im_mask,
            lang_mask=lang_mask,
            aux_input_ids=aux["input_ids"],
            aux_attention_mask=aux["attention_mask"],
            panoptic_pixel_values=panoptic,
            image_token_index=self.image_token_index,
            num_image_tokens=self.img_length,
            texts=texts,
            aux_texts=aux_list,
        )

    # ------------------------------------------------------------------ decoding passthrough
    def decode(self, ids: Any, skip_special_tokens: bool = True, **kwargs: Any) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = True, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    # ------------------------------------------------------------------ argument normalisation
    @staticmethod
    def _as_image_list(images: Any) -> list[Any]:
        items = split_images(images)
        if not items:
            raise InputError("no images given; MoAI needs exactly one image per prompt")
        return items

    @staticmethod
    def _broadcast_strings(values: Any, batch: int, name: str, *, allow_none: bool) -> list[Any]:
        if isinstance(values, str):
            return [values] * batch
        if not isinstance(values, (list, tuple)):
            raise InputError(f"{name} must be a str or a list of str; got {type(values).__name__}")
        return per_row(values, batch, name, str, name=name, allow_none=allow_none)


__all__ = [
    "MoAIInputs",
    "MoAIProcessor",
    "normalize_pixels",
    "merged_image_masks",
    "CLIP_MEAN",
    "CLIP_STD",
    "EMPTY_VERBALIZATION",
]
