"""The official verbalization, checked string for string against the moai-tiny oracle fixture.

The fixture stores synthetic expert outputs in a neutral form plus the exact strings the official helpers
produced; a small converter below turns the neutral form into our typed results.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moai_sdk.errors import InputError
from moai_sdk.results import Box, Detection, PerceptionResult, Relation, Segment, TextLine
from moai_sdk.verbalization import (
    SCENE_GRAPH_PREFIX,
    SEGMENTATION_PREFIX,
    VerbalizationParts,
    argpartition_numpy126,
    format_box,
    join_parts,
    number_duplicates,
    select_relations,
    verbalize,
    verbalize_detection,
    verbalize_ocr,
    verbalize_parts,
    verbalize_scene_graph,
    verbalize_segmentation,
)

FIXTURE = Path(__file__).parent / "fixtures" / "moai-tiny"
VERB = json.loads((FIXTURE / "verbalization.json").read_text(encoding="utf-8"))
CASES = json.loads((FIXTURE / "cases.json").read_text(encoding="utf-8"))["cases"]


# ----------------------------------------------------------------------------------------------------------
# neutral fixture form -> typed results
# ----------------------------------------------------------------------------------------------------------


def _segments_from_map(ids: np.ndarray, infos: list[dict]) -> list[Segment]:
    h, w = ids.shape
    segs = []
    for info in infos:
        mask = ids == info["id"]
        box = info["mask_box_pixels_x0y0x1y1_exclusive"] or [0, 0, 0, 0]
        segs.append(
            Segment(
                id=info["id"],
                label=info["class_raw"],
                category_id=info["label_id"],
                isthing=info["label_id"] < 80,
                score=info["score"],
                box=Box.from_xyxy(box, w, h),
                area=info["pixel_count"],
                mask=mask,
            )
        )
        assert int(mask.sum()) == info["pixel_count"], "converter painted the map differently"
    return segs


def seg_input_to_result(inp: dict) -> PerceptionResult:
    h, w = inp["map_hw"]
    if inp["map_max_id"] < 0:
        ids = np.full((h, w), -1, dtype=np.int32)
    else:
        ids = np.zeros((h, w), dtype=np.int32)
        for item in inp["painted_in_order"]:
            for x0, y0, x1, y1 in item["rects_x0y0x1y1_exclusive"]:
                ids[y0:y1, x0:x1] = item["id"]
    return PerceptionResult(
        image_width=w, image_height=h, segments=_segments_from_map(ids, inp["segments"]), panoptic_ids=ids
    )


def detections_from(items: list[dict]) -> list[Detection]:
    return [
        Detection(
            label=d["label"],
            label_index=d["label_index"],
            score=d["score"],
            box=Box.from_xyxy(d["box_pixels_x0y0x1y1"]),
        )
        for d in items
    ]


def scene_graph_from(inp: dict) -> tuple[list[Segment], list[Relation]]:
    names = inp["object_names_raw"]
    objects = [
        Segment(id=i + 1, label=name, category_id=lab - 1, isthing=lab <= 80, box=Box.zero(), area=0)
        for i, (lab, name) in enumerate(zip(inp["object_labels_1based"], names))
    ]
    relations = [
        Relation(
            subject_index=r["subject_index"],
            object_index=r["object_index"],
            subject_label=names[r["subject_index"]],
            object_label=names[r["object_index"]],
            predicate=r["best_predicate"],
            predicate_index=r["best_predicate_index"],
            score=r["score"],
            distribution=r["rel_dists_57"],
        )
        for r in inp["relations"]
    ]
    return objects, relations


def text_lines_from(items: list[dict] | None) -> list[TextLine]:
    # PaddleOCR's None ("no text") is an empty list in our types.
    return [TextLine.from_polygon(o["text"], o["confidence"], o["box_points"]) for o in (items or [])]


def _blank(**fields) -> PerceptionResult:
    return PerceptionResult(image_width=490, image_height=490, **fields)


# ----------------------------------------------------------------------------------------------------------
# every helper case of verbalization.json
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", VERB["seg"], ids=[c["name"] for c in VERB["seg"]])
def test_segmentation_matches_official(case):
    result = seg_input_to_result(case["input"])
    assert verbalize_segmentation(result) == case["output"]
    # joined alone: the other three parts are empty
    assert verbalize(result) == join_parts(case["output"], "", "", "")


@pytest.mark.parametrize("case", VERB["seg"], ids=[c["name"] for c in VERB["seg"]])
def test_segmentation_without_id_map_uses_masks(case):
    result = seg_input_to_result(case["input"])
    no_map = result.model_copy(update={"panoptic_ids": None})
    assert verbalize_segmentation(no_map) == case["output"]


@pytest.mark.parametrize("case", VERB["seg"], ids=[c["name"] for c in VERB["seg"]])
def test_segmentation_from_boxes_only(case):
    """JSON without masks: the segments' own boxes / areas stand in for the map."""
    result = seg_input_to_result(case["input"])
    restored = PerceptionResult.from_json(result.to_json(include_masks=False))
    assert restored.panoptic_ids is None and all(s.mask is None for s in restored.segments)
    assert verbalize_segmentation(restored) == case["output"]


