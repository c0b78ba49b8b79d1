"""Backend plumbing the experts share: ultralytics (import, device names, precision, batched predict), keeping
the caller's thread settings, batching, transformers' image-processor selection, and the two backend families'
base classes (:class:`TransformersExpert`, :class:`UltralyticsExpert`).

Weights are located by :mod:`moai_sdk.experts.weights`; these helpers adapt third-party inference libraries to the
expert interface.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

import numpy as np
import torch

from ..errors import ConfigError, DependencyError
from .base import Expert
from .settings import ExpertSettings, PositiveInt, UnitFloat
from .weights import load_pretrained, resolve_weight_file, transformers_hub_plan, weight_file_hub_plan

logger = logging.getLogger(__name__)

T = TypeVar("T")


def transformers_major_version() -> int:
    """Major version of the installed transformers (0 when it cannot be read)."""
    import transformers

    head = str(getattr(transformers, "__version__", "0")).split(".", 1)[0]
    return int(head) if head.isdigit() else 0


def image_processor_backend_kwargs(backend: str) -> dict[str, Any]:
    """Keywords selecting an image-processor implementation on this transformers version.

    ``"pil"`` is the reference implementation (NumPy/PIL; what transformers 4.x calls the slow processor and
    what the official MoAI code ran), ``"torchvision"`` the tensor one (faster, slightly different
    resampling). transformers >= 5 takes ``backend=``; older versions ``use_fast=``.
    """
    if backend not in ("pil", "torchvision"):
        raise ConfigError(f"image_backend must be 'pil' (reference) or 'torchvision'; got {backend!r}")
    if transformers_major_version() >= 5:
        return {"backend": backend}
    return {"use_fast": backend == "torchvision"}


def keeps_thread_settings(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator: restore torch's and OpenCV's thread counts and ``OMP_NUM_THREADS`` after ``fn``.

    ultralytics sets ``OMP_NUM_THREADS=1`` when imported and resets torch to ``cores - 1`` threads whenever it
    selects a device; a library must not change the caller's process-wide settings (other experts and the
    LLM would silently run single-threaded, and their float reductions would change).
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        threads = torch.get_num_threads()
        omp = os.environ.get("OMP_NUM_THREADS")
        cv2 = sys.modules.get("cv2")
        cv2_threads = cv2.getNumThreads() if cv2 is not None else None
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
            if omp is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = omp
            cv2 = sys.modules.get("cv2")
            if cv2 is not None and cv2_threads is not None:
                cv2.setNumThreads(cv2_threads)

    return wrapper


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """``items`` in consecutive slices of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def ultralytics_predict(expert: Any, images: Sequence[Any], **extra: Any) -> Iterator[tuple[Any, Any]]:
    """Run an ultralytics model over uint8 CHW RGB frames in batches: yields ``(frame, prediction)`` pairs.

    ultralytics reads numpy images as BGR (OpenCV order), so the frames are flipped to BGR here.
    """
    s = expert.settings
    for chunk in chunks(images, s["batch_size"]):
        arrays = [np.ascontiguousarray(img.permute(1, 2, 0).numpy()[..., ::-1]) for img in chunk]
        predictions = expert.model.predict(
            arrays,
            conf=s["conf"],
            iou=s["iou"],
            imgsz=s["imgsz"],
            max_det=s["max_det"],
            device=ultralytics_device(expert.device),
            **ultralytics_precision_kwargs(expert.dtype),
            verbose=False,
            **extra,
        )
        yield from zip(chunk, predictions)


@keeps_thread_settings
def import_ultralytics(*, offline: bool = False) -> Any:
    """Import ultralytics lazily; :class:`DependencyError` with the pip command when it is missing.

    ``offline=True`` sets ``YOLO_OFFLINE=1`` before the first import so that ultralytics skips its online
    checks (it reads the variable once, at import time).
    """
    if offline and "ultralytics" not in sys.modules and "YOLO_OFFLINE" not in os.environ:
        os.environ["YOLO_OFFLINE"] = "1"
        logger.info("set YOLO_OFFLINE=1 (local_files_only) before importing ultralytics")
    try:
        return importlib.import_module("ultralytics")
    except ImportError as exc:
        raise DependencyError(
            "the YOLO experts need ultralytics: pip install 'moai-sdk[experts]' (or pip install ultralytics)"
        ) from exc


