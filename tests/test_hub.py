"""moai_sdk.hub against a local cache in the real Hugging Face Hub layout (nothing is downloaded).

The cache is what ``huggingface_hub`` writes: ``models--owner--name/refs/<branch or tag>`` holding a commit hash,
``snapshots/<commit>/<file>`` symlinks into ``blobs/``. With ``HF_HUB_OFFLINE=1`` or ``local_files_only`` the real
``hf_hub_download`` / ``snapshot_download`` read it as they would read a cache filled by downloads.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from moai_sdk import hub
from moai_sdk.errors import CheckpointError, ConfigError
from moai_sdk.hub import HubOptions

REPO = "owner/model"
MAIN = "1" * 40
V1 = "2" * 40


def add_file(cache: Path, repo_id: str, commit: str, filename: str, content: bytes, refs: tuple[str, ...] = ()) -> None:
    """Put ``filename`` into the cached snapshot ``commit`` of ``repo_id`` (blob + relative symlink, refs)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(content)
    link = repo / "snapshots" / commit / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    root = tmp_path / "hub"
    add_file(root, REPO, MAIN, "config.json", b'{"v": "main"}', refs=("main",))
    add_file(root, REPO, MAIN, "pytorch_model.bin", b"bin weights")
    add_file(root, REPO, V1, "config.json", b'{"v": "v1"}', refs=("v1",))
    add_file(root, REPO, V1, "model.safetensors", b"safe weights")
    return root


@pytest.fixture
def offline_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def read_version(path: Path) -> str:
    return json.loads(path.read_text())["v"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("true", True), ("TRUE", True), ("yes", True), (" on ", True)]
    + [("false", False), ("0", False), ("", False), ("no", False), (None, False)],
)
def test_env_offline_reads_hf_hub_offline_now(value, expected, monkeypatch):
    if value is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub.env_offline() is expected
    assert hub.offline() is expected and hub.offline(local_files_only=True) is True
    assert HubOptions().offline is expected and HubOptions(local_files_only=True).offline is True
    assert HubOptions().kwargs()["local_files_only"] is expected


