"""OCR experts.

* ``rapidocr`` (default): rapidocr-onnxruntime, the PP-OCRv4 detection / angle / recognition models that ship
  inside its wheel, run with onnxruntime on CPU threads. Works offline, nothing to download.
* ``paddleocr``: PaddleOCR 3.x, the engine the official MoAI code used (``lang='ch'``, angle classifier on,
  CPU), with the official-era PaddleOCR 2.x defaults for detection and the recogniser's drop score.

Each text line found is stored with its recogniser confidence, its polygon and its bounding box, in the
engine's reading order. The official ``>= 0.85`` confidence filter is the verbalizer's business, not the
expert's: results keep every line the engine returns.

Colour order: both engines read numpy images as BGR (OpenCV order). The official demo handed PaddleOCR the
RGB array unchanged, so ``paddleocr`` does the same by default (``input_order="rgb"``, parity); ``rapidocr``,
which has no parity to keep, converts to BGR (``input_order="bgr"``).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Literal, Optional

import numpy as np
import torch
from pydantic import field_validator

from ..errors import ConfigError, DependencyError, InputError
from ..results import PerceptionResult, TextLine
from .base import Expert, frame_result, register_expert
from .settings import ChannelOrder, ExpertSettings, OptionalPositiveInt, PositiveInt, UnitFloat

logger = logging.getLogger(__name__)

_OCR_EXTRA = "pip install 'moai-sdk[experts]'"


def frame_to_array(frame: torch.Tensor, input_order: str) -> np.ndarray:
    """uint8 [3, H, W] RGB tensor -> contiguous HWC uint8 array in the order the engine will receive."""
    arr = frame.detach().to("cpu").permute(1, 2, 0).numpy()
    if input_order == "bgr":
        arr = arr[..., ::-1]
    return np.ascontiguousarray(arr)


def text_line_fields(frame: torch.Tensor, lines: Iterable[tuple[Any, str, float]]) -> dict[str, Any]:
    """The ``text_lines`` field of a result for ``frame`` from ``(polygon, text, confidence)`` triples."""
    h, w = int(frame.shape[-2]), int(frame.shape[-1])
    text_lines = [
        TextLine.from_polygon(
            str(text),
            float(conf),
            np.asarray(poly, dtype=np.float64).reshape(-1, 2).tolist(),
            frame_width=w,
            frame_height=h,
        )
        for poly, text, conf in lines
    ]
    return {"text_lines": text_lines}


def text_lines_result(frame: torch.Tensor, lines: Iterable[tuple[Any, str, float]]) -> PerceptionResult:
    """An OCR-only :class:`PerceptionResult` from ``(polygon, text, confidence)`` triples."""
    return frame_result(frame, **text_line_fields(frame, lines))


# ----------------------------------------------------------------------------------------------------------
# RapidOCR (default)
# ----------------------------------------------------------------------------------------------------------


def rapidocr_lines(raw: Any) -> list[tuple[Any, str, float]]:
    """Lines from RapidOCR's first return value: ``None`` or ``[[box(4 points), text, score], ...]``."""
    if raw is None:
        return []
    out = []
    for item in raw:
        if len(item) < 3:
            raise InputError(f"unexpected RapidOCR line {item!r}; expected [box, text, score]")
        out.append((item[0], str(item[1]), float(item[2])))
    return out


