"""Every script in examples/ runs on the tiny offline MoAI (the FastAPI app through its test client)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from moai_sdk import MoAIResult, PerceptionResult
from moai_sdk.testing import build_tiny_experts, build_tiny_moai, demo_image

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "moai-sdk-tiny"
    build_tiny_moai(root / "moai")
    build_tiny_experts(root / "experts")
    return root


def load_example(name: str):
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"moai_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_example_is_tested():
    # openai_client talks to a running `moai serve`: tests/test_serve.py runs it against its server
    tested = {"quickstart", "batch_folder", "perception_only", "custom_expert", "streaming", "openai_client"}
    assert {p.stem for p in EXAMPLES.glob("*.py")} == tested


def test_quickstart(tiny_root, tmp_path, capsys):
    image = tmp_path / "photo.png"
    demo_image("MOAI").save(image)
    result = load_example("quickstart").main([str(image), "--tiny", str(tiny_root), "--max-new-tokens", "4"])
    assert isinstance(result, MoAIResult) and 1 <= result.token_counts["generated"] <= 4
    out = capsys.readouterr().out
    assert f"answer: {result.text}" in out and "MOAI" in out


def test_streaming(tiny_root, capsys):
    pieces, result = load_example("streaming").main(["--tiny", str(tiny_root), "--max-new-tokens", "6"])
    assert "".join(pieces) == result.text
    assert result.text in capsys.readouterr().out


def test_perception_only(tiny_root, tmp_path):
    out, js = tmp_path / "p.png", tmp_path / "p.json"
    result = load_example("perception_only").main(["--tiny", str(tiny_root), "--out", str(out), "--json", str(js)])
    assert [line.text for line in result.text_lines] == ["MOAI"]
    assert Image.open(out).size == (490, 490)
    assert PerceptionResult.from_json(js.read_text()).text_lines[0].text == "MOAI"


def test_custom_expert(tiny_root):
    result = load_example("custom_expert").main(["--tiny", str(tiny_root)])
    labels = sorted(d.label for d in result.perception.detections)
    assert labels == ["blue object", "red object"]
    assert result.perception.sources["detection"] == "colour-blobs"
    assert "red object" in result.aux_text and "MOAI" in result.aux_text


def test_batch_folder(tiny_root, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, word in enumerate(["ONE", "TWO", "SIX"]):
        demo_image(word, (320 + 40 * i, 240)).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "answers.jsonl"
    load_example("batch_folder").main(
        [str(folder), "--tiny", str(tiny_root), "--out", str(out), "--batch-size", "2", "--max-new-tokens", "3"]
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(line["image"]).name for line in lines] == ["img0.png", "img1.png", "img2.png"]
    results = [MoAIResult.model_validate(line["result"]) for line in lines]
    assert [r.perception.image_width for r in results] == [320, 360, 400]
    assert all(1 <= len(r.new_token_ids) <= 3 for r in results)
