"""Loading the official checkpoint layout: formats, the Hub cache, offline mode, and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY, official_inputs, rel_err
from moai_sdk import CheckpointError, ConfigError, MissingKeysError, UnsafeCheckpointError
from moai_sdk.modeling import MoAIForCausalLM


@pytest.fixture(scope="module")
def reference_logits(tiny_model, cases, cases_meta):
    with torch.no_grad():
        return tiny_model(**official_inputs("b_eval_template", cases, cases_meta)).logits[:, -1]


def _logits(model, cases, cases_meta):
    with torch.no_grad():
        return model(**official_inputs("b_eval_template", cases, cases_meta)).logits[:, -1]


def _copy_meta(dst: Path) -> None:
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(TINY / name, dst / name)


def test_official_keys_are_loaded_exactly(tiny_model):
    keys = [line.split("\t")[0] for line in (TINY / "keys.txt").read_text().splitlines() if line.strip()]
    state = tiny_model.state_dict()
    assert set(keys) <= set(state)
    from safetensors.torch import load_file

    ckpt = load_file(str(TINY / "model.safetensors"))
    for key in keys:
        assert torch.equal(state[key], ckpt[key]), key
    info = tiny_model.load_info
    assert info["format"] == "safetensors" and info["vision_from"] == "checkpoint" and not info["added_image_row"]


def test_sharded_safetensors_and_bin_load_to_same_logits(tmp_path, tiny_model, reference_logits, cases, cases_meta):
    sharded = tmp_path / "sharded"
    tiny_model.save_pretrained(sharded, max_shard_size=1_000_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    m1 = MoAIForCausalLM.from_pretrained(sharded, device="cpu")
    assert torch.equal(_logits(m1, cases, cases_meta), reference_logits)

    as_bin = tmp_path / "bin"
    tiny_model.save_pretrained(as_bin, safe_serialization=False)
    assert (as_bin / "pytorch_model.bin").is_file()
    m2 = MoAIForCausalLM.from_pretrained(as_bin, device="cpu")
    assert m2.load_info["format"] == "bin"
    assert torch.equal(_logits(m2, cases, cases_meta), reference_logits)


def _hub_cache(root: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Lay files out like huggingface_hub's cache: models--org--name/{refs/main, snapshots/<sha>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, src in files.items():
        shutil.copy(src, snap / name)
    return root


def test_hub_style_cache_offline(tmp_path, monkeypatch, reference_logits, cases, cases_meta):
    cache = _hub_cache(
        tmp_path / "hub",
        "BK-Lee/MoAI-tiny",
        {n: TINY / n for n in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json")},
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = MoAIForCausalLM.from_pretrained("BK-Lee/MoAI-tiny", cache_dir=cache, device="cpu")
    assert model.load_info["source"] == "BK-Lee/MoAI-tiny"
    assert torch.equal(_logits(model, cases, cases_meta), reference_logits)
    from moai_sdk import MoAIProcessor

    processor = MoAIProcessor.from_pretrained("BK-Lee/MoAI-tiny", cache_dir=cache)
    assert processor.tokenizer.image_token_id == 1000
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        MoAIForCausalLM.from_pretrained("BK-Lee/not-cached", cache_dir=cache, device="cpu")


def test_hub_options_value_and_legacy_keywords(tmp_path, monkeypatch, reference_logits, cases, cases_meta):
    """``hub=HubOptions(...)`` carries the cache folder; a legacy keyword given next to it wins."""
    from moai_sdk.hub import HubOptions
    from moai_sdk.modeling import load_moai

    cache = _hub_cache(
        tmp_path / "hub", "BK-Lee/MoAI-tiny", {n: TINY / n for n in ("config.json", "model.safetensors")}
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_moai("BK-Lee/MoAI-tiny", hub=HubOptions(cache_dir=str(cache), revision="main"), device="cpu")
    assert isinstance(model, MoAIForCausalLM)
    assert model.load_info["revision"] == "main" and model.load_info["source"] == "BK-Lee/MoAI-tiny"
    assert torch.equal(_logits(model, cases, cases_meta), reference_logits)
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        MoAIForCausalLM.from_pretrained("BK-Lee/MoAI-tiny", hub=HubOptions(cache_dir=str(empty)), device="cpu")
    again = MoAIForCausalLM.from_pretrained(
        "BK-Lee/MoAI-tiny", hub=HubOptions(cache_dir=str(empty)), cache_dir=cache, device="cpu"
    )
    assert again.load_info["files"][0].startswith(str(cache))


def test_checkpoint_without_image_row_gets_one(tmp_path, reference_logits, cases, cases_meta):
    from safetensors.torch import load_file, save_file

    state = load_file(str(TINY / "model.safetensors"))
    state["model.tok_embeddings.weight"] = state["model.tok_embeddings.weight"][:1000].clone()
    d = tmp_path / "norow"
    d.mkdir()
    _copy_meta(d)
    save_file(state, str(d / "model.safetensors"))
    model = MoAIForCausalLM.from_pretrained(d, device="cpu")
    assert model.load_info["added_image_row"]
    assert model.model.tok_embeddings.weight.shape == (1001, 32)
    # the <image> row is replaced by image features: logits do not depend on it
    assert torch.equal(_logits(model, cases, cases_meta), reference_logits)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    d = tmp_path / "trunc"
    d.mkdir()
    _copy_meta(d)
    data = (TINY / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        MoAIForCausalLM.from_pretrained(d, device="cpu")


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_key_mismatch_lists_the_keys(tmp_path, change):
    from safetensors.torch import load_file, save_file

    state = load_file(str(TINY / "model.safetensors"))
    if change == "missing":
        del state["model.layers.3.feed_forward.w2.Plora_B.weight"]
    else:
        state["model.layers.3.feed_forward.w4.weight"] = torch.zeros(2, 2)
    d = tmp_path / change
    d.mkdir()
    _copy_meta(d)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(MissingKeysError) as info:
        MoAIForCausalLM.from_pretrained(d, device="cpu")
    if change == "missing":
        assert info.value.missing == ["model.layers.3.feed_forward.w2.Plora_B.weight"]
        assert "model.layers.3.feed_forward.w2.Plora_B.weight" in str(info.value)
    else:
        assert info.value.unexpected == ["model.layers.3.feed_forward.w4.weight"]


def test_bin_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    d = tmp_path / "evil"
    d.mkdir()
    _copy_meta(d)
    torch.save({"model.norm.weight": Evil()}, d / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="weights_only"):
        MoAIForCausalLM.from_pretrained(d, device="cpu")


def test_bad_arguments_raise_moai_errors(tmp_path):
    with pytest.raises(ConfigError, match="quantization"):
        MoAIForCausalLM.from_pretrained(TINY, quantization="int3")
    with pytest.raises(ConfigError, match="dtype"):
        MoAIForCausalLM.from_pretrained(TINY, dtype="float8")
    with pytest.raises(ConfigError, match="device"):
        MoAIForCausalLM.from_pretrained(TINY, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            MoAIForCausalLM.from_pretrained(TINY, device="cuda")
    with pytest.raises(CheckpointError, match="no config.json"):
        MoAIForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        MoAIForCausalLM.from_pretrained(str(tmp_path / "nope" / "deeper"))


def test_dtype_float16_and_bfloat16_load(reference_logits, cases, cases_meta):
    # this oracle is deliberately ill-conditioned (sharp attention): fp16 lands near 2e-2, bf16 near 1e-1
    for dtype, tol in (("float16", 5e-2), ("bfloat16", 2.5e-1)):
        model = MoAIForCausalLM.from_pretrained(TINY, device="cpu", dtype=dtype)
        assert model.dtype == getattr(torch, dtype)
        assert model.vision_proj[0].weight.dtype == getattr(torch, dtype)
        logits = _logits(model, cases, cases_meta).float()
        assert torch.isfinite(logits).all()
        assert rel_err(logits, reference_logits) < tol


def test_vision_tower_from_hub_when_checkpoint_has_none(tmp_path, monkeypatch, cases, cases_meta, reference_logits):
    """A checkpoint without `vit.*` weights gets the CLIP tower from the Hub (here: a local Hub-style cache)."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(TINY / "model.safetensors"))
    prefix = "vit.vision_tower.vision_model."
    clip_state = {"vision_model." + k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    # store the CLIP tower the way a 336-px checkpoint would not: keep the 490-px table (already 1226 rows)
    no_vit = {k: v for k, v in state.items() if not k.startswith(prefix)}
    d = tmp_path / "novit"
    d.mkdir()
    _copy_meta(d)
    save_file(no_vit, str(d / "model.safetensors"))
    clip_file = tmp_path / "clip.safetensors"
    save_file(clip_state, str(clip_file))
    cache = _hub_cache(tmp_path / "hub", "openai/clip-vit-large-patch14-336", {"model.safetensors": clip_file})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = MoAIForCausalLM.from_pretrained(d, device="cpu", cache_dir=cache)
    assert model.load_info["vision_from"] == "openai/clip-vit-large-patch14-336"
    assert torch.equal(_logits(model, cases, cases_meta), reference_logits)
