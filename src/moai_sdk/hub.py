"""Fetching files from the Hugging Face Hub (or finding them in a local folder), one way for every component.

The LLM checkpoint, the tokenizer, the CLIP tower, PSGTR's checkpoint and expert weight files all come through
:func:`download` / :func:`resolve_file`, so revision, ``cache_dir``, ``token``, ``local_files_only`` and
``HF_HUB_OFFLINE`` behave the same everywhere, and every failure is a :class:`~moai_sdk.CheckpointError` that
says what to do.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Mapping, Optional, Union

from huggingface_hub import constants, hf_hub_download, scan_cache_dir, snapshot_download
from huggingface_hub.errors import (
    CacheNotFound,
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


_TRUE = ("1", "true", "yes", "on")


def env_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value now (``1``/``true``/``yes``/``on``, any case).

    The one place that reads the variable: ``HF_HUB_OFFLINE=false`` or ``0`` means online.
    """
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def offline(local_files_only: bool = False) -> bool:
    """True when nothing may be downloaded (``local_files_only`` or ``HF_HUB_OFFLINE`` set now)."""
    return bool(local_files_only) or env_offline()


@dataclass(frozen=True)
class HubOptions:
    """Where and how to fetch files from the Hugging Face Hub: one value carried by every component.

    ``revision`` (branch, tag or commit), ``cache_dir`` (the Hub cache folder), ``token`` (for private or gated
    repositories; ``True`` reads the saved login) and ``local_files_only`` (never download). ``HF_HUB_OFFLINE``
    is read when a file is fetched (:attr:`offline`), not when the value is built.
    """

    revision: Optional[str] = None
    cache_dir: Optional[str] = None
    token: Union[str, bool, None] = None
    local_files_only: bool = False

    def __post_init__(self) -> None:
        if self.revision is not None and (not isinstance(self.revision, str) or not self.revision):
            raise ConfigError(f"revision must be a non-empty string or None; got {self.revision!r}")
        if self.cache_dir is not None:
            if not isinstance(self.cache_dir, (str, os.PathLike)):
                raise ConfigError(f"cache_dir must be a folder path or None; got {type(self.cache_dir).__name__}")
            object.__setattr__(self, "cache_dir", os.fspath(self.cache_dir))
        if self.token is not None and not isinstance(self.token, (str, bool)):
            raise ConfigError(f"token must be a string, True/False or None; got {type(self.token).__name__}")
        object.__setattr__(self, "local_files_only", bool(self.local_files_only))

    @classmethod
    def from_any(cls, value: HubOptions | Mapping[str, Any] | None = None, **overrides: Any) -> HubOptions:
        """A :class:`HubOptions` from ``None``, an instance or a dict, with keyword ``overrides`` that are not None."""
        if value is None:
            fields: dict[str, Any] = {}
        elif isinstance(value, HubOptions):
            fields = dataclasses.asdict(value)
        elif isinstance(value, Mapping):
            fields = dict(value)
        else:
            raise ConfigError(f"hub options must be a HubOptions, a dict or None; got {type(value).__name__}")
        fields.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(
                f"unknown hub option(s) {sorted(unknown)}; known: revision, cache_dir, token, local_files_only"
            )
        return cls(**fields)

    def replace(self, **changes: Any) -> HubOptions:
        return dataclasses.replace(self, **changes)

    @property
    def offline(self) -> bool:
        """True when nothing may be downloaded now (``local_files_only`` or ``HF_HUB_OFFLINE``)."""
        return offline(self.local_files_only)

    def kwargs(self) -> dict[str, Any]:
        """The four settings as keyword arguments of ``huggingface_hub`` / transformers ``from_pretrained``
        (``local_files_only`` already folds in ``HF_HUB_OFFLINE``)."""
        return {
            "revision": self.revision,
            "cache_dir": self.cache_dir,
            "token": self.token,
            "local_files_only": self.offline,
        }


