"""One pipeline shared by several threads answers as it does serially, and many calls on different images keep the
process's memory bounded (the expert cache is capped)."""

from __future__ import annotations

import gc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest

from moai_sdk.testing import demo_image, tiny_pipeline


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("moai-concurrency"))


def _requests(n: int) -> list[tuple[object, str]]:
    words = ["MOAI", "CAT", "42", "SIGN"]
    return [(demo_image(words[i % len(words)]), f"Question {i}: what is written?") for i in range(n)]


def test_concurrent_calls_equal_serial_calls(pipe):
    requests = _requests(8)  # 4 images (the experts run once per image, then the cache answers), 8 prompts
    serial = [pipe(image, prompt, max_new_tokens=4).new_token_ids for image, prompt in requests]
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(pipe, image, prompt, max_new_tokens=4) for image, prompt in requests * 2]
        concurrent = [f.result().new_token_ids for f in futures]
    assert concurrent == serial * 2


@pytest.mark.slow  # 48 pipeline calls
def test_many_calls_on_different_images_keep_memory_bounded(pipe):
    process = psutil.Process()
    rng = np.random.default_rng(0)

    def call(i: int) -> None:
        image = rng.integers(0, 256, (48 + i % 7, 64, 3), dtype=np.uint8)
        # the tiny segmentation and detection experts run on every new image and fill the (capped) expert cache
        pipe(image, "What is in the image?", max_new_tokens=1, experts=["segmentation", "detection"])

    for i in range(8):  # warm-up: lazy loading, allocator pools, the first cache entries
        call(i)
    gc.collect()
    before = process.memory_info().rss
    for i in range(8, 48):
        call(i)
    gc.collect()
    growth_mb = (process.memory_info().rss - before) / 2**20
    # a leak of one 490x490 frame (0.7 MB), one set of expert outputs or one KV cache per call would show as
    # tens of MB over 40 calls
    assert growth_mb < 40, f"RSS grew by {growth_mb:.0f} MB over 40 calls"
