"""Pictures: pixels where boxes, overlays, arrows and OCR polygons must be."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from moai_sdk.errors import InputError
from moai_sdk.results import Box, Detection, PerceptionResult, Relation, Segment, TextLine, pascal_colormap
from moai_sdk.viz import BACKGROUND_GREY, LAYERS, blend_segments, label_colour, plot_perception

GREY = np.array(BACKGROUND_GREY, dtype=np.uint8)


def _px(img: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.asarray(img)[y, x])


def _seg_result(**extra) -> PerceptionResult:
    ids = np.zeros((490, 490), dtype=np.int32)
    ids[300:480, 20:220] = 1  # Pascal colour 1 = (128, 0, 0)
    ids[300:480, 250:450] = 2  # colour 2 = (0, 128, 0)
    segs = [
        Segment.from_mask(ids == 1, id=1, label="person", category_id=0),
        Segment.from_mask(ids == 2, id=2, label="grass-merged", category_id=125),
    ]
    return PerceptionResult(image_width=490, image_height=490, segments=segs, panoptic_ids=ids, **extra)


def test_detection_box_outline_is_drawn_where_the_detection_is():
    det = Detection(label="car", label_index=14, score=0.87, box=Box.from_xyxy([100, 120, 300, 320]))
    img = plot_perception(PerceptionResult(image_width=490, image_height=490, detections=[det]))
    colour = label_colour("car", 14)
    assert img.size == (490, 490) and img.mode == "RGB"
    assert _px(img, 100, 220) == colour  # left edge
    assert _px(img, 300, 220) == colour  # right edge
    assert _px(img, 200, 320) == colour  # bottom edge
    assert _px(img, 200, 220) == tuple(GREY)  # inside untouched
    assert _px(img, 50, 220) == tuple(GREY)  # outside untouched
    # a detector box reaching outside the frame, and an inverted one, still draw
    odd = [
        Detection(label="sky", score=0.5, box=Box.from_xyxy([-3, -0.5, 500, 491])),
        Detection(label="x", score=0.5, box=Box.from_xyxy([50, 60, 40, 30])),
    ]
    plot_perception(PerceptionResult(image_width=490, image_height=490, detections=odd))


def test_overlay_colour_inside_a_segment_is_the_exact_blend():
    r = _seg_result()
    img = plot_perception(r, show=("segments",), alpha=0.5)
    # grey 128 blended with (128, 0, 0) at 0.5: rint(64 + 64), rint(64 + 0), rint(64 + 0)
    assert _px(img, 25, 305) == (128, 64, 64)
    assert _px(img, 255, 305) == (64, 128, 64)
    assert _px(img, 240, 305) == tuple(GREY)  # unlabelled pixels are not darkened
    assert _px(img, 25, 100) == tuple(GREY)
    img = plot_perception(r, show=("segments",), alpha=0.3)
    # rint(0.7 * 128 + 0.3 * 128) = 128 and rint(0.7 * 128) = rint(89.6) = 90
    assert _px(img, 25, 305) == (128, 90, 90)


def test_blend_formula_on_a_real_image():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (490, 490, 3), dtype=np.uint8)
    r = _seg_result(frame_image=frame)
    out = blend_segments(frame, r, 0.5)
    colour = pascal_colormap()[1] * 255
    expected = np.rint(0.5 * frame[300:480, 20:220].astype(np.float64) + 0.5 * colour).astype(np.uint8)
    assert np.array_equal(out[300:480, 20:220], expected)
    assert np.array_equal(out[:300], frame[:300])
    # plot() uses the kept frame when no image is passed
    pic = r.plot(show=("segments",))
    assert _px(pic, 21, 301) == tuple(int(v) for v in expected[1, 1])
    assert _px(pic, 5, 5) == tuple(int(v) for v in frame[5, 5])


def test_layers_can_be_switched_off():
    det = Detection(label="car", label_index=14, score=0.87, box=Box.from_xyxy([100, 120, 300, 320]))
    r = _seg_result(detections=[det])
    only_det = plot_perception(r, show=("detections",))
    assert _px(only_det, 25, 305) == tuple(GREY)
    assert _px(only_det, 100, 220) == label_colour("car", 14)
    nothing = plot_perception(r, show=())
    assert (np.asarray(nothing) == GREY).all()
    assert set(LAYERS) == {"segments", "detections", "relations", "text"}


def test_relation_arrow_between_box_centres():
    objs = [
        Segment(id=1, label="person", category_id=0, box=Box.from_xyxy([0, 0, 100, 100]), area=10000),
        Segment(id=2, label="horse", category_id=17, box=Box.from_xyxy([300, 0, 400, 100]), area=10000),
    ]
    rel = Relation(
        subject_index=0,
        object_index=1,
        subject_label="person",
        object_label="horse",
        predicate="riding",
        predicate_index=40,
        score=0.95,
    )
    r = PerceptionResult(image_width=490, image_height=490, scene_graph_objects=objs, relations=[rel])
    img = plot_perception(r, show=("relations",), font_size=10)
    arr = np.asarray(img)
    # the arrow runs along y = 50 from x = 50 to x = 350; sample points away from the labels
    for x in (130, 280):
        assert tuple(arr[50, x]) == (255, 255, 0)
    low = r.model_copy(update={"relations": [rel.model_copy(update={"score": 0.5})]})
    assert (np.asarray(plot_perception(low, show=("relations",))) == GREY).all()  # below min_relation_score


def test_ocr_polygon_is_drawn():
    line = TextLine.from_polygon("EXIT", 0.9, [(200, 200), (300, 200), (300, 260), (200, 260)])
    r = PerceptionResult(image_width=490, image_height=490, text_lines=[line])
    img = plot_perception(r, show=("text",))
    assert _px(img, 300, 230) == (0, 255, 255)
    assert _px(img, 250, 260) == (0, 255, 255)
    assert _px(img, 250, 230) == tuple(GREY)


def test_image_argument_is_resized_to_the_frame(tmp_path):
    raw = np.zeros((480, 640, 3), dtype=np.uint8)
    raw[:, :320] = 255
    r = PerceptionResult(image_width=640, image_height=480)
    img = plot_perception(r, Image.fromarray(raw))
    assert img.size == (490, 490)
    assert _px(img, 10, 10) == (255, 255, 255) and _px(img, 480, 10) == (0, 0, 0)
    path = r.save(tmp_path / "out.png", Image.fromarray(raw))
    assert Image.open(path).size == (490, 490)


def test_bad_arguments():
    r = _seg_result()
    with pytest.raises(InputError, match="unknown layer"):
        plot_perception(r, show=("masks",))
    with pytest.raises(InputError, match="alpha"):
        plot_perception(r, alpha=1.5)
    with pytest.raises(InputError, match="PerceptionResult"):
        plot_perception({"segments": []})


def test_segments_without_masks_draw_boxes():
    r = PerceptionResult.from_json(_seg_result().to_json())  # masks and id map dropped
    img = plot_perception(r, show=("segments",))
    assert _px(img, 20, 400) == (128, 0, 0)  # box outline in the segment's colour
    assert _px(img, 25, 305) == tuple(GREY)  # no overlay without pixels
