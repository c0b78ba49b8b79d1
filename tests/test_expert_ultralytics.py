"""The ultralytics backends (yolo-seg, yolo-world) with models built from their .yaml configs.

Random weights, built locally: the tests check that nothing is downloaded and that the conversion to typed
results is right; what the random models find is meaningless.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch

from conftest import random_frames as frames

# keep ultralytics' settings file out of the home folder and its online checks off (read once, at import)
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="moai-yolo-"))
os.environ.setdefault("YOLO_OFFLINE", "1")

_omp = os.environ.get("OMP_NUM_THREADS")
ultralytics = pytest.importorskip("ultralytics")
if _omp is None:  # ultralytics sets OMP_NUM_THREADS=1 on import; keep it out of later subprocess tests
    os.environ.pop("OMP_NUM_THREADS", None)

from moai_sdk.errors import CheckpointError, ConfigError  # noqa: E402
from moai_sdk.experts import available_experts, create_expert  # noqa: E402
from moai_sdk.experts.detection import official_queries  # noqa: E402
from moai_sdk.experts.segmentation import (  # noqa: E402
    YoloSegExpert,
    instances_to_panoptic,
    yolo_names_to_panoptic,
)
from moai_sdk.results import load_vocab  # noqa: E402

COCO = load_vocab("COCO_PANOPTIC_CLASSES")


@pytest.fixture(autouse=True)
def no_ultralytics_downloads(monkeypatch):
    """ultralytics fetches assets on its own; make any such attempt fail the test (sockets are refused too)."""
    from ultralytics.utils import downloads

    def no_download(*args, **kwargs):
        raise AssertionError(f"ultralytics tried to download {args[:1]}")

    monkeypatch.setattr(downloads, "attempt_download_asset", no_download)
    monkeypatch.setattr(downloads, "safe_download", no_download)
    torch.manual_seed(0)  # the .yaml models draw their random weights from the global generator


@pytest.fixture
def fake_text_encoders(monkeypatch):
    """Stand-ins for the CLIP / MobileCLIP text encoders (ultralytics would download them): fixed random unit
    vectors, one call recorded per encoding of a class list."""
    from ultralytics.nn.tasks import WorldModel, YOLOEModel

    calls: list[int] = []

    def encode(self, text, *args, **kwargs):
        calls.append(len(text))
        g = torch.Generator().manual_seed(len(text))
        return torch.nn.functional.normalize(torch.randn(1, len(text), 512, generator=g), dim=-1)

    monkeypatch.setattr(WorldModel, "get_text_pe", encode)
    monkeypatch.setattr(YOLOEModel, "get_text_pe", encode)
    return calls


def test_registered():
    experts = available_experts()
    assert "yolo-seg" in experts["segmentation"] and "yolo-world" in experts["detection"]


def test_yolo_seg_from_yaml_end_to_end():
    exp = create_expert(
        "yolo-seg",
        model_id="yolov8n-seg.yaml",
        device="cpu",
        conf=0.0,
        imgsz=160,
        max_det=30,
        overlap_mask_area_threshold=0.0,
        local_files_only=True,
    )
    assert isinstance(exp, YoloSegExpert)
    results = exp.predict(frames(3))
    assert len(results) == 3
    total = 0
    for res in results:
        ids = res.panoptic_ids
        assert ids.shape == (490, 490) and ids.dtype == np.int32
        assert res.sources == {"segmentation": "yolo-seg"}
        present = sorted(set(np.unique(ids).tolist()) - {0, -1})
        assert [s.id for s in res.segments] == list(range(1, len(res.segments) + 1)) == present
        for seg in res.segments:
            mask = ids == seg.id
            assert seg.area == int(mask.sum()) > 0 and np.array_equal(seg.mask, mask)
            assert seg.isthing and seg.category_id < 80 and seg.label == COCO[seg.category_id]
        scores = [s.score for s in res.segments]
        assert scores == sorted(scores, reverse=True)  # painted best first
        total += len(res.segments)
    assert total > 0, "conf=0 on a random model must give instances"


def test_yolo_seg_default_threshold_on_random_weights_finds_nothing():
    exp = create_expert("yolo-seg", model_id="yolov8n-seg.yaml", device="cpu", imgsz=160)
    (res,) = exp.predict(frames(1))
    assert res.segments == [] and (res.panoptic_ids == -1).all()


def test_instances_to_panoptic_by_hand():
    masks = np.zeros((4, 6, 6), bool)
    masks[0, :3, :3] = True  # score 0.6: loses 1 of 9 pixels to instance 1, keeps 8/9 > 0.8
    masks[1, 2:4, 2:4] = True  # score 0.9: painted first
    masks[2, :, 5] = True  # score 0.7
    masks[3, 2:4, 2:4] = True  # score 0.8: fully covered by instance 1 -> dropped
    ids, infos = instances_to_panoptic(masks, np.array([0.6, 0.9, 0.7, 0.8]), [0, 16, 2, 3])
    assert [(i["id"], i["label_id"], i["score"]) for i in infos] == [(1, 16, 0.9), (2, 2, 0.7), (3, 0, 0.6)]
    expected = np.zeros((6, 6), np.int32)
    expected[:3, :3] = 3
    expected[2:4, 2:4] = 1
    expected[:, 5] = 2
    np.testing.assert_array_equal(ids, expected)
    ids, infos = instances_to_panoptic(np.zeros((0, 5, 7), bool), np.zeros(0), [])
    assert infos == [] and ids.shape == (5, 7) and (ids == -1).all()
    with pytest.raises(ValueError, match="N x H x W"):
        instances_to_panoptic(np.zeros((5, 7), bool), np.zeros(0), [])


def test_yolo_names_to_panoptic():
    coco80 = dict(enumerate(COCO[:80]))
    assert yolo_names_to_panoptic(coco80) == {i: i for i in range(80)}
    assert yolo_names_to_panoptic({0: "dog", 1: "person"}) == {0: 16, 1: 0}
    assert yolo_names_to_panoptic({i: str(i) for i in range(80)}) == {i: i for i in range(80)}
    with pytest.raises(ConfigError, match="not COCO classes"):
        yolo_names_to_panoptic({0: "pothole"})
    with pytest.raises(ConfigError, match="beyond the 80"):
        yolo_names_to_panoptic({i: str(i) for i in range(81)})


def test_yolo_weights_resolution_errors(tmp_path):
    missing = create_expert("yolo-seg", model_id="yolo11m-seg.pt", local_files_only=True)
    with pytest.raises(CheckpointError, match="local_files_only"):
        missing.load()
    with pytest.raises(ConfigError, match="neither an existing file"):
        create_expert("yolo-seg", model_id=str(tmp_path / "model.onnx2")).load()
    with pytest.raises(ConfigError, match="segmentation model"):
        create_expert("yolo-seg", model_id="yolov8n.yaml", device="cpu").load()
    with pytest.raises(ConfigError, match="float32 or float16"):
        create_expert("yolo-seg", model_id="yolov8n-seg.yaml", device="cpu", dtype=torch.bfloat16).load()


def test_yolo_world_sets_classes_once(fake_text_encoders):
    exp = create_expert(
        "yolo-world",
        model_id="yolov8s-worldv2.yaml",
        device="cpu",
        conf=0.0,
        imgsz=160,
        max_det=20,
        local_files_only=True,
    )
    first = exp.predict(frames(2))
    exp.predict(frames(1, seed=5))
    assert fake_text_encoders == [1847]  # the whole official list, encoded once at load
    queries = official_queries()
    found = [d for res in first for d in res.detections]
    assert found, "conf=0 on a random model must give boxes"
    for det in found:
        assert 0 <= det.label_index < 1847 and det.label == queries[det.label_index]
        assert det.box.frame_width == 490 and 0.0 <= det.score <= 1.0
        assert det.box.x1 >= det.box.x0 and det.box.y1 >= det.box.y0
    assert all(res.sources == {"detection": "yolo-world"} for res in first)


def test_yoloe_is_picked_by_name(fake_text_encoders):
    exp = create_expert(
        "yolo-world",
        model_id="yoloe-11s-seg.yaml",
        device="cpu",
        conf=0.0,
        imgsz=160,
        max_det=10,
        queries=["cat", "dog", "traffic cone"],
    )
    (res,) = exp.predict(frames(1))
    assert exp.is_yoloe and fake_text_encoders == [3]
    assert res.detections and {d.label for d in res.detections} <= {"cat", "dog", "traffic cone"}
    assert "3 queries sha256:" in exp.cache_key()


def test_ultralytics_experts_leave_process_thread_settings_alone():
    """ultralytics resets torch to cores-1 threads and sets OMP_NUM_THREADS; our experts undo that."""
    before_threads = torch.get_num_threads()
    before_omp = os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(2)
    try:
        expert = create_expert("yolo-seg", model_id="yolov8n-seg.yaml", device="cpu")
        expert.predict(frames(1))
        assert torch.get_num_threads() == 2
        assert os.environ.get("OMP_NUM_THREADS") == before_omp
    finally:
        torch.set_num_threads(before_threads)