@register_expert
class RapidOCRExpert(Expert):
    """OCR with rapidocr-onnxruntime (PP-OCRv4 models bundled in the wheel; CPU).

    ``model_id``: None (the bundled models) or the path of a RapidOCR ``config.yaml``. Settings:

    * ``text_score`` (0.5): the engine's own drop threshold (PaddleOCR's ``drop_score`` default);
    * ``use_cls`` (True): the 0/180 degree angle classifier (the official ``use_angle_cls=True``);
    * ``det_limit_side_len`` (736), ``det_limit_type`` (``"min"``), ``det_box_thresh`` (0.5),
      ``det_unclip_ratio`` (1.6): RapidOCR's detector defaults;
    * ``num_threads`` (None = onnxruntime's default): intra-op threads;
    * ``input_order`` (``"bgr"``): colour order handed to the engine (it expects BGR).
    """

    class Settings(ExpertSettings):
        text_score: UnitFloat = 0.5
        use_cls: bool = True
        det_limit_side_len: PositiveInt = 736
        det_limit_type: Literal["min", "max"] = "min"
        det_box_thresh: UnitFloat = 0.5
        det_unclip_ratio: float = 1.6
        num_threads: OptionalPositiveInt = None
        input_order: ChannelOrder = "bgr"

    name = "rapidocr"
    task = "ocr"
    default_model_id = None

    def __init__(self, model_id: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(model_id, **kwargs)
        if model_id is not None and not os.path.isfile(model_id):
            raise ConfigError(
                f"rapidocr model_id must be None (bundled models) or a config.yaml path; got {model_id!r}"
            )

    def _hub_plan(self) -> Optional[dict[str, Any]]:
        return {"method": "bundled"}  # the PP-OCRv4 models ship inside the rapidocr-onnxruntime wheel

    @property
    def compute_device_type(self) -> str:
        return "cpu"  # onnxruntime's CPU provider, whatever device the expert was given

    def _load(self) -> None:
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as exc:
            raise DependencyError(f"the rapidocr expert needs rapidocr-onnxruntime: {_OCR_EXTRA}") from exc
        if self.device is not None and self.device.type != "cpu":
            logger.info("rapidocr runs on CPU threads (onnxruntime); ignoring device %s", self.device)
        s = self.settings
        kwargs: dict[str, Any] = {
            "text_score": float(s["text_score"]),
            "use_cls": bool(s["use_cls"]),
            "det_limit_side_len": s["det_limit_side_len"],
            "det_limit_type": s["det_limit_type"],
            "det_box_thresh": float(s["det_box_thresh"]),
            "det_unclip_ratio": float(s["det_unclip_ratio"]),
        }
        if s["num_threads"] is not None:
            kwargs["intra_op_num_threads"] = int(s["num_threads"])
        self.model = RapidOCR(config_path=self.model_id, **kwargs)

    def _predict(self, images: list[torch.Tensor]) -> list[PerceptionResult]:
        order = self.settings["input_order"]
        results = []
        for frame in images:
            raw, _elapsed = self.model(frame_to_array(frame, order))
            results.append(self.make_result(frame, **text_line_fields(frame, rapidocr_lines(raw))))
        return results


# ----------------------------------------------------------------------------------------------------------
# PaddleOCR 3.x (the official engine)
# ----------------------------------------------------------------------------------------------------------


def paddleocr_lines(page: Any) -> list[tuple[Any, str, float]]:
    """Lines from one PaddleOCR page result, in either documented shape.

    * PaddleOCR 3.x ``predict``: a dict-like ``OCRResult`` with ``rec_texts``, ``rec_scores`` and
      ``rec_polys`` (4-point polygons, one per text);
    * PaddleOCR 2.x ``ocr`` (what the official code called): ``[[box, (text, score)], ...]`` or ``None``.
    """
    if page is None:
        return []
    if hasattr(page, "keys") and "rec_texts" in page:
        texts, scores = list(page["rec_texts"]), list(page["rec_scores"])
        polys = page["rec_polys"] if "rec_polys" in page else page["dt_polys"]
        polys = list(polys)
        if not len(texts) == len(scores) == len(polys):
            raise InputError(f"PaddleOCR returned {len(texts)} texts, {len(scores)} scores and {len(polys)} polygons")
        return [(poly, str(text), float(score)) for poly, text, score in zip(polys, texts, scores)]
    out = []
    for item in page:
        box, rec = item[0], item[1]
        out.append((box, str(rec[0]), float(rec[1])))
    return out


@register_expert
class PaddleOCRExpert(Expert):
    """OCR with PaddleOCR 3.x (``paddleocr`` + ``paddlepaddle``), configured like the official demo.

    Settings (defaults reproduce the official ``PaddleOCR(use_angle_cls=True, lang='ch', use_gpu=False)``
    of PaddleOCR 2.x): ``lang`` ("ch"), ``ocr_version`` ("PP-OCRv4", the 2.x default models),
    ``use_textline_orientation`` (True), ``text_det_limit_side_len`` (960) / ``text_det_limit_type`` ("max"),
    ``text_det_thresh`` (0.3), ``text_det_box_thresh`` (0.6), ``text_det_unclip_ratio`` (1.5),
    ``text_rec_score_thresh`` (0.5, the 2.x ``drop_score``), ``input_order`` ("rgb": the official array, see
    the module notes) and ``engine_kwargs`` (more ``PaddleOCR(...)`` keywords). ``model_id`` is unused
    (PaddleOCR names its models through ``lang`` / ``ocr_version``). Runs on CPU unless a CUDA device is
    given (PaddleOCR's ``device="gpu:N"``).
    """

    class Settings(ExpertSettings):
        lang: str = "ch"
        ocr_version: str = "PP-OCRv4"
        use_textline_orientation: bool = True
        text_det_limit_side_len: PositiveInt = 960
        text_det_limit_type: Literal["min", "max"] = "max"
        text_det_thresh: UnitFloat = 0.3
        text_det_box_thresh: UnitFloat = 0.6
        text_det_unclip_ratio: float = 1.5
        text_rec_score_thresh: UnitFloat = 0.5
        input_order: ChannelOrder = "rgb"
        engine_kwargs: dict[str, Any] = {}

        @field_validator("engine_kwargs", mode="before")
        @classmethod
        def _engine_kwargs(cls, value: Any) -> Any:
            if not isinstance(value, dict):
                raise ValueError("must be a dict of PaddleOCR keywords")
            return value

    name = "paddleocr"
    task = "ocr"
    default_model_id = None

    def engine_options(self) -> dict[str, Any]:
        """The keywords given to ``paddleocr.PaddleOCR``."""
        s = self.settings
        device = "cpu"
        if self.device is not None and self.device.type == "cuda":
            device = f"gpu:{self.device.index or 0}"
        options = {
            "lang": s["lang"],
            "ocr_version": s["ocr_version"],
            "use_doc_orientation_classify": False,
            "use_doc_unwarping": False,
            "use_textline_orientation": bool(s["use_textline_orientation"]),
            "text_det_limit_side_len": int(s["text_det_limit_side_len"]),
            "text_det_limit_type": s["text_det_limit_type"],
            "text_det_thresh": float(s["text_det_thresh"]),
            "text_det_box_thresh": float(s["text_det_box_thresh"]),
            "text_det_unclip_ratio": float(s["text_det_unclip_ratio"]),
            "text_rec_score_thresh": float(s["text_rec_score_thresh"]),
            "device": device,
        }
        options.update(s["engine_kwargs"])
        return options

    def _load(self) -> None:
        try:
            import paddleocr
        except ImportError as exc:
            raise DependencyError(
                f"the paddleocr expert needs PaddleOCR 3.x and PaddlePaddle: {_OCR_EXTRA} "
                "(or pip install paddleocr paddlepaddle)"
            ) from exc
        if not hasattr(paddleocr.PaddleOCR, "predict"):
            raise DependencyError(
                f"paddleocr {getattr(paddleocr, '__version__', '?')} is older than 3.0; pip install -U 'paddleocr>=3'"
            )
        self.model = paddleocr.PaddleOCR(**self.engine_options())

    def _predict(self, images: list[torch.Tensor]) -> list[PerceptionResult]:
        order = self.settings["input_order"]
        results = []
        for frame in images:
            pages = self.model.predict(frame_to_array(frame, order))
            page = pages[0] if pages else None
            results.append(self.make_result(frame, **text_line_fields(frame, paddleocr_lines(page))))
        return results


__all__ = [
    "RapidOCRExpert",
    "PaddleOCRExpert",
    "frame_to_array",
    "text_lines_result",
    "text_line_fields",
    "rapidocr_lines",
    "paddleocr_lines",
]
