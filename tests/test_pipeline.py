"""MoAIPipeline end to end on the tiny random MoAI: typed results, batching, perception reuse, streaming, seeds."""

from __future__ import annotations

import contextlib
import inspect
import json
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from moai_sdk import ConfigError, ExpertError, GenerationError, InputError, MoAIResult, PerceptionResult
from moai_sdk.experts.base import Expert
from moai_sdk.pipeline import ANSWER_CUT, DEFAULT_EXPERTS, MoAIPipeline, resolve_experts
from moai_sdk.processing import EMPTY_VERBALIZATION
from moai_sdk.testing import build_tiny_experts, build_tiny_moai, demo_image, tiny_pipeline

STAGES = {"verbalization", "preprocess", "vision", "compression", "prefill", "decode", "total"}


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "moai-sdk-tiny"
    build_tiny_moai(root / "moai")
    build_tiny_experts(root / "experts")
    return root


@pytest.fixture(scope="module")
def pipe(tiny_root):
    return tiny_pipeline(tiny_root)


@pytest.fixture(scope="module")
def image():
    return demo_image("MOAI")


@pytest.fixture(scope="module")
def first(pipe, image):
    """One greedy answer with every tiny expert (reused by several tests)."""
    return pipe(image, "What is written in the image?", max_new_tokens=8)


class RecordingOCR(Expert):
    """An OCR stand-in that reads a fixed line and counts its calls (optionally failing)."""

    name = "test-recording-ocr"
    task = "ocr"
    default_settings = {"text": "HELLO", "fail": False}

    def _load(self) -> None:
        self.model = object()
        self.calls = 0

    def _predict(self, images):
        self.calls += 1
        if self.settings["fail"]:
            raise RuntimeError("ocr backend down")
        from moai_sdk.results import TextLine

        square = [(1, 1), (9, 1), (9, 5), (1, 5)]
        line = TextLine.from_polygon(self.settings["text"], 0.99, square)
        return [self.make_result(img, text_lines=[line]) for img in images]


def test_configuration_is_lazy_and_readable(tiny_root):
    p = tiny_pipeline(tiny_root)
    assert not any(p.loaded.values())
    text = repr(p)
    assert "moai" in text and "mask2former" in text and "owlv2" in text and "rapidocr" in text and "psgtr" in text
    assert "not loaded" in text and "template='chat'" in text
    assert set(p.experts) == {"segmentation", "detection", "scene_graph", "ocr"}
    assert p.to("cpu") is p and all(e.device == torch.device("cpu") for e in p.experts.values())
    p.load()
    assert all(p.loaded.values())
    assert p.vision_tower is p.model.vit
    assert p.tokenizer.image_token_id == 1000


def test_single_call_returns_a_complete_result(pipe, first):
    r = first
    assert isinstance(r, MoAIResult)
    assert r.prompt == "What is written in the image?"
    assert isinstance(r.perception, PerceptionResult)
    assert r.perception.sources == {
        "segmentation": "mask2former",
        "detection": "owlv2",
        "scene_graph": "psgtr",
        "ocr": "rapidocr",
    }
    assert not any("scene graph" in w for w in r.perception.warnings)
    assert (r.perception.image_width, r.perception.image_height) == (640, 480)
    assert (r.perception.frame_width, r.perception.frame_height) == (490, 490)
    assert any("MOAI" in line.text for line in r.perception.text_lines)  # the real OCR read the picture
    assert r.aux_text == pipe.verbalize(r.perception)
    assert r.aux_text.endswith("The image includes text descriptions: MOAI.")
    counts = r.token_counts
    assert counts["image"] == 1225 and counts["generated"] == len(r.new_token_ids)
    assert 1 <= counts["generated"] <= 8
    assert counts["aux"] == len(pipe.tokenizer.encode(r.aux_text))
    assert counts["context"] == counts["prompt"] + 1225
    assert {"expert.mask2former", "expert.owlv2", "expert.psgtr", "expert.rapidocr"} | STAGES <= set(r.timings)
    assert all(t >= 0 for t in r.timings.values())
    assert r.timings["total"] >= r.timings["prefill"] + r.timings["decode"]
    assert r.timings["load"] > 0  # this call loaded the model (kept out of "total")
    assert r.model_id == str(pipe.model_id) and r.seed is None
    assert r.generation["max_new_tokens"] == 8 and r.generation["do_sample"] is False
    assert r.text == pipe.answer_text(r.new_token_ids)
    back = MoAIResult.from_json(r.to_json())
    assert back.text == r.text and back.new_token_ids == r.new_token_ids and back.aux_text == r.aux_text