def test_segmentation_box_values_are_the_official_float32():
    case = next(c for c in VERB["seg"] if c["name"] == "boxes_near_0_and_1")
    from moai_sdk.verbalization import _scaled_mask_box

    for seg, nice in zip(case["input"]["segments"], case["nice_seg_info"]):
        assert _scaled_mask_box(seg["mask_box_pixels_x0y0x1y1_exclusive"], 490, 490) == nice["box_float32_values"]


@pytest.mark.parametrize("case", VERB["od"], ids=[c["name"] for c in VERB["od"]])
def test_detection_matches_official(case):
    result = _blank(detections=detections_from(case["input"]))
    assert verbalize_detection(result) == case["output"]
    assert verbalize(result) == join_parts("", case["output"], "", "")


@pytest.mark.parametrize("case", VERB["sgg"], ids=[c["name"] for c in VERB["sgg"]])
def test_scene_graph_matches_official(case):
    objects, relations = scene_graph_from(case["input"])
    result = _blank(scene_graph_objects=objects, relations=relations)
    assert verbalize_scene_graph(result) == case["output"]
    assert verbalize(result) == join_parts("", "", case["output"], "")


@pytest.mark.parametrize("case", VERB["ocr"], ids=[c["name"] for c in VERB["ocr"]])
def test_ocr_matches_official(case):
    result = _blank(text_lines=text_lines_from(case["input"]))
    if "output_error" in case:
        # The official helper raised on PaddleOCR's None; ours reports no text, like an empty list.
        assert case["output_error"].startswith("TypeError")
        assert verbalize_ocr(result) == ""
        assert verbalize(result) == "   "
    else:
        assert verbalize_ocr(result) == case["output"]
        assert verbalize(result) == join_parts("", "", "", case["output"])


@pytest.mark.parametrize("case", VERB["human_string"], ids=[c["name"] for c in VERB["human_string"]])
def test_join_parts_matches_official(case):
    assert join_parts(*case["args"]) == case["output"]


HELPER_CASES = ("seg", "od", "sgg", "ocr", "human_string")  # the keys parametrized above


def test_every_fixture_helper_was_exercised():
    # Every list of helper cases in the fixture is one the tests above parametrize over (a helper added to the
    # fixture without a test fails here), and each keeps at least 8 distinctly named cases.
    case_lists = {k for k, v in VERB.items() if isinstance(v, list)}
    assert case_lists == set(HELPER_CASES)
    for key in HELPER_CASES:
        names = [c["name"] for c in VERB[key]]
        assert len(names) >= 8, f"{key}: {len(names)} cases"
        assert len(set(names)) == len(names), f"{key}: duplicate case names"


# ----------------------------------------------------------------------------------------------------------
# the three full cases
# ----------------------------------------------------------------------------------------------------------


