"""Open-vocabulary detection experts.

* ``owlv2`` (default, the official expert): transformers ``Owlv2ForObjectDetection`` + ``Owlv2Processor``
  queried with the 1847 raw names ``ADE20K_847 + IMAGENET_CLASSES``, post-processed with threshold 0.1 and
  the expert frame (490 x 490) as target size. Every detection scoring above 0.1 is kept (float32 scores,
  in the model's patch order); the official >= 0.5 filter belongs to the verbalization.

  The official demo tokenizes and encodes the 1847 queries again for every image. Here the query
  embeddings are computed once per loaded model and reused: each image runs only the vision tower and the
  box / class heads. The numbers are those of the full forward (the text tower is deterministic and the
  heads see the same embeddings); ``reencode_queries=True`` restores the per-image full forward.
* ``yolo-world`` (alternative): ultralytics YOLO-World (or YOLOE, chosen by the weight name) with the same
  query list set once as its classes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from pydantic import field_validator

from ..errors import InputError
from ..results import Box, Detection, PerceptionResult, load_vocab
from .backends import (
    TransformersExpert,
    UltralyticsExpert,
    UltralyticsSettings,
    chunks,
    keeps_thread_settings,
    ultralytics_predict,
)
from .base import frame_result, register_expert
from .settings import ExpertSettings, ImageBackend, OptionalPositiveInt, PositiveInt, UnitFloat

logger = logging.getLogger(__name__)


def official_queries() -> tuple[str, ...]:
    """The official OWLv2 query list: ``ADE20K_847 + IMAGENET_CLASSES`` (1847 raw names, duplicates kept)."""
    return tuple(load_vocab("ADE20K_847")) + tuple(load_vocab("IMAGENET_CLASSES"))


class QuerySettings(ExpertSettings):
    """Settings shared by the open-vocabulary detectors: ``queries`` (None = the official 1847 names)."""

    queries: Optional[list[str]] = None

    @field_validator("queries", mode="before")
    @classmethod
    def _queries(cls, value: Any) -> Optional[list[str]]:
        if value is None:
            return None
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise ValueError(f"must be a list of strings, not a {type(value).__name__}")
        out = list(value)
        if not out or not all(isinstance(q, str) and q.strip() for q in out):
            raise ValueError("must be a non-empty list of non-empty strings")
        return out


class OpenVocabulary:
    """Mixin of the open-vocabulary detectors: :attr:`queries` is the ``queries`` setting (default: the official
    1847 names), and the cache key names the list by its count and digest instead of spelling it out."""

    settings: dict[str, Any]

    @functools.cached_property
    def queries(self) -> tuple[str, ...]:
        queries = self.settings["queries"]
        return official_queries() if queries is None else tuple(queries)

    def cache_key(self) -> str:
        """Model id, revision and settings, with the query list replaced by its count and digest."""
        payload = json.loads(super().cache_key())  # type: ignore[misc]
        payload["settings"]["queries"] = f"{len(self.queries)} queries sha256:{_queries_digest(self.queries)}"
        return json.dumps(payload, sort_keys=True)


def detection_fields(
    frame: torch.Tensor,
    boxes: Any,
    scores: Any,
    labels: Any,
    queries: Sequence[str],
) -> dict[str, Any]:
    """The ``detections`` field of a result for ``frame`` from xyxy pixel boxes, scores and query indices.

    Boxes are kept exactly (float32 values, not clipped); the order is the backend's.
    """
    h, w = int(frame.shape[-2]), int(frame.shape[-1])
    box_arr = np.asarray(
        boxes.detach().to("cpu").float() if isinstance(boxes, torch.Tensor) else boxes, dtype=np.float32
    ).reshape(-1, 4)
    score_arr = np.asarray(
        scores.detach().to("cpu").float() if isinstance(scores, torch.Tensor) else scores, dtype=np.float32
    ).reshape(-1)
    label_arr = np.asarray(
        labels.detach().to("cpu") if isinstance(labels, torch.Tensor) else labels, dtype=np.int64
    ).reshape(-1)
    if not len(box_arr) == len(score_arr) == len(label_arr):
        raise InputError(f"got {len(box_arr)} boxes, {len(score_arr)} scores and {len(label_arr)} labels")
    detections = []
    for box, score, label in zip(box_arr.tolist(), score_arr.tolist(), label_arr.tolist()):
        if not 0 <= label < len(queries):
            raise InputError(f"label index {label} is outside the {len(queries)} queries")
        detections.append(
            Detection(
                label=queries[label],
                label_index=label,
                score=score,
                box=Box.from_xyxy(box, frame_width=w, frame_height=h),
            )
        )
    return {"detections": detections}


def detections_result(
    frame: torch.Tensor,
    boxes: Any,
    scores: Any,
    labels: Any,
    queries: Sequence[str],
) -> PerceptionResult:
    """A detection-only :class:`PerceptionResult` (see :func:`detection_fields`)."""
    return frame_result(frame, **detection_fields(frame, boxes, scores, labels, queries))


def _queries_digest(queries: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(queries)).encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# OWLv2 (official)
# ----------------------------------------------------------------------------------------------------------


@register_expert
class Owlv2Expert(OpenVocabulary, TransformersExpert):
    """Open-vocabulary detection with OWLv2, as the official MoAI demo runs it.

    Settings:

    * ``threshold`` (0.1): the official post-processing threshold (kept: score > threshold);
    * ``queries`` (None = ``ADE20K_847 + IMAGENET_CLASSES``): the text queries;
    * ``reencode_queries`` (False): True runs the official per-image full forward (text tower included);
    * ``image_backend`` (``"pil"``): the reference OWLv2 image processor (needs scipy, as the official one
      did); ``"torchvision"`` is faster with a slightly different anti-aliasing filter;
    * ``batch_size`` (4): images per vision forward (cached path);
    * ``text_batch_size`` (None = all queries at once, as the official call): queries per text forward.

    ``dtype`` defaults to float32 (the official precision); class logits always come back in float32.
    """

    class Settings(QuerySettings):
        threshold: UnitFloat = 0.1
        reencode_queries: bool = False
        image_backend: ImageBackend = "pil"
        batch_size: PositiveInt = 4
        text_batch_size: OptionalPositiveInt = None

    name = "owlv2"
    task = "detection"
    default_model_id = "google/owlv2-base-patch16-ensemble"

    def __init__(self, model_id: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(model_id, **kwargs)
        self._query_embeds: Optional[torch.Tensor] = None  # [1, Q, D], L2-normalised like the full forward
        self._query_mask: Optional[torch.Tensor] = None  # [1, Q] bool
        self.text_encodings = 0  # how many times the query list went through the text tower

    def _load(self) -> None:
        from transformers import AutoProcessor, Owlv2ForObjectDetection

        self._place(self._load_pretrained(AutoProcessor.from_pretrained, Owlv2ForObjectDetection.from_pretrained))
        self._query_embeds = self._query_mask = None

    def _unload(self) -> None:
        self._query_embeds = self._query_mask = None
        super()._unload()

    # --- pieces -------------------------------------------------------------------------------------------

    def encode_queries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Query embeddings ``[1, Q, D]`` and validity mask ``[1, Q]``, computed on first use and cached."""
        if self._query_embeds is not None and self._query_mask is not None:
            return self._query_embeds, self._query_mask
        self.load()
        text = self.processor(text=[list(self.queries)], return_tensors="pt")
        input_ids, attention_mask = text["input_ids"], text["attention_mask"]
        step = self.settings["text_batch_size"] or len(input_ids)
        parts = []
        with torch.inference_mode():
            for start in range(0, len(input_ids), step):
                ids = input_ids[start : start + step].to(self.device)
                mask = attention_mask[start : start + step].to(self.device)
                feats = self.model.owlv2.get_text_features(input_ids=ids, attention_mask=mask)
                feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
                # the full forward hands the class head text embeddings divided by their L2 norm
                parts.append(feats / torch.linalg.norm(feats, ord=2, dim=-1, keepdim=True))
        self.text_encodings += 1
        embeds = torch.cat(parts, dim=0)[None]
        # a query whose first token is padding does not exist (same rule as the full forward)
        query_mask = (input_ids[:, 0] > 0)[None].to(self.device)
        self._query_embeds, self._query_mask = embeds, query_mask
        logger.info("encoded %d OWLv2 queries once (%s)", len(self.queries), self.model_id)
        return embeds, query_mask

    def _cached_outputs(self, frames: Sequence[torch.Tensor]) -> Any:
        """Model outputs (logits, pred_boxes) for a batch of frames from the cached query embeddings."""
        from transformers.models.owlv2.modeling_owlv2 import Owlv2ObjectDetectionOutput

        query_embeds, query_mask = self.encode_queries()
        pixel_values = self._to_device(self.processor(images=list(frames), return_tensors="pt"))["pixel_values"]
        feature_map = self.model.image_embedder(pixel_values=pixel_values)[0]
        b, gh, gw, d = feature_map.shape
        image_feats = feature_map.reshape(b, gh * gw, d)
        logits = self.model.class_predictor(image_feats, query_embeds.expand(b, -1, -1), query_mask.expand(b, -1))[0]
        boxes = self.model.box_predictor(image_feats, feature_map)
        return Owlv2ObjectDetectionOutput(logits=logits.float(), pred_boxes=boxes.float())

    def _full_outputs(self, frame: torch.Tensor) -> Any:
        """The official call: processor(text=[queries], images=[frame]) and the full model forward."""
        inputs = self._to_device(self.processor(text=[list(self.queries)], images=[frame], return_tensors="pt"))
        outputs = self.model(**inputs)
        self.text_encodings += 1
        outputs.logits = outputs.logits.float()
        outputs.pred_boxes = outputs.pred_boxes.float()
        return outputs

    def raw_outputs(self, frames: Sequence[torch.Tensor]) -> Any:
        """Logits / boxes for frames through the configured path (for inspection and benchmarks)."""
        self.load()
        with torch.inference_mode():
            if self.settings["reencode_queries"]:
                parts = [self._full_outputs(f) for f in frames]
                from transformers.models.owlv2.modeling_owlv2 import Owlv2ObjectDetectionOutput

                return Owlv2ObjectDetectionOutput(
                    logits=torch.cat([p.logits for p in parts]), pred_boxes=torch.cat([p.pred_boxes for p in parts])
                )
            return self._cached_outputs(frames)

    # --- prediction ---------------------------------------------------------------------------------------

    def _predict(self, images: list[torch.Tensor]) -> list[PerceptionResult]:
        s = self.settings
        step = 1 if s["reencode_queries"] else s["batch_size"]
        results: list[PerceptionResult] = []
        for chunk in chunks(images, step):
            with torch.inference_mode():
                outputs = self.raw_outputs(chunk)
                sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in chunk]
                found = self.processor.image_processor.post_process_object_detection(
                    outputs, threshold=s["threshold"], target_sizes=sizes
                )
            for frame, item in zip(chunk, found):
                fields = detection_fields(frame, item["boxes"], item["scores"], item["labels"], self.queries)
                results.append(self.make_result(frame, **fields))
        return results


