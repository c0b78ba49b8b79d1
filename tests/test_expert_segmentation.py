"""The Mask2Former panoptic expert on a tiny random checkpoint built locally.

Everything runs through the real path (image processor -> model -> transformers' panoptic post-processing ->
typed results); where exact values are needed, the model's logits are replaced by crafted ones *after* the
real forward, so the post-processing has a known answer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_frames as frames
from moai_sdk.errors import CheckpointError, ConfigError, ExpertError, InputError
from moai_sdk.experts import Perception, available_experts, create_expert
from moai_sdk.experts.segmentation import Mask2FormerExpert, segments_from_id_map
from moai_sdk.results import load_vocab
from moai_sdk.testing import TINY_IMAGE_SIZE, build_tiny_mask2former

COCO = load_vocab("COCO_PANOPTIC_CLASSES")
PERSON, SKY, DOG, CAR = 0, COCO.index("sky-other-merged"), COCO.index("dog"), COCO.index("car")
NO_OBJECT = len(COCO)  # Mask2Former's extra "no object" class
L = 20.0  # a logit far from the decision boundary


@pytest.fixture(scope="module")
def tiny_m2f(tmp_path_factory):
    return str(build_tiny_mask2former(tmp_path_factory.mktemp("m2f")))


def crafted_logits(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Class logits [Q, 134] and mask logits [Q, 384, 384] for one image.

    ``"quadrants"``: person top-left, sky top-right, another person bottom-left; the bottom-right quadrant is
    won by a confident dog query whose mask probability is only 0.5 (below the 0.95 mask threshold), so it
    stays unlabelled; a "no object" query and a low-score car query are dropped. ``"empty"``: no object.
    """
    q = 6
    cls = torch.zeros(q, NO_OBJECT + 1)
    masks = torch.full((q, 384, 384), -L)
    if kind == "empty":
        cls[:, NO_OBJECT] = L
        return cls, masks
    top, bottom, left, right = slice(0, 192), slice(192, 384), slice(0, 192), slice(192, 384)
    cls[0, PERSON] = L
    masks[0, top, left] = L
    cls[1, SKY] = L
    masks[1, top, right] = L
    cls[2, PERSON] = L
    masks[2, bottom, left] = L
    cls[3, DOG] = L
    masks[3, bottom, right] = 0.0
    cls[4, NO_OBJECT] = L
    masks[4] = L
    cls[5, CAR] = 0.0  # uniform over 134 classes: score 1/134 < 0.5
    masks[5] = L
    return cls, masks