def case_to_result(case: dict) -> PerceptionResult:
    p = case["perception"][0]
    png = np.asarray(Image.open(FIXTURE / case["segmentation_files"][0]))
    ids = png.astype(np.int32) - 1
    h, w = ids.shape
    objects, relations = scene_graph_from(p["scene_graph"])
    return PerceptionResult(
        image_width=w,
        image_height=h,
        segments=_segments_from_map(ids, p["segmentation"]["segments"]),
        panoptic_ids=ids,
        detections=detections_from(p["detections"]),
        scene_graph_objects=objects,
        relations=relations,
        text_lines=text_lines_from(p["ocr"]),
    )


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_full_cases_match_official(case):
    expected = case["verbalization"][0]
    result = case_to_result(case)
    parts = verbalize_parts(result)
    assert isinstance(parts, VerbalizationParts)
    assert parts.segmentation == expected["seg"]
    assert parts.detection == expected["od"]
    assert parts.scene_graph == expected["sgg"]
    assert parts.ocr == expected["ocr"]
    assert parts.text == expected["aux"] == str(parts)
    assert verbalize(result) == expected["aux"]
    # and after a JSON round trip with masks
    assert verbalize(PerceptionResult.from_json(result.to_json(include_masks=True))) == expected["aux"]


def test_empty_case_is_three_spaces():
    case = next(c for c in CASES if c["name"] == "c_raw640x480_empty")
    assert verbalize(case_to_result(case)) == "   "
    assert verbalize(_blank()) == "   "


# ----------------------------------------------------------------------------------------------------------
# numerics and building blocks
# ----------------------------------------------------------------------------------------------------------


def test_number_format_rounding_and_negative_zero():
    assert (
        format_box([-0.0010204081190750003, 0.004999999888241291, 1.0204081535339355, 0.9999999403953552])
        == "[-0.00, 0.00, 1.02, 1.00]"
    )
    # Python's round() on the double of the float32 value: 0.125 -> 0.12 (half to even on the exact value)
    assert format_box([0.125, 0.135, 0.0, -0.006]) == "[0.12, 0.14, 0.00, -0.01]"


def test_detection_threshold_is_on_float32():
    # 0.49999999 rounds to 0.5 in float32, so the official (float32) comparison keeps it
    res = _blank(
        detections=[
            Detection(label="a", score=0.49999999, box=Box.from_xyxy([0, 0, 49, 49])),
            Detection(label="b", score=0.4999999, box=Box.from_xyxy([0, 0, 49, 49])),
        ]
    )
    assert (
        verbalize_detection(res)
        == "The image includes bounding box coordinates and their objects: [0.00, 0.00, 0.10, 0.10] a."
    )


def test_number_duplicates_rule():
    assert number_duplicates(["car", "person", "car", "sky", "car"]) == [
        "car (#1)",
        "person",
        "car (#2)",
        "sky",
        "car (#3)",
    ]
    assert number_duplicates([]) == []


# Reference orders produced by numpy 1.26.4's np.argpartition(a, -k)[-k:] (the version behind the fixture).
NUMPY126_REFERENCE = [
    (1, 100, 10, [79, 72, 35, 77, 3, 1, 23, 24, 29, 69]),
    (2, 37, 7, [23, 2, 33, 31, 22, 16, 25]),
    (3, 12, 10, [9, 3, 1, 5, 6, 7, 8, 2, 10, 11]),
    (4, 250, 10, [16, 131, 14, 172, 145, 58, 178, 2, 248, 226]),
    (5, 64, 4, [55, 53, 9, 13]),
]


@pytest.mark.parametrize("seed,n,k,expected", NUMPY126_REFERENCE)
def test_argpartition_matches_numpy_126(seed, n, k, expected):
    a = np.round(np.random.default_rng(seed).random(n), 3).astype(np.float32)
    assert argpartition_numpy126(a, -k)[-k:].tolist() == expected


def test_argpartition_median_of_medians_path():
    # np.roll(arange) defeats median-of-3 and forces the median-of-medians fallback
    a = np.roll(np.arange(200, dtype=np.float32), 100)
    assert argpartition_numpy126(a, -10)[-10:].tolist() == list(range(90, 100))


def test_argpartition_is_a_partition():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 17, 60):
        a = rng.random(n).astype(np.float32)
        for kth in range(n):
            idx = argpartition_numpy126(a, kth)
            assert sorted(idx.tolist()) == list(range(n))
            assert a[idx[kth]] == np.sort(a)[kth]
            assert (a[idx[:kth]] <= a[idx[kth]]).all() and (a[idx[kth + 1 :]] >= a[idx[kth]]).all()
    with pytest.raises(InputError):
        argpartition_numpy126([0.1, 0.2], -3)


