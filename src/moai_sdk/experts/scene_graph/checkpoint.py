"""Finding, verifying and safely reading PSGTR weights.

The released checkpoint is a full mmcv-1 training checkpoint (state dict + optimizer + meta, 532 MB) pickled by
``torch.save``. It is read here without executing arbitrary pickle code: a restricted unpickler resolves only
the globals needed to rebuild tensors and plain containers; classes of the training stack that can appear in
the metadata (mmcv/mmdet/mmengine/numpy/addict) are replaced by inert placeholders without importing them;
any other global (``os.system``, ``builtins.eval``, ...) makes the load fail with
:class:`~moai_sdk.errors.UnsafeCheckpointError`. After a successful read the weights alone (~178 MB fp32) are
written once to a safetensors file, so later loads are fast and pickle-free.

Key spellings: the checkpoint uses mmcv-1 names (``attentions.0`` / ``attentions.1`` / ``ffns.0``), MoAI's
in-memory model and this port the mmdet-3 names (``self_attn`` / ``cross_attn`` / ``ffn``); both are accepted.
"""

from __future__ import annotations

import _codecs
import _compat_pickle
import collections
import functools
import hashlib
import logging
import os
import pickle
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ...errors import CheckpointError, MissingKeysError, UnsafeCheckpointError
from ...hub import HubOptions, download
from .config import OFFICIAL_FILENAME, OFFICIAL_REPO_ID, OFFICIAL_REPO_TYPE, OFFICIAL_SHA256

logger = logging.getLogger(__name__)

V = TypeVar("V")

# --------------------------------------------------------------------------------------------------------------
# Key spellings
# --------------------------------------------------------------------------------------------------------------
#: mmcv-1 (checkpoint) spelling -> mmdet-3 (model) spelling of the transformer sub-modules.
_CHECKPOINT_TO_MODEL = ((".attentions.0.", ".self_attn."), (".attentions.1.", ".cross_attn."), (".ffns.0.", ".ffn."))
#: Wrappers a state dict may carry: DataParallel/DDP prefixes.
_STRIP_PREFIXES = ("module.",)


def to_model_keys(state_dict: Mapping[str, V]) -> dict[str, V]:
    """Rename a state dict from either spelling to the model's (mmdet-3) spelling; strips ``module.``."""
    out: dict[str, V] = {}
    for key, value in state_dict.items():
        new = key
        for prefix in _STRIP_PREFIXES:
            if new.startswith(prefix):
                new = new[len(prefix) :]
        for old_part, new_part in _CHECKPOINT_TO_MODEL:
            new = new.replace(old_part, new_part)
        if new in out:
            raise CheckpointError(f"the checkpoint holds {new!r} twice (in both key spellings); keep one spelling")
        out[new] = value
    return out


def to_checkpoint_keys(state_dict: Mapping[str, V]) -> dict[str, V]:
    """Rename a model-spelling state dict to the released checkpoint's mmcv-1 spelling (order kept)."""
    out: dict[str, V] = {}
    for key, value in state_dict.items():
        new = key
        for old_part, new_part in _CHECKPOINT_TO_MODEL:
            new = new.replace(new_part, old_part)
        out[new] = value
    return out


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The tensor dict inside a loaded checkpoint (``{'state_dict': ...}``, ``{'model': ...}`` or bare)."""
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"the checkpoint holds no state dict (got {type(obj).__name__}); expected a dict of tensors or an "
            "mmcv checkpoint {'state_dict': ..., 'meta': ..., 'optimizer': ...}"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"state dict entries that are not tensors: {bad[:5]}{' ...' if len(bad) > 5 else ''}")
    return dict(obj)


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Strict key and shape check of a model-spelling state dict against ``model``.

    Raises :class:`MissingKeysError` (with ``missing`` / ``unexpected``) or :class:`CheckpointError` on a shape
    mismatch.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise MissingKeysError(
            f"the PSGTR checkpoint does not match the model: {len(missing)} missing key(s) "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, {len(unexpected)} unexpected key(s) "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. Is it a PSGTR R-50 checkpoint with the "
            "configuration you built the model with?",
            missing=missing,
            unexpected=unexpected,
        )
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise CheckpointError(f"PSGTR checkpoint shapes do not match the model: {wrong[:5]}")


def load_into(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Strictly load a state dict in either spelling into ``model``."""
    renamed = to_model_keys(state_dict)
    check_state_dict(model, renamed)
    model.load_state_dict(renamed, strict=True)


