"""Where expert weights come from: a local folder or file, a Hugging Face Hub repository, or a file in one.

Every expert carries one :class:`~moai_sdk.hub.HubOptions` (``expert.hub``); the helpers here hand it to
transformers' ``from_pretrained`` or to :mod:`moai_sdk.hub`, so that revision, cache folder, token and offline mode
behave the same for every backend, and a missing or unreachable checkpoint always surfaces as a
:class:`~moai_sdk.errors.CheckpointError` that says what to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from ..errors import CheckpointError, ConfigError
from ..hub import HubOptions, download, hub_unreachable, is_repo_id

T = TypeVar("T")

#: Prefix naming a file inside a Hub repository, for backends that load one weight file
#: (``hf://owner/repo/path/in/repo.pt``).
HF_FILE_PREFIX = "hf://"

#: Files of a transformers expert repository (Mask2Former, OWLv2): configs, processor files, weights; the
#: ``.bin`` weights are fetched only when the repository has no safetensors.
TRANSFORMERS_FILE_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model")
TRANSFORMERS_BIN_PATTERNS = ("pytorch_model*.bin",)


def pretrained_kwargs(hub: HubOptions) -> dict[str, Any]:
    """``from_pretrained`` keywords for ``hub`` (the settings that are set; offline folds in ``HF_HUB_OFFLINE``)."""
    return {key: value for key, value in hub.kwargs().items() if value is not None and value is not False}


def load_pretrained(loader: Callable[..., T], model_id: Optional[str], hub: HubOptions, who: str, **kwargs: Any) -> T:
    """Call ``loader(model_id, **hub settings, **kwargs)`` (a transformers ``from_pretrained``).

    Failures to find or fetch the files become :class:`CheckpointError` naming the model id and the fix; ``who``
    names the expert in the messages.
    """
    if not model_id:
        raise ConfigError(f"expert {who!r} needs a model_id (a Hub id or a local folder)")
    options = pretrained_kwargs(hub)
    unreachable = None if hub.offline or is_local(model_id) else hub_unreachable()
    if unreachable:  # no network: read the cache at once instead of 25 s of retries per file
        options["local_files_only"] = True
    try:
        return loader(model_id, **options, **kwargs)
    except OSError as exc:
        where = "local folder" if Path(str(model_id)).exists() else "Hub id"
        hint = (
            "the files are not in the local cache and downloading is off (local_files_only / HF_HUB_OFFLINE); "
            "download them once with network access (or point model_id at a folder holding them)"
            if hub.offline
            else f"the files are not in the local cache and the Hub is unreachable ({unreachable}); download them "
            "once with network access (or point model_id at a folder holding them)"
            if unreachable
            else "check the id / revision, your network (HF_HUB_OFFLINE=1 forces the cache) and, for gated "
            "or private repositories, pass token="
        )
        raise CheckpointError(
            f"expert {who!r}: cannot load {where} {model_id!r}"
            f"{'@' + hub.revision if hub.revision else ''}: {exc}. Fix: {hint}"
        ) from exc


def is_local(model_id: Any) -> bool:
    """Whether ``model_id`` names an existing local file or folder."""
    return model_id is not None and Path(os.fspath(model_id)).expanduser().exists()


def split_hf_file(spec: str) -> tuple[str, str]:
    """``hf://owner/repo/path/file.pt`` -> (``owner/repo``, ``path/file.pt``)."""
    parts = spec[len(HF_FILE_PREFIX) :].split("/")
    if len(parts) < 3 or not is_repo_id("/".join(parts[:2])):
        raise ConfigError(f"{spec!r}: write Hub files as hf://owner/repo/path/to/file.pt")
    return "/".join(parts[:2]), "/".join(parts[2:])


def resolve_weight_file(
    model_id: Optional[str],
    hub: HubOptions,
    who: str,
    *,
    suffixes: tuple[str, ...] = (".pt", ".pth", ".yaml", ".yml"),
) -> str:
    """Resolve an ultralytics-style ``model_id`` to what ultralytics should open.

    * an existing local file: returned as is;
    * ``hf://owner/repo/file.pt``: fetched through :func:`moai_sdk.hub.download` with ``hub``;
    * a bare name (``yolo11m-seg.pt``, ``yolov8n-seg.yaml``): handed to ultralytics, which builds ``.yaml``
      configs locally (random weights) and fetches released ``.pt`` weights itself -- refused when downloading
      is off unless the file is present.
    """
    if not model_id:
        raise ConfigError(f"expert {who!r} needs a model_id (a weight file, a .yaml config or hf://...)")
    spec = os.fspath(model_id)
    if spec.startswith(HF_FILE_PREFIX):
        repo_id, filename = split_hf_file(spec)
        return str(download(repo_id, filename, **hub.kwargs()))
    path = Path(spec).expanduser()
    if path.is_file():
        return str(path)
    if not spec.lower().endswith(suffixes):
        raise ConfigError(
            f"expert {who!r}: {spec!r} is neither an existing file nor a weight/config name ending in "
            f"{', '.join(suffixes)}"
        )
    if spec.lower().endswith((".pt", ".pth")) and hub.offline:
        raise CheckpointError(
            f"expert {who!r}: weight file {spec!r} not found and downloading is off (local_files_only / "
            "HF_HUB_OFFLINE); give the path of a downloaded file (or an hf://owner/repo/file.pt already in the cache)"
        )
    return spec


def transformers_hub_plan(model_id: Optional[str]) -> Optional[dict[str, Any]]:
    """Download plan of a transformers ``from_pretrained`` repo id: a snapshot of its config, processor and weight
    files (``.bin`` only when there is no safetensors); ``None`` (load instead) for anything else."""
    if not isinstance(model_id, str) or model_id.count("/") != 1 or not is_repo_id(model_id):
        return None
    return {
        "method": "snapshot",
        "allow_patterns": list(TRANSFORMERS_FILE_PATTERNS),
        "fallback_patterns": list(TRANSFORMERS_BIN_PATTERNS),
    }


def weight_file_hub_plan(model_id: Optional[str]) -> Optional[dict[str, Any]]:
    """Download plan of a single-file ``hf://owner/repo/file`` model id (repo id and filename replace the spec);
    ``None`` for a bare weight name, which the backend fetches itself when it loads."""
    if not isinstance(model_id, str) or not model_id.startswith(HF_FILE_PREFIX):
        return None
    repo_id, filename = split_hf_file(model_id)
    return {"method": "file", "repo_id": repo_id, "filenames": [filename], "repo_type": None}


__all__ = [
    "transformers_hub_plan",
    "weight_file_hub_plan",
    "HF_FILE_PREFIX",
    "TRANSFORMERS_FILE_PATTERNS",
    "TRANSFORMERS_BIN_PATTERNS",
    "pretrained_kwargs",
    "load_pretrained",
    "is_local",
    "split_hf_file",
    "resolve_weight_file",
]