def test_select_relations_official_failures():
    assert select_relations([0.9, 0.9, 0.9], num_objects=4) == []  # fewer rows than k -> nothing
    assert select_relations([], num_objects=0) == []
    assert select_relations([0.9], num_objects=0) == []
    assert select_relations([0.81, 0.5, 0.95], num_objects=2) == [0, 2]


# ----------------------------------------------------------------------------------------------------------
# corrected=True
# ----------------------------------------------------------------------------------------------------------


def test_corrected_segmentation_drops_only_the_empty_segment():
    case = next(c for c in VERB["seg"] if c["name"] == "segment_without_pixels")
    result = seg_input_to_result(case["input"])
    assert verbalize_segmentation(result) == ""
    assert verbalize_segmentation(result, corrected=True) == (
        "The image includes bounding box coordinates and their objects: "
        "[0.00, 0.00, 0.20, 0.20] car, and [0.41, 0.41, 0.61, 0.61] dog."
    )


def test_corrected_segmentation_pairs_boxes_by_id():
    case = next(c for c in VERB["seg"] if c["name"] == "info_order_not_id_order")
    result = seg_input_to_result(case["input"])
    # official: list position -> the dog gets the car's box
    assert verbalize_segmentation(result) == case["output"]
    assert verbalize_segmentation(result, corrected=True) == (
        "The image includes bounding box coordinates and their objects: "
        "[0.41, 0.41, 1.00, 1.00] dog, and [0.00, 0.00, 0.20, 0.20] car."
    )


def test_corrected_scene_graph_with_fewer_rows_than_k():
    case = next(c for c in VERB["sgg"] if c["name"] == "fewer_relations_than_objects")
    objects, relations = scene_graph_from(case["input"])
    result = _blank(scene_graph_objects=objects, relations=relations)
    assert verbalize_scene_graph(result) == ""
    assert verbalize_scene_graph(result, corrected=True) == (
        "The image includes relationships between objects: person is looking at car (#1), "
        "and car (#1) is parked on road, and car (#2) is parked on road."
    )


def test_corrected_scene_graph_orders_by_score():
    case = next(c for c in VERB["sgg"] if c["name"] == "topk_order")
    objects, relations = scene_graph_from(case["input"])
    result = _blank(scene_graph_objects=objects, relations=relations)
    text = verbalize_scene_graph(result, corrected=True)
    assert text.startswith(
        "The image includes relationships between objects: stop sign is walking on person, "
        "and traffic light is going down fire hydrant, and truck is on back of boat"
    )
    assert text.count(", and ") == 9  # still ten relations, the same set as the official one
    official = verbalize_scene_graph(result)
    assert sorted(text.split(": ", 1)[1].rstrip(".").split(", and ")) == sorted(
        official.split(": ", 1)[1].rstrip(".").split(", and ")
    )


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_corrected_equals_official_when_no_quirk_applies(case):
    result = case_to_result(case)
    parts = verbalize_parts(result, corrected=True)
    expected = case["verbalization"][0]
    assert parts.segmentation == expected["seg"] and parts.detection == expected["od"]
    assert parts.ocr == expected["ocr"]


def test_verbalize_rejects_other_types():
    with pytest.raises(InputError, match="PerceptionResult"):
        verbalize({"segments": []})


# ----------------------------------------------------------------------------------------------------------
# NumPy 1.26's argpartition (mutation testing: drive every branch of the introselect port)
# ----------------------------------------------------------------------------------------------------------

# np.argpartition with NumPy's SIMD selection switched off: the portable introselect NumPy 1.26 ran on every CPU
# (NumPy 2 uses x86-simd-sort's argselect on AVX-512 machines, a different but equally valid order).
_PORTABLE_ARGPARTITION = """
import json, sys
import numpy as np
cases = json.load(sys.stdin)
print(json.dumps([np.argpartition(np.asarray(v, dtype=np.float64), k).tolist() for v, k in cases]))
"""


