"""The registered ``psgtr`` expert: registry, settings, batched inference and the typed results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moai_sdk.errors import CheckpointError, ConfigError
from moai_sdk.experts import Perception, available_experts, create_expert
from moai_sdk.experts.scene_graph import PSGTRExpert, prediction_to_fields
from moai_sdk.labels import load_vocab
from moai_sdk.results import PerceptionResult
from moai_sdk.testing import synthetic_state_dict
from moai_sdk.verbalization import verbalize_scene_graph

#: A reduced resize target keeps these tests fast (MoAI's 490 x 490 frames become 800 x 800 by default).
SMALL = {"scale": (160, 128)}


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("psgtr-weights") / "psgtr_synthetic.safetensors"
    save_file({k: v.contiguous() for k, v in synthetic_state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def frames():
    g = torch.Generator().manual_seed(3)
    square = [torch.randint(0, 256, (3, 490, 490), dtype=torch.uint8, generator=g) for _ in range(2)]
    wide = torch.randint(0, 256, (3, 300, 420), dtype=torch.uint8, generator=g)
    return [square[0], wide, square[1]]


@pytest.fixture(scope="module")
def expert(weights_file):
    return create_expert("psgtr", model_id=str(weights_file), device="cpu", batch_size=2, **SMALL)


@pytest.fixture(scope="module")
def predictions(expert, frames):
    return expert.predict(frames)


def test_registered_as_the_scene_graph_expert():
    assert "psgtr" in available_experts()["scene_graph"]
    exp = create_expert("psgtr")
    assert isinstance(exp, PSGTRExpert) and exp.task == "scene_graph"
    assert exp.model_id == "ECCV2022/PSG" and not exp.is_loaded
    assert '"mask_dtype": "bfloat16"' in exp.cache_key()


def test_settings_are_validated():
    with pytest.raises(ConfigError, match="no setting"):
        create_expert("psgtr", threshold=0.5)
    with pytest.raises(ConfigError, match="batch_size"):
        create_expert("psgtr", batch_size=0)
    with pytest.raises(ConfigError, match="mask_dtype"):
        create_expert("psgtr", mask_dtype="float16")
    with pytest.raises(ConfigError, match="float32, float16 or bfloat16"):
        create_expert("psgtr", dtype=torch.int8)


def test_missing_weights_raise_a_checkpoint_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    exp = create_expert("psgtr", cache_dir=str(tmp_path), device="cpu")
    with pytest.raises(CheckpointError, match="hf download ECCV2022/PSG"):
        exp.load()


def test_predictions_are_typed_and_consistent(expert, frames, predictions):
    assert expert.weights_origin == "safetensors"
    assert len(predictions) == len(frames)
    for frame, result in zip(frames, predictions):
        h, w = frame.shape[1:]
        assert isinstance(result, PerceptionResult)
        assert (result.frame_height, result.frame_width) == (h, w)
        assert result.sources == {"scene_graph": "psgtr"} and result.timings["psgtr"] > 0
        assert result.segments == [] and result.detections == [] and result.text_lines == []
        for obj in result.scene_graph_objects:
            assert obj.mask.shape == (h, w) and obj.area == int(obj.mask.sum())
        for rel in result.relations:
            assert rel.score == max(rel.distribution[1:]) and len(rel.distribution) == 57
    # the synthetic weights find something on random frames, so the checks above are not vacuous
    assert sum(len(r.relations) for r in predictions) > 0
    assert isinstance(verbalize_scene_graph(predictions[0]), str)


def test_typed_results_are_the_raw_arrays_converted(expert, frames, predictions):
    raw = expert.predict_raw(frames[1:2])[0]
    assert raw.pan_results.shape == tuple(frames[1].shape[1:])
    objects, relations = prediction_to_fields(raw)
    assert predictions[1].scene_graph_objects == objects and predictions[1].relations == relations
    light, _ = prediction_to_fields(raw, keep_masks=False)
    assert [o.mask for o in light] == [None] * len(light)
    assert [(o.area, o.box) for o in light] == [(o.area, o.box) for o in objects]


def test_batching_matches_single_image_runs(weights_file, frames, predictions):
    """frames 0 and 2 share a shape and ran in one batch of 2; rerun them one by one."""
    single = create_expert("psgtr", model_id=str(weights_file), device="cpu", batch_size=1, **SMALL)
    for index in (0, 2):
        alone, batched = single.predict([frames[index]])[0], predictions[index]
        assert [o.label for o in alone.scene_graph_objects] == [o.label for o in batched.scene_graph_objects]
        assert [(r.subject_index, r.object_index, r.predicate) for r in alone.relations] == [
            (r.subject_index, r.object_index, r.predicate) for r in batched.relations
        ]
        for a, b in zip(alone.relations, batched.relations):
            np.testing.assert_allclose(a.distribution, b.distribution, atol=1e-4)


def test_perception_runner_uses_the_expert(expert):
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))
    runner = Perception([expert])
    result = runner(image)[0]
    assert result.sources == {"scene_graph": "psgtr"}
    assert (result.image_width, result.image_height) == (320, 240)
    assert (result.frame_width, result.frame_height) == (490, 490)
    assert result.warnings == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(weights_file, frames):
    from safetensors.torch import load_file

    from moai_sdk.experts.scene_graph import PSGTR, load_into, postprocess, preprocess_image
    from moai_sdk.experts.scene_graph.expert import _tf32

    model = PSGTR()
    load_into(model, load_file(str(weights_file)))
    config = model.config.replace(**SMALL)
    prepared = preprocess_image(frames[0], config)
    x = prepared.pixel_values[None]
    with torch.inference_mode():
        cpu = model(x)
        gpu_model = model.cuda()
        with _tf32(False):  # strict fp32: the GPU then agrees with the CPU up to float noise
            gpu = gpu_model(x.cuda())
    for name in ("sub_logits", "obj_logits", "rel_logits", "sub_boxes", "sub_mask_logits", "obj_mask_logits"):
        torch.testing.assert_close(getattr(gpu, name).cpu(), getattr(cpu, name), atol=1e-3, rtol=1e-3)
    # post-processing gives the same arrays on either device for the same network outputs
    heads = [
        cpu.sub_logits[-1, 0],
        cpu.obj_logits[-1, 0],
        cpu.rel_logits[-1, 0],
        cpu.sub_boxes[-1, 0],
        cpu.obj_boxes[-1, 0],
        cpu.sub_mask_logits[0],
        cpu.obj_mask_logits[0],
    ]
    on_cpu = postprocess(*heads, prepared.img_shape, prepared.scale_factor, config)
    on_gpu = postprocess(*[h.cuda() for h in heads], prepared.img_shape, prepared.scale_factor, config)
    for key in ("pan_results", "labels", "rel_pair_idxes", "rel_dists", "rel_labels", "masks"):
        np.testing.assert_array_equal(getattr(on_gpu, key), getattr(on_cpu, key), err_msg=key)
    # box scores come from a softmax whose last bit differs between the CPU and CUDA kernels
    np.testing.assert_allclose(on_gpu.refine_bboxes, on_cpu.refine_bboxes, rtol=1e-6, atol=1e-6)
    # the expert runs on CUDA in every supported precision
    for kwargs in ({"allow_tf32": False}, {}, {"dtype": torch.float16}):
        exp = create_expert("psgtr", model_id=str(weights_file), device="cuda", batch_size=2, **SMALL, **kwargs)
        results = exp.predict(frames)
        assert [r.sources for r in results] == [{"scene_graph": "psgtr"}] * len(frames)
        assert next(exp.model.parameters()).device.type == "cuda"


def test_tiny_psgtr_runs_through_the_expert(tmp_path):
    """The tiny ResNet-18 PSGTR of moai_sdk.testing loads through the same expert and returns typed results;
    an unknown architecture field is refused."""
    from moai_sdk.errors import ConfigError
    from moai_sdk.experts import create_expert
    from moai_sdk.testing import build_tiny_psgtr, tiny_psgtr_settings

    weights = build_tiny_psgtr(tmp_path / "psgtr.safetensors", seed=0)
    expert = create_expert("psgtr", model_id=str(weights), device="cpu", **tiny_psgtr_settings())
    frames = [
        torch.randint(0, 256, (3, 490, 490), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        for i in range(2)
    ]
    results = expert.predict(frames)
    assert [r.sources for r in results] == [{"scene_graph": "psgtr"}] * 2
    # random weights score below the default keep thresholds (0.5 / 0.3): nothing is kept
    assert all(not r.scene_graph_objects and not r.relations for r in results)
    # with the keep filter open, every query's entities and relations come through, typed and consistent
    open_expert = create_expert(
        "psgtr",
        model_id=str(weights),
        device="cpu",
        entity_score_threshold=0.0,
        relation_score_threshold=0.0,
        **tiny_psgtr_settings(),
    )
    for r in open_expert.predict(frames):
        objects = r.scene_graph_objects
        assert len(objects) >= 2 and len(r.relations) >= 2
        for rel in r.relations:
            assert 0 <= rel.subject_index < len(objects) and 0 <= rel.object_index < len(objects)
            assert rel.subject_index != rel.object_index
            assert (rel.subject_label, rel.object_label) == (
                objects[rel.subject_index].label,
                objects[rel.object_index].label,
            )
            assert 0 <= rel.predicate_index < 56 and rel.predicate == load_vocab("PREDICATES")[rel.predicate_index]
            dist = np.asarray(rel.distribution)
            assert dist.shape == (57,) and abs(dist.sum() - 1) < 1e-5  # softmax row, column 0 = no relation
            assert rel.predicate_index == int(dist[1:].argmax()) and rel.score == pytest.approx(dist[1:].max())
    assert expert.model.config.depth == 18 and expert.model.config.num_queries == 10
    with pytest.raises(ConfigError, match="unknown field"):
        create_expert("psgtr", model_id=str(weights), architecture={"depth": 18, "width": 3})
