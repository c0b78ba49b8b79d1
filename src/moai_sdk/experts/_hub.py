"""Finding expert weights: a local folder, a Hugging Face Hub id or an ultralytics weight name.

The experts pass their ``revision`` / ``cache_dir`` / ``token`` / ``local_files_only`` here so that every
backend resolves weights the same way, and so that a missing or unreachable checkpoint always surfaces as a
:class:`~moai_sdk.errors.CheckpointError` that says what to do.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, TypeVar

import numpy as np

from ..errors import CheckpointError, ConfigError, DependencyError

if TYPE_CHECKING:  # pragma: no cover
    from .base import Expert

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Prefix naming a file inside a Hub repository, for backends that load one weight file
#: (``hf://owner/repo/path/in/repo.pt``).
HF_FILE_PREFIX = "hf://"


def hub_kwargs(expert: Expert) -> dict[str, Any]:
    """``from_pretrained`` keywords for the expert's revision, cache folder, token and offline flag."""
    kwargs: dict[str, Any] = {}
    if expert.revision is not None:
        kwargs["revision"] = expert.revision
    if expert.cache_dir is not None:
        kwargs["cache_dir"] = str(expert.cache_dir)
    if expert.token is not None:
        kwargs["token"] = expert.token
    if expert.local_files_only:
        kwargs["local_files_only"] = True
    return kwargs


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


def load_pretrained(loader: Callable[..., T], expert: Expert, **kwargs: Any) -> T:
    """Call ``loader(expert.model_id, **hub_kwargs(expert), **kwargs)`` (a ``from_pretrained``).

    Failures to find or fetch the files become :class:`CheckpointError` naming the model id and the fix.
    """
    model_id = expert.model_id
    if not model_id:
        raise ConfigError(f"expert {expert.name!r} needs a model_id (a Hub id or a local folder)")
    try:
        return loader(model_id, **hub_kwargs(expert), **kwargs)
    except OSError as exc:
        where = "local folder" if Path(str(model_id)).exists() else "Hub id"
        hint = (
            "the files are not in the local cache and local_files_only=True; download them once with "
            "network access (or point model_id at a folder holding them)"
            if expert.local_files_only
            else "check the id / revision, your network (HF_HUB_OFFLINE=1 forces the cache) and, for gated "
            "or private repositories, pass token="
        )
        raise CheckpointError(
            f"expert {expert.name!r}: cannot load {where} {model_id!r}"
            f"{'@' + expert.revision if expert.revision else ''}: {exc}. Fix: {hint}"
        ) from exc


def resolve_weight_file(expert: Expert, *, suffixes: tuple[str, ...] = (".pt", ".pth", ".yaml", ".yml")) -> str:
    """Resolve an ultralytics-style ``model_id`` to what ultralytics should open.

    * an existing local file: returned as is;
    * ``hf://owner/repo/file.pt``: downloaded (or taken from the cache) with huggingface_hub, honouring the
      expert's revision, cache folder, token and ``local_files_only``;
    * a bare name (``yolo11m-seg.pt``, ``yolov8n-seg.yaml``): handed to ultralytics, which builds ``.yaml``
      configs locally (random weights) and fetches released ``.pt`` weights itself -- refused with
      ``local_files_only=True`` unless the file is present.
    """
    spec = expert.model_id
    if not spec:
        raise ConfigError(f"expert {expert.name!r} needs a model_id (a weight file, a .yaml config or hf://...)")
    spec = os.fspath(spec)
    if spec.startswith(HF_FILE_PREFIX):
        parts = spec[len(HF_FILE_PREFIX) :].split("/")
        if len(parts) < 3:
            raise ConfigError(f"{spec!r}: write Hub files as hf://owner/repo/path/to/file.pt")
        repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
        from ..hub import download

        return str(
            download(
                repo_id,
                filename,
                revision=expert.revision,
                cache_dir=expert.cache_dir,
                token=expert.token,
                local_files_only=expert.local_files_only,
            )
        )
    path = Path(spec).expanduser()
    if path.is_file():
        return str(path)
    if not spec.lower().endswith(suffixes):
        raise ConfigError(
            f"expert {expert.name!r}: {spec!r} is neither an existing file nor a weight/config name ending in "
            f"{', '.join(suffixes)}"
        )
    if spec.lower().endswith((".pt", ".pth")) and expert.local_files_only:
        raise CheckpointError(
            f"expert {expert.name!r}: weight file {spec!r} not found and local_files_only=True; give the path "
            "of a downloaded file (or an hf://owner/repo/file.pt already in the cache)"
        )
    return spec


def keeps_thread_settings(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator: restore torch's and OpenCV's thread counts and ``OMP_NUM_THREADS`` after ``fn``.

    ultralytics sets ``OMP_NUM_THREADS=1`` when imported and resets torch to ``cores - 1`` threads whenever it
    selects a device; a library must not change the caller's process-wide settings (other experts and the
    LLM would silently run single-threaded, and their float reductions would change).
    """
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        import sys

        import torch

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


def ultralytics_predict(expert: Expert, images: Sequence[Any], **extra: Any) -> Iterator[tuple[Any, Any]]:
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
    import importlib
    import sys

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
    import torch

    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cuda":
        return str(dev.index or 0)
    return dev.type


def ultralytics_precision_kwargs(dtype: Any) -> dict[str, Any]:
    """``predict`` keywords for a torch dtype: none for float32, half precision for float16.

    Recent ultralytics spells half precision ``quantize=16`` (``half=True`` is deprecated there); older
    releases only know ``half``. Other dtypes are refused: ultralytics has no bfloat16 inference.
    """
    import torch

    if dtype is None or dtype == torch.float32:
        return {}
    if dtype != torch.float16:
        raise ConfigError(f"the YOLO experts run in float32 or float16; got dtype={dtype}")
    from ultralytics.cfg import DEFAULT_CFG_DICT

    return {"quantize": 16} if "quantize" in DEFAULT_CFG_DICT else {"half": True}


__all__ = [
    "import_ultralytics",
    "chunks",
    "ultralytics_predict",
    "keeps_thread_settings",
    "ultralytics_precision_kwargs",
    "ultralytics_device",
    "HF_FILE_PREFIX",
    "hub_kwargs",
    "transformers_major_version",
    "image_processor_backend_kwargs",
    "load_pretrained",
    "resolve_weight_file",
]