class HubSettings:
    """Read-only views of ``self.hub`` (a :class:`HubOptions`) for the components that carry one (the pipeline,
    the experts), so that ``x.revision`` and friends read the one value instead of copies of it."""

    hub: HubOptions

    @property
    def revision(self) -> Optional[str]:
        """The revision (branch, tag or commit) weights come from."""
        return self.hub.revision

    @property
    def cache_dir(self) -> Optional[str]:
        """The Hugging Face cache folder (None: the default)."""
        return self.hub.cache_dir

    @property
    def token(self) -> Union[str, bool, None]:
        """The Hub token (None: the saved login, if any)."""
        return self.hub.token

    @property
    def local_files_only(self) -> bool:
        """Never download when True."""
        return self.hub.local_files_only


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in the file ``path`` (a model folder's ``config.json`` ...), or a :class:`ConfigError`
    naming the file when it cannot be read, is not JSON or holds something other than an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {os.fspath(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{os.fspath(path)!r} must hold a JSON object, not {type(data).__name__}")
    return data


#: Seconds the reachability probe waits for the Hub's host (DNS lookup and TCP connect).
HUB_PROBE_TIMEOUT_S = 3.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")
_probe_lock = threading.Lock()
_probe_result: dict[str, tuple[str | None, float]] = {}
#: A failed probe is trusted this long (seconds) before the next download probes again.
_PROBE_RETRY_S = 60.0


def hub_unreachable() -> str | None:
    """Why the Hub cannot be reached from here (a short reason), or ``None`` when it can or cannot be told.

    Without a network huggingface_hub retries every request five times with back-off (about 25 s per file) before
    giving up. One DNS lookup and TCP connect to the endpoint's host tells this at once (probed once per process;
    after a failure again a minute later), so a file that is not cached is reported in one line instead. Skipped
    (``None``) behind a proxy, where a direct connection says nothing.
    """
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None
    parsed = urllib.parse.urlsplit(constants.ENDPOINT)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    if not host:
        return None
    key = f"{host}:{port}"
    with _probe_lock:
        known = _probe_result.get(key)
        if known is not None and (known[0] is None or time.monotonic() - known[1] < _PROBE_RETRY_S):
            return known[0]
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
            reason = None
        except OSError as exc:
            reason = f"{host} cannot be reached: {exc.strerror or exc}"
            if known is None:
                logger.warning("the Hugging Face Hub is unreachable (%s); using the local cache only", reason)
        _probe_result[key] = (reason, time.monotonic())
        return reason


def is_repo_id(value: str) -> bool:
    return bool(_REPO_ID.match(value)) and value.count("/") <= 1


def download(
    repo_id: str,
    filename: str,
    *,
    required: bool = True,
    hub: HubOptions | Mapping[str, Any] | None = None,
    repo_type: str | None = None,
    **hub_keywords: Any,
) -> Path | None:
    """Local path of ``filename`` from a Hub repo (downloaded into the Hub cache unless already there).

    ``hub`` carries revision, cache folder, token and ``local_files_only``; the keywords ``revision``,
    ``cache_dir``, ``token`` and ``local_files_only`` still work and win over it. A file the repo does not have --
    or, offline, a file that is not cached -- gives ``None`` when ``required=False`` and a :class:`CheckpointError`
    otherwise.
    """
    opts = HubOptions.from_any(hub, **hub_keywords)
    revision = opts.revision
    no_network = opts.offline
    unreachable = None if no_network else hub_unreachable()
    where = f"{repo_type + ' ' if repo_type else ''}{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        return Path(
            hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                cache_dir=opts.cache_dir,
                token=opts.token,
                local_files_only=no_network or unreachable is not None,
                repo_type=repo_type,
            )
        )
    except LocalEntryNotFoundError as exc:
        if not required:
            logger.debug("optional file %s of %s is not available: %s", filename, where, exc)
            return None
        fetch = f"`hf download {repo_id} {filename}" + (f" --repo-type {repo_type}" if repo_type else "") + "`"
        if no_network:
            raise CheckpointError(
                f"{filename!r} of {where} is not in the local Hugging Face cache and downloading is off "
                f"(HF_HUB_OFFLINE or local_files_only=True): run {fetch} or `moai download` where the Hub is "
                "reachable, or pass a local folder"
            ) from exc
        reason = f" ({unreachable})" if unreachable else ""
        raise CheckpointError(
            f"cannot download {filename!r} from {where}: it is not in the local Hugging Face cache and the Hub is "
            f"unreachable{reason}. Check your network, or run {fetch} elsewhere and copy the cache"
        ) from exc
    except EntryNotFoundError as exc:  # after LocalEntryNotFoundError, which subclasses it in some versions
        if not required:
            return None
        raise CheckpointError(f"{where} has no file {filename!r}") from exc
    except GatedRepoError as exc:
        raise CheckpointError(
            f"{where} is gated: accept its terms on the Hub and pass token=... (or `hf auth login`)"
        ) from exc
    except RevisionNotFoundError as exc:
        raise CheckpointError(f"revision {revision!r} does not exist in {repo_id!r}") from exc
    except RepositoryNotFoundError as exc:
        raise CheckpointError(
            f"{where} is neither a local folder nor a Hub repository you can access "
            "(check the spelling, or pass token=... for a private repo)"
        ) from exc
    except (OSError, ValueError) as exc:  # HTTP and validation errors of huggingface_hub
        raise CheckpointError(f"could not fetch {filename!r} from {where}: {type(exc).__name__}: {exc}") from exc


def resolve_file(
    path_or_repo_id: str | os.PathLike,
    filename: str,
    *,
    required: bool = True,
    hub: HubOptions | Mapping[str, Any] | None = None,
    **hub_keywords: Any,
) -> Path | None:
    """``filename`` inside a local model folder, or fetched from the Hub repo ``path_or_repo_id`` (``hub`` and
    the keywords ``revision``, ``cache_dir``, ``token``, ``local_files_only`` as in :func:`download`)."""
    source = os.fspath(path_or_repo_id)
    local = Path(source).expanduser()
    if local.is_dir():
        candidate = local / filename
        if candidate.is_file():
            return candidate
        if required:
            raise CheckpointError(f"{filename!r} not found in the model folder {str(local)!r}")
        return None
    if local.exists():
        raise CheckpointError(f"{source!r} is a file; pass the folder that holds {filename!r} (or a Hub repo id)")
    if not is_repo_id(source):
        raise CheckpointError(
            f"model folder {source!r} does not exist and is not a Hugging Face Hub repo id ('owner/name')"
        )
    return download(source, filename, required=required, hub=HubOptions.from_any(hub, **hub_keywords))


# ------------------------------------------------------------------------------------------------------------ weights

#: Weight files in the order they are looked for: safetensors (a sharded index, then one file), else PyTorch ``.bin``.
WEIGHT_FORMATS: tuple[tuple[str, str, str], ...] = (
    ("safetensors", "model.safetensors.index.json", "model.safetensors"),
    ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def _shards(index_path: Path) -> list[str]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise CheckpointError(f"cannot read the weight index {str(index_path)!r}: {exc}") from exc
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{str(index_path)!r} has no 'weight_map'")
    names = sorted({str(v) for v in weight_map.values()})
    for name, value in ((str(v), v) for v in weight_map.values()):
        if not isinstance(value, str) or not _is_inside_name(name):
            raise CheckpointError(
                f"{str(index_path)!r} names the shard {value!r}, which is not a file inside the checkpoint folder "
                "(absolute paths and '..' are refused); the index is corrupt or hostile"
            )
    return names


def _is_inside_name(name: str) -> bool:
    """Whether ``name`` is a relative file name that stays inside its folder (no absolute path, drive or '..')."""
    if not name or "\0" in name:
        return False
    posix, windows = PurePosixPath(name.replace("\\", "/")), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or name.startswith(("/", "\\")):
        return False
    return ".." not in posix.parts and posix.name not in ("", ".")


def find_weights(path_or_repo_id: str | os.PathLike, *, hub: HubOptions | None = None) -> tuple[list[Path], str] | None:
    """The weight files of a checkpoint (a local folder or a Hub repo) and their format: safetensors, else ``.bin``
    (:data:`WEIGHT_FORMATS`); a sharded checkpoint gives every shard named by its index. ``None`` when there are
    none. Only the files of the format found are downloaded."""
    for fmt, index_name, single_name in WEIGHT_FORMATS:
        index = resolve_file(path_or_repo_id, index_name, required=False, hub=hub)
        if index is not None:
            return [resolve_file(path_or_repo_id, shard, hub=hub) for shard in _shards(index)], fmt  # type: ignore[misc]
        single = resolve_file(path_or_repo_id, single_name, required=False, hub=hub)
        if single is not None:
            return [single], fmt
    return None


# -------------------------------------------------------------------------------------------------------- the cache


def cache_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hugging Face Hub cache folder: ``cache_dir`` when given, else the default (``HF_HUB_CACHE`` / ``HF_HOME``)."""
    return Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)


def scan_cache(cache_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The repositories in the Hub cache folder, sorted by id: ``repo_id``, ``type``, ``size_bytes``, ``revisions``
    (commit hashes) and ``refs`` (branch / tag names). An absent folder holds none."""
    try:
        info = scan_cache_dir(cache_path(cache_dir))
    except CacheNotFound:
        return []
    repos = []
    for repo in info.repos:
        revisions = sorted(r.commit_hash for r in repo.revisions)
        refs = sorted(ref for r in repo.revisions for ref in r.refs)
        repos.append(
            {
                "repo_id": repo.repo_id,
                "type": repo.repo_type,
                "size_bytes": repo.size_on_disk,
                "revisions": revisions,
                "refs": refs,
            }
        )
    return sorted(repos, key=lambda r: (r["repo_id"], r["type"]))


def snapshot(
    repo_id: str,
    allow_patterns: list[str] | tuple[str, ...],
    fallback_patterns: list[str] | tuple[str, ...] | None = None,
    *,
    hub: HubOptions | None = None,
    repo_type: str | None = None,
) -> Path:
    """Local folder holding the files of a Hub repo that match ``allow_patterns`` (fetched into the Hub cache).

    When the folder then has no ``*.safetensors`` file and ``fallback_patterns`` are given, those are fetched too
    (e.g. the ``.bin`` weights of a repository without safetensors). Failures become :class:`CheckpointError`.
    """
    opts = HubOptions.from_any(hub)
    folder = _snapshot_once(repo_id, list(allow_patterns), opts, repo_type)
    if fallback_patterns and not any(folder.glob("*.safetensors")):
        logger.info("%s has no safetensors weights; fetching %s", repo_id, list(fallback_patterns))
        folder = _snapshot_once(repo_id, list(fallback_patterns), opts, repo_type)
    return folder


def _snapshot_once(repo_id: str, patterns: list[str], opts: HubOptions, repo_type: str | None) -> Path:
    where = f"{repo_type + ' ' if repo_type else ''}{repo_id!r}" + (
        f" at revision {opts.revision!r}" if opts.revision else ""
    )
    unreachable = None if opts.offline else hub_unreachable()
    kwargs = {**opts.kwargs(), "local_files_only": opts.offline or unreachable is not None}
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, repo_type=repo_type, **kwargs))
    except LocalEntryNotFoundError as exc:
        state = (
            "downloading is off (HF_HUB_OFFLINE or local_files_only=True)"
            if opts.offline
            else f"the Hub is unreachable ({unreachable})"
            if unreachable
            else "the Hub is unreachable"
        )
        raise CheckpointError(
            f"{where} is not in the local Hugging Face cache and {state}: run `moai download` (or `hf download "
            f"{repo_id}`) where the Hub is reachable, or pass a local folder"
        ) from exc
    except GatedRepoError as exc:
        raise CheckpointError(f"{where} is gated: accept its terms on the Hub and pass token=...") from exc
    except RevisionNotFoundError as exc:
        raise CheckpointError(f"revision {opts.revision!r} does not exist in {repo_id!r}") from exc
    except RepositoryNotFoundError as exc:
        raise CheckpointError(f"{where} is not a Hub repository you can access (spelling? token=...?)") from exc
    except (OSError, ValueError) as exc:  # HTTP and validation errors of huggingface_hub
        raise CheckpointError(f"could not fetch {patterns} from {where}: {type(exc).__name__}: {exc}") from exc


def download_first(
    repo_id: str, filenames: list[str] | tuple[str, ...], *, hub: HubOptions | None = None, repo_type: str | None = None
) -> Path:
    """Local path of the first of ``filenames`` that the Hub repo has (or, offline, that the cache holds)."""
    opts = HubOptions.from_any(hub)
    for name in filenames:
        path = download(repo_id, name, required=False, hub=opts, repo_type=repo_type)
        if path is not None:
            return path
    where = "the local Hugging Face cache (downloading is off)" if opts.offline else "the repository"
    raise CheckpointError(f"{where} has none of {list(filenames)} for {repo_id!r}; check the repo id and revision")


__all__ = [
    "HubOptions",
    "HubSettings",
    "download",
    "snapshot",
    "download_first",
    "resolve_file",
    "find_weights",
    "WEIGHT_FORMATS",
    "cache_path",
    "scan_cache",
    "offline",
    "env_offline",
    "is_repo_id",
    "read_json_object",
    "hub_unreachable",
]
