"""The OWLv2 open-vocabulary expert on a tiny random checkpoint built locally.

The expert encodes the 1847 official queries once and reuses the embeddings for every image; these tests
prove that gives the numbers of the official per-image full forward, and that the text tower runs once.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_frames as frames
from moai_sdk.errors import ConfigError, ExpertError
from moai_sdk.experts import available_experts, create_expert
from moai_sdk.experts.detection import Owlv2Expert, detections_result, official_queries
from moai_sdk.testing import build_tiny_owlv2


@pytest.fixture(scope="module")
def tiny_owl(tmp_path_factory):
    return str(build_tiny_owlv2(tmp_path_factory.mktemp("owlv2")))


def count_text_calls(monkeypatch, expert) -> list[int]:
    """Wrap the text tower's forward; returns a list whose length is the number of calls."""
    calls: list[int] = []
    tower = expert.model.owlv2.text_model
    real = tower.forward

    def forward(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tower, "forward", forward)
    return calls


def test_official_query_list():
    q = official_queries()
    assert len(q) == 1847
    assert q[0] == "wall" and q[847] == "tench" and q[-1] == "toilet paper"
    assert len(set(q)) < len(q)  # ADE20K_847 repeats some names; indices, not names, identify a query


def test_defaults_are_the_official_call(tiny_owl):
    assert "owlv2" in available_experts()["detection"]
    exp = create_expert("owlv2", model_id=tiny_owl)
    assert isinstance(exp, Owlv2Expert) and not exp.is_loaded
    assert exp.settings["threshold"] == 0.1 and exp.settings["reencode_queries"] is False
    assert exp.queries == official_queries()
    assert Owlv2Expert.default_model_id == "google/owlv2-base-patch16-ensemble"


def test_cached_queries_equal_the_full_forward(tiny_owl):
    imgs = frames(3)
    cached = create_expert("owlv2", model_id=tiny_owl, device="cpu", batch_size=2)
    full = create_expert("owlv2", model_id=tiny_owl, device="cpu", reencode_queries=True)
    a, b = cached.raw_outputs(imgs), full.raw_outputs(imgs)
    assert a.logits.shape == (3, 16, 1847) and a.logits.dtype == torch.float32
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.pred_boxes, b.pred_boxes, rtol=0, atol=1e-6)

    ra, rb = cached.predict(imgs), full.predict(imgs)
    for x, y in zip(ra, rb):
        assert [d.label_index for d in x.detections] == [d.label_index for d in y.detections]
        np.testing.assert_allclose([d.score for d in x.detections], [d.score for d in y.detections], atol=1e-6)
        np.testing.assert_allclose([d.box.xyxy for d in x.detections], [d.box.xyxy for d in y.detections], atol=1e-4)


def test_text_tower_runs_once_for_all_images(tiny_owl, monkeypatch):
    exp = create_expert("owlv2", model_id=tiny_owl, device="cpu", batch_size=2).load()
    calls = count_text_calls(monkeypatch, exp)
    exp.predict(frames(3))
    assert len(calls) == 1 and exp.text_encodings == 1
    exp.predict(frames(2, seed=1))
    assert len(calls) == 1

    official = create_expert("owlv2", model_id=tiny_owl, device="cpu", reencode_queries=True).load()
    official_calls = count_text_calls(monkeypatch, official)
    official.predict(frames(3))
    assert len(official_calls) == 3  # the official behaviour: the 1847 queries again for every image


def test_detections_match_the_raw_outputs(tiny_owl):
    imgs = frames(2, seed=3)
    exp = create_expert("owlv2", model_id=tiny_owl, device="cpu")
    results = exp.predict(imgs)
    raw = exp.raw_outputs(imgs)
    for res, logits, boxes in zip(results, raw.logits, raw.pred_boxes):
        best, labels = logits.max(-1)
        scores = torch.sigmoid(best)
        keep = torch.nonzero(scores > 0.1).flatten().tolist()  # patch order, nothing sorted or dropped
        assert [d.label_index for d in res.detections] == [int(labels[i]) for i in keep]
        assert [d.label for d in res.detections] == [official_queries()[int(labels[i])] for i in keep]
        assert [d.score for d in res.detections] == [float(scores[i]) for i in keep]  # float32 values
        cx, cy, w, h = boxes[keep].unbind(-1)
        xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * 490  # not clipped
        np.testing.assert_allclose([d.box.xyxy for d in res.detections], xyxy.numpy(), rtol=0, atol=1e-3)
        assert all(d.box.frame_width == 490 and d.box.frame_height == 490 for d in res.detections)
        assert res.sources == {"detection": "owlv2"}


def test_threshold_zero_keeps_every_patch(tiny_owl):
    exp = create_expert("owlv2", model_id=tiny_owl, device="cpu", threshold=0.0)
    (res,) = exp.predict(frames(1))
    assert len(res.detections) == 16  # one per patch of the 4 x 4 tiny grid


def test_custom_queries_and_cache_key(tiny_owl):
    exp = create_expert("owlv2", model_id=tiny_owl, device="cpu", queries=["cat", "dog", "remote"], threshold=0.0)
    (res,) = exp.predict(frames(1))
    assert {d.label for d in res.detections} <= {"cat", "dog", "remote"}
    key = exp.cache_key()
    assert "3 queries sha256:" in key and tiny_owl in key and "remote" not in key
    other = create_expert("owlv2", model_id=tiny_owl, queries=["cat", "dog", "mouse"])
    assert other.cache_key() != key
    assert create_expert("owlv2", model_id=tiny_owl).cache_key() != key


def test_chunked_text_encoding_matches(tiny_owl):
    whole = create_expert("owlv2", model_id=tiny_owl, device="cpu")
    chunked = create_expert("owlv2", model_id=tiny_owl, device="cpu", text_batch_size=500)
    ea, ma = whole.encode_queries()
    eb, _ = chunked.encode_queries()
    assert ea.shape == (1, 1847, 32) and ma.all()
    torch.testing.assert_close(ea, eb, rtol=0, atol=1e-6)


def test_bad_settings(tiny_owl):
    with pytest.raises(ConfigError, match="queries"):
        create_expert("owlv2", model_id=tiny_owl, queries="cat")
    with pytest.raises(ConfigError, match="queries"):
        create_expert("owlv2", model_id=tiny_owl, queries=["cat", ""])
    with pytest.raises(ConfigError, match="threshold"):
        create_expert("owlv2", model_id=tiny_owl, threshold=-0.1)
    with pytest.raises(ConfigError, match="text_batch_size"):
        create_expert("owlv2", model_id=tiny_owl, text_batch_size=0)


def test_detections_result_rejects_bad_labels():
    frame = torch.zeros(3, 10, 20, dtype=torch.uint8)
    res = detections_result(frame, [[-5.0, 1.0, 30.0, 9.5]], [0.25], [1], ["a", "b"])
    (det,) = res.detections
    assert det.box.xyxy == (-5.0, 1.0, 30.0, 9.5) and (det.box.frame_width, det.box.frame_height) == (20, 10)
    assert (det.label, det.label_index, det.score) == ("b", 1, 0.25)
    with pytest.raises(ValueError, match="label index 2"):
        detections_result(frame, [[0, 0, 1, 1]], [0.5], [2], ["a", "b"])


def test_backend_failure_is_wrapped(tiny_owl, monkeypatch):
    exp = create_expert("owlv2", model_id=tiny_owl, device="cpu").load()

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(exp.model, "image_embedder", broken)
    with pytest.raises(ExpertError, match="owlv2.*boom"):
        exp.predict(frames(1))
