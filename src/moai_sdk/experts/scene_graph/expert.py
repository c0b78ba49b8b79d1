"""The registered scene-graph expert ``psgtr`` (task ``scene_graph``), MoAI's default SGG model.

It runs the pure-PyTorch PSGTR port on the expert frames (MoAI's 490 x 490 images), one forward per batch of
same-sized inputs, and returns the objects and relations as typed results: ``scene_graph_objects`` in the
order MoAI's verbalization sees them (PSGTR's ``labels``) and ``relations`` in ``rel_pair_idxes`` order, each
with its full 57-column predicate distribution.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator, Literal, Optional, Union

import numpy as np
import torch
from pydantic import StrictBool, field_validator

from ...errors import ConfigError
from ...hub import is_repo_id
from ...results import PerceptionResult, Relation, Segment, load_vocab
from ..base import Expert, register_expert
from ..settings import ExpertSettings, OptionalPositiveInt, PositiveInt, UnitFloat
from .checkpoint import load_into, resolve_weights
from .config import NUM_THING_CLASSES, OFFICIAL_FILENAME, OFFICIAL_REPO_ID, OFFICIAL_REPO_TYPE, PSGTRConfig
from .modeling import PSGTR
from .processing import PreparedImage, SceneGraphPrediction, postprocess, preprocess_image

logger = logging.getLogger(__name__)

#: Structure fields a non-official checkpoint may change (``architecture=`` setting; the official model and its
#: label spaces keep the defaults).
_ARCHITECTURE_FIELDS = (
    "depth",
    "num_queries",
    "embed_dim",
    "num_heads",
    "ffn_dim",
    "num_encoder_layers",
    "num_decoder_layers",
)

#: Settings forwarded to :class:`PSGTRConfig` (pre/post-processing knobs; the architecture is fixed by the weights).
_CONFIG_SETTINGS = (
    "scale",
    "size_divisor",
    "swap_channels",
    "resize_backend",
    "mask_padding",
    "max_per_img",
    "mask_threshold",
    "entity_score_threshold",
    "relation_score_threshold",
    "dedup_iou_threshold",
    "mask_dtype",
    "drop_class_index",
    "mask_head_chunk",
)
_DEFAULT_CONFIG = PSGTRConfig()
_DTYPES = {torch.float32, torch.float16, torch.bfloat16}


class PSGTRSettings(ExpertSettings):
    """Settings of the ``psgtr`` expert; defaults reproduce MoAI (the pre/post-processing ones are
    :class:`PSGTRConfig`'s defaults, which also checks how they combine with the architecture)."""

    scale: tuple[PositiveInt, PositiveInt] = _DEFAULT_CONFIG.scale
    size_divisor: PositiveInt = _DEFAULT_CONFIG.size_divisor
    swap_channels: bool = _DEFAULT_CONFIG.swap_channels
    resize_backend: Literal["cv2", "torch"] = "cv2"
    mask_padding: bool = _DEFAULT_CONFIG.mask_padding
    max_per_img: PositiveInt = _DEFAULT_CONFIG.max_per_img
    mask_threshold: UnitFloat = _DEFAULT_CONFIG.mask_threshold
    entity_score_threshold: UnitFloat = _DEFAULT_CONFIG.entity_score_threshold
    relation_score_threshold: UnitFloat = _DEFAULT_CONFIG.relation_score_threshold
    dedup_iou_threshold: UnitFloat = _DEFAULT_CONFIG.dedup_iou_threshold
    mask_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    drop_class_index: Optional[int] = _DEFAULT_CONFIG.drop_class_index
    mask_head_chunk: OptionalPositiveInt = _DEFAULT_CONFIG.mask_head_chunk
    batch_size: PositiveInt = 2
    keep_masks: bool = True
    allow_tf32: Optional[StrictBool] = None
    filename: str = OFFICIAL_FILENAME
    repo_type: Optional[str] = OFFICIAL_REPO_TYPE
    sha256: Optional[str] = None
    verify_sha256: bool = True
    convert: bool = True
    convert_dir: Optional[Union[str, os.PathLike]] = None
    architecture: Optional[dict[str, int]] = None

    @field_validator("architecture", mode="before")
    @classmethod
    def _architecture(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError("must be a dict of PSGTRConfig structure fields")
        unknown = sorted(set(value) - set(_ARCHITECTURE_FIELDS))
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}; known: {list(_ARCHITECTURE_FIELDS)}")
        return value


@contextlib.contextmanager
def _tf32(allow: bool | None) -> Iterator[None]:
    """Temporarily set PyTorch's TF32 switches for CUDA convolutions and matmuls (``None`` leaves them alone)."""
    if allow is None:
        yield
        return
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = bool(allow)
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def prediction_to_fields(
    prediction: SceneGraphPrediction, *, keep_masks: bool = True
) -> tuple[list[Segment], list[Relation]]:
    """Typed ``scene_graph_objects`` and ``relations`` from a :class:`SceneGraphPrediction`.

    Object k is ``labels[k]`` with its mask (``Segment.id`` = k + 1, the segment index in ``pan_results`` plus
    one). Relations keep the row order of ``rel_dists``; ``predicate_index`` / ``score`` are the argmax / max of
    columns 1..56, which is what MoAI's verbalization reads. The official placeholder result of an image where
    nothing passed the filters (a fake 'person' covering the image, no relation) gives no objects at all.
    """
    if prediction.empty:
        return [], []
    classes = load_vocab("COCO_PANOPTIC_CLASSES")
    predicates = load_vocab("PREDICATES")
    objects = []
    for k, (label, mask, score) in enumerate(zip(prediction.labels, prediction.masks, prediction.segment_scores)):
        category = int(label) - 1
        objects.append(
            Segment.from_mask(
                mask,
                id=k + 1,
                label=classes[category],
                category_id=category,
                isthing=category < NUM_THING_CLASSES,
                score=float(score),
                keep_mask=keep_masks,
            )
        )
    relations = []
    for (s, o), dist in zip(prediction.rel_pair_idxes.tolist(), prediction.rel_dists):
        predicate = int(np.argmax(dist[1:]))
        relations.append(
            Relation(
                subject_index=s,
                object_index=o,
                subject_label=objects[s].label,
                object_label=objects[o].label,
                predicate=predicates[predicate],
                predicate_index=predicate,
                score=float(dist[1:].max()),
                distribution=[float(v) for v in dist],
            )
        )
    return objects, relations


@register_expert
class PSGTRExpert(Expert):
    """PSGTR (OpenPSG, ECCV 2022) scene-graph generation, ported to plain PyTorch.

    ``model_id``: ``None`` / ``"ECCV2022/PSG"`` for the official weights (a file of that Hugging Face Space,
    SHA-256 checked), another Hub repo id (with the ``filename`` / ``repo_type`` settings), or a local
    ``.pth`` / ``.safetensors`` file. The pickled checkpoint is read with a restricted unpickler and cached
    once as safetensors (``convert`` / ``convert_dir``).

    Settings (defaults reproduce MoAI): the pre/post-processing fields of :class:`PSGTRConfig` (``scale``,
    ``swap_channels``, ``resize_backend``, ``mask_dtype``, thresholds, ...), ``batch_size`` (images per
    forward), ``keep_masks`` (keep object masks in the results), ``allow_tf32`` (CUDA only: ``None`` keeps
    PyTorch's global switches -- cuDNN convolutions then use TF32 by default, as in MoAI's own GPU runs --,
    ``False`` computes in strict fp32, closest to the CPU numbers), ``filename``, ``repo_type``, ``sha256``
    (expected hash of a non-official file), ``verify_sha256``, ``convert``, ``convert_dir``, ``architecture``
    (a dict of structure fields -- ``depth``, ``num_queries``, ``embed_dim``, ... -- for a non-official
    checkpoint, e.g. the tiny test model of :func:`moai_sdk.testing.build_tiny_psgtr`).

    dtype: ``float32`` (MoAI runs PSGTR in fp32), ``float16`` or ``bfloat16`` (GPU speed-ups that change the
    numbers slightly; post-processing always starts from fp32 logits).
    """

    Settings = PSGTRSettings
    name = "psgtr"
    task = "scene_graph"
    default_model_id = OFFICIAL_REPO_ID

    def __init__(self, model_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(model_id, **kwargs)
        self.weights_origin: str | None = None
        self.config = self._build_config()
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ConfigError(f"psgtr runs in float32, float16 or bfloat16; got dtype={self.dtype}")

    def _build_config(self) -> PSGTRConfig:
        overrides = {key: self.settings[key] for key in _CONFIG_SETTINGS}
        return _DEFAULT_CONFIG.replace(**overrides, **(self.settings["architecture"] or {}))

    def _hub_plan(self) -> dict[str, Any] | None:
        """One weight file of a Hub repository (the official one: a file of the OpenPSG demo Space)."""
        mid = self.model_id
        if not isinstance(mid, str) or mid.count("/") != 1 or not is_repo_id(mid):
            return None
        s = self.settings
        return {"method": "file", "filenames": [s["filename"]], "repo_type": s["repo_type"]}

    # --- lifecycle --------------------------------------------------------------------------------------------
    def _load(self) -> None:
        dtype = self.dtype or torch.float32
        if dtype not in _DTYPES:
            raise ConfigError(f"psgtr runs in float32, float16 or bfloat16; got dtype={dtype}")
        model = PSGTR(self.config)
        weights = resolve_weights(
            self.model_id,
            filename=self.settings["filename"],
            repo_type=self.settings["repo_type"],
            hub=self.hub,
            sha256=self.settings["sha256"],
            verify=self.settings["verify_sha256"],
            convert=self.settings["convert"],
            convert_dir=self.settings["convert_dir"],
        )
        load_into(model, weights.state_dict)
        if self.device.type == "cpu" and dtype != torch.float32:
            logger.warning("psgtr in %s on CPU is slow and not what MoAI runs; float32 is recommended", dtype)
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.weights_origin = weights.origin
        logger.info("psgtr weights from %s (%s)", weights.source, weights.origin)

    # --- inference --------------------------------------------------------------------------------------------
    def _forward(self, prepared: list[PreparedImage]) -> list[SceneGraphPrediction]:
        """Run one batch of same-shaped inputs and post-process each image."""
        model = self.model
        dtype = next(model.parameters()).dtype
        pixels = torch.stack([p.pixel_values for p in prepared]).to(device=self.device, dtype=dtype)
        mask = None
        if self.config.mask_padding:
            mask = torch.stack([p.padding_mask for p in prepared]).to(self.device)
        tf32 = self.settings["allow_tf32"] if self.device.type == "cuda" else None
        with torch.inference_mode(), _tf32(tf32):
            out = model(pixels, mask)
            return [
                postprocess(
                    out.sub_logits[-1, i],
                    out.obj_logits[-1, i],
                    out.rel_logits[-1, i],
                    out.sub_boxes[-1, i],
                    out.obj_boxes[-1, i],
                    out.sub_mask_logits[i].float(),
                    out.obj_mask_logits[i].float(),
                    p.img_shape,
                    p.scale_factor,
                    self.config,
                )
                for i, p in enumerate(prepared)
            ]

    def predict_raw(self, images: list[torch.Tensor]) -> list[SceneGraphPrediction]:
        """PSGTR's raw per-image results (MoAI's ``triplet2Result`` arrays) for uint8 RGB ``[3, H, W]`` frames."""
        self.load()
        prepared = [preprocess_image(img, self.config) for img in images]
        results: list[SceneGraphPrediction | None] = [None] * len(prepared)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(prepared):
            by_shape.setdefault(tuple(p.pixel_values.shape), []).append(i)
        batch = self.settings["batch_size"]
        for indices in by_shape.values():
            for start in range(0, len(indices), batch):
                chunk = indices[start : start + batch]
                for i, pred in zip(chunk, self._forward([prepared[i] for i in chunk])):
                    results[i] = pred
        return [r for r in results if r is not None]

    def _predict(self, images: list[torch.Tensor]) -> list[PerceptionResult]:
        out = []
        for image, prediction in zip(images, self.predict_raw(images)):
            objects, relations = prediction_to_fields(prediction, keep_masks=self.settings["keep_masks"])
            out.append(self.make_result(image, scene_graph_objects=objects, relations=relations))
        return out


__all__ = ["PSGTRExpert", "PSGTRSettings", "prediction_to_fields"]