def _numpy_portable_argpartition(cases: list[tuple[list[float], int]]) -> list[list[int]]:
    import os
    import subprocess
    import sys

    try:
        dispatch = np._core._multiarray_umath.__cpu_dispatch__  # NumPy 2
    except AttributeError:
        dispatch = np.core._multiarray_umath.__cpu_dispatch__  # NumPy 1.x
    env = {**os.environ, "NPY_DISABLE_CPU_FEATURES": " ".join(dispatch)}
    out = subprocess.run(
        [sys.executable, "-c", _PORTABLE_ARGPARTITION],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(out.stdout)


def _argpartition_cases() -> list[tuple[list[float], int]]:
    rng = np.random.default_rng(126)
    cases: list[tuple[list[float], int]] = [([0.5], 0), ([2.0, 1.0], 0), ([2.0, 1.0], 1), ([1.0, 1.0, 1.0], 2)]
    for n in (5, 9, 17, 40, 101):
        for values in (
            rng.random(n),  # distinct
            rng.integers(0, 3, n).astype(np.float64),  # many ties
            np.where(rng.random(n) < 0.2, np.nan, rng.random(n)),  # NaN sorts last
            np.arange(n, 0, -1, dtype=np.float64),  # descending
        ):
            for k in sorted({0, 1, 2, 3, n // 2, n - 2, n - 1}):
                if 0 <= k < n:
                    cases.append(([float(x) for x in values], k))
    # organ pipes exhaust the median-of-3 depth limit: the median-of-medians fallback runs (checked below)
    for n, k in ((88, 16), (96, 35), (99, 40), (103, 77), (114, 12), (114, 75), (124, 94), (160, 80), (250, 200)):
        pipe = np.concatenate([np.arange(n // 2), np.arange(n - n // 2, 0, -1)]).astype(np.float64)
        cases.append(([float(x) for x in pipe], k))
        cases.append(([float(x) for x in pipe[::-1]], k))
        cases.append(([float(x) for x in np.arange(n, 0, -1)], k))
    return cases


def test_argpartition_matches_numpys_portable_introselect(monkeypatch):
    import moai_sdk.verbalization as verbalization_module

    cases = _argpartition_cases()
    calls = {"median_of_medians": 0, "nested_introselect": 0}
    mom, intro = verbalization_module._median_of_median5, verbalization_module._introselect

    def counting_mom(*args):
        calls["median_of_medians"] += 1
        return mom(*args)

    def counting_intro(v, t, base, num, kth):
        calls["nested_introselect"] += base > 0
        return intro(v, t, base, num, kth)

    monkeypatch.setattr(verbalization_module, "_median_of_median5", counting_mom)
    monkeypatch.setattr(verbalization_module, "_introselect", counting_intro)
    ours = [argpartition_numpy126(v, k).tolist() for v, k in cases]
    assert calls["median_of_medians"] > 0 and calls["nested_introselect"] > 0  # every branch was driven
    reference = _numpy_portable_argpartition(cases)
    for (v, k), mine, theirs in zip(cases, ours, reference):
        assert mine == theirs, f"n={len(v)} kth={k}"


def test_argpartition_contract():
    values = [3.0, float("nan"), 1.0, 2.0, 1.0]
    out = argpartition_numpy126(values, -2)  # negative kth counts from the end, like NumPy
    assert out.dtype == np.int64 and sorted(out.tolist()) == list(range(5))
    assert values[out[3]] == 3.0 and np.isnan(values[out[4]])
    for bad in (5, -6):
        with pytest.raises(InputError, match=f"kth {bad} out of bounds for 5 values"):
            argpartition_numpy126(values, bad)


# ----------------------------------------------------------------------------------------------------------
# segmentation / scene graph / parts details (mutation testing)
# ----------------------------------------------------------------------------------------------------------


def _map_result(ids: np.ndarray, boxes: dict[int, list[int]], *, keep_map: bool = True) -> PerceptionResult:
    """Segments 1..n on an id map, their own boxes / areas given explicitly (possibly wrong on purpose)."""
    h, w = ids.shape
    segments = [
        Segment(id=i, label=label, category_id=0, box=Box.from_xyxy(box, w, h), area=1)
        for i, (label, box) in zip(sorted(boxes), [(f"thing{i}", boxes[i]) for i in sorted(boxes)])
    ]
    return PerceptionResult(
        image_width=w,
        image_height=h,
        frame_width=w,
        frame_height=h,
        segments=segments,
        panoptic_ids=ids if keep_map else None,
    )


def test_segmentation_boxes_come_from_the_map_when_it_is_kept():
    ids = np.zeros((10, 10), dtype=np.int32)
    ids[2:4, 3:6] = 1
    ids[7, 8] = 2  # a one-pixel segment
    # the segments' own boxes are wrong: with the map kept, the map's boxes are used
    result = _map_result(ids, {1: [0, 0, 10, 10], 2: [0, 0, 10, 10]})
    expected = SEGMENTATION_PREFIX + "[0.30, 0.20, 0.60, 0.40] thing1, and [0.80, 0.70, 0.90, 0.80] thing2."
    assert verbalize_segmentation(result) == expected
    assert verbalize_segmentation(result, corrected=True) == expected
    # without the map (and without masks) the segments' own boxes stand in
    no_map = _map_result(ids, {1: [0, 0, 10, 10], 2: [0, 0, 10, 10]}, keep_map=False)
    assert verbalize_segmentation(no_map).count("[0.00, 0.00, 1.00, 1.00]") == 2


def test_segmentation_on_an_empty_map_is_empty(caplog):
    ids = np.zeros((6, 6), dtype=np.int32)  # no pixel belongs to any segment
    result = _map_result(ids, {1: [0, 0, 2, 2], 2: [1, 1, 3, 3]})
    with caplog.at_level("DEBUG", logger="moai_sdk.verbalization"):
        assert verbalize_segmentation(result) == ""
    assert "segmentation part empty: 2 segments but 0 boxes (official behaviour)" in caplog.messages
    assert verbalize_segmentation(result, corrected=True) == ""


def test_relation_scores_compare_in_float32():
    # 0.8 as a Python float is below float32(0.8); the official helper compares float32 scores: kept
    objects = [Segment(id=i + 1, label=n, category_id=0, box=Box.zero(), area=0) for i, n in enumerate("ab")]
    rel = Relation(
        subject_index=0,
        object_index=1,
        subject_label="a",
        object_label="b",
        predicate="on",
        predicate_index=0,
        score=0.8,
    )
    result = _blank(scene_graph_objects=objects, relations=[rel, rel.model_copy(update={"score": 0.79})])
    assert select_relations([0.8, 0.79], 2) == [0] and select_relations([0.8, 0.79], 2, corrected=True) == [0]
    assert verbalize_scene_graph(result) == SCENE_GRAPH_PREFIX + "a is on b."
    assert verbalize_scene_graph(result, corrected=True) == SCENE_GRAPH_PREFIX + "a is on b."


def test_corrected_reaches_every_part_and_the_text():
    seg_case = next(c for c in VERB["seg"] if c["name"] == "segment_without_pixels")
    sgg_case = next(c for c in VERB["sgg"] if c["name"] == "fewer_relations_than_objects")
    seg = seg_input_to_result(seg_case["input"])
    objects, relations = scene_graph_from(sgg_case["input"])
    result = seg.model_copy(update={"scene_graph_objects": objects, "relations": relations})
    for corrected in (False, True):
        parts = verbalize_parts(result, corrected=corrected)
        assert parts.segmentation == verbalize_segmentation(result, corrected=corrected)
        assert parts.scene_graph == verbalize_scene_graph(result, corrected=corrected)
        assert verbalize(result, corrected=corrected) == parts.text
    assert verbalize_parts(result).segmentation == "" and verbalize_parts(result).scene_graph == ""
    fixed = verbalize_parts(result, corrected=True)
    assert fixed.segmentation and fixed.scene_graph
    assert verbalize(result, corrected=True) == join_parts(fixed.segmentation, "", fixed.scene_graph, "")


def test_verbalize_names_the_wrong_type():
    with pytest.raises(InputError, match="got int"):
        verbalize(42)
