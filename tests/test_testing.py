"""moai_sdk.testing: the tiny offline MoAI checkpoint and experts that downstream apps test against."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from moai_sdk import ConfigError, MoAIForCausalLM, MoAIProcessor
from moai_sdk.testing import (
    TINY_MOAI_CONFIG,
    build_tiny_experts,
    build_tiny_moai,
    demo_image,
    init_tiny_weights,
    tiny_config,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_tiny_moai(tmp_path_factory.mktemp("tiny") / "moai", seed=0)


def test_official_layout_with_tokenizer(built):
    names = {p.name for p in built.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"} <= names
    config = json.loads((built / "config.json").read_text())
    assert config["hidden_size"] == 32 and config["num_hidden_layers"] == 8 and config["vocab_size"] == 1000
    assert config["moai_structure"]["num_patches"] == 1225 and config["moai_structure"]["mixer_layers"] == [7]
    keys = set(load_file(str(built / "model.safetensors")))
    assert "model.layers.7.attention.moai_CA_img_aux.linear_q.0.weight" in keys  # official key names
    assert "vit.vision_tower.vision_model.embeddings.position_embedding.weight" in keys
    assert "moai_compressor.latents" in keys and "output.weight" in keys


def test_loads_and_gives_decisive_greedy_logits(built):
    model = MoAIForCausalLM.from_pretrained(built, device="cpu", dtype="float32")
    proc = MoAIProcessor.from_pretrained(built)
    assert model.config.image_token_id == proc.image_token_index == 1000
    inputs = proc(demo_image(), "What is this?", "The image includes text descriptions: MOAI.")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    top2 = logits.topk(2).values
    assert 1.0 < float(logits.std()) < 20.0  # neither flat nor exploding
    assert float(top2[0] - top2[1]) > 1e-3


def test_seeded_and_reused(built, tmp_path):
    same = build_tiny_moai(tmp_path / "a", seed=0)
    other = build_tiny_moai(tmp_path / "b", seed=1)
    w0, w_same, w_other = (load_file(str(p / "model.safetensors")) for p in (built, same, other))
    assert all(torch.equal(w0[k], w_same[k]) for k in w0)
    assert not torch.equal(w0["output.weight"], w_other["output.weight"])
    stamp = (same / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_moai(tmp_path / "a", seed=0) == same
    assert (same / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    build_tiny_moai(tmp_path / "a", seed=2)  # another seed rebuilds
    assert not torch.equal(load_file(str(same / "model.safetensors"))["output.weight"], w0["output.weight"])


def test_weight_scales():
    model = MoAIForCausalLM(tiny_config())
    init_tiny_weights(model, seed=3)
    params = {name: p.detach() for name, p in model.named_parameters()}
    assert float(params["model.tok_embeddings.weight"].std()) == pytest.approx(1.0, abs=0.05)
    assert float(params["model.norm.weight"].mean()) == pytest.approx(1.0, abs=0.1)
    assert float(params["output.weight"].std()) == pytest.approx(3 / 32**0.5, rel=0.1)
    w1 = params["model.layers.0.feed_forward.w1.Plora_main.weight"]
    assert float(w1.std()) == pytest.approx(1 / 32**0.5, rel=0.1)
    assert TINY_MOAI_CONFIG["moai_structure"]["vision_config"]["image_size"] == 490


def test_tiny_experts_spec(tmp_path):
    spec = build_tiny_experts(tmp_path, ocr=False)
    assert spec["segmentation"]["name"] == "mask2former" and spec["detection"]["name"] == "owlv2"
    assert "ocr" not in spec
    assert (tmp_path / "mask2former" / "config.json").is_file() and (tmp_path / "owlv2" / "config.json").is_file()
    assert build_tiny_experts(tmp_path)["ocr"] == "rapidocr"


def test_demo_image():
    img = demo_image("AB", (200, 100))
    assert img.size == (200, 100) and img.mode == "RGB"
    assert img.getpixel((0, 0)) == (240, 240, 235)
    with pytest.raises(ConfigError):
        demo_image("x", (10, 10))


def test_old_builder_homes_are_deprecated_aliases(monkeypatch):
    """The tiny builders live in moai_sdk.testing; the old modules warn and hand out the same objects."""
    import importlib
    import sys

    import moai_sdk.experts.scene_graph as scene_graph
    import moai_sdk.testing as testing

    for name in ("moai_sdk.experts.tiny", "moai_sdk.experts.scene_graph.synthetic"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.warns(DeprecationWarning, match="moai_sdk.testing"):
        tiny = importlib.import_module("moai_sdk.experts.tiny")
    assert tiny.build_tiny_psgtr is testing.build_tiny_psgtr and tiny.TINY_IMAGE_SIZE == testing.TINY_IMAGE_SIZE
    with pytest.warns(DeprecationWarning, match="synthetic_state_dict from moai_sdk.testing"):
        assert scene_graph.synthetic_state_dict is testing.synthetic_state_dict
    with pytest.raises(AttributeError):
        scene_graph.no_such_name  # noqa: B018