def patch_outputs(monkeypatch, expert, kinds: list[str], seen_shapes: list):
    """Run the real forward, then swap in the crafted logits (one kind per image of the batch)."""
    real_forward = expert.model.forward

    def forward(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        seen_shapes.append(tuple(kwargs["pixel_values"].shape))
        pairs = [crafted_logits(k) for k in kinds[: kwargs["pixel_values"].shape[0]]]
        out.class_queries_logits = torch.stack([p[0] for p in pairs])
        out.masks_queries_logits = torch.stack([p[1] for p in pairs])
        return out

    monkeypatch.setattr(expert.model, "forward", forward)


def test_registered_and_lazy(tiny_m2f):
    assert "mask2former" in available_experts()["segmentation"]
    exp = create_expert("mask2former", model_id=tiny_m2f, device="cpu")
    assert isinstance(exp, Mask2FormerExpert)
    assert not exp.is_loaded
    res = exp.predict(frames(1))
    assert exp.is_loaded and len(res) == 1
    exp.unload()
    assert not exp.is_loaded and exp.model is None and exp.processor is None


def test_random_model_end_to_end_shapes(tiny_m2f):
    # a permissive configuration so the random model yields segments, batched over 3 images (batch_size 2)
    exp = create_expert(
        "mask2former",
        model_id=tiny_m2f,
        device="cpu",
        threshold=0.0,
        mask_threshold=0.0,
        overlap_mask_area_threshold=0.0,
        batch_size=2,
    )
    results = exp.predict(frames(3))
    assert len(results) == 3
    for res in results:
        ids = res.panoptic_ids
        assert ids.dtype == np.int32 and ids.shape == (490, 490)
        assert res.sources == {"segmentation": "mask2former"} and res.timings["mask2former"] > 0
        assert res.segments, "a permissive threshold must give segments"
        assert sorted(s.id for s in res.segments) == sorted(set(np.unique(ids).tolist()) - {0, -1})
        for seg in res.segments:
            mask = ids == seg.id
            assert np.array_equal(seg.mask, mask) and seg.area == int(mask.sum())
            rows, cols = np.nonzero(mask)
            assert seg.box.xyxy == (cols.min(), rows.min(), cols.max() + 1.0, rows.max() + 1.0)
            assert seg.label == COCO[seg.category_id] and seg.isthing == (seg.category_id < 80)
            assert seg.score is not None and 0.0 <= seg.score <= 1.0


def test_official_settings_default(tiny_m2f):
    exp = create_expert("mask2former", model_id=tiny_m2f)
    assert exp.settings["threshold"] == 0.5
    assert exp.settings["mask_threshold"] == 0.95
    assert exp.settings["label_ids_to_fuse"] == ()
    assert exp.settings["image_backend"] == "pil"
    assert Mask2FormerExpert.default_model_id == "facebook/mask2former-swin-base-coco-panoptic"


def test_crafted_segmentation_ids_boxes_and_colour_map(tiny_m2f, monkeypatch):
    exp = create_expert("mask2former", model_id=tiny_m2f, device="cpu").load()
    shapes: list = []
    patch_outputs(monkeypatch, exp, ["quadrants", "empty"], shapes)
    res, empty = exp.predict(frames(2))
    # the processor resized 490 -> the tiny checkpoint's 64 (shortest edge), both images in one batch
    assert shapes == [(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)]

    # Hand computation: the 384-grid masks switch at index 192; resizing 384 -> 490 (bilinear, half-pixel
    # centres) maps output pixel 244 to source 191.108 (89% on the first half) and pixel 245 to 191.892
    # (89% on the second half), so each quadrant covers exactly 245 x 245 pixels.
    ids = res.panoptic_ids
    assert ids.dtype == np.int32
    assert (ids[:245, :245] == 1).all() and (ids[:245, 245:] == 2).all()
    assert (ids[245:, :245] == 3).all() and (ids[245:, 245:] == 0).all()

    got = [(s.id, s.label, s.category_id, s.isthing, s.area, s.box.xyxy) for s in res.segments]
    assert got == [
        (1, "person", 0, True, 245 * 245, (0.0, 0.0, 245.0, 245.0)),
        (2, "sky-other-merged", SKY, False, 245 * 245, (245.0, 0.0, 490.0, 245.0)),
        (3, "person", 0, True, 245 * 245, (0.0, 245.0, 245.0, 490.0)),
    ]
    assert all(s.score == 1.0 for s in res.segments)  # softmax(20 vs 133 x 0) rounded to 6 decimals
    assert res.segments[1].clean_label == "sky"

    cmap = res.panoptic_color_map()
    assert cmap.dtype == np.float64 and cmap.shape == (490, 490, 3)
    # Pascal-VOC colours of segment ids 1, 2, 3 are (128,0,0), (0,128,0), (128,128,0); id 0 is black
    np.testing.assert_array_equal(cmap[10, 10], np.array([128, 0, 0]) / 255)
    np.testing.assert_array_equal(cmap[10, 480], np.array([0, 128, 0]) / 255)
    np.testing.assert_array_equal(cmap[480, 10], np.array([128, 128, 0]) / 255)
    np.testing.assert_array_equal(cmap[480, 480], [0.0, 0.0, 0.0])
    assert (cmap[:245, :245] == cmap[0, 0]).all() and (cmap[245:, 245:] == 0).all()

    # nothing found: -1 everywhere, no segments, a black colour map
    assert empty.segments == []
    assert (empty.panoptic_ids == -1).all() and empty.panoptic_ids.dtype == np.int32
    assert (empty.panoptic_color_map() == 0).all()


def test_label_fusion_setting_reaches_post_processing(tiny_m2f, monkeypatch):
    exp = create_expert("mask2former", model_id=tiny_m2f, device="cpu", label_ids_to_fuse=[PERSON]).load()
    patch_outputs(monkeypatch, exp, ["quadrants"], [])
    (res,) = exp.predict(frames(1))
    # both person queries share segment 1 now; sky becomes 2
    assert (res.panoptic_ids[:, :245] == 1).all() and (res.panoptic_ids[:245, 245:] == 2).all()
    got = [(s.id, s.label, s.area, s.box.xyxy) for s in res.segments]
    assert got == [
        (1, "person", 2 * 245 * 245, (0.0, 0.0, 245.0, 490.0)),
        (2, "sky-other-merged", 245 * 245, (245.0, 0.0, 490.0, 245.0)),
    ]


def test_masks_optional_and_json(tiny_m2f, monkeypatch):
    exp = create_expert("mask2former", model_id=tiny_m2f, device="cpu", keep_masks=False).load()
    patch_outputs(monkeypatch, exp, ["quadrants"], [])
    (res,) = exp.predict(frames(1))
    assert all(s.mask is None for s in res.segments)
    assert res.panoptic_ids is not None  # the map is enough to rebuild masks and colours
    text = res.to_json(include_masks=True)
    back = type(res).from_json(text)
    assert np.array_equal(back.panoptic_ids, res.panoptic_ids)
    assert [s.box for s in back.segments] == [s.box for s in res.segments]


def test_runner_resizes_any_image(tiny_m2f):
    exp = create_expert("mask2former", model_id=tiny_m2f, device="cpu")
    img = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    (res,) = Perception([exp])(img)
    assert (res.image_width, res.image_height) == (400, 300)
    assert (res.frame_width, res.frame_height) == (490, 490) and res.panoptic_ids.shape == (490, 490)


def test_cache_key_names_model_revision_and_settings(tiny_m2f):
    a = create_expert("mask2former", model_id=tiny_m2f, revision="abc123")
    b = create_expert("mask2former", model_id=tiny_m2f, revision="abc123", mask_threshold=0.5)
    key = a.cache_key()
    assert tiny_m2f in key and "abc123" in key and '"mask_threshold": 0.95' in key
    assert a.cache_key() != b.cache_key()


def test_bad_settings_and_inputs(tiny_m2f):
    with pytest.raises(ConfigError, match="no setting"):
        create_expert("mask2former", model_id=tiny_m2f, treshold=0.3)
    with pytest.raises(ConfigError, match="threshold"):
        create_expert("mask2former", model_id=tiny_m2f, threshold=1.5)
    with pytest.raises(ConfigError, match="image_backend"):
        create_expert("mask2former", model_id=tiny_m2f, image_backend="opencv")
    with pytest.raises(ConfigError, match="label_ids_to_fuse"):
        create_expert("mask2former", model_id=tiny_m2f, label_ids_to_fuse="sky")
    exp = create_expert("mask2former", model_id=tiny_m2f, device="cpu")
    with pytest.raises(InputError, match="uint8"):
        exp.predict([torch.zeros(3, 490, 490)])


def test_missing_checkpoint_is_a_checkpoint_error(tmp_path):
    exp = create_expert("mask2former", model_id=str(tmp_path / "nowhere"), local_files_only=True, device="cpu")
    with pytest.raises(CheckpointError, match="nowhere"):
        exp.predict(frames(1))


def test_backend_failure_is_wrapped(tiny_m2f, monkeypatch):
    exp = create_expert("mask2former", model_id=tiny_m2f, device="cpu").load()

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(exp.model, "forward", broken)
    with pytest.raises(ExpertError, match="mask2former.*out of memory"):
        exp.predict(frames(1))


def test_segments_from_id_map_rejects_unknown_labels():
    ids = np.zeros((4, 4), np.int32)
    ids[:2] = 1
    (seg,) = segments_from_id_map(ids, [{"id": 1, "label_id": 5, "score": 0.9}, {"id": 1, "label_id": 5}])
    assert (seg.area, seg.box.xyxy, seg.label) == (8, (0.0, 0.0, 4.0, 2.0), COCO[5])
    with pytest.raises(ValueError, match="label_id 200"):
        segments_from_id_map(ids, [{"id": 1, "label_id": 200}])
