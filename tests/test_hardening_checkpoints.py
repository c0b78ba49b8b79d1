"""Hostile checkpoints: config.json checked by a typed schema before anything is built, integer-typed and
non-finite weights refused naming the tensor, shard names that leave the checkpoint folder refused."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moai_sdk import CheckpointError, ConfigError
from moai_sdk.modeling import MoAIForCausalLM
from moai_sdk.modeling.config import MoAIConfig

WEIGHT = "model.layers.0.attention.wo.Plora_main.weight"


@pytest.fixture(scope="module")
def tiny_state(tiny_dir) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_dir / "model.safetensors"))


def _checkpoint(root: Path, tiny_dir: Path, config: dict | None = None, state: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((tiny_dir / "config.json").read_text()) if config is None else config
    (root / "config.json").write_text(json.dumps(cfg))
    if state is None:
        (root / "model.safetensors").symlink_to(tiny_dir / "model.safetensors")
    else:
        save_file(state, str(root / "model.safetensors"))
    return root


def _set(cfg: dict, dotted: str, value) -> dict:
    node = cfg
    *path, last = dotted.split(".")
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value
    return cfg


BAD_FIELDS = [
    ("vocab_size", 0, "'vocab_size' must be a positive integer"),
    ("hidden_size", -64, "'hidden_size' must be a positive integer"),
    ("num_attention_heads", "4", "'num_attention_heads' must be a positive integer"),
    ("num_hidden_layers", 2.0, "'num_hidden_layers' must be a positive integer"),
    ("num_key_value_heads", True, "'num_key_value_heads' must be a positive integer"),
    ("num_attention_heads", 7, "not divisible by num_attention_heads 7"),
    ("hidden_act", "swish", "'hidden_act' must be one of"),
    ("rms_norm_eps", math.nan, "'rms_norm_eps' must be a finite number > 0"),
    ("rope_theta", -1.0, "'rope_theta' must be a finite number > 0"),
    ("eos_token_id", 10**9, "'eos_token_id' must be a token id"),
    ("bos_token_id", -3, "'bos_token_id' must be a token id"),
    ("rope_scaling", {"type": "dynamic", "factor": "2"}, "'rope_scaling.factor' must be a finite number > 0"),
    ("moai_structure.mixer_rank", 0, "'moai_structure.mixer_rank' must be a positive integer"),
    ("moai_structure.gate_softmax_dtype", "float8", "'moai_structure.gate_softmax_dtype' must be one of"),
    ("moai_structure.vision_config.hidden_act", "nope", "'moai_structure.vision_config.hidden_act' must be"),
    ("moai_structure.vision_config.num_attention_heads", 0, "vision_config.num_attention_heads' must be a positive"),
    ("moai_structure.patch_size", 13, "image_size .* is not a multiple of patch_size 13"),
]


@pytest.mark.parametrize("field, value, message", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v, _ in BAD_FIELDS])
def test_config_schema_names_the_field_before_anything_is_built(tmp_path, tiny_dir, monkeypatch, field, value, message):
    cfg = _set(json.loads((tiny_dir / "config.json").read_text()), field, value)
    with pytest.raises(ConfigError, match=message):
        MoAIConfig.from_dict(cfg)

    def never(*args, **kwargs):
        raise AssertionError("the model was built from an invalid config")

    monkeypatch.setattr(MoAIForCausalLM, "__init__", never)
    with pytest.raises(ConfigError, match=message):
        MoAIForCausalLM.from_pretrained(_checkpoint(tmp_path / "ckpt", tiny_dir, config=cfg), device="cpu")


@pytest.mark.parametrize("position", [0, 17, -1])
def test_a_nan_weight_is_refused_naming_the_tensor(tmp_path, tiny_dir, tiny_state, position):
    state = dict(tiny_state)
    bad = state[WEIGHT].clone()
    bad.view(-1)[position] = math.nan
    state[WEIGHT] = bad
    root = _checkpoint(tmp_path / "nan", tiny_dir, state=state)
    with pytest.raises(CheckpointError, match=rf"weight '{WEIGHT}' holds 1 NaN and 0 infinite"):
        MoAIForCausalLM.from_pretrained(root, device="cpu", dtype="float32")
    model = MoAIForCausalLM.from_pretrained(root, device="cpu", dtype="float32", check_weights=False)
    assert torch.isnan(model.state_dict()[WEIGHT]).sum() == 1  # the option really skips the scan


def test_overflow_in_the_cast_is_reported(tmp_path, tiny_dir, tiny_state):
    state = dict(tiny_state)
    big = state[WEIGHT].clone().float()
    big.view(-1)[3] = 1e6  # fine in float32, infinite in float16
    state[WEIGHT] = big
    root = _checkpoint(tmp_path / "big", tiny_dir, state=state)
    assert MoAIForCausalLM.from_pretrained(root, device="cpu", dtype="float32") is not None
    with pytest.raises(CheckpointError, match=r"0 NaN and 1 infinite value\(s\) \(after the cast to float16\)"):
        MoAIForCausalLM.from_pretrained(root, device="cpu", dtype="float16")


def test_an_integer_weight_is_refused_at_load_not_at_the_first_call(tmp_path, tiny_dir, tiny_state):
    state = dict(tiny_state)
    state[WEIGHT] = state[WEIGHT].round().to(torch.int64)
    root = _checkpoint(tmp_path / "int", tiny_dir, state=state)
    with pytest.raises(CheckpointError, match=rf"weight '{WEIGHT}' has dtype int64"):
        MoAIForCausalLM.from_pretrained(root, device="cpu", check_weights=False)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors", "C:\\x.bin"])
@pytest.mark.parametrize("index", ["model.safetensors.index.json", "pytorch_model.bin.index.json"])
def test_shard_names_must_stay_inside_the_checkpoint_folder(tmp_path, tiny_dir, tiny_state, shard, index):
    root = tmp_path / "ckpt"
    root.mkdir()
    shutil.copy(tiny_dir / "config.json", root / "config.json")
    outside = tmp_path / "outside.safetensors"
    save_file(dict(tiny_state), str(outside))  # a real file the hostile index points at
    weight_map = {k: "model-00001-of-00002.safetensors" for k in list(tiny_state)[:3]}
    weight_map.update({k: shard for k in list(tiny_state)[3:]})
    (root / index).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="not a file inside the checkpoint folder"):
        MoAIForCausalLM.from_pretrained(root, device="cpu")
