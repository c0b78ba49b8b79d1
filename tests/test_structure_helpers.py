"""The small shared helpers the structure refactor introduced: each rule once, and each behaves as its callers need."""

from __future__ import annotations

import sys

import pytest
import torch

from moai_sdk.errors import ConfigError, DependencyError, InputError, import_optional
from moai_sdk.experts.base import Expert, Perception, check_on_expert_error
from moai_sdk.hub import HubOptions
from moai_sdk.imageops import per_row


class CountingExpert(Expert):
    name = "test-structure-counting"
    task = "ocr"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.load_calls = 0

    def _load(self):
        self.load_calls += 1
        self.model = "loaded"

    def _predict(self, images):
        return [self.make_result(img, text_lines=[]) for img in images]


def test_import_optional_names_the_install_command(monkeypatch):
    assert import_optional("json", "unused").dumps([1]) == "[1]"
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes the import fail
    with pytest.raises(DependencyError, match=r"pip install 'moai-sdk\[parquet\]'"):
        import_optional("pyarrow.parquet", "Parquet output needs pyarrow: pip install 'moai-sdk[parquet]'")


def test_per_row_shares_one_value_or_takes_one_per_row():
    assert per_row(["a"], 3, "prompts", str, name="prompts") == ["a", "a", "a"]
    assert per_row(["a", None], 2, "aux texts", str, name="aux", allow_none=True) == ["a", None]
    with pytest.raises(InputError, match="got 2 prompts for 3 images"):
        per_row(["a", "b"], 3, "prompts", str, name="prompts")
    with pytest.raises(InputError, match=r"prompts\[1\] must be a str; got int"):
        per_row(["a", 1], 2, "prompts", str, name="prompts")


def test_expert_to_moves_unloaded_and_reloads_loaded():
    exp = CountingExpert(device="cpu")
    assert exp.to("meta") is exp and exp.device == torch.device("meta") and exp.load_calls == 0
    exp.to("cpu").load()
    assert exp.load_calls == 1
    exp.to("cpu")  # same device: nothing to do
    assert exp.load_calls == 1 and exp.is_loaded


def test_hub_views_read_the_one_hub_value():
    exp = CountingExpert(hub=HubOptions(revision="v1", token="t"), local_files_only=True)
    assert (exp.revision, exp.token, exp.local_files_only, exp.cache_dir) == ("v1", "t", True, None)


def test_on_expert_error_rule_is_shared():
    assert check_on_expert_error("warn") == "warn"
    with pytest.raises(ConfigError, match="'raise' or 'warn'"):
        check_on_expert_error("ignore")
    with pytest.raises(ConfigError, match="'raise' or 'warn'"):
        Perception([CountingExpert()], on_expert_error="ignore")