# --------------------------------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------------------------------
def _safe_globals() -> dict[tuple[str, str], Any]:
    """Globals a torch checkpoint of tensors and plain containers needs (module, name) -> object."""
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "slice"): slice,
        ("builtins", "complex"): complex,
        ("_codecs", "encode"): _codecs.encode,
        ("torch", "Size"): torch.Size,
        ("torch", "Tensor"): torch.Tensor,
        ("torch", "device"): torch.device,
        ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
    }
    for name in (
        "_rebuild_tensor",
        "_rebuild_tensor_v2",
        "_rebuild_tensor_v3",
        "_rebuild_parameter",
        "_rebuild_parameter_with_state",
    ):
        if hasattr(torch._utils, name):
            allowed[("torch._utils", name)] = getattr(torch._utils, name)
    for attr in dir(torch):
        value = getattr(torch, attr, None)
        if isinstance(value, torch.dtype):
            allowed[("torch", attr)] = value
    return allowed


#: Top-level packages whose classes may appear in an mmcv checkpoint's metadata; they are never imported,
#: their objects become :class:`DroppedObject` placeholders.
DROPPED_MODULE_ROOTS = ("mmcv", "mmdet", "mmengine", "openpsg", "numpy", "addict")


class DroppedObject:
    """Inert stand-in for a metadata object whose class is not loaded (it records only the class name)."""

    __slots__ = ("qualified_name",)
    _name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> DroppedObject:
        obj = object.__new__(cls)
        object.__setattr__(obj, "qualified_name", cls._name)
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Iterable[Any]) -> None:
        pass

    def __repr__(self) -> str:
        return f"<dropped {self.qualified_name}>"


@functools.cache
def _placeholder(module: str, name: str) -> type:
    return type("DroppedObject", (DroppedObject,), {"__slots__": (), "_name": f"{module}.{name}"})


class RestrictedUnpickler(pickle.Unpickler):
    """A pickle reader that resolves only allow-listed globals (see the module docstring)."""

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        # protocol-2 pickles (torch.save's default) spell builtins the Python 2 way: map names first
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        cls = type(self)
        if cls._allowed is None:
            cls._allowed = _safe_globals()
        found = cls._allowed.get((module, name))
        if found is not None:
            return found
        if module.split(".", 1)[0] in DROPPED_MODULE_ROOTS:
            logger.debug("checkpoint metadata: dropping object of class %s.%s", module, name)
            return _placeholder(module, name)
        raise UnsafeCheckpointError(
            f"the checkpoint asks to load the global {module}.{name}, which is not on the allow list of "
            "tensor/container types, so it was not read (a pickle can run arbitrary code through such globals). "
            "Use the official PSGTR checkpoint, or convert your file to safetensors in an environment you trust "
            "and pass that file instead"
        )


class _RestrictedPickleModule:
    """The ``pickle_module`` handed to ``torch.load``: its ``Unpickler`` is :class:`RestrictedUnpickler`."""

    Unpickler = RestrictedUnpickler
    __name__ = "moai_sdk_restricted_pickle"

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return RestrictedUnpickler(file, **kwargs).load()


