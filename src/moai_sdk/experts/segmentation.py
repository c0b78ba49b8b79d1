"""Panoptic segmentation experts.

* ``mask2former`` (default, the official expert): transformers ``Mask2FormerForUniversalSegmentation`` with
  its image processor and ``post_process_panoptic_segmentation``, called with the settings of the official
  MoAI demo: ``threshold=0.5``, ``mask_threshold=0.95``, no label fusion, target size = the expert frame
  (490 x 490). Weights stay in float32 unless a dtype is given, as in the official code.
* ``yolo-seg`` (alternative): an ultralytics YOLO *instance* segmentation model. It knows the 80 COCO thing
  classes only -- no stuff classes (sky, wall, grass, ...) -- so its panoptic map leaves the background
  unlabelled. Its class names are mapped onto the COCO-panoptic ids.

Both produce :class:`~moai_sdk.results.Segment` objects (box and area from the mask, the raw COCO-panoptic
name as label) and the panoptic id map (int32; -1 everywhere when nothing was found, 0 for unlabelled
pixels, k for segment k), which is what the official code turns into the colour map and the verbalization.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from pydantic import field_validator

from ..errors import ConfigError, ExpertError, InputError
from ..results import PerceptionResult, Segment, load_vocab
from .backends import (
    TransformersExpert,
    UltralyticsExpert,
    UltralyticsSettings,
    chunks,
    keeps_thread_settings,
    ultralytics_predict,
)
from .base import frame_result, register_expert
from .settings import ExpertSettings, ImageBackend, PositiveInt, UnitFloat

logger = logging.getLogger(__name__)

#: COCO-panoptic category ids below this are "things" (countable objects); the rest are "stuff".
NUM_THING_CLASSES = 80


def coco_panoptic_classes() -> tuple[str, ...]:
    """The 133 COCO-panoptic class names (index = Mask2Former ``label_id``)."""
    return load_vocab("COCO_PANOPTIC_CLASSES")


def segments_from_id_map(ids: np.ndarray, segments_info: Iterable[dict], *, keep_masks: bool = True) -> list[Segment]:
    """Typed segments from a panoptic id map and its ``segments_info`` (``id``, ``label_id``, ``score``).

    Entries repeating an id (fused segments) are kept once. ``label_id`` indexes ``COCO_PANOPTIC_CLASSES``;
    ``isthing`` is ``label_id < 80``. Box and area come from the pixels carrying the id.
    """
    names = coco_panoptic_classes()
    segments: list[Segment] = []
    seen: set[int] = set()
    for info in segments_info:
        seg_id = int(info["id"])
        if seg_id in seen:
            continue
        seen.add(seg_id)
        label_id = int(info["label_id"])
        if not 0 <= label_id < len(names):
            raise InputError(f"label_id {label_id} is outside the {len(names)} COCO-panoptic classes")
        score = info.get("score")
        segments.append(
            Segment.from_mask(
                ids == seg_id,
                id=seg_id,
                label=names[label_id],
                category_id=label_id,
                isthing=label_id < NUM_THING_CLASSES,
                score=None if score is None else float(score),
                keep_mask=keep_masks,
            )
        )
    return segments


def panoptic_fields(
    frame: torch.Tensor, ids: np.ndarray, segments_info: Iterable[dict], *, keep_masks: bool = True
) -> dict[str, Any]:
    """The segmentation fields (``segments``, ``panoptic_ids``) of a result for ``frame`` (uint8 [3, H, W])."""
    h, w = int(frame.shape[-2]), int(frame.shape[-1])
    ids = np.ascontiguousarray(ids, dtype=np.int32)
    if ids.shape != (h, w):
        raise InputError(f"the panoptic map is {ids.shape[1]}x{ids.shape[0]} but the frame is {w}x{h}")
    return {"segments": segments_from_id_map(ids, segments_info, keep_masks=keep_masks), "panoptic_ids": ids}


def panoptic_result(
    frame: torch.Tensor, ids: np.ndarray, segments_info: Iterable[dict], *, keep_masks: bool = True
) -> PerceptionResult:
    """A segmentation-only :class:`PerceptionResult` for ``frame`` (uint8 [3, H, W])."""
    return frame_result(frame, **panoptic_fields(frame, ids, segments_info, keep_masks=keep_masks))


# ----------------------------------------------------------------------------------------------------------
# Mask2Former (official)
# ----------------------------------------------------------------------------------------------------------


@register_expert
class Mask2FormerExpert(TransformersExpert):
    """Panoptic segmentation with Mask2Former, as the official MoAI demo runs it.

    Settings (defaults = the official call):

    * ``threshold`` (0.5): minimum class probability of a query to become a segment;
    * ``mask_threshold`` (0.95): binarisation threshold of the (score-weighted) mask probabilities;
    * ``overlap_mask_area_threshold`` (0.8): transformers' default, which the official code keeps;
    * ``label_ids_to_fuse`` (empty): COCO-panoptic ids whose instances are merged into one segment;
    * ``image_backend`` (``"pil"``): the reference image processor (what the official code ran);
      ``"torchvision"`` is faster with slightly different resizing;
    * ``batch_size`` (8): images per forward pass;
    * ``keep_masks`` (True): keep each segment's boolean mask in memory.

    The model must have the 133 COCO-panoptic labels. ``dtype`` defaults to float32 (the official expert
    ran in float32); ``dtype=torch.float16`` halves memory on CUDA, with the logits cast back to float32
    before post-processing.
    """

    class Settings(ExpertSettings):
        threshold: UnitFloat = 0.5
        mask_threshold: UnitFloat = 0.95
        overlap_mask_area_threshold: UnitFloat = 0.8
        label_ids_to_fuse: tuple[int, ...] = ()
        image_backend: ImageBackend = "pil"
        batch_size: PositiveInt = 8
        keep_masks: bool = True

        @field_validator("label_ids_to_fuse", mode="before")
        @classmethod
        def _ids(cls, value: Any) -> tuple[int, ...]:
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
                raise ValueError("must be a collection of COCO-panoptic ids")
            ids = list(value)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise ValueError("must be a collection of COCO-panoptic ids (integers)")
            return tuple(sorted(set(ids)))

    name = "mask2former"
    task = "segmentation"
    default_model_id = "facebook/mask2former-swin-base-coco-panoptic"

    def _load(self) -> None:
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        model = self._load_pretrained(
            AutoImageProcessor.from_pretrained, Mask2FormerForUniversalSegmentation.from_pretrained
        )
        num_labels = int(model.config.num_labels)
        expected = len(coco_panoptic_classes())
        if num_labels != expected:
            raise ConfigError(
                f"{self.model_id!r} predicts {num_labels} classes; the mask2former expert needs a COCO-panoptic "
                f"model ({expected} classes), e.g. {self.default_model_id!r}"
            )
        self._place(model)

    def _predict(self, images: list[torch.Tensor]) -> list[PerceptionResult]:
        s = self.settings
        results: list[PerceptionResult] = []
        for chunk in chunks(images, s["batch_size"]):
            sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in chunk]
            with torch.inference_mode():
                outputs = self._forward(list(chunk))
                panoptic = self.processor.post_process_panoptic_segmentation(
                    outputs,
                    threshold=s["threshold"],
                    mask_threshold=s["mask_threshold"],
                    overlap_mask_area_threshold=s["overlap_mask_area_threshold"],
                    label_ids_to_fuse=set(s["label_ids_to_fuse"]),
                    target_sizes=sizes,
                )
            for img, item in zip(chunk, panoptic):
                ids = item["segmentation"].detach().to("cpu").to(torch.int32).numpy()
                fields = panoptic_fields(img, ids, item["segments_info"], keep_masks=s["keep_masks"])
                results.append(self.make_result(img, **fields))
        return results

    def _forward(self, frames: list[torch.Tensor]) -> Any:
        """Processor + model on a batch of frames (the frames go to the processor as uint8 CHW tensors, as
        in the official code); logits come back in float32. Call under ``torch.inference_mode()``."""
        outputs = self.model(**self._to_device(self.processor(images=frames, return_tensors="pt")))
        if outputs.class_queries_logits.dtype != torch.float32:
            outputs.class_queries_logits = outputs.class_queries_logits.float()
            outputs.masks_queries_logits = outputs.masks_queries_logits.float()
        return outputs


# ----------------------------------------------------------------------------------------------------------
# ultralytics YOLO instance segmentation (alternative)
# ----------------------------------------------------------------------------------------------------------


def yolo_names_to_panoptic(names: dict[int, str] | Sequence[str]) -> dict[int, int]:
    """Map a YOLO model's class indices to COCO-panoptic ids.

    Names are matched to the 80 COCO thing names (which ultralytics' COCO models spell exactly like the
    panoptic list). A model whose names are just numbers (built from a ``.yaml`` config, untrained) is taken
    to use the COCO-80 order. Anything else raises :class:`ConfigError`.
    """
    table = dict(enumerate(names)) if not isinstance(names, dict) else dict(names)
    things = coco_panoptic_classes()[:NUM_THING_CLASSES]
    by_name = {name: i for i, name in enumerate(things)}
    if all(str(v).isdigit() for v in table.values()):
        out = {int(k): int(v) for k, v in table.items() if int(v) < NUM_THING_CLASSES}
        if len(out) != len(table):
            raise ConfigError("this YOLO model has numbered classes beyond the 80 COCO ones; it cannot be mapped")
        return out
    unknown = sorted(str(v) for v in table.values() if v not in by_name)
    if unknown:
        raise ConfigError(
            f"YOLO classes {unknown[:8]}{'...' if len(unknown) > 8 else ''} are not COCO classes; the yolo-seg "
            "expert needs a COCO-trained segmentation model (e.g. yolo11m-seg.pt)"
        )
    return {int(k): by_name[v] for k, v in table.items()}


def instances_to_panoptic(
    masks: np.ndarray, scores: np.ndarray, label_ids: Sequence[int], overlap_mask_area_threshold: float = 0.8
) -> tuple[np.ndarray, list[dict]]:
    """Paint instance masks into a panoptic id map, best score first.

    Each instance claims its still-free pixels; it becomes a segment (ids 1, 2, ... in painting order) only
    if it keeps more than ``overlap_mask_area_threshold`` of its own area (the rule Mask2Former's
    post-processing uses for overlapping queries). Unclaimed pixels are 0; with no segment at all the map is
    -1 everywhere, as transformers reports an empty panoptic result.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise InputError(f"instance masks must be N x H x W; got shape {masks.shape}")
    h, w = masks.shape[1:]
    ids = np.zeros((h, w), dtype=np.int32)
    infos: list[dict] = []
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    for k in order.tolist():
        mask = masks[k]
        own = int(mask.sum())
        if own == 0:
            continue
        free = mask & (ids == 0)
        kept = int(free.sum())
        if kept == 0 or kept / own <= overlap_mask_area_threshold:
            continue
        seg_id = len(infos) + 1
        ids[free] = seg_id
        infos.append({"id": seg_id, "label_id": int(label_ids[k]), "score": float(scores[k])})
    if not infos:
        ids.fill(-1)
    return ids, infos


