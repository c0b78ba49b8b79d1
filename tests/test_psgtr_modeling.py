"""The PSGTR network against the golden mmdet intermediates (synthetic weights, fp32 CPU), plus unit checks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moai_sdk.errors import InputError
from moai_sdk.experts.scene_graph.checkpoint import load_into
from moai_sdk.experts.scene_graph.config import INSTANCE_OFFSET, PSGTRConfig
from moai_sdk.experts.scene_graph.modeling import PSGTR, sine_position_encoding
from moai_sdk.experts.scene_graph.processing import postprocess, preprocess_image
from moai_sdk.testing import synthetic_state_dict

GOLDEN = Path(__file__).parent / "fixtures" / "psgtr-golden"

pytestmark = pytest.mark.numerics


def load_case(name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / f"psgtr_golden_{name}.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def model() -> PSGTR:
    net = PSGTR()
    load_into(net, synthetic_state_dict())
    return net.eval()


@pytest.fixture(scope="module", params=["sq490", "rect375x500"])
def network_run(request, model):
    """One full forward per golden image (the expensive part of this file: ~10-25 s each on 2 cores)."""
    case = load_case(request.param)
    prepared = preprocess_image(torch.from_numpy(case["image"]).permute(2, 0, 1), model.config)
    # With these synthetic weights two triplets are near-duplicates whose de-duplication is decided by float
    # noise: a single-threaded forward keeps one fewer object on sq490. Pin the thread count the golden
    # comparison was established with (2, as in every test here) even if another test changed it.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            out = model(prepared.pixel_values[None], return_features=True)
    finally:
        torch.set_num_threads(threads)
    return request.param, case, prepared, out


# --------------------------------------------------------------------------------------------------------------
# unit checks
# --------------------------------------------------------------------------------------------------------------
def test_parameter_count_and_torchvision_backbone():
    from torchvision.models import resnet50

    net = PSGTR()
    assert sum(p.numel() for p in net.parameters()) == 44_437_695
    backbone_keys = {k[len("backbone.") :] for k in net.state_dict() if k.startswith("backbone.")}
    tv_keys = set(resnet50(weights=None).state_dict())
    assert tv_keys - backbone_keys == {"fc.weight", "fc.bias"}
    assert backbone_keys <= tv_keys


def test_sine_encoding_matches_the_formula():
    mask = torch.zeros(2, 3, 5, dtype=torch.bool)
    mask[1, :, 4:] = True  # a padded column in the second image
    num_feats = 8
    pos = sine_position_encoding(mask, num_feats, 10000.0, 1e-6)
    assert pos.shape == (2, 2 * num_feats, 3, 5)
    for b in range(2):
        valid = ~mask[b].numpy()
        y = np.cumsum(valid, 0).astype(np.float64)
        x = np.cumsum(valid, 1).astype(np.float64)
        y = y / (y[-1:, :] + 1e-6) * 2 * math.pi
        x = x / (x[:, -1:] + 1e-6) * 2 * math.pi
        for i in range(num_feats):
            dim_t = 10000.0 ** (2 * (i // 2) / num_feats)
            fn = np.sin if i % 2 == 0 else np.cos
            np.testing.assert_allclose(pos[b, i].numpy(), fn(y / dim_t), atol=2e-6)
            np.testing.assert_allclose(pos[b, num_feats + i].numpy(), fn(x / dim_t), atol=2e-6)


def test_forward_rejects_bad_shapes(model):
    with pytest.raises(InputError, match=r"\[B, 3, H, W\]"):
        model(torch.zeros(3, 64, 64))
    with pytest.raises(InputError, match="padding_mask"):
        model(torch.zeros(1, 3, 64, 64), torch.zeros(1, 32, 32, dtype=torch.bool))


def test_mask_head_chunking_and_batching_do_not_change_results(model):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 128, 160)
    with torch.inference_mode():
        joint = model(x)
        single = model(x[1:])
        model.bbox_head.sub_mask_head.chunk = 7
        model.bbox_head.obj_mask_head.chunk = 7
        try:
            chunked = model(x)
        finally:
            model.bbox_head.sub_mask_head.chunk = model.config.mask_head_chunk
            model.bbox_head.obj_mask_head.chunk = model.config.mask_head_chunk
    assert joint.sub_mask_logits.shape == (2, 100, 32, 40)
    for name in ("sub_logits", "rel_logits", "obj_boxes"):
        torch.testing.assert_close(getattr(single, name)[:, 0], getattr(joint, name)[:, 1], atol=1e-4, rtol=1e-4)
    for name in ("sub_mask_logits", "obj_mask_logits"):
        torch.testing.assert_close(getattr(chunked, name), getattr(joint, name), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(getattr(single, name)[0], getattr(joint, name)[1], atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# golden parity
# --------------------------------------------------------------------------------------------------------------
def test_backbone_features_match(network_run):
    name, case, _, out = network_run
    for level, feat in enumerate(out.features):
        assert list(feat.shape) == case["feat_shapes"][level].tolist()
        f = feat.double()
        stats = np.array([f.mean().item(), f.std().item(), f.abs().sum().item()])
        np.testing.assert_allclose(stats, case["feat_stats"][level], rtol=1e-4, err_msg=f"{name} C{level + 2}")


def test_decoder_heads_match_every_layer(network_run):
    name, case, _, out = network_run
    pairs = {
        "sub_logits": "sub_cls",
        "obj_logits": "obj_cls",
        "rel_logits": "rel_cls",
        "sub_boxes": "sub_box",
        "obj_boxes": "obj_box",
    }
    for ours, theirs in pairs.items():
        got = getattr(out, ours)[:, 0].numpy()
        assert got.shape == case[theirs].shape
        np.testing.assert_allclose(got, case[theirs], rtol=1e-4, atol=1e-4, err_msg=f"{name} {ours}")


def test_mask_logits_match(network_run):
    name, case, _, out = network_run
    for ours, theirs in (("sub_mask_logits", "sub_seg"), ("obj_mask_logits", "obj_seg")):
        logits = getattr(out, ours)[0]
        np.testing.assert_allclose(
            logits[:4, ::2, ::2].numpy(), case[f"{theirs}_q0to3_stride2"], rtol=1e-4, atol=1e-4, err_msg=name
        )
        d = logits.double()
        stats = torch.stack([d.mean((1, 2)), d.std((1, 2)), d.abs().sum((1, 2))], 1).numpy()
        np.testing.assert_allclose(stats, case[f"{theirs}_stats"], rtol=1e-4)


def _relation_queries(rel_dists: np.ndarray, probs: np.ndarray) -> list[int]:
    """The query each relation came from: a relation row is the full predicate softmax of its triplet's query, so
    it identifies the query exactly (rows of near-identical queries still differ)."""
    out = []
    for row in rel_dists:
        query = int(np.abs(probs - row).max(1).argmin())
        assert np.abs(probs[query] - row).max() < 1e-6
        out.append(query)
    return out


def _object_segment_queries(pairs: np.ndarray, rel_dists: np.ndarray, probs: np.ndarray) -> dict[int, int]:
    """Map each object segment to the query it came from (see :func:`_relation_queries`)."""
    return {obj: query for (_, obj), query in zip(pairs.tolist(), _relation_queries(rel_dists, probs))}


def _segment_identities(labels: np.ndarray, object_queries: dict[int, int]) -> list[int]:
    """One code per segment that names the same entity in our result and the reference's: an object segment is its
    query (>= 0); any other segment (here the merged stuff subject) is minus its class label."""
    return [object_queries.get(seg, -int(label)) for seg, label in enumerate(labels.tolist())]


def _relations(pairs: np.ndarray, rel_labels: np.ndarray, ids: list[int], kept: set[int]) -> list[tuple[int, ...]]:
    """The relations between entities in ``kept``, as (subject code, object code, predicate)."""
    return [
        (ids[s], ids[o], int(r)) for (s, o), r in zip(pairs.tolist(), rel_labels.tolist()) if {ids[s], ids[o]} <= kept
    ]


# Two fp32 mask logits closer than this are a near-tie: 50x below the network tolerance (rtol/atol 1e-4 above),
# so the reference's own logits may order them either way once the official fp16 -> bf16 chain has rounded them.
NEAR_TIE = 2e-6
# A pixel contested by a merged stuff subject and an object: the panoptic softmax runs in bfloat16, whose steps are
# 2**-8 to 2**-7 relative, so two entities whose logits differ by less than 2**-7 (probability ratio exp(2**-7))
# can get the same bfloat16 probability, and the first entity (the subject) wins the tie; whether they do hinges on
# the last bits of the logits (measured 0.0042 on one pixel of each image under ATEN_CPU_CAPABILITY=default).
BF16_TIE = 2.0**-7


def test_end_to_end_matches_golden(network_run):
    """The scene graph equals the reference's exactly, except where a panoptic pixel is a near-tie that no fp32
    port can decide like the reference: with these random weights no mask passes the 0.85 threshold (so no
    de-duplication or merging happens) and all 100 object entities share one class with near-identical mask logits,
    so the winner of a pixel can hinge on whether a logit lands above or below an fp16/bf16 rounding boundary
    (different CPUs differ there). Pixels are compared by the entity that wins them (object segments are identified
    by their query), and each pixel won by a different entity must be a near-tie: the two winners' fp32 logits
    differ by less than ``NEAR_TIE``; a merged stuff subject's logit there is the largest subject mask logit of the
    queries whose relations have that subject and the bound is ``BF16_TIE`` (e.g. under ``ATEN_CPU_CAPABILITY=default`` one pixel of each image goes
    to an object instead of the stuff subject). An object that wins only near-tie pixels can then exist on one side
    only (e.g. sq490 on an AVX2-only EPYC: objects of queries 17, 59 and 76 win 9, 4 and 6 such pixels, the
    reference's query 74 is replaced by query 27 on 4 pixels); every other segment, its label, its relations and
    their predicate rows must equal the reference's exactly, in the same order."""
    name, case, prepared, out = network_run
    pred = postprocess(
        out.sub_logits[-1, 0],
        out.obj_logits[-1, 0],
        out.rel_logits[-1, 0],
        out.sub_boxes[-1, 0],
        out.obj_boxes[-1, 0],
        out.sub_mask_logits[0],
        out.obj_mask_logits[0],
        prepared.img_shape,
        prepared.scale_factor,
        PSGTRConfig(),
    )
    assert pred.pan_results.shape == case["pan_results"].shape
    ours_probs = out.rel_logits[-1, 0].softmax(-1).numpy()
    gold_probs = torch.from_numpy(case["rel_cls"][-1]).softmax(-1).numpy()
    ours_q = _object_segment_queries(pred.rel_pair_idxes, pred.rel_dists, ours_probs)
    gold_q = _object_segment_queries(case["rel_pair_idxes"], case["rel_dists"], gold_probs)
    ours_ids = _segment_identities(pred.labels, ours_q)
    gold_ids = _segment_identities(case["labels"], gold_q)
    assert len(set(ours_ids)) == len(ours_ids) and len(set(gold_ids)) == len(gold_ids), name
    # the queries whose subject belongs to each non-object segment (a merged stuff subject), on either side
    subject_queries: dict[int, set[int]] = {}
    for pairs, dists, probs, ids in (
        (pred.rel_pair_idxes, pred.rel_dists, ours_probs, ours_ids),
        (case["rel_pair_idxes"], case["rel_dists"], gold_probs, gold_ids),
    ):
        for (sub, _), query in zip(pairs.tolist(), _relation_queries(dists, probs)):
            if ids[sub] < 0:
                subject_queries.setdefault(ids[sub], set()).add(query)

    # panoptic pixels: same winning entity, or a near-tie between the two winning queries' mask logits
    ours_px = np.asarray(ours_ids)[pred.pan_results // INSTANCE_OFFSET]
    gold_px = np.asarray(gold_ids)[case["pan_results"] // INSTANCE_OFFSET]
    differing = np.argwhere(ours_px != gold_px)
    assert len(differing) <= 2e-4 * pred.pan_results.size, f"{name}: {len(differing)} panoptic pixels differ"
    obj_logits = F.interpolate(out.obj_mask_logits[0][None], size=pred.pan_results.shape, mode="nearest")[0]
    sub_logits = F.interpolate(out.sub_mask_logits[0][None], size=pred.pan_results.shape, mode="nearest")[0]

    def winner_logit(entity: int, y: int, x: int) -> float:
        if entity >= 0:  # an object segment: its query's object mask logit
            return obj_logits[entity, y, x].item()
        queries = sorted(subject_queries.get(entity, ()))
        assert queries, f"{name}: segment {entity} wins pixel {(y, x)} but no relation has it as its subject"
        return sub_logits[queries, y, x].max().item()

    for y, x in differing.tolist():
        ours_logit = winner_logit(int(ours_px[y, x]), y, x)
        gold_logit = winner_logit(int(gold_px[y, x]), y, x)
        tie = NEAR_TIE if min(ours_px[y, x], gold_px[y, x]) >= 0 else BF16_TIE
        assert abs(ours_logit - gold_logit) < tie, f"{name}: pixel {(y, x)}: {ours_logit} vs {gold_logit}"

    # everything else exactly: the entities both sides have (an entity on one side only won near-tie pixels only,
    # all checked above), in the same order, with the same labels, relations and predicates
    common = set(ours_ids) & set(gold_ids)
    ours_common = [i for i, e in enumerate(ours_ids) if e in common]
    gold_common = [i for i, e in enumerate(gold_ids) if e in common]
    assert [ours_ids[i] for i in ours_common] == [gold_ids[i] for i in gold_common], name
    np.testing.assert_array_equal(pred.labels[ours_common], case["labels"][gold_common], err_msg=name)
    ours_rels = _relations(pred.rel_pair_idxes, pred.rel_labels, ours_ids, common)
    assert ours_rels == _relations(case["rel_pair_idxes"], case["rel_labels"], gold_ids, common), name
    # relation rows: same query -> same row within the network tolerance
    gold_rows = {gold_q[obj]: row for (_, obj), row in zip(case["rel_pair_idxes"].tolist(), case["rel_dists"])}
    for (_, obj), row in zip(pred.rel_pair_idxes.tolist(), pred.rel_dists):
        if ours_q[obj] in gold_rows:
            np.testing.assert_allclose(row, gold_rows[ours_q[obj]], atol=1e-6, err_msg=name)