def ultralytics_device(device: Any) -> str:
    """A torch device as ultralytics spells it: ``cpu``, ``0``, ``1``, ``mps``."""
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cuda":
        return str(dev.index or 0)
    return dev.type


def ultralytics_precision_kwargs(dtype: Any) -> dict[str, Any]:
    """``predict`` keywords for a torch dtype: none for float32, half precision for float16.

    Recent ultralytics spells half precision ``quantize=16`` (``half=True`` is deprecated there); older
    releases only know ``half``. Other dtypes are refused: ultralytics has no bfloat16 inference.
    """
    if dtype is None or dtype == torch.float32:
        return {}
    if dtype != torch.float16:
        raise ConfigError(f"the YOLO experts run in float32 or float16; got dtype={dtype}")
    from ultralytics.cfg import DEFAULT_CFG_DICT

    return {"quantize": 16} if "quantize" in DEFAULT_CFG_DICT else {"half": True}


class TransformersExpert(Expert):
    """An expert whose processor and model load with transformers ``from_pretrained`` from a Hub repo or a folder.

    Subclasses have an ``image_backend`` setting; ``moai download`` fetches a snapshot of the repo's configs,
    processor files and weights.
    """

    def __init__(self, model_id: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(model_id, **kwargs)
        self.processor: Any = None

    def _hub_plan(self) -> Optional[dict[str, Any]]:
        return transformers_hub_plan(self.model_id)

    def _load_pretrained(self, processor_loader: Callable[..., Any], model_loader: Callable[..., Any]) -> Any:
        """Load the processor (with the configured image backend) into ``self.processor`` and return the model,
        not yet moved to the device (see :meth:`_place`)."""
        backend = image_processor_backend_kwargs(self.settings["image_backend"])
        self.processor = load_pretrained(processor_loader, self.model_id, self.hub, self.name, **backend)
        return load_pretrained(model_loader, self.model_id, self.hub, self.name)

    def _place(self, model: Any) -> None:
        """Move ``model`` to the expert's device and dtype (float32 unless one was given), in eval mode."""
        self.model = model.to(device=self.device, dtype=self.dtype or torch.float32).eval()

    def _to_device(self, inputs: Any) -> dict[str, torch.Tensor]:
        """Processor outputs on the model's device; floating tensors in the model's dtype."""
        dtype = next(self.model.parameters()).dtype
        return {
            key: value.to(self.device, dtype=dtype) if value.is_floating_point() else value.to(self.device)
            for key, value in inputs.items()
        }

    def _unload(self) -> None:
        self.processor = None
        super()._unload()


class UltralyticsSettings(ExpertSettings):
    """The ``predict`` options every ultralytics expert has (:func:`ultralytics_predict` reads them); experts
    restate a field to change its default."""

    conf: UnitFloat = 0.25
    iou: UnitFloat = 0.7
    imgsz: PositiveInt = 640
    max_det: PositiveInt = 300
    batch_size: PositiveInt = 8


class UltralyticsExpert(Expert):
    """An expert running an ultralytics model: ``model_id`` is a local weight file, an ultralytics name (fetched
    by ultralytics itself) or ``hf://owner/repo/file.pt`` (fetched through :mod:`moai_sdk.hub`)."""

    def _hub_plan(self) -> Optional[dict[str, Any]]:
        return weight_file_hub_plan(self.model_id)

    def _open_ultralytics(self) -> tuple[Any, str]:
        """The ultralytics module and the weights to open; refuses dtypes ultralytics cannot run."""
        ultralytics = import_ultralytics(offline=self.hub.offline)
        ultralytics_precision_kwargs(self.dtype)
        return ultralytics, resolve_weight_file(self.model_id, self.hub, self.name)


__all__ = [
    "TransformersExpert",
    "UltralyticsExpert",
    "UltralyticsSettings",
    "import_ultralytics",
    "chunks",
    "ultralytics_predict",
    "keeps_thread_settings",
    "ultralytics_precision_kwargs",
    "ultralytics_device",
    "transformers_major_version",
    "image_processor_backend_kwargs",
]