def test_hub_options_validate_and_combine(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # kwargs() folds the environment in; CI sets it to 1
    opts = HubOptions.from_any({"revision": "v1", "cache_dir": tmp_path}, token="t")
    assert opts == HubOptions(revision="v1", cache_dir=str(tmp_path), token="t") and isinstance(opts.cache_dir, str)
    assert HubOptions.from_any(opts, revision=None) == opts  # None leaves a setting as it is
    assert HubOptions.from_any(opts, revision="main").revision == "main"  # a keyword that is given wins
    assert opts.replace(revision=None).revision is None and opts.revision == "v1"  # frozen: replace copies
    assert opts.kwargs() == {"revision": "v1", "cache_dir": str(tmp_path), "token": "t", "local_files_only": False}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert opts.kwargs()["local_files_only"] is True and opts.local_files_only is False  # read now, not stored
    with pytest.raises(ConfigError, match="revision must be a non-empty string"):
        HubOptions(revision="")
    with pytest.raises(ConfigError, match="cache_dir must be a folder path"):
        HubOptions(cache_dir=3)
    with pytest.raises(ConfigError, match="token must be"):
        HubOptions(token=5)
    with pytest.raises(ConfigError, match="unknown hub option"):
        HubOptions.from_any({"revison": "v1"})
    with pytest.raises(ConfigError, match="hub options must be"):
        HubOptions.from_any("v1")


def test_download_reads_the_cached_snapshot_of_a_revision(cache, offline_env):
    opts = HubOptions(cache_dir=str(cache))
    main = hub.download(REPO, "config.json", hub=opts)
    assert main.parent.name == MAIN and read_version(main) == "main"
    assert read_version(hub.download(REPO, "config.json", hub=opts.replace(revision="v1"))) == "v1"  # a tag
    assert read_version(hub.download(REPO, "config.json", hub=opts.replace(revision=V1))) == "v1"  # a commit
    # the legacy keywords still work and win over hub=
    assert read_version(hub.download(REPO, "config.json", cache_dir=cache, revision="v1")) == "v1"
    assert read_version(hub.download(REPO, "config.json", hub=opts.replace(revision="v1"), revision="main")) == "main"


def test_local_files_only_works_without_the_environment(cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "false")  # online as far as the environment goes
    opts = HubOptions(cache_dir=str(cache), local_files_only=True)
    assert read_version(hub.download(REPO, "config.json", hub=opts)) == "main"
    assert read_version(hub.download(REPO, "config.json", cache_dir=cache, local_files_only=True)) == "main"


def test_an_offline_miss_is_one_checkpoint_error_that_says_what_to_do(cache, offline_env):
    opts = HubOptions(cache_dir=str(cache))
    assert hub.download(REPO, "tokenizer.model", hub=opts, required=False) is None
    with pytest.raises(CheckpointError) as info:
        hub.download(REPO, "tokenizer.model", hub=opts)
    message = str(info.value)
    assert "\n" not in message and "'tokenizer.model'" in message and "not in the local Hugging Face cache" in message
    assert "hf download owner/model tokenizer.model" in message and "moai download" in message
    with pytest.raises(CheckpointError, match="at revision 'v9'"):
        hub.download(REPO, "config.json", hub=opts.replace(revision="v9"))  # a revision the cache does not know
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        hub.download("other/model", "config.json", hub=opts)


def test_resolve_file_prefers_a_local_folder(cache, offline_env, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text('{"v": "local"}')
    assert read_version(hub.resolve_file(folder, "config.json")) == "local"
    assert hub.resolve_file(folder, "tokenizer.model", required=False) is None
    with pytest.raises(CheckpointError, match="not found in the model folder"):
        hub.resolve_file(folder, "tokenizer.model")
    with pytest.raises(CheckpointError, match="is a file"):
        hub.resolve_file(folder / "config.json", "config.json")
    with pytest.raises(CheckpointError, match="does not exist and is not a Hugging Face Hub repo id"):
        hub.resolve_file(tmp_path / "missing" / "deeper" / "x", "config.json")
    opts = HubOptions(cache_dir=str(cache), revision="v1")
    assert read_version(hub.resolve_file(REPO, "config.json", hub=opts)) == "v1"


def test_find_weights_prefers_safetensors_then_bin(cache, offline_env, tmp_path):
    opts = HubOptions(cache_dir=str(cache))
    files, fmt = hub.find_weights(REPO, hub=opts)  # main has only .bin
    assert fmt == "bin" and [f.name for f in files] == ["pytorch_model.bin"]
    files, fmt = hub.find_weights(REPO, hub=opts.replace(revision="v1"))
    assert fmt == "safetensors" and files[0].read_bytes() == b"safe weights"

    folder = tmp_path / "sharded"
    folder.mkdir()
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    for name in index["weight_map"].values():
        (folder / name).write_bytes(b"shard")
    (folder / "pytorch_model.bin").write_bytes(b"ignored: safetensors come first")
    files, fmt = hub.find_weights(folder)
    assert fmt == "safetensors" and [f.name for f in files] == sorted(index["weight_map"].values())
    empty = tmp_path / "empty"
    empty.mkdir()
    assert hub.find_weights(empty) is None
    (empty / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="weight_map"):
        hub.find_weights(empty)


def test_snapshot_and_download_first_read_the_cache(cache, offline_env):
    opts = HubOptions(cache_dir=str(cache))
    folder = hub.snapshot(REPO, ["*.json", "*.safetensors"], ["*.bin"], hub=opts)
    assert folder.name == MAIN and (folder / "pytorch_model.bin").is_file()
    assert hub.snapshot(REPO, ["*.json"], hub=opts.replace(revision="v1")).name == V1
    first = hub.download_first(REPO, ["model.safetensors", "pytorch_model.bin"], hub=opts)
    assert first.name == "pytorch_model.bin"  # main has no safetensors
    with pytest.raises(CheckpointError, match="has none of"):
        hub.download_first(REPO, ["a.bin", "b.bin"], hub=opts)
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        hub.snapshot("other/model", ["*.json"], hub=opts)


def test_scan_cache_lists_repos_with_refs(cache, tmp_path):
    [repo] = hub.scan_cache(cache)
    assert repo["repo_id"] == REPO and repo["type"] == "model"
    assert repo["revisions"] == [MAIN, V1] and repo["refs"] == ["main", "v1"] and repo["size_bytes"] > 0
    assert hub.scan_cache(tmp_path / "absent") == []
    assert hub.cache_path(cache) == cache and hub.cache_path().is_absolute()