@register_expert
class YoloSegExpert(UltralyticsExpert):
    """Instance segmentation with an ultralytics YOLO ``-seg`` model (no stuff classes).

    ``model_id`` is a weight file, an ultralytics name (``yolo11m-seg.pt`` is fetched by ultralytics; a
    ``.yaml`` config such as ``yolov8n-seg.yaml`` builds random weights locally) or ``hf://owner/repo/file.pt``.
    Settings: ``conf`` (0.5, like Mask2Former's class threshold), ``iou`` (NMS, 0.7), ``imgsz`` (640),
    ``max_det`` (100), ``overlap_mask_area_threshold`` (0.8), ``batch_size`` (8), ``keep_masks`` (True).
    ``dtype=torch.float16`` runs ultralytics in half precision (CUDA).
    """

    class Settings(UltralyticsSettings):
        conf: UnitFloat = 0.5
        max_det: PositiveInt = 100
        overlap_mask_area_threshold: UnitFloat = 0.8
        keep_masks: bool = True

    name = "yolo-seg"
    task = "segmentation"
    default_model_id = "yolo11m-seg.pt"

    def __init__(self, model_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(model_id, **kwargs)
        self.class_map: dict[int, int] = {}

    @keeps_thread_settings
    def _load(self) -> None:
        ultralytics, weights = self._open_ultralytics()
        model = ultralytics.YOLO(weights)
        if model.task != "segment":
            raise ConfigError(f"{self.model_id!r} is a {model.task!r} model; yolo-seg needs a segmentation model")
        self.class_map = yolo_names_to_panoptic(model.names)
        model.to(torch.device(self.device))
        self.model = model

    @keeps_thread_settings
    def _predict(self, images: list[torch.Tensor]) -> list[PerceptionResult]:
        out: list[PerceptionResult] = []
        s = self.settings
        for img, pred in ultralytics_predict(self, images, retina_masks=True):
            h, w = int(img.shape[-2]), int(img.shape[-1])
            if pred.masks is None or pred.boxes is None or len(pred.boxes) == 0:
                masks, scores, labels = np.zeros((0, h, w), bool), np.zeros(0), []
            else:
                masks = pred.masks.data.detach().to("cpu").numpy() > 0.5
                scores = pred.boxes.conf.detach().to("cpu").float().numpy()
                labels = [self.class_map[int(c)] for c in pred.boxes.cls.detach().to("cpu").tolist()]
            if masks.shape[1:] != (h, w):
                raise ExpertError(self.name, f"masks came back {masks.shape[1:]} for a {h}x{w} frame")
            ids, infos = instances_to_panoptic(masks, scores, labels, s["overlap_mask_area_threshold"])
            out.append(self.make_result(img, **panoptic_fields(img, ids, infos, keep_masks=s["keep_masks"])))
        return out


__all__ = [
    "NUM_THING_CLASSES",
    "Mask2FormerExpert",
    "YoloSegExpert",
    "coco_panoptic_classes",
    "segments_from_id_map",
    "panoptic_result",
    "panoptic_fields",
    "yolo_names_to_panoptic",
    "instances_to_panoptic",
]
