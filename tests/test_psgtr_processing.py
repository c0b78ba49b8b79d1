"""PSGTR pre/post-processing against the golden MoAI/mmdet outputs, the typed conversion and the verbalization."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from moai_sdk.errors import ConfigError, InputError
from moai_sdk.experts.scene_graph.config import PSGTRConfig
from moai_sdk.experts.scene_graph.expert import prediction_to_fields
from moai_sdk.experts.scene_graph.processing import postprocess, preprocess_image, rescale_size
from moai_sdk.results import PerceptionResult, load_vocab
from moai_sdk.verbalization import verbalize_scene_graph

GOLDEN = Path(__file__).parent / "fixtures" / "psgtr-golden"
POST_CASES = ("post_a_sq", "post_b_rect", "post_c_dups")
RESULT_KEYS = ("pan_results", "labels", "rel_pair_idxes", "rel_dists", "rel_labels", "masks", "refine_bboxes")

pytestmark = pytest.mark.numerics


def load_case(name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / f"psgtr_golden_{name}.npz") as data:
        return {k: data[k] for k in data.files}


def run_post(case: dict[str, np.ndarray], config: PSGTRConfig | None = None):
    t = {k: torch.from_numpy(case[k]).float() for k in ("s_cls", "o_cls", "r_cls", "s_box", "o_box")}
    return postprocess(
        t["s_cls"],
        t["o_cls"],
        t["r_cls"],
        t["s_box"],
        t["o_box"],
        torch.from_numpy(case["s_mask_logits"]).float(),
        torch.from_numpy(case["o_mask_logits"]).float(),
        tuple(int(v) for v in case["img_shape"]),
        tuple(float(v) for v in case["scale_factor"]),
        config or PSGTRConfig(),
    )


@pytest.fixture(scope="module", params=POST_CASES)
def post_case(request):
    case = load_case(request.param)
    return request.param, case, run_post(case)


# --------------------------------------------------------------------------------------------------------------
# pre-processing
# --------------------------------------------------------------------------------------------------------------
def test_rescale_rule_matches_mmcv():
    assert rescale_size(490, 490, (1333, 800)) == (800, 800)
    assert rescale_size(375, 500, (1333, 800)) == (800, 1067)
    # the long side limit binds for very wide images
    assert rescale_size(100, 1000, (1333, 800)) == (133, 1333)


@pytest.mark.parametrize("name", ["sq490", "rect375x500"])
def test_preprocessing_reproduces_reference_input_exactly(name):
    case = load_case(name)
    prepared = preprocess_image(torch.from_numpy(case["image"]).permute(2, 0, 1), PSGTRConfig())
    x = prepared.pixel_values
    assert x.dtype == torch.float32
    assert tuple(x.shape) == tuple(case["input_shape"])
    assert hashlib.sha256(x.numpy().tobytes()).hexdigest() == str(case["input_sha256"])
    assert prepared.img_shape == tuple(int(v) for v in case["img_shape"])
    np.testing.assert_array_equal(np.array(prepared.scale_factor), case["scale_factor"])
    # also from an HWC numpy array (what MoAI hands to mmdet)
    again = preprocess_image(case["image"], PSGTRConfig()).pixel_values
    assert torch.equal(again, x)


def test_preprocessing_pads_with_zeros_after_normalising():
    case = load_case("rect375x500")
    prepared = preprocess_image(case["image"], PSGTRConfig())
    assert prepared.img_shape == (800, 1067)
    assert tuple(prepared.pixel_values.shape) == (3, 800, 1088)
    assert torch.count_nonzero(prepared.pixel_values[:, :, 1067:]) == 0
    assert prepared.padding_mask[:, 1067:].all() and not prepared.padding_mask[:, :1067].any()


def test_channel_swap_is_the_moai_quirk():
    case = load_case("sq490")
    moai = preprocess_image(case["image"], PSGTRConfig()).pixel_values
    rgb = preprocess_image(case["image"], PSGTRConfig(swap_channels=False)).pixel_values
    mean = torch.tensor([123.675, 116.28, 103.53])
    std = torch.tensor([58.395, 57.12, 57.375])
    # MoAI: channel 0 holds the blue plane normalised with the red statistics
    torch.testing.assert_close(moai[0] * std[0] + mean[0], rgb[2] * std[2] + mean[2], atol=1e-3, rtol=0)
    assert not torch.equal(moai, rgb)


def test_torch_resize_backend_is_within_one_grey_level():
    case = load_case("sq490")
    exact = preprocess_image(case["image"], PSGTRConfig()).pixel_values
    approx = preprocess_image(case["image"], PSGTRConfig(resize_backend="torch")).pixel_values
    std_min = 57.12
    assert (exact - approx).abs().max() <= 1.0 / std_min + 1e-5
    assert (exact != approx).any()


def test_preprocessing_rejects_bad_images():
    with pytest.raises(InputError, match="uint8"):
        preprocess_image(torch.zeros(3, 8, 8), PSGTRConfig())
    with pytest.raises(InputError, match="uint8 RGB arrays"):
        preprocess_image(np.zeros((8, 8), dtype=np.uint8), PSGTRConfig())


def test_config_validation():
    with pytest.raises(ConfigError, match="mask_dtype"):
        PSGTRConfig(mask_dtype="float16")
    with pytest.raises(ConfigError, match="resize_backend"):
        PSGTRConfig(resize_backend="pil")
    with pytest.raises(ConfigError, match="unknown PSGTR setting"):
        PSGTRConfig().replace(threshold=0.3)
    with pytest.raises(ConfigError, match="mask_threshold"):
        PSGTRConfig(mask_threshold=1.5)


# --------------------------------------------------------------------------------------------------------------
# post-processing
# --------------------------------------------------------------------------------------------------------------
#: a few float32 ulps (2**-23 ~ 1.2e-7 each): the float tolerance of the golden comparisons
FLOAT_ULPS = 8 * 2**-23


def test_postprocessing_equals_golden_exactly(post_case):
    name, case, pred = post_case
    for key in RESULT_KEYS:
        got, want = getattr(pred, key), case[key]
        assert got.dtype == want.dtype, f"{name}: {key} dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{name}: {key} shape {got.shape} != {want.shape}"
        if np.issubdtype(want.dtype, np.floating):
            # probabilities and boxes: torch's CPU softmax/exp kernels are vectorised per instruction set (the
            # golden files came from another CPU; on an AVX2-only EPYC they differ by 1-3 float32 ulps): FLOAT_ULPS
            np.testing.assert_allclose(got, want, rtol=FLOAT_ULPS, atol=0, err_msg=f"{name}: {key}")
        else:
            np.testing.assert_array_equal(got, want, err_msg=f"{name}: {key}")
    np.testing.assert_array_equal(pred.rels, np.concatenate([case["rel_pair_idxes"], case["rel_labels"][:, None]], 1))
    assert not pred.empty
    assert pred.segment_scores.shape == pred.labels.shape
    assert ((pred.segment_scores > 0.5) & (pred.segment_scores <= 1)).all()


def test_dedup_case_removes_duplicated_triplets():
    case = load_case("post_c_dups")
    pred = run_post(case)
    assert pred.refine_bboxes.shape == (2 * 86, 5)  # 14 of the 100 top-k triplets were duplicates
    assert len(pred.labels) == 7


def test_wall_other_off_by_one_is_kept_by_default():
    case = load_case("post_a_sq")
    official = run_post(case)
    assert 132 not in official.labels  # 1-based label of 'wall-other-merged'
    fixed = run_post(case, PSGTRConfig(drop_class_index=None))
    assert 132 in fixed.labels
    assert len(fixed.rel_labels) > len(official.rel_labels)


def test_float32_mask_chain_differs_from_moai_bf16_chain():
    case = load_case("post_b_rect")
    moai = run_post(case)
    openpsg = run_post(case, PSGTRConfig(mask_dtype="float32"))
    assert openpsg.pan_results.shape == moai.pan_results.shape
    assert not np.array_equal(openpsg.pan_results, moai.pan_results)


def test_nothing_passing_gives_the_official_placeholder():
    case = load_case("post_a_sq")
    pred = run_post(case, PSGTRConfig(relation_score_threshold=1.0))
    assert pred.empty
    assert pred.labels.tolist() == [1]
    assert pred.masks.shape == (1, 490, 490) and pred.masks.all()
    assert (pred.pan_results == 1).all()
    assert pred.rel_pair_idxes.shape == (0, 2) and pred.rel_dists.shape == (0, 57)
    assert pred.rels.tolist() == [[0, 0, 0]]
    objects, relations = prediction_to_fields(pred)
    assert objects == [] and relations == []


# --------------------------------------------------------------------------------------------------------------
# typed results and verbalization
# --------------------------------------------------------------------------------------------------------------
def test_typed_fields_follow_the_raw_arrays(post_case):
    name, case, pred = post_case
    classes, predicates = load_vocab("COCO_PANOPTIC_CLASSES"), load_vocab("PREDICATES")
    objects, relations = prediction_to_fields(pred)
    assert [o.category_id for o in objects] == (case["labels"] - 1).tolist()
    assert [o.label for o in objects] == [classes[l - 1] for l in case["labels"]]
    for k, obj in enumerate(objects):
        assert obj.id == k + 1
        assert obj.isthing == (obj.category_id < 80)
        np.testing.assert_array_equal(obj.mask, case["pan_results"] // 1000 == k)
        assert obj.area == int(obj.mask.sum())
    assert len(relations) == len(case["rel_labels"])
    for rel, pair, dist in zip(relations, case["rel_pair_idxes"], case["rel_dists"]):
        assert (rel.subject_index, rel.object_index) == tuple(pair)
        assert rel.predicate_index == int(dist[1:].argmax())
        assert rel.predicate == predicates[rel.predicate_index]
        assert rel.score == pytest.approx(float(dist[1:].max()), rel=FLOAT_ULPS, abs=0)
        np.testing.assert_allclose(np.array(rel.distribution, dtype=np.float32), dist, rtol=FLOAT_ULPS, atol=0)
    h, w = case["pan_results"].shape
    PerceptionResult(
        image_width=w, image_height=h, frame_width=w, frame_height=h, scene_graph_objects=objects, relations=relations
    )


def official_sgg_prompt(labels: np.ndarray, rel_dists: np.ndarray, pairs: np.ndarray, num_rel: int = 10) -> str:
    """MoAI's make_sgg_prompt as the spec describes it (section 3, step 11), on PSGTR's raw arrays."""
    classes, predicates = load_vocab("COCO_PANOPTIC_CLASSES"), load_vocab("PREDICATES")
    names = [classes[l - 1].replace("-merged", "").replace("-other", "").replace("-stuff", "") for l in labels]
    counts: dict[str, int] = {}
    numbered = []
    for name in names:
        if names.count(name) > 1:
            counts[name] = counts.get(name, 0) + 1
            numbered.append(f"{name} (#{counts[name]})")
        else:
            numbered.append(name)
    n = min(num_rel, len(numbered))
    if len(rel_dists) == 0 or n > len(rel_dists):  # where numpy raises in the official code -> ''
        return ""
    dists = rel_dists[:, 1:]
    scores = dists.max(1)
    top = np.argpartition(scores, -n)[-n:]
    values = np.partition(scores, -n)[-n:]
    chosen = top[np.where(values >= 0.8)]
    if len(chosen) == 0:
        return ""
    items = [f"{numbered[pairs[i][0]]} is {predicates[int(dists[i].argmax())]} {numbered[pairs[i][1]]}" for i in chosen]
    return "The image includes relationships between objects: " + ", and ".join(items) + "."


def test_verbalization_equals_official_prompt(post_case):
    name, case, pred = post_case
    objects, relations = prediction_to_fields(pred)
    h, w = case["pan_results"].shape
    result = PerceptionResult(
        image_width=w, image_height=h, frame_width=w, frame_height=h, scene_graph_objects=objects, relations=relations
    )
    expected = official_sgg_prompt(case["labels"], case["rel_dists"], case["rel_pair_idxes"])
    assert verbalize_scene_graph(result) == expected


def test_verbalization_of_the_golden_cases_is_not_trivial():
    texts = []
    for name in POST_CASES:
        case = load_case(name)
        texts.append(official_sgg_prompt(case["labels"], case["rel_dists"], case["rel_pair_idxes"]))
    assert any(t.startswith("The image includes relationships between objects: ") for t in texts)


def test_verbalization_empty_cases():
    case = load_case("post_a_sq")
    # fewer relation rows than min(10, #objects): the official helper fails and writes ''
    pred = run_post(case)
    objects, relations = prediction_to_fields(pred)
    few = PerceptionResult(image_width=490, image_height=490, scene_graph_objects=objects, relations=relations[:3])
    assert verbalize_scene_graph(few) == ""
    assert official_sgg_prompt(case["labels"], case["rel_dists"][:3], case["rel_pair_idxes"][:3]) == ""
    # nothing detected: official placeholder -> '' as well
    empty = run_post(case, PSGTRConfig(relation_score_threshold=1.0))
    assert official_sgg_prompt(empty.labels, empty.rel_dists, empty.rel_pair_idxes) == ""
    objects, relations = prediction_to_fields(empty)
    assert (
        verbalize_scene_graph(
            PerceptionResult(image_width=490, image_height=490, scene_graph_objects=objects, relations=relations)
        )
        == ""
    )
