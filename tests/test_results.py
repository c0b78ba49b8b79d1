"""Typed results: construction, validation, lossless JSON, the official panoptic colour map, merging."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from moai_sdk.errors import InputError
from moai_sdk.results import (
    Box,
    Detection,
    MoAIResult,
    PerceptionResult,
    Relation,
    Segment,
    TextLine,
    clean_coco_name,
    decode_array,
    encode_array,
    load_vocab,
    mask_box,
    mask_to_rle,
    pascal_colormap,
    rle_to_mask,
)

FIXTURE = Path(__file__).parent / "fixtures" / "moai-tiny"


def _ids_and_segments() -> tuple[np.ndarray, list[Segment]]:
    ids = np.zeros((490, 490), dtype=np.int32)
    ids[10:60, 20:120] = 1
    ids[100:300, 200:250] = 2
    ids[400:490, :] = 3
    labels = [("person", 0, True), ("car", 2, True), ("sky-other-merged", 119, False)]
    segs = [
        Segment.from_mask(ids == k, id=k, label=lab, category_id=cat, isthing=thing, score=0.9 - k / 10)
        for k, (lab, cat, thing) in enumerate(labels, start=1)
    ]
    return ids, segs


def full_result() -> PerceptionResult:
    ids, segs = _ids_and_segments()
    objects = [segs[0], segs[1]]
    dist = [0.0] * 57
    dist[4] = np.float32(0.8125).item()
    return PerceptionResult(
        image_width=640,
        image_height=480,
        segments=segs,
        panoptic_ids=ids,
        detections=[
            Detection(
                label="person",
                label_index=11,
                score=np.float32(0.93).item(),
                box=Box.from_xyxy([40.5, 60.25, 150.0, 300.75]),
            ),
            Detection(label="tench", label_index=847, score=0.1 + 0.2, box=Box.from_xyxy([-3.0, -0.5, 500.0, 491.0])),
        ],
        scene_graph_objects=objects,
        relations=[
            Relation(
                subject_index=0,
                object_index=1,
                subject_label="person",
                object_label="car",
                predicate="on",
                predicate_index=3,
                score=dist[4],
                distribution=dist,
            )
        ],
        text_lines=[TextLine.from_polygon('Café ☕ "quoted"', 0.87, [[1, 2], [30, 2], [30, 9.5], [1, 9.5]])],
        sources={"segmentation": "seg", "detection": "det", "scene_graph": "sg", "ocr": "ocr"},
        timings={"seg": 0.25, "det": 1e-7},
        warnings=["something odd"],
    )


# --- Box / Segment / TextLine ---------------------------------------------------------------------------


def test_box_properties():
    b = Box.from_xyxy([49.0, 98.0, 147.0, 245.0])
    assert b.xyxy == (49.0, 98.0, 147.0, 245.0)
    assert b.xyxyn == (0.1, 0.2, 0.3, 0.5)
    assert (b.width, b.height, b.area) == (98.0, 147.0, 98.0 * 147.0)
    assert b.center == (98.0, 171.5)
    assert (b.frame_width, b.frame_height) == (490, 490)
    inverted = Box(x0=10, y0=10, x1=5, y1=20)  # kept as given, area clamps to 0
    assert inverted.x1 == 5 and inverted.area == 0.0
    outside = Box.from_xyxy([-3, -1, 500, 491], 490, 490)
    assert outside.xyxyn[0] < 0 and outside.xyxyn[2] > 1
    with pytest.raises(InputError, match="4 values"):
        Box.from_xyxy([1, 2, 3])
    with pytest.raises(ValidationError):
        Box(x0=0, y0=0, x1=1, y1=1, frame_width=0)


def test_mask_box_and_segment_from_mask():
    m = np.zeros((490, 490), dtype=bool)
    m[10:50, 20:30] = True
    m[300, 400] = True
    assert mask_box(m) == (20, 10, 401, 301)
    assert mask_box(np.zeros((4, 4), bool)) == (0, 0, 0, 0)
    seg = Segment.from_mask(m, id=7, label="wall-other-merged", category_id=131, score=None)
    assert seg.box.xyxy == (20.0, 10.0, 401.0, 301.0)
    assert seg.area == 401  # 40 x 10 block + the lone pixel
    assert seg.mask.dtype == bool and np.array_equal(seg.mask, m)
    assert Segment.from_mask(m, id=7, label="x", category_id=0, keep_mask=False).mask is None
    assert seg.clean_label == "wall"
    empty = Segment.from_mask(np.zeros((490, 490), bool), id=2, label="person", category_id=0)
    assert empty.area == 0 and empty.box.xyxy == (0.0, 0.0, 0.0, 0.0)
    assert clean_coco_name("floor-other-merged") == "floor" and clean_coco_name("door-stuff") == "door"
    assert clean_coco_name("floor-wood") == "floor-wood"


def test_segment_mask_validation():
    with pytest.raises(ValidationError):
        Segment(id=1, label="x", category_id=0, box=Box.zero(), area=0, mask=np.zeros((2, 2, 2), bool))
    with pytest.raises(ValidationError):
        Segment(id=1, label="x", category_id=0, box=Box.zero(), area=0, mask=np.full((2, 2), 0.5))
    ok = Segment(id=1, label="x", category_id=0, box=Box.zero(), area=1, mask=np.array([[0, 1], [0, 0]]))
    assert ok.mask.dtype == bool and ok.mask[0, 1]
    with pytest.raises(ValidationError):
        Segment(id=0, label="x", category_id=0, box=Box.zero(), area=0)


def test_textline_from_polygon():
    line = TextLine.from_polygon("EXIT", 0.85, [(10, 5), (40, 7), (41, 20), (9, 18)])
    assert line.box.xyxy == (9.0, 5.0, 41.0, 20.0)
    assert line.polygon[1] == (40.0, 7.0)


# --- RLE and array codecs -----------------------------------------------------------------------------------


def test_rle_matches_pycocotools_strings():
    # reference strings from pycocotools.mask.encode
    m = np.zeros((6, 7), bool)
    m[1:4, 2:5] = True
    m[5, 6] = True
    m[0, 0] = True
    assert mask_to_rle(m) == {"size": [6, 7], "counts": "01<2G000:N"}
    assert np.array_equal(rle_to_mask({"size": [6, 7], "counts": b"01<2G000:N"}), m)
    assert mask_to_rle(m, compressed=False)["counts"] == [0, 1, 12, 3, 3, 3, 3, 3, 13, 1]


def test_rle_round_trip_random():
    rng = np.random.default_rng(0)
    for _ in range(100):
        h, w = rng.integers(1, 40, 2)
        m = rng.random((h, w)) < rng.random()
        assert np.array_equal(rle_to_mask(mask_to_rle(m)), m)
        assert np.array_equal(rle_to_mask(mask_to_rle(m, compressed=False)), m)
    with pytest.raises(InputError, match="sum"):
        rle_to_mask({"size": [2, 2], "counts": [1, 1]})
    with pytest.raises(InputError):
        rle_to_mask({"counts": [4]})


def test_array_codec():
    a = np.arange(-1, 11, dtype=np.int32).reshape(3, 4)
    enc = encode_array(a)
    assert enc["dtype"] == "i4" and enc["shape"] == [3, 4]
    out = decode_array(json.loads(json.dumps(enc)))
    assert out.dtype == np.int32 and np.array_equal(out, a)
    with pytest.raises(InputError):
        decode_array({**enc, "shape": [5, 5]})
    with pytest.raises(InputError):
        decode_array({**enc, "encoding": "raw"})


# --- JSON ---------------------------------------------------------------------------------------------------


def test_json_round_trip_is_exact_with_masks():
    r = full_result()
    text = r.to_json(include_masks=True)
    back = PerceptionResult.from_json(text)
    assert back == r
    assert back.panoptic_ids.dtype == np.int32 and np.array_equal(back.panoptic_ids, r.panoptic_ids)
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(back.segments, r.segments))
    # floats exactly
    assert back.detections[1].score == 0.1 + 0.2
    assert back.detections[0].score == np.float32(0.93).item()
    assert back.timings["det"] == 1e-7
    assert back.text_lines[0].text == 'Café ☕ "quoted"'
    assert back.relations[0].distribution == r.relations[0].distribution


def test_json_without_masks_drops_arrays_only():
    r = full_result()
    data = json.loads(r.to_json())
    assert data["panoptic_ids"] is None
    assert all(s["mask"] is None for s in data["segments"])
    back = PerceptionResult.from_json(r.to_json())
    assert back.panoptic_ids is None and back.segments[0].mask is None
    assert back.segments[0].box == r.segments[0].box and back.segments[0].area == r.segments[0].area
    assert back.detections == r.detections and back.relations == r.relations
    assert len(r.to_json()) < len(r.to_json(include_masks=True))


def test_json_special_floats_and_frame_image():
    img = np.random.default_rng(1).integers(0, 256, (490, 490, 3), dtype=np.uint8)
    r = PerceptionResult(image_width=10, image_height=20, timings={"x": float("inf")}, frame_image=img)
    assert json.loads(r.to_json())["frame_image"] is None
    back = PerceptionResult.from_json(r.to_json(include_image=True))
    assert back.timings["x"] == float("inf")
    assert np.array_equal(back.frame_image, img)


def test_from_json_errors_are_input_errors():
    with pytest.raises(InputError, match="PerceptionResult"):
        PerceptionResult.from_json("{not json")
    with pytest.raises(InputError):
        PerceptionResult.from_json(json.dumps({"image_width": 1}))
    with pytest.raises(InputError):
        PerceptionResult.from_json(json.dumps({"image_width": 4, "image_height": 4, "bogus": 1}))


def test_json_schema_is_exported():
    schema = PerceptionResult.json_schema()
    json.dumps(schema)
    props = schema["properties"]
    for key in (
        "segments",
        "detections",
        "scene_graph_objects",
        "relations",
        "text_lines",
        "sources",
        "timings",
        "warnings",
        "panoptic_ids",
        "frame_width",
    ):
        assert key in props
    assert "Segment" in schema["$defs"] and "Box" in schema["$defs"]
    assert "size" in json.dumps(schema["$defs"]["Segment"])  # the RLE form of masks
    assert "text" in MoAIResult.json_schema()["properties"]


# --- validation ---------------------------------------------------------------------------------------------


def test_validation_of_consistency():
    with pytest.raises(ValidationError, match="panoptic_ids"):
        PerceptionResult(image_width=5, image_height=5, panoptic_ids=np.zeros((10, 10), np.int32))
    with pytest.raises(ValidationError, match="unknown task"):
        PerceptionResult(image_width=5, image_height=5, sources={"depth": "x"})
    seg = Segment(id=1, label="a", category_id=0, box=Box.zero(), area=0)
    with pytest.raises(ValidationError, match="scene_graph_objects"):
        PerceptionResult(
            image_width=5,
            image_height=5,
            scene_graph_objects=[seg],
            relations=[
                Relation(
                    subject_index=0,
                    object_index=1,
                    subject_label="a",
                    object_label="b",
                    predicate="on",
                    predicate_index=3,
                    score=0.9,
                )
            ],
        )
    with pytest.raises(ValidationError, match="mask"):
        PerceptionResult(
            image_width=5,
            image_height=5,
            segments=[Segment.from_mask(np.ones((5, 5), bool), id=1, label="a", category_id=0)],
        )
    with pytest.raises(ValidationError):
        PerceptionResult(image_width=5, image_height=5, panoptic_ids=np.zeros((490, 490), np.float32))


def test_tasks_and_has_task():
    r = full_result()
    assert r.tasks == ("segmentation", "detection", "scene_graph", "ocr")
    empty = PerceptionResult(image_width=3, image_height=3)
    assert empty.tasks == ()
    ran_but_empty = PerceptionResult(image_width=3, image_height=3, sources={"ocr": "rapidocr"})
    assert ran_but_empty.tasks == ("ocr",)
    with pytest.raises(InputError):
        empty.has_task("depth")


# --- panoptic colour map ------------------------------------------------------------------------------------


def test_pascal_colormap_is_the_official_table():
    table = pascal_colormap()
    assert table.shape == (134, 3) and table.dtype == np.float64
    assert table[0].tolist() == [0, 0, 0] and table[1].tolist() == [128 / 255, 0, 0]
    # the Pascal-VOC bit pattern
    for i in (5, 37, 133):
        r = g = b = 0
        c = i
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        assert (table[i] * 255).round().astype(int).tolist() == [r, g, b]
    assert len(load_vocab("COCO_PANOPTIC_CLASSES")) == 133
    with pytest.raises(InputError):
        load_vocab("NOPE")


@pytest.mark.parametrize("case", ["a_demo_full", "b_eval_template", "c_raw640x480_empty"])
def test_panoptic_color_map_matches_fixture(case):
    ids = np.asarray(Image.open(FIXTURE / f"{case}.segmentation0.png")).astype(np.int32) - 1
    expected = np.asarray(Image.open(FIXTURE / f"{case}.panoptic_map0.png")).astype(np.float64) / 255
    r = PerceptionResult(image_width=490, image_height=490, panoptic_ids=ids)
    cmap = r.panoptic_color_map()
    assert cmap.dtype == np.float64 and cmap.shape == (490, 490, 3)
    assert np.array_equal(cmap, expected)


def test_panoptic_colours_by_id_match_verbalization_fixture():
    verb = json.loads((FIXTURE / "verbalization.json").read_text(encoding="utf-8"))
    table = pascal_colormap()
    for case in verb["seg"]:
        for k, colour in case["panoptic_map_colours_by_id"].items():
            assert table[int(k)].tolist() == colour


def test_color_map_rebuilt_from_masks_and_large_ids(caplog):
    ids, segs = _ids_and_segments()
    r = PerceptionResult(image_width=490, image_height=490, segments=segs)
    assert np.array_equal(r.panoptic_id_map(), ids)
    assert np.array_equal(r.panoptic_color_map()[20, 30], pascal_colormap()[1])
    no_seg = PerceptionResult(image_width=490, image_height=490)
    assert (no_seg.panoptic_id_map() == -1).all() and not no_seg.panoptic_color_map().any()
    big = ids.copy()
    big[0:5, 0:5] = 200
    with caplog.at_level(logging.WARNING, logger="moai_sdk.results"):
        cmap = PerceptionResult(image_width=490, image_height=490, panoptic_ids=big).panoptic_color_map()
    assert not cmap[0:5, 0:5].any()
    assert "200" in caplog.text
    no_masks = PerceptionResult.from_json(r.to_json())
    with pytest.raises(InputError, match="no mask"):
        no_masks.panoptic_id_map()


# --- merging ------------------------------------------------------------------------------------------------


def test_merge_combines_tasks():
    r = full_result()
    seg_part = PerceptionResult(
        image_width=640,
        image_height=480,
        segments=r.segments,
        panoptic_ids=r.panoptic_ids,
        sources={"segmentation": "seg"},
        timings={"seg": 0.5},
        warnings=["w1"],
    )
    det_part = PerceptionResult(
        image_width=640,
        image_height=480,
        detections=r.detections,
        sources={"detection": "det"},
        timings={"seg": 0.25, "det": 1.0},
        warnings=["w2"],
    )
    merged = seg_part.merge(det_part)
    assert merged.segments == r.segments and merged.detections == r.detections
    assert merged.sources == {"segmentation": "seg", "detection": "det"}
    assert merged.timings == {"seg": 0.75, "det": 1.0}
    assert merged.warnings == ["w1", "w2"]
    assert seg_part.detections == []  # inputs untouched
    with pytest.raises(InputError, match="segmentation"):
        merged.merge(seg_part)
    with pytest.raises(InputError, match="image_width"):
        seg_part.merge(PerceptionResult(image_width=10, image_height=480))
    with pytest.raises(InputError):
        seg_part.merge("nope")


# --- MoAIResult ---------------------------------------------------------------------------------------------


def test_moai_result_round_trip_and_delegation(tmp_path):
    res = MoAIResult(
        text="Two cars.",
        prompt="How many cars?",
        perception=full_result(),
        aux_text="   ",
        token_counts={"prompt": 30, "image": 1225, "aux": 5, "generated": 4},
        timings={"generate": 0.5},
        model_id="BK-Lee/MoAI-7B",
        revision=None,
        seed=0,
        generation={"max_new_tokens": 8, "do_sample": False},
        new_token_ids=[5, 6, 7, 2],
    )
    assert str(res) == "Two cars."
    back = MoAIResult.from_json(res.to_json(include_masks=True))
    assert back == res
    pic = res.plot()
    assert pic.size == (490, 490)
    out = res.save(tmp_path / "pic.png")
    assert Image.open(out).size == (490, 490)
    j = res.save(tmp_path / "res.json")
    assert MoAIResult.from_json(j.read_text()).text == "Two cars."
    with pytest.raises(InputError, match="no perception"):
        MoAIResult(text="x").plot()
    with pytest.raises(InputError):
        MoAIResult.from_json("[]")


def test_perception_save_json(tmp_path):
    r = full_result()
    path = r.save(tmp_path / "p.json", include_masks=True)
    assert PerceptionResult.from_json(path.read_text(encoding="utf-8")) == r
    with pytest.raises(InputError):
        r.save(tmp_path / "p.json", alpha=0.3)