def safe_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load`` a pickled checkpoint on CPU through :class:`RestrictedUnpickler`.

    Raises :class:`UnsafeCheckpointError` when the file references a global outside the allow list and
    :class:`CheckpointError` when it cannot be read at all.
    """
    try:
        return torch.load(path, map_location="cpu", pickle_module=_RestrictedPickleModule, weights_only=False)
    except UnsafeCheckpointError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, KeyError) as exc:
        raise CheckpointError(f"cannot read the checkpoint {str(path)!r}: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------------------------------------------
# Files: hashing, the Hub, the safetensors cache
# --------------------------------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 23) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def default_convert_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of converted weights: ``<cache_dir>/moai_sdk-converted`` when a Hub cache dir is given, else
    ``$MOAI_SDK_CACHE`` or ``$XDG_CACHE_HOME/moai_sdk`` (``~/.cache/moai_sdk``), with ``/psgtr`` appended."""
    if cache_dir is not None:
        return Path(cache_dir) / "moai_sdk-converted" / "psgtr"
    root = os.environ.get("MOAI_SDK_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moai_sdk")
    return Path(root) / "psgtr"


def download_checkpoint(
    repo_id: str = OFFICIAL_REPO_ID,
    filename: str = OFFICIAL_FILENAME,
    *,
    repo_type: str | None = OFFICIAL_REPO_TYPE,
    hub: HubOptions | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """Path of ``filename`` from a Hub repo (downloaded into the Hub cache unless already there).

    ``hub`` carries revision, cache folder, token and ``local_files_only`` (the separate keywords are folded in).
    Honours ``HF_HUB_OFFLINE`` like every other component; failures become :class:`CheckpointError` naming the fix.
    """
    opts = HubOptions.from_any(
        hub, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only or None
    )
    return download(repo_id, filename, repo_type=repo_type, **opts.kwargs())


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _cache_key(path: Path) -> str:
    """Name of the converted file for a source file.

    Hub LFS blobs are stored under their SHA-256, which then is the key (no hashing needed). Other files are
    keyed by resolved path, size and modification time.
    """
    real = Path(os.path.realpath(path))
    if _HEX64.match(real.name):
        return real.name
    stat = real.stat()
    ident = f"{real}|{stat.st_size}|{stat.st_mtime_ns}".encode()
    return "local-" + hashlib.sha256(ident).hexdigest()[:32]


@dataclass
class LoadedWeights:
    """A model-spelling state dict and where it came from.

    ``origin`` is ``"pickle"`` (read from the pickled checkpoint), ``"converted"`` (read from the safetensors
    conversion cache) or ``"safetensors"`` (a safetensors file given directly).
    """

    state_dict: dict[str, torch.Tensor]
    source: Path
    origin: str
    converted_path: Path | None = None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the safetensors file {str(path)!r}: {exc}") from exc


def _write_safetensors(state_dict: Mapping[str, torch.Tensor], target: Path, metadata: dict[str, str]) -> bool:
    """Atomically write ``state_dict`` to ``target``; returns False (with a warning) if the folder is not writable."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=target.name, suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp, metadata=metadata)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except OSError as exc:
        logger.warning(
            "could not cache the converted PSGTR weights at %s (%s); the next load re-reads the pickle", target, exc
        )
        return False
    return True


def _check_sha256(source: Path, actual: str | None, expected: str) -> None:
    if actual != expected.lower():
        raise CheckpointError(
            f"SHA-256 mismatch for {str(source)!r}: expected {expected.lower()}, got {actual}. The file is corrupt "
            "or not the expected checkpoint; delete it and download again (or pass sha256=None for your own file)"
        )


def _converted_source_sha256(path: Path) -> str | None:
    """The SHA-256 of the pickle a converted file was made from (recorded in its metadata)."""
    with safe_open(str(path), "pt") as fh:
        return (fh.metadata() or {}).get("source_sha256")


def read_weights(
    path: str | os.PathLike,
    *,
    sha256: str | None = None,
    convert: bool = True,
    convert_dir: str | os.PathLike | None = None,
) -> LoadedWeights:
    """Read PSGTR weights from a local file (pickled checkpoint or safetensors), in the model spelling.

    For a pickled file: when a converted safetensors copy exists in ``convert_dir`` it is read instead (no
    pickle, no hashing). Otherwise the file's SHA-256 is checked against ``sha256`` (if given), the pickle is
    read with :func:`safe_torch_load`, and (``convert=True``) the weights are written to the conversion cache.
    The returned state dict is not yet checked against a model (see :func:`check_state_dict`).
    """
    source = Path(path)
    if not source.is_file():
        raise CheckpointError(f"PSGTR checkpoint file not found: {str(source)!r}")
    if source.suffix == ".safetensors":
        return LoadedWeights(to_model_keys(_read_safetensors(source)), source, "safetensors")

    target = Path(convert_dir or default_convert_dir()) / f"{_cache_key(source)}.safetensors"
    if convert and target.is_file():
        if sha256 is not None:
            _check_sha256(source, _converted_source_sha256(target), sha256)
        logger.info("reading converted PSGTR weights from %s", target)
        return LoadedWeights(_read_safetensors(target), source, "converted", target)

    digest = sha256_file(source)
    if sha256 is not None:
        _check_sha256(source, digest, sha256)
    logger.info("reading pickled PSGTR checkpoint %s (restricted unpickler)", source)
    state_dict = to_model_keys(extract_state_dict(safe_torch_load(source)))
    converted: Path | None = None
    if convert:
        metadata = {"format": "pt", "producer": "moai_sdk.psgtr", "source_sha256": digest, "source": source.name}
        if _write_safetensors(state_dict, target, metadata):
            converted = target
            logger.info("cached the PSGTR weights as safetensors at %s", target)
    return LoadedWeights(state_dict, source, "pickle", converted)


def resolve_weights(
    model_id: str | os.PathLike | None = None,
    *,
    filename: str | None = None,
    repo_type: str | None = None,
    hub: HubOptions | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    sha256: str | None = None,
    verify: bool = True,
    convert: bool = True,
    convert_dir: str | os.PathLike | None = None,
) -> LoadedWeights:
    """Locate PSGTR weights (a local file, or a file of a Hub repo) and read them (:func:`read_weights`).

    ``model_id`` None means the official Space ``ECCV2022/PSG`` (file ``OpenPSG/checkpoints/epoch_60.pth``, whose
    SHA-256 is then checked unless ``verify=False``). An existing local path is used as is. Anything else is a
    Hub repo id; ``filename`` / ``repo_type`` default to the official file and ``"space"``. ``hub`` (or the separate
    ``revision`` / ``cache_dir`` / ``token`` / ``local_files_only`` keywords) says how to reach the Hub.
    """
    opts = HubOptions.from_any(
        hub, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only or None
    )
    convert_dir = convert_dir if convert_dir is not None else default_convert_dir(opts.cache_dir)
    if model_id is not None and (Path(model_id).exists() or str(model_id).startswith((".", "/", "~"))):
        local = Path(model_id).expanduser()
        return read_weights(local, sha256=sha256 if verify else None, convert=convert, convert_dir=convert_dir)
    repo_id = str(model_id) if model_id is not None else OFFICIAL_REPO_ID
    filename = filename or OFFICIAL_FILENAME
    repo_type = repo_type if repo_type is not None else OFFICIAL_REPO_TYPE
    expected = sha256
    if expected is None and (repo_id, filename, repo_type) == (OFFICIAL_REPO_ID, OFFICIAL_FILENAME, OFFICIAL_REPO_TYPE):
        expected = OFFICIAL_SHA256
    path = download_checkpoint(repo_id, filename, repo_type=repo_type, hub=opts)
    return read_weights(path, sha256=expected if verify else None, convert=convert, convert_dir=convert_dir)


__all__ = [
    "to_model_keys",
    "to_checkpoint_keys",
    "extract_state_dict",
    "check_state_dict",
    "load_into",
    "RestrictedUnpickler",
    "DroppedObject",
    "DROPPED_MODULE_ROOTS",
    "safe_torch_load",
    "sha256_file",
    "default_convert_dir",
    "download_checkpoint",
    "read_weights",
    "resolve_weights",
    "LoadedWeights",
]
