"""Without a network, a file missing from the Hub cache is reported at once, in one line -- no retries."""

from __future__ import annotations

import pytest

from moai_sdk import CheckpointError
from moai_sdk import hub as hub_module
from moai_sdk.experts.weights import load_pretrained
from moai_sdk.hub import HubOptions


@pytest.fixture
def no_hub(monkeypatch):
    """Online mode (HF_HUB_OFFLINE unset, no proxy), the suite's socket block as the missing network, a fresh probe."""
    for name in ("HF_HUB_OFFLINE", *hub_module._PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub_module, "_probe_result", {})
    calls = []
    real = hub_module.hf_hub_download

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(hub_module, "hf_hub_download", spy)
    return calls


def test_unreachable_hub_is_one_line_from_the_cache_only(no_hub, tmp_path, caplog):
    with pytest.raises(CheckpointError) as info:
        hub_module.download("BK-Lee/MoAI-7B", "tokenizer.model", cache_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message and "the Hub is unreachable (huggingface.co cannot be reached" in message
    assert [c["local_files_only"] for c in no_hub] == [True]  # one call, straight to the cache: no retries
    with pytest.raises(CheckpointError):
        hub_module.download("BK-Lee/MoAI-7B", "config.json", cache_dir=tmp_path)
    warnings = [r for r in caplog.records if "Hub is unreachable" in r.getMessage()]
    assert len(warnings) == 1  # said once, not per file


def test_snapshots_and_transformers_loaders_use_the_cache_when_unreachable(no_hub, tmp_path, monkeypatch):
    seen = {}

    def fake_snapshot(repo_id, **kwargs):
        seen.update(kwargs)
        from huggingface_hub.errors import LocalEntryNotFoundError

        raise LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(hub_module, "snapshot_download", fake_snapshot)
    with pytest.raises(CheckpointError, match=r"the Hub is unreachable \(huggingface.co cannot be reached"):
        hub_module.snapshot("facebook/mask2former-swin-base-coco-panoptic", ["*.json"], hub=HubOptions())
    assert seen["local_files_only"] is True

    def loader(model_id, **kwargs):
        seen["loader"] = kwargs
        raise OSError("not in the cache")

    with pytest.raises(CheckpointError, match="the Hub is unreachable"):
        load_pretrained(loader, "google/owlv2-base-patch16-ensemble", HubOptions(), "owlv2")
    assert seen["loader"]["local_files_only"] is True


def test_behind_a_proxy_the_probe_is_skipped(no_hub, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert hub_module.hub_unreachable() is None