# ----------------------------------------------------------------------------------------------------------
# ultralytics YOLO-World / YOLOE (alternative)
# ----------------------------------------------------------------------------------------------------------


@register_expert
class YoloWorldExpert(OpenVocabulary, UltralyticsExpert):
    """Open-vocabulary detection with ultralytics YOLO-World (or YOLOE when the weight name says ``yoloe``).

    The query list (default: the official 1847 names) is set once, when the model loads: ultralytics then
    encodes it with its text model (CLIP for YOLO-World, MobileCLIP for YOLOE; ultralytics fetches those
    itself the first time). Settings: ``conf`` (0.1, the official OWLv2 threshold), ``iou`` (0.7),
    ``imgsz`` (640), ``max_det`` (300), ``queries``, ``batch_size`` (8).
    """

    class Settings(QuerySettings, UltralyticsSettings):
        conf: UnitFloat = 0.1

    name = "yolo-world"
    task = "detection"
    default_model_id = "yolov8l-worldv2.pt"

    @property
    def is_yoloe(self) -> bool:
        return "yoloe" in str(self.model_id).lower()

    @keeps_thread_settings
    def _load(self) -> None:
        ultralytics, weights = self._open_ultralytics()
        classes = list(self.queries)
        if self.is_yoloe:
            model = ultralytics.YOLOE(weights)
            model.set_classes(classes, model.get_text_pe(classes))
        else:
            model = ultralytics.YOLOWorld(weights)
            model.set_classes(classes)
        model.to(torch.device(self.device))
        self.model = model

    @keeps_thread_settings
    def _predict(self, images: list[torch.Tensor]) -> list[PerceptionResult]:
        out: list[PerceptionResult] = []
        for img, pred in ultralytics_predict(self, images):
            boxes = pred.boxes
            if boxes is None or len(boxes) == 0:
                fields = detection_fields(img, np.zeros((0, 4)), np.zeros(0), np.zeros(0), self.queries)
            else:
                fields = detection_fields(img, boxes.xyxy, boxes.conf, boxes.cls.long(), self.queries)
            out.append(self.make_result(img, **fields))
        return out


__all__ = ["Owlv2Expert", "YoloWorldExpert", "official_queries", "detections_result", "detection_fields"]
