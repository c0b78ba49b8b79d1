"""The expert interface, the registry and the Perception runner, with small experts defined here."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from moai_sdk.errors import ConfigError, ExpertError, InputError
from moai_sdk.experts import (
    SCENE_GRAPH_MISSING_WARNING,
    Expert,
    Perception,
    available_experts,
    create_expert,
    get_expert_class,
    register_expert,
    unregister_expert,
)
from moai_sdk.results import Box, Detection, Relation, Segment, TextLine
from moai_sdk.verbalization import verbalize, verbalize_parts


class BrightBoxDetector(Expert):
    """Finds the bounding box of bright pixels (> 200 in every channel) and calls it 'lamp'."""

    name = "test-bright-box"
    task = "detection"
    default_model_id = "local/bright"
    default_settings = {"threshold": 200, "label": "lamp"}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.load_calls = 0
        self.predict_calls = 0

    def _load(self):
        self.load_calls += 1
        self.model = "loaded"

    def _predict(self, images):
        self.predict_calls += 1
        out = []
        for img in images:
            bright = (img > self.settings["threshold"]).all(dim=0).numpy()
            dets = []
            if bright.any():
                ys, xs = np.nonzero(bright)
                box = Box.from_xyxy([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], img.shape[2], img.shape[1])
                dets.append(Detection(label=self.settings["label"], label_index=None, score=0.75, box=box))
            out.append(self.make_result(img, detections=dets))
        return out


class WholeImageSegmenter(Expert):
    name = "test-whole-seg"
    task = "segmentation"

    def _load(self):
        self.model = object()

    def _predict(self, images):
        out = []
        for img in images:
            h, w = img.shape[1:]
            ids = np.ones((h, w), dtype=np.int32)
            seg = Segment.from_mask(ids == 1, id=1, label="wall-other-merged", category_id=131)
            out.append(self.make_result(img, segments=[seg], panoptic_ids=ids))
        return out


class ConstantOCR(Expert):
    name = "test-const-ocr"
    task = "ocr"

    def _load(self):
        self.model = object()

    def _predict(self, images):
        return [
            self.make_result(
                img,
                text_lines=[
                    TextLine.from_polygon("OPEN", 0.9, [[1, 1], [20, 1], [20, 8], [1, 8]], img.shape[2], img.shape[1])
                ],
            )
            for img in images
        ]


class BrokenOCR(ConstantOCR):
    name = "test-broken-ocr"

    def _predict(self, images):
        raise RuntimeError("the OCR engine crashed")


class TwoObjectSceneGraph(Expert):
    name = "test-scene-graph"
    task = "scene_graph"

    def _load(self):
        self.model = object()

    def _predict(self, images):
        out = []
        for img in images:
            objs = [
                Segment(id=1, label="person", category_id=0, isthing=True, box=Box.from_xyxy([0, 0, 10, 10]), area=100),
                Segment(id=2, label="dog", category_id=16, isthing=True, box=Box.from_xyxy([20, 20, 40, 40]), area=400),
            ]
            rel = Relation(
                subject_index=0,
                object_index=1,
                subject_label="person",
                object_label="dog",
                predicate="holding",
                predicate_index=21,
                score=0.9,
            )
            out.append(self.make_result(img, scene_graph_objects=objs, relations=[rel]))
        return out


TEST_CLASSES = [BrightBoxDetector, WholeImageSegmenter, ConstantOCR, BrokenOCR, TwoObjectSceneGraph]


@pytest.fixture(autouse=True)
def registered():
    for cls in TEST_CLASSES:
        register_expert(cls)
    yield
    for cls in TEST_CLASSES:
        unregister_expert(cls.name)


def _image(h=480, w=640, box=(100, 50, 300, 250)) -> np.ndarray:
    img = np.full((h, w, 3), 40, dtype=np.uint8)
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = 255
    return img


# --- registry ----------------------------------------------------------------------------------------------


def test_registry_lists_and_creates():
    avail = available_experts()
    assert set(avail) == {"segmentation", "detection", "scene_graph", "ocr"}
    assert "test-bright-box" in avail["detection"] and "test-const-ocr" in avail["ocr"]
    exp = create_expert("test-bright-box", threshold=100)
    assert isinstance(exp, BrightBoxDetector) and exp.settings == {"threshold": 100, "label": "lamp"}
    assert exp.model_id == "local/bright" and not exp.is_loaded
    assert get_expert_class("test-whole-seg") is WholeImageSegmenter


def test_unknown_expert_name_lists_available():
    with pytest.raises(ConfigError, match="unknown expert 'nope'.*test-bright-box"):
        create_expert("nope")
    with pytest.raises(ConfigError, match="unknown expert"):
        Perception(["nope"])


def test_register_validation():
    class NoTask(Expert):
        name = "test-no-task"
        task = "depth"

        def _load(self):
            pass

        def _predict(self, images):
            return []

    with pytest.raises(ConfigError, match="must be one of"):
        register_expert(NoTask)

    class Abstract(Expert):
        name = "test-abstract"
        task = "ocr"

    with pytest.raises(ConfigError, match="does not implement"):
        register_expert(Abstract)
    with pytest.raises(ConfigError, match="Expert subclass"):
        register_expert(int)

    class Clash(ConstantOCR):
        name = "test-const-ocr"

    with pytest.raises(ConfigError, match="already registered"):
        register_expert(Clash)
    register_expert(Clash, replace=True)
    assert get_expert_class("test-const-ocr") is Clash
    register_expert(ConstantOCR, replace=True)
    assert register_expert(ConstantOCR) is ConstantOCR  # idempotent

    @register_expert
    class Decorated(ConstantOCR):
        name = "test-decorated"

    try:
        assert get_expert_class("test-decorated") is Decorated
    finally:
        unregister_expert("test-decorated")


def test_expert_settings_and_cache_key():
    with pytest.raises(ConfigError, match="no setting.*'colour'.*known settings"):
        BrightBoxDetector(colour="red")
    a, b = BrightBoxDetector(), BrightBoxDetector(threshold=10)
    c = BrightBoxDetector(revision="v2")
    assert a.cache_key() != b.cache_key() and a.cache_key() != c.cache_key()
    assert a.cache_key() == BrightBoxDetector().cache_key()
    assert "local/bright" in a.cache_key()


# --- one expert ---------------------------------------------------------------------------------------------


def test_expert_lazy_load_and_predict():
    exp = BrightBoxDetector()
    frame = torch.from_numpy(_image(490, 490, (49, 98, 147, 245))).permute(2, 0, 1).contiguous()
    results = exp.predict([frame])
    assert exp.is_loaded and exp.load_calls == 1 and exp.device == torch.device("cpu")
    (res,) = results
    assert res.detections[0].box.xyxy == (49.0, 98.0, 147.0, 245.0)
    assert res.sources == {"detection": "test-bright-box"}
    assert res.timings["test-bright-box"] >= 0
    exp.predict(frame)  # a single [3, H, W] tensor is one image
    assert exp.load_calls == 1
    exp.unload()
    assert not exp.is_loaded and exp.model is None
    exp.predict(torch.stack([frame, frame]))  # a [B, 3, H, W] batch
    assert exp.load_calls == 2
    assert exp.predict([]) == []


def test_expert_input_validation():
    exp = BrightBoxDetector()
    with pytest.raises(InputError, match="uint8 RGB"):
        exp.predict([torch.zeros(3, 10, 10)])
    with pytest.raises(InputError, match="uint8 RGB"):
        exp.predict([torch.zeros(4, 10, 10, dtype=torch.uint8)])
    with pytest.raises(InputError, match="list of uint8"):
        exp.predict(np.zeros((10, 10, 3), np.uint8))


def test_expert_output_checks():
    class WrongCount(ConstantOCR):
        name = "test-wrong-count"

        def _predict(self, images):
            return []

    class Foreign(ConstantOCR):
        name = "test-foreign"

        def _predict(self, images):
            return [
                self.make_result(img, detections=[Detection(label="x", score=1.0, box=Box.zero())]) for img in images
            ]

    frame = torch.zeros(3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ExpertError, match="test-wrong-count.*one PerceptionResult per image"):
        WrongCount().predict([frame])
    with pytest.raises(ExpertError, match="filled other task"):
        Foreign().predict([frame])
    with pytest.raises(ExpertError, match="test-broken-ocr.*crashed"):
        BrokenOCR().predict([frame])


def test_make_result_validates():
    exp = ConstantOCR()
    frame = torch.zeros(3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ExpertError, match="scene_graph_objects"):
        exp.make_result(
            frame,
            relations=[
                Relation(
                    subject_index=0,
                    object_index=0,
                    subject_label="a",
                    object_label="a",
                    predicate="on",
                    predicate_index=3,
                    score=1,
                )
            ],
        )


# --- the runner ---------------------------------------------------------------------------------------------


def test_user_expert_through_runner():
    perception = Perception(["test-bright-box", WholeImageSegmenter(), "test-const-ocr"])
    assert perception.tasks == {
        "segmentation": "test-whole-seg",
        "detection": "test-bright-box",
        "ocr": "test-const-ocr",
    }
    pil = Image.fromarray(_image(480, 640, (64, 48, 320, 240)))
    (res,) = perception(pil)
    assert (res.image_width, res.image_height) == (640, 480)
    assert (res.frame_width, res.frame_height) == (490, 490)
    assert res.frame_image.shape == (490, 490, 3)
    # 640x480 -> 490x490: the bright rectangle x 64..320 -> 49..245, y 48..240 -> 49..245 (bilinear edges)
    x0, y0, x1, y1 = res.detections[0].box.xyxy
    assert abs(x0 - 49) <= 1 and abs(y0 - 49) <= 1 and abs(x1 - 245) <= 1 and abs(y1 - 245) <= 1
    assert res.sources == {"segmentation": "test-whole-seg", "detection": "test-bright-box", "ocr": "test-const-ocr"}
    assert set(res.timings) == {"test-whole-seg", "test-bright-box", "test-const-ocr"}
    assert SCENE_GRAPH_MISSING_WARNING in res.warnings
    assert res.warnings[0].startswith("scene graph expert not configured: ")
    parts = verbalize_parts(res)
    assert (
        parts.segmentation
        == "The image includes bounding box coordinates and their objects: [0.00, 0.00, 1.00, 1.00] wall."
    )
    assert parts.detection.startswith("The image includes bounding box coordinates and their objects: [0.1")
    assert parts.detection.endswith("] lamp.")
    assert parts.scene_graph == ""
    assert parts.ocr == "The image includes text descriptions: OPEN."
    assert verbalize(res) == " ".join([parts.segmentation, parts.detection, "", parts.ocr])


def test_runner_batch_of_mixed_inputs(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(_image(100, 200)).save(path)
    perception = Perception([BrightBoxDetector(), TwoObjectSceneGraph()], keep_image=False)
    results = perception([path, _image(300, 300), torch.from_numpy(_image(50, 60)).permute(2, 0, 1)])
    assert [(r.image_width, r.image_height) for r in results] == [(200, 100), (300, 300), (60, 50)]
    assert all(r.frame_image is None for r in results)
    assert all(not r.warnings for r in results)  # scene graph configured
    assert results[1].relations[0].predicate == "holding"
    # two objects but one relation row: the official helper yields nothing, the corrected one the relation
    assert verbalize_parts(results[1]).scene_graph == ""
    assert (
        verbalize_parts(results[1], corrected=True).scene_graph
        == "The image includes relationships between objects: person is holding dog."
    )


def test_runner_validation():
    with pytest.raises(ConfigError, match="two experts for the 'ocr' task"):
        Perception(["test-const-ocr", "test-broken-ocr"])
    with pytest.raises(ConfigError, match="on_expert_error"):
        Perception([], on_expert_error="ignore")
    with pytest.raises(ConfigError, match="Expert instances or registered names"):
        Perception([42])
    (res,) = Perception([])(np.zeros((20, 30, 3), np.uint8))
    assert res.tasks == () and verbalize(res) == "   " and res.warnings == [SCENE_GRAPH_MISSING_WARNING]


def test_on_expert_error_raise_names_the_expert():
    perception = Perception(["test-bright-box", "test-broken-ocr"])
    with pytest.raises(ExpertError) as info:
        perception(_image())
    assert info.value.expert == "test-broken-ocr"
    assert "crashed" in str(info.value)


def test_on_expert_error_warn_keeps_other_parts():
    perception = Perception(["test-bright-box", "test-broken-ocr"], on_expert_error="warn")
    (res,) = perception(_image())
    assert len(res.detections) == 1 and res.text_lines == []
    assert "ocr" not in res.sources
    assert any(w.startswith("expert 'test-broken-ocr' failed:") and "crashed" in w for w in res.warnings)


def _waiting_pair(barrier: threading.Barrier) -> list[Expert]:
    """A detector and an OCR expert that both wait at ``barrier`` inside ``_predict``."""

    class WaitingDet(BrightBoxDetector):
        name = "test-wait-det"

        def _predict(self, images):
            barrier.wait()
            return super()._predict(images)

    class WaitingOCR(ConstantOCR):
        name = "test-wait-ocr"

        def _predict(self, images):
            barrier.wait()
            return super()._predict(images)

    return [WaitingDet(), WaitingOCR()]


def test_concurrent_experts_run_in_parallel_threads():
    # both experts must be inside _predict at the same time, or the barrier times out
    (res,) = Perception(_waiting_pair(threading.Barrier(2, timeout=10)), concurrent=True)(_image())
    assert res.detections and res.text_lines and not any("failed" in w for w in res.warnings)
    # run one after the other, they cannot meet
    seq = Perception(_waiting_pair(threading.Barrier(2, timeout=0.2)), concurrent=False, on_expert_error="warn")
    (res,) = seq(_image())
    assert sum("failed" in w for w in res.warnings) == 2


class _Placed:
    """Mixin: pretend the expert computes on ``placed_on`` and record the thread each prediction ran in."""

    placed_on = "cpu"

    @property
    def compute_device_type(self) -> str:
        return self.placed_on

    def _predict(self, images):
        self.threads = getattr(self, "threads", []) + [threading.current_thread().name]
        return super()._predict(images)


def test_auto_schedule_overlaps_cpu_experts_with_accelerator_ones():
    barrier = threading.Barrier(2, timeout=10)

    class GpuDet(_Placed, BrightBoxDetector):
        name, placed_on = "test-gpu-det", "cuda"

        def _predict(self, images):
            barrier.wait()  # the CPU expert must be running at the same time
            return super()._predict(images)

    class GpuSeg(_Placed, WholeImageSegmenter):
        name, placed_on = "test-gpu-seg", "cuda"

    class CpuOCR(_Placed, ConstantOCR):
        name = "test-cpu-ocr"

        def _predict(self, images):
            barrier.wait()
            return super()._predict(images)

    det, seg, ocr = GpuDet(), GpuSeg(), CpuOCR()
    perception = Perception([ocr, det, seg])
    assert perception.concurrent == "auto"
    foreground, background = perception.schedule()
    assert [e.name for e in foreground] == ["test-gpu-seg", "test-gpu-det"] and background == [ocr]
    (res,) = perception(_image())
    assert res.detections and res.text_lines and res.segments and not any("failed" in w for w in res.warnings)
    main = threading.current_thread().name
    assert det.threads == [main] and seg.threads == [main]  # accelerator experts: serial, in the caller
    assert ocr.threads[0].startswith("moai-expert-cpu")


def test_auto_schedule_is_serial_on_one_kind_of_device():
    class CpuDet(_Placed, BrightBoxDetector):
        name = "test-cpu-det"

    class CpuOCR(_Placed, ConstantOCR):
        name = "test-cpu-ocr"

    det, ocr = CpuDet(), CpuOCR()
    perception = Perception([det, ocr])
    assert perception.schedule() == ([det, ocr], [])
    perception(_image())
    assert det.threads == ocr.threads == [threading.current_thread().name]
    # the waiting pair cannot meet without threads
    (res,) = Perception(_waiting_pair(threading.Barrier(2, timeout=0.2)), on_expert_error="warn")(_image())
    assert sum("failed" in w for w in res.warnings) == 2
    with pytest.raises(ConfigError, match="concurrent must be"):
        Perception([det], concurrent="yes")


def test_auto_schedule_error_in_background_is_raised_with_its_name():
    class GpuDet(_Placed, BrightBoxDetector):
        name, placed_on = "test-gpu-det", "cuda"

    broken = create_expert("test-broken-ocr")
    with pytest.raises(ExpertError, match="test-broken-ocr"):
        Perception([GpuDet(), broken])(_image())


def test_rapidocr_always_counts_as_a_cpu_expert():
    from moai_sdk.experts.ocr import RapidOCRExpert

    assert RapidOCRExpert(device="cuda").compute_device_type == "cpu"


def test_concurrent_error_raise():
    with pytest.raises(ExpertError, match="test-broken-ocr"):
        Perception(["test-bright-box", "test-broken-ocr"], concurrent=True)(_image())


def test_runner_cache():
    det = BrightBoxDetector()
    perception = Perception([det], cache_size=8)
    a, b = _image(box=(10, 10, 50, 50)), _image(box=(20, 20, 80, 80))
    first = perception([a, b])
    assert det.predict_calls == 1
    again = perception([b, a])
    assert det.predict_calls == 1  # both served from the cache
    assert again[0].detections == first[1].detections and again[1].detections == first[0].detections
    perception([a, _image(box=(0, 0, 5, 5))])
    assert det.predict_calls == 2
    perception.clear_cache()
    perception([a])
    assert det.predict_calls == 3


def test_runner_load_unload():
    det = BrightBoxDetector()
    perception = Perception([det]).load(device="cpu")
    assert det.is_loaded and det.device == torch.device("cpu")
    perception.unload()
    assert not det.is_loaded
