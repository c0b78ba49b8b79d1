"""The expert-output LRU cache (keys = image content x expert configuration, LRU order, counters) and the runner's
cached prediction (only misses run the expert, duplicates run once)."""

from __future__ import annotations

import pytest
import torch

from moai_sdk import ConfigError, ExpertError, InputError
from moai_sdk.cache import ExpertCache, image_digest
from moai_sdk.experts.base import Expert, predict_cached
from moai_sdk.results import Box, Detection, PerceptionResult


class CountingDetector(Expert):
    """Reports one detection whose score is the frame's mean intensity; counts the frames it sees."""

    name = "test-counting-detector"
    task = "detection"
    default_settings = {"scale": 1.0, "fail": False}

    def _load(self) -> None:
        self.model = "loaded"
        self.frames_seen = 0
        self.calls = 0

    def _predict(self, images: list[torch.Tensor]) -> list[PerceptionResult]:
        if self.settings["fail"]:
            raise RuntimeError("backend exploded")
        self.calls += 1
        self.frames_seen += len(images)
        out = []
        for img in images:
            score = float(img.float().mean()) / 255 * float(self.settings["scale"])
            det = Detection(label="thing", score=score, box=Box(x0=0, y0=0, x1=4, y1=4, frame_width=8, frame_height=8))
            out.append(self.make_result(img, detections=[det]))
        return out


def frame(value: int) -> torch.Tensor:
    return torch.full((3, 8, 8), value, dtype=torch.uint8)


def test_digest_depends_on_content_shape_and_dtype():
    a = frame(10)
    assert image_digest(a) == image_digest(a.clone())
    b = a.clone()
    b[0, 0, 0] = 11
    assert image_digest(b) != image_digest(a)
    assert image_digest(a.reshape(3, 4, 16)) != image_digest(a)
    assert image_digest(a.to(torch.int16)) != image_digest(a)
    with pytest.raises(InputError):
        image_digest([1, 2, 3])


def test_second_lookup_of_same_image_does_not_run_the_expert():
    cache = ExpertCache(8)
    exp = CountingDetector()
    first = predict_cached(exp, [frame(10), frame(20)], cache)
    assert exp.frames_seen == 2
    again = predict_cached(exp, [frame(20), frame(10)], cache)  # same contents, other order, new tensors
    assert exp.frames_seen == 2 and exp.calls == 1
    assert again[0] is first[1] and again[1] is first[0]
    assert cache.stats.hits == 2 and cache.stats.misses == 2 and len(cache) == 2
    assert cache.stats.hit_rate == pytest.approx(0.5)


def test_only_misses_are_computed_in_one_batch():
    cache = ExpertCache(8)
    exp = CountingDetector()
    predict_cached(exp, [frame(1)], cache)
    out = predict_cached(exp, [frame(1), frame(2), frame(3)], cache)
    assert exp.calls == 2 and exp.frames_seen == 3
    assert [round(r.detections[0].score * 255) for r in out] == [1, 2, 3]


def test_identical_frames_in_one_call_run_once_even_when_cache_is_off():
    cache = ExpertCache(0)
    exp = CountingDetector()
    out = predict_cached(exp, [frame(5), frame(5), frame(6)], cache)
    assert exp.frames_seen == 2
    assert out[0] is out[1]
    predict_cached(exp, [frame(5)], cache)
    assert exp.frames_seen == 3  # nothing was kept
    assert len(cache) == 0 and not cache.enabled


def test_settings_model_id_and_revision_are_part_of_the_key():
    cache = ExpertCache(8)
    base, scaled = CountingDetector(), CountingDetector(scale=2.0)
    other_model, other_rev = CountingDetector(model_id="a/b"), CountingDetector(revision="v2")
    r1 = predict_cached(base, [frame(100)], cache)[0]
    r2 = predict_cached(scaled, [frame(100)], cache)[0]
    predict_cached(other_model, [frame(100)], cache)
    predict_cached(other_rev, [frame(100)], cache)
    assert scaled.frames_seen == other_model.frames_seen == other_rev.frames_seen == 1
    assert r2.detections[0].score == pytest.approx(2 * r1.detections[0].score)
    assert len(cache) == 4
    # an equal configuration shares the entry
    twin = CountingDetector()
    assert predict_cached(twin, [frame(100)], cache)[0] is r1
    assert not twin.is_loaded  # a full hit never loads the model


def test_lru_evicts_least_recently_used():
    cache = ExpertCache(2)
    exp = CountingDetector()
    predict_cached(exp, [frame(1)], cache)
    predict_cached(exp, [frame(2)], cache)
    predict_cached(exp, [frame(1)], cache)  # touch 1: now 2 is the oldest
    predict_cached(exp, [frame(3)], cache)  # evicts 2
    assert cache.stats.evictions == 1 and len(cache) == 2
    seen = exp.frames_seen
    predict_cached(exp, [frame(1)], cache)
    assert exp.frames_seen == seen
    predict_cached(exp, [frame(2)], cache)
    assert exp.frames_seen == seen + 1


def test_failures_propagate_and_store_nothing():
    cache = ExpertCache(4)
    exp = CountingDetector(fail=True)
    with pytest.raises(ExpertError, match="backend exploded"):
        predict_cached(exp, [frame(1)], cache)
    assert len(cache) == 0


def test_put_get_clear_and_validation():
    cache = ExpertCache(3)
    exp = CountingDetector()
    res = predict_cached(exp, [frame(9)], cache)[0]
    key = ExpertCache.make_key(exp, image_digest(frame(9)))
    assert key in cache and cache.get(key) is res
    cache.clear()
    assert len(cache) == 0 and cache.get(key) is None
    with pytest.raises(InputError):
        cache.put(key, "not a result")
    with pytest.raises(InputError, match="digests"):
        predict_cached(exp, [frame(1)], cache, digests=["a", "b"])
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ConfigError):
            ExpertCache(bad)
    assert "hits=" in repr(cache)
    assert predict_cached(exp, [], cache) == []


def test_cache_is_a_plain_lru_that_imports_no_experts():
    """The cache stores results under any (expert key, digest); it neither runs nor imports experts."""
    import ast
    import inspect

    import moai_sdk.cache as cache_module

    tree = ast.parse(inspect.getsource(cache_module))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not any("experts" in name for name in imported), imported
    cache = ExpertCache(2)
    exp = CountingDetector()
    result = exp.make_result(frame(3), detections=[])
    key = ExpertCache.make_key(exp.cache_key(), "digest-3")
    assert key == ExpertCache.make_key(exp, "digest-3")
    cache.put(key, result)
    assert cache.get(key) is result and not exp.is_loaded