def test_the_answer_is_what_the_model_generates(pipe, first, image):
    """The facade's staged run gives the tokens of one plain processor + generate call."""
    proc = pipe.processor
    inputs = proc(image, first.prompt, first.aux_text, first.perception)
    out = pipe.model.generate(**inputs, max_new_tokens=8, return_dict=True)
    assert out.new_tokens[0] == first.new_token_ids


def test_precomputed_perception_skips_every_expert(pipe, first, image, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("an expert ran although a perception was given")

    for exp in pipe.experts.values():
        monkeypatch.setattr(exp, "predict", boom)
    r = pipe(image, first.prompt, perception=first.perception, max_new_tokens=8)
    assert r.new_token_ids == first.new_token_ids
    assert r.aux_text == first.aux_text
    assert not any(k.startswith("expert.") for k in r.timings) and "load" not in r.timings
    assert not any(k.startswith("expert.") for k in r.timings)


def test_batch_equals_single_calls_for_greedy(pipe, first, image):
    other = np.array(demo_image("HI", (300, 220)))  # numpy HWC input, another size and shorter prompt
    prompts = [first.prompt, "Colour?"]
    batch = pipe([image, other], prompts, max_new_tokens=8)
    assert isinstance(batch, list) and len(batch) == 2
    single = pipe(other, "Colour?", max_new_tokens=8)
    assert batch[0].new_token_ids == first.new_token_ids and batch[0].text == first.text
    assert batch[1].new_token_ids == single.new_token_ids and batch[1].text == single.text
    assert batch[1].aux_text == single.aux_text
    assert batch[0].token_counts["prompt"] > batch[1].token_counts["prompt"]  # rows were padded differently


def test_expert_outputs_are_cached_per_image(tiny_root):
    ocr = RecordingOCR()
    p = tiny_pipeline(tiny_root, experts=[ocr])
    img = demo_image("CACHE")
    a = p.perceive(img)
    b = p.perceive(img.copy())
    c = p.perceive([img, np.array(img)])
    assert ocr.calls == 1
    assert a.text_lines == b.text_lines == c[0].text_lines == c[1].text_lines
    assert p.cache.stats.hits == 3
    off = tiny_pipeline(tiny_root, experts=[RecordingOCR()], cache=False)
    off.perceive(img)
    off.perceive(img)
    assert off.experts["ocr"].calls == 2


def test_streaming_pieces_add_up_to_the_answer(pipe, first, image):
    before = pipe.cache.stats
    items = list(pipe.stream(image, first.prompt, max_new_tokens=8))
    after = pipe.cache.stats
    assert after.hits == before.hits + 4 and after.misses == before.misses  # a second question: experts cached
    *pieces, final = items
    assert isinstance(final, MoAIResult) and all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == final.text
    assert final.new_token_ids == first.new_token_ids


@contextlib.contextmanager
def counting_forwards(model, on_call=None):
    """Counts the language model's forward calls (the prefill, then one per decoding step)."""
    calls = []

    def hook(module, args):
        calls.append(threading.current_thread().name)
        if on_call is not None:
            on_call(len(calls))

    handle = model.register_forward_pre_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def test_on_token_sees_every_step_and_raising_stops_generation(pipe, image):
    opts = dict(experts=[])
    seen = []
    full = pipe(image, "Tell me more.", max_new_tokens=6, on_token=lambda ids: seen.append(ids.tolist()), **opts)
    assert seen == [[t] for t in full.new_token_ids] and len(seen) == 6  # one [B] tensor per step

    class Enough(Exception):
        pass

    def stop_at_third(ids):
        seen.append(int(ids[0]))
        if len(seen) == 3:
            raise Enough

    seen = []
    with counting_forwards(pipe.model) as calls, pytest.raises(Enough):
        pipe(image, "Tell me more.", max_new_tokens=64, on_token=stop_at_third, **opts)
    assert seen == full.new_token_ids[:3] and len(calls) == 3  # the prefill and two decoding steps, not 64
    with pytest.raises(GenerationError, match="beam search"):
        pipe(image, "Hi", num_beams=2, on_token=print, experts=[])


def test_stream_can_stop_early(pipe, image):
    opts = dict(experts=[], max_new_tokens=32)
    reference = pipe(image, "Tell me more.", **opts)
    assert len(reference.new_token_ids) == 32  # no EOS: left alone, the generation runs all 32 steps
    gen = pipe.stream(image, "Tell me more.", **opts)

    def hold_until_closing(n):
        # From the third forward on, the generation waits until the consumer starts closing the stream.
        while n >= 3 and inspect.getgeneratorstate(gen) == inspect.GEN_SUSPENDED:
            time.sleep(0.001)

    with counting_forwards(pipe.model, hold_until_closing) as calls:
        piece = next(gen)
        gen.close()
    assert isinstance(piece, str) and piece and reference.text.startswith(piece)
    assert 1 <= len(calls) < 32 and set(calls) == {"moai-stream"}  # generation stopped well before 32 tokens
    assert not any(t.name == "moai-stream" for t in threading.enumerate())  # and its thread has ended
    again = pipe(image, "Tell me more.", **opts)  # the pipeline still answers, unchanged
    assert again.new_token_ids == reference.new_token_ids and again.text == reference.text


def test_seed_makes_sampling_reproducible(pipe, image):
    opts = dict(do_sample=True, temperature=1.0, max_new_tokens=6, experts=[])
    a = pipe(image, "Say something.", seed=123, **opts)
    b = pipe(image, "Say something.", seed=123, **opts)
    c = pipe(image, "Say something.", seed=124, **opts)
    assert a.new_token_ids == b.new_token_ids and a.seed == b.seed == 123
    assert a.new_token_ids != c.new_token_ids
    drawn = pipe(image, "Say something.", **opts)
    assert isinstance(drawn.seed, int) and drawn.generation["seed"] == drawn.seed
    again = pipe(image, "Say something.", seed=drawn.seed, **opts)
    assert again.new_token_ids == drawn.new_token_ids


def test_no_experts_gives_the_empty_verbalization(tiny_root, image):
    p = tiny_pipeline(tiny_root, experts=None)
    r = p(image, "Hi", max_new_tokens=2, template="demo")
    assert r.perception is None and r.aux_text == EMPTY_VERBALIZATION
    assert not any(k.startswith("expert.") for k in r.timings)
    with pytest.raises(InputError, match="no perception"):
        r.plot()
    with pytest.raises(ConfigError, match="no experts"):
        p.perceive(image)


def test_answer_text_cuts_at_chat_marker_and_stop_strings(pipe):
    tok = pipe.tokenizer
    marker = tok.convert_tokens_to_ids("[UNUSED_TOKEN_145]")
    ids = tok.encode("red and blue", add_bos=False) + [marker] + tok.encode("tail", add_bos=False)
    assert pipe.answer_text(ids) == "red and blue"
    assert pipe.answer_text(ids, stop=[" and"]) == "red"
    assert pipe.answer_text(tok.encode("a [UK] b", add_bos=False)) == "a "  # the official cut at "[U"
    assert ANSWER_CUT == "[U"


def test_perception_picture(first, tmp_path):
    picture = first.plot()
    assert isinstance(picture, Image.Image) and picture.size == (490, 490)
    out = first.save(tmp_path / "p.png")
    assert Image.open(out).size == (490, 490)
    data = json.loads(first.to_json())
    assert data["perception"]["text_lines"][0]["text"]


def test_on_expert_error_warn_keeps_the_other_parts(tiny_root, image):
    good, bad = RecordingOCR(), RecordingOCR(fail=True)
    p = tiny_pipeline(tiny_root, experts=[bad], on_expert_error="warn")
    res = p.perceive(image)
    assert any("ocr backend down" in w for w in res.warnings) and res.text_lines == []
    strict = tiny_pipeline(tiny_root, experts=[RecordingOCR(fail=True)])
    with pytest.raises(ExpertError, match="test-recording-ocr.*ocr backend down"):
        strict.perceive(image)
    assert tiny_pipeline(tiny_root, experts=[good]).perceive(image).text_lines[0].text == "HELLO"


def test_bad_input_raises_typed_errors(pipe, image):
    with pytest.raises(InputError, match="unsupported image type"):
        pipe(12345, "Hi", max_new_tokens=1)
    with pytest.raises(InputError, match="image file not found"):
        pipe("/no/such/image.png", "Hi", max_new_tokens=1)
    with pytest.raises(InputError, match="2 images and 3 prompts"):
        pipe([image, image], ["a", "b", "c"], max_new_tokens=1)
    with pytest.raises(GenerationError, match="temperature"):
        pipe(image, "Hi", do_sample=True, temperature=-1.0)
    with pytest.raises(ConfigError, match="not configured"):
        pipe(image, "Hi", experts=["paddleocr"], max_new_tokens=1)
    with pytest.raises(ConfigError, match="unknown prompt template"):
        pipe(image, "Hi", template="nope", experts=[], max_new_tokens=1)
    with pytest.raises(InputError, match="precomputed perceptions"):
        pipe([image, image], "Hi", perception=[None, None, None], max_new_tokens=1)
    with pytest.raises(GenerationError, match="beam search"):
        next(pipe.stream(image, "Hi", num_beams=3))
    with pytest.raises(InputError, match="one prompt about one image"):
        next(pipe.stream([image, image], "Hi"))


def test_expert_specifications(tmp_path):
    assert resolve_experts(None) == {} and resolve_experts([]) == {}
    got = resolve_experts(["rapidocr", {"name": "owlv2", "threshold": 0.2}], device="cpu")
    assert list(got) == ["detection", "ocr"] and got["detection"].settings["threshold"] == 0.2
    by_task = resolve_experts({"ocr": {"backend": "rapidocr", "text_score": 0.7}, "detection": None})
    assert list(by_task) == ["ocr"] and by_task["ocr"].settings["text_score"] == 0.7
    by_name = resolve_experts({"owlv2": {"model_id": "my/owl", "revision": "abc"}})
    assert by_name["detection"].model_id == "my/owl" and by_name["detection"].revision == "abc"
    with pytest.raises(ConfigError, match="two experts"):
        resolve_experts(["rapidocr", "paddleocr"])
    tasks = resolve_experts(["ocr", {"name": "detection", "threshold": 0.3}, "scene_graph", "segmentation"])
    assert {t: e.name for t, e in tasks.items()} == DEFAULT_EXPERTS  # a task name means its default expert
    assert tasks["detection"].settings["threshold"] == 0.3
    assert resolve_experts({"ocr": "ocr"})["ocr"].name == "rapidocr"
    with pytest.raises(ConfigError, match="unknown expert"):
        resolve_experts(["no-such-expert"])
    with pytest.raises(ConfigError, match="an expert for 'ocr'"):
        resolve_experts({"detection": "rapidocr"})
    with pytest.raises(ConfigError, match="needs 'name'"):
        resolve_experts({"ocr": {"text_score": 0.5}})
    with pytest.raises(ConfigError):
        MoAIPipeline.from_pretrained(tmp_path, quantization="fp3", experts=None)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            MoAIPipeline.from_pretrained(tmp_path, device="cuda", experts=None)
