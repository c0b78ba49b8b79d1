"""Pre- and post-processing of PSGTR exactly as MoAI runs it (mmdet 3.3.0 with MoAI's patches).

Pre-processing (:func:`preprocess`): keep-ratio resize to fit (1333, 800) with OpenCV bilinear on uint8, channel
reversal (MoAI passes RGB to a pipeline that assumes BGR, so the network sees BGR), normalisation with the RGB
statistics, zero padding to a multiple of 32 *after* normalisation; the padded area is attended to (MoAI's mmcv
patch keeps ``img_shape`` unpadded, so its padding mask is empty).

Post-processing (:func:`postprocess`): MoAI's ``PSGTrHead._get_bboxes_single`` followed by ``triplet2Result``
(``eval_pan_rels=True``): top-100 (query, predicate) pairs, masks resized to the original image size through
fp16 -> bf16, triplet de-duplication, the keep filter (including the upstream off-by-one that drops
'wall-other-merged'), stuff/thing merging, a per-pixel bf16 softmax/argmax panoptic map and renumbering.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import DependencyError, InputError
from .config import INSTANCE_OFFSET, NUM_THING_CLASSES, PSGTRConfig


# --------------------------------------------------------------------------------------------------------------
# Pre-processing
# --------------------------------------------------------------------------------------------------------------
def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv ``imrescale`` size rule: the largest keep-ratio size within (long, short) -> (new_h, new_w)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


@dataclass
class PreparedImage:
    """One pre-processed image: ``pixel_values`` [3, H, W] float32 (padded), the resized size ``img_shape``
    (h, w), ``scale_factor`` (w_scale, h_scale) and the size of the image given, ``ori_shape`` (h, w)."""

    pixel_values: torch.Tensor
    img_shape: tuple[int, int]
    scale_factor: tuple[float, float]
    ori_shape: tuple[int, int]

    @property
    def padding_mask(self) -> torch.Tensor:
        """[H, W] bool, True on the padded pixels."""
        mask = torch.ones(self.pixel_values.shape[-2:], dtype=torch.bool)
        mask[: self.img_shape[0], : self.img_shape[1]] = False
        return mask


def _resize_uint8(hwc: np.ndarray, size_hw: tuple[int, int], backend: str) -> np.ndarray:
    """Bilinear resize of a uint8 HWC array. ``cv2`` reproduces mmcv exactly; ``torch`` approximates it."""
    new_h, new_w = size_hw
    if backend == "cv2":
        try:
            import cv2
        except ImportError as exc:
            raise DependencyError(
                "PSGTR pre-processing needs OpenCV to match MoAI exactly: pip install 'moai-sdk[experts]' "
                "(or opencv-python-headless); or set resize_backend='torch' to resize without it (approximate)"
            ) from exc
        return cv2.resize(hwc, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    t = torch.from_numpy(np.ascontiguousarray(hwc)).permute(2, 0, 1)[None].float()
    out = F.interpolate(t, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=False)
    return out.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()


def preprocess_image(image: torch.Tensor | np.ndarray, config: PSGTRConfig) -> PreparedImage:
    """Pre-process one RGB uint8 image (tensor [3, H, W] or array [H, W, 3]) the way MoAI feeds PSGTR."""
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise InputError(f"PSGTR expects uint8 RGB images [3, H, W]; got {image.dtype} {tuple(image.shape)}")
        hwc = image.detach().cpu().permute(1, 2, 0).contiguous().numpy()
    else:
        hwc = np.asarray(image)
        if hwc.dtype != np.uint8 or hwc.ndim != 3 or hwc.shape[2] != 3:
            raise InputError(f"PSGTR expects uint8 RGB arrays [H, W, 3]; got {hwc.dtype} {hwc.shape}")
    h, w = hwc.shape[:2]
    if h < 1 or w < 1:
        raise InputError(f"PSGTR got an empty image ({h}x{w})")
    new_h, new_w = rescale_size(h, w, config.scale)
    resized = _resize_uint8(hwc, (new_h, new_w), config.resize_backend)
    if config.swap_channels:
        resized = resized[..., ::-1]
    x = torch.from_numpy(np.ascontiguousarray(resized)).to(torch.float32)
    mean = torch.tensor(config.mean, dtype=torch.float32)
    std = torch.tensor(config.std, dtype=torch.float32)
    x = ((x - mean) / std).permute(2, 0, 1)
    d = config.size_divisor
    pad_h, pad_w = -new_h % d, -new_w % d
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), value=0.0)
    return PreparedImage(x.contiguous(), (new_h, new_w), (new_w / w, new_h / h), (h, w))


# --------------------------------------------------------------------------------------------------------------
# Post-processing
# --------------------------------------------------------------------------------------------------------------
@dataclass
class SceneGraphPrediction:
    """PSGTR's result for one image, as MoAI's ``triplet2Result`` returns it (numpy arrays).

    ``labels`` (K,) 1-based COCO-panoptic classes of the segments; ``masks`` (K, H, W) bool;
    ``pan_results`` (H, W) int64 = segment index * 1000 + 0-based class; ``rel_pair_idxes`` (M, 2) int32
    (subject, object) indices into ``labels``; ``rel_dists`` (M, 57) float32 predicate distributions (column 0 =
    no relation); ``rel_labels`` (M,) 1-based predicate chosen by the top-k; ``rels`` (M, 3) pairs + label (one
    ``[0, 0, 0]`` row when M = 0); ``refine_bboxes`` (2T, 5) xyxy + score of the de-duplicated triplets' subjects
    then objects, in original-image pixels (not aligned with ``labels``).

    Extras of this port: ``segment_scores`` (K,) the class score of the entity each segment comes from and
    ``empty``, True when no triplet passed the filter (then, like the official code, ``labels`` = [1] with one
    all-ones mask and there are no relations).
    """

    pan_results: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    rel_pair_idxes: np.ndarray
    rel_dists: np.ndarray
    rel_labels: np.ndarray
    rels: np.ndarray
    refine_bboxes: np.ndarray
    segment_scores: np.ndarray
    empty: bool


def _cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.split((1, 1, 1, 1), dim=-1)
    return torch.cat([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def _pixel_boxes(
    boxes: torch.Tensor, scores: torch.Tensor, img_shape: tuple[int, int], scale_factor: tuple[float, float]
) -> torch.Tensor:
    """Normalised cxcywh -> xyxy in resized pixels, clamped to the resized image, divided by the scale factor."""
    xyxy = _cxcywh_to_xyxy(boxes)
    xyxy[:, 0::2] = (xyxy[:, 0::2] * img_shape[1]).clamp(min=0, max=img_shape[1])
    xyxy[:, 1::2] = (xyxy[:, 1::2] * img_shape[0]).clamp(min=0, max=img_shape[0])
    xyxy = xyxy / xyxy.new_tensor(tuple(scale_factor) * 2)
    return torch.cat([xyxy, scores[:, None]], dim=-1)


class _MaskSet:
    """Pairwise IoUs of binary masks, computed once with a matrix product.

    ``index`` maps item i to row ``index[i]`` of ``masks`` (items sharing a mask share a row). Counts stay below
    2**24, so the float32 sums of 0/1 products are exact whatever the summation order.
    """

    def __init__(self, masks: torch.Tensor, index: torch.Tensor | None = None):
        values = masks.flatten(1).to(torch.float32)
        self.intersections = (values @ values.T).cpu()
        self.areas = self.intersections.diagonal().clone()
        self.index = (index if index is not None else torch.arange(masks.shape[0])).cpu()

    def __len__(self) -> int:
        return self.index.shape[0]

    def ious(self, base: int, others: list[int]) -> list[float]:
        """IoU of item ``base`` with each of ``others`` (0/0 gives NaN, which compares False)."""
        b, rows = self.index[base], self.index[others]
        inter = self.intersections[b, rows]
        union = self.areas[b] + self.areas[rows] - inter
        return (inter / union).tolist()


def _dedup_triplets(
    groups: list[list[int]], s_masks: _MaskSet, o_masks: _MaskSet, iou_threshold: float
) -> torch.Tensor:
    """Within each (subject, object, predicate) class group, drop later triplets whose subject AND object masks
    overlap an earlier kept one with IoU > threshold. Returns the keep flags over all triplets."""
    keep = torch.ones(len(s_masks), dtype=torch.bool)
    for ids in groups:
        while len(ids) > 1:
            base, rest = ids[0], ids[1:]
            left = []
            for s, o, other in zip(s_masks.ious(base, rest), o_masks.ious(base, rest), rest):
                if s > iou_threshold and o > iou_threshold:
                    keep[other] = False
                else:
                    left.append(other)
            ids = left
    return keep


def _thing_groups(ids: list[int], masks: _MaskSet, iou_threshold: float) -> list[list[int]]:
    """Greedy grouping of same-class thing entities: each group = a base and the later ones with IoU > threshold."""
    groups = []
    while len(ids) > 1:
        base, rest = ids[0], ids[1:]
        ious = masks.ious(base, rest)
        groups.append([base] + [other for iou, other in zip(ious, rest) if iou > iou_threshold])
        ids = [other for iou, other in zip(ious, rest) if not iou > iou_threshold]
    if len(ids) == 1:
        groups.append(ids)
    return groups


def postprocess(
    sub_logits: torch.Tensor,
    obj_logits: torch.Tensor,
    rel_logits: torch.Tensor,
    sub_boxes: torch.Tensor,
    obj_boxes: torch.Tensor,
    sub_mask_logits: torch.Tensor,
    obj_mask_logits: torch.Tensor,
    img_shape: tuple[int, int],
    scale_factor: tuple[float, float],
    config: PSGTRConfig,
) -> SceneGraphPrediction:
    """Turn one image's last-layer outputs into the scene graph MoAI reads (see the module docstring).

    Inputs: class logits [Q, classes + 1], predicate logits [Q, predicates + 1], boxes [Q, 4] (sigmoid cxcywh),
    mask logits [Q, h, w] at stride 4 of the padded input; ``img_shape`` the resized unpadded (h, w) and
    ``scale_factor`` (w_scale, h_scale) from :func:`preprocess_image`.
    """
    num_rel = config.num_relations
    sub_logits, obj_logits, rel_logits = sub_logits.float(), obj_logits.float(), rel_logits.float()
    sub_boxes, obj_boxes = sub_boxes.float(), obj_boxes.float()
    mask_size = (round(img_shape[0] / scale_factor[1]), round(img_shape[1] / scale_factor[0]))

    # 1-2. entity scores (background column dropped, no renormalisation), top-k (query, predicate) pairs
    s_scores, s_labels = F.softmax(sub_logits, dim=-1)[..., :-1].max(-1)
    o_scores, o_labels = F.softmax(obj_logits, dim=-1)[..., :-1].max(-1)
    r_probs = F.softmax(rel_logits, dim=-1)
    r_scores, r_index = r_probs[..., 1:].reshape(-1).topk(config.max_per_img)
    r_labels = r_index % num_rel + 1
    triplet = r_index // num_rel
    s_scores, s_labels, s_boxes = s_scores[triplet], s_labels[triplet] + 1, sub_boxes[triplet]
    o_scores, o_labels, o_boxes = o_scores[triplet], o_labels[triplet] + 1, obj_boxes[triplet]
    r_dists = r_probs[triplet]

    # 3. masks at the original image size (MoAI: fp32 -> fp16 -> nearest resize -> bf16; OpenPSG: fp32). A query
    #    can appear with several predicates; resizing and thresholding are per query, so do them once per query.
    queries, query_of_triplet = torch.unique(triplet, return_inverse=True)

    def resize(logits: torch.Tensor) -> torch.Tensor:
        x = logits[queries].unsqueeze(1)
        if config.mask_dtype == "bfloat16":
            return F.interpolate(x.to(torch.float16), size=mask_size).squeeze(1).to(torch.bfloat16)
        return F.interpolate(x.float(), size=mask_size).squeeze(1)

    s_query_logits, o_query_logits = resize(sub_mask_logits), resize(obj_mask_logits)
    s_query_masks = torch.sigmoid(s_query_logits) > config.mask_threshold
    o_query_masks = torch.sigmoid(o_query_logits) > config.mask_threshold
    s_mask_logits, o_mask_logits = s_query_logits[query_of_triplet], o_query_logits[query_of_triplet]
    s_masks, o_masks = s_query_masks[query_of_triplet], o_query_masks[query_of_triplet]

    # 4. triplet de-duplication within (subject, object, predicate) class groups, in top-k order
    by_class: dict[tuple[int, int, int], list[int]] = defaultdict(list)
    for k, key in enumerate(zip(s_labels.tolist(), o_labels.tolist(), r_labels.tolist())):
        by_class[key].append(k)
    keep_tri = _dedup_triplets(
        [ids for ids in by_class.values() if len(ids) > 1],
        _MaskSet(s_query_masks, query_of_triplet),
        _MaskSet(o_query_masks, query_of_triplet),
        config.dedup_iou_threshold,
    ).to(s_labels.device)

    boxes = torch.cat(
        (
            _pixel_boxes(s_boxes, s_scores, img_shape, scale_factor)[keep_tri],
            _pixel_boxes(o_boxes, o_scores, img_shape, scale_factor)[keep_tri],
        ),
        0,
    )
    s_labels, o_labels = s_labels[keep_tri], o_labels[keep_tri]
    s_scores, o_scores = s_scores[keep_tri], o_scores[keep_tri]
    r_scores, r_labels, r_dists = r_scores[keep_tri], r_labels[keep_tri], r_dists[keep_tri]
    s_masks, o_masks = s_masks[keep_tri], o_masks[keep_tri]
    s_mask_logits, o_mask_logits = s_mask_logits[keep_tri], o_mask_logits[keep_tri]

    # 5. keep filter (the official class test drops 1-based label num_classes - 1, i.e. 0-based 131)
    keep = (
        (s_scores > config.entity_score_threshold)
        & (o_scores > config.entity_score_threshold)
        & (r_scores > config.relation_score_threshold)
    )
    if config.drop_class_index is not None:
        keep &= (s_labels != config.drop_class_index + 1) & (o_labels != config.drop_class_index + 1)
    r_labels, r_dists = r_labels[keep], r_dists[keep]
    labels = torch.cat((s_labels[keep], o_labels[keep]), 0) - 1
    scores = torch.cat((s_scores[keep], o_scores[keep]), 0)
    masks = torch.cat((s_masks[keep], o_masks[keep]), 0)
    mask_logits = torch.cat((s_mask_logits[keep], o_mask_logits[keep]), 0)
    refine_bboxes = boxes.cpu().numpy().astype(np.float32)

    # 6. nothing left: the official placeholder result
    if labels.numel() == 0:
        h, w = mask_size
        return SceneGraphPrediction(
            pan_results=np.ones((h, w), dtype=np.int64),
            labels=np.array([1], dtype=np.int64),
            masks=np.ones((1, h, w), dtype=bool),
            rel_pair_idxes=np.zeros((0, 2), dtype=np.int32),
            rel_dists=r_dists.cpu().numpy().astype(np.float32).reshape(0, num_rel + 1),
            rel_labels=r_labels.cpu().numpy().astype(np.int64),
            rels=np.zeros((1, 3), dtype=np.int64),
            refine_bboxes=refine_bboxes,
            segment_scores=np.zeros((1,), dtype=np.float32),
            empty=True,
        )

    # 7. merge groups: all entities of one stuff class; thing instances of one class with mask IoU > threshold
    stuff: dict[int, list[int]] = defaultdict(list)
    things: dict[int, list[int]] = defaultdict(list)
    for k, label in enumerate(labels.tolist()):
        (stuff if label >= NUM_THING_CLASSES else things)[label].append(k)
    entity_masks = _MaskSet(masks)
    groups = [ids for ids in stuff.values() if len(ids) > 1]
    for ids in things.values():
        groups.extend(g for g in _thing_groups(ids, entity_masks, config.dedup_iou_threshold) if len(g) > 1)

    # 8. panoptic map: per-pixel softmax over the entity logits (in the mask dtype), first index wins ties
    h, w = mask_logits.shape[-2:]
    entity_ids = mask_logits.flatten(1).transpose(0, 1).softmax(-1).argmax(-1).view(h, w)
    num_entities = labels.shape[0]
    representative = torch.arange(num_entities, device=entity_ids.device)
    for ids in groups:
        representative[ids] = ids[0]
    entity_ids = representative[entity_ids]
    pairs = representative.cpu().reshape(2, -1).T

    # 9. drop pairs whose subject or object vanished from the map; renumber the surviving ids 0..K-1
    present = (torch.bincount(entity_ids.flatten(), minlength=num_entities) > 0).cpu()
    remaining = present.nonzero().squeeze(1)  # ascending, like the official sorted unique ids
    pair_ok = present[pairs[:, 0]] & present[pairs[:, 1]]
    new_index = torch.full((num_entities,), -1, dtype=torch.long)
    new_index[remaining] = torch.arange(remaining.numel())
    pairs = new_index[pairs[pair_ok]]
    r_labels, r_dists = r_labels[pair_ok.to(r_labels.device)], r_dists[pair_ok.to(r_dists.device)]
    segment_map = new_index.to(entity_ids.device)[entity_ids]
    seg_labels = labels[remaining.to(labels.device)]

    # 10. MoAI's triplet2Result(eval_pan_rels=True)
    segment_map_np = segment_map.cpu().numpy().astype(np.int64)
    seg_labels_np = seg_labels.cpu().numpy().astype(np.int64)
    rel_labels_np = r_labels.cpu().numpy().astype(np.int64)
    pairs_np = pairs.numpy().astype(np.int32)
    return SceneGraphPrediction(
        pan_results=segment_map_np * INSTANCE_OFFSET + seg_labels_np[segment_map_np],
        labels=seg_labels_np + 1,
        masks=segment_map_np[None] == np.arange(len(seg_labels_np))[:, None, None],
        rel_pair_idxes=pairs_np,
        rel_dists=r_dists.float().cpu().numpy(),
        rel_labels=rel_labels_np,
        rels=(
            np.concatenate([pairs_np.astype(np.int64), rel_labels_np[:, None]], axis=1)
            if len(rel_labels_np)
            else np.zeros((1, 3), dtype=np.int64)
        ),
        refine_bboxes=refine_bboxes,
        segment_scores=scores[remaining.to(scores.device)].float().cpu().numpy(),
        empty=False,
    )


__all__ = ["rescale_size", "PreparedImage", "preprocess_image", "SceneGraphPrediction", "postprocess"]
