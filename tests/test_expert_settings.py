"""Typed expert settings: one Pydantic model per expert, shared value types, ConfigError naming the bad field;
the Hub options an expert carries (``expert.hub`` and the read-only legacy attributes)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moai_sdk.errors import ConfigError
from moai_sdk.experts import create_expert, get_expert_class
from moai_sdk.experts.settings import ExpertSettings, PositiveInt, UnitFloat
from moai_sdk.hub import HubOptions

BUILTIN = ("mask2former", "yolo-seg", "owlv2", "yolo-world", "psgtr", "rapidocr", "paddleocr")

#: (expert, unit-interval settings, positive-integer settings) of the built-in experts.
UNIT_FIELDS = {
    "mask2former": ("threshold", "mask_threshold", "overlap_mask_area_threshold"),
    "yolo-seg": ("conf", "iou", "overlap_mask_area_threshold"),
    "owlv2": ("threshold",),
    "yolo-world": ("conf", "iou"),
    "psgtr": ("mask_threshold", "entity_score_threshold", "relation_score_threshold", "dedup_iou_threshold"),
    "rapidocr": ("text_score", "det_box_thresh"),
    "paddleocr": ("text_det_thresh", "text_det_box_thresh", "text_rec_score_thresh"),
}
INT_FIELDS = {
    "mask2former": ("batch_size",),
    "yolo-seg": ("imgsz", "max_det", "batch_size"),
    "owlv2": ("batch_size", "text_batch_size"),
    "yolo-world": ("imgsz", "max_det", "batch_size"),
    "psgtr": ("batch_size", "size_divisor", "max_per_img", "mask_head_chunk"),
    "rapidocr": ("det_limit_side_len", "num_threads"),
    "paddleocr": ("text_det_limit_side_len",),
}
UNIT_CASES = [(name, field) for name, fields in UNIT_FIELDS.items() for field in fields]
INT_CASES = [(name, field) for name, fields in INT_FIELDS.items() for field in fields]


@pytest.mark.parametrize("name", BUILTIN)
def test_every_builtin_expert_has_a_typed_settings_model(name):
    klass = get_expert_class(name)
    assert issubclass(klass.Settings, ExpertSettings)
    expert = create_expert(name)
    assert isinstance(expert.typed_settings, klass.Settings)
    # the dict view is the model's values, and the class defaults come from the model
    assert expert.settings == expert.typed_settings.model_dump() == klass.default_settings
    with pytest.raises(ConfigError, match=f"expert '{name}' has no setting.*'nope'.*known settings"):
        create_expert(name, nope=1)


@pytest.mark.parametrize(("name", "field"), UNIT_CASES)
@settings(max_examples=15, deadline=None)
@given(value=st.floats(allow_nan=True, allow_infinity=True))
def test_unit_interval_settings(name, field, value):
    if 0.0 <= value <= 1.0:
        assert create_expert(name, **{field: value}).settings[field] == value
    else:
        with pytest.raises(ConfigError, match=f"expert '{name}': setting '{field}'") as info:
            create_expert(name, **{field: value})
        assert "got" in str(info.value) and (math.isnan(value) or repr(value) in str(info.value))


@pytest.mark.parametrize(("name", "field"), UNIT_CASES[:3])
@pytest.mark.parametrize("value", [True, "0.5", None])
def test_unit_interval_settings_refuse_non_numbers(name, field, value):
    with pytest.raises(ConfigError, match=f"setting '{field}'"):
        create_expert(name, **{field: value})


@pytest.mark.parametrize(("name", "field"), INT_CASES)
@settings(max_examples=10, deadline=None)
@given(value=st.integers(min_value=-5, max_value=5000))
def test_positive_integer_settings(name, field, value):
    if value >= 1:
        assert create_expert(name, **{field: value}).settings[field] == value
    else:
        with pytest.raises(ConfigError, match=f"setting '{field}'.*got {value}"):
            create_expert(name, **{field: value})


@pytest.mark.parametrize(("name", "field"), INT_CASES[:4])
@pytest.mark.parametrize("value", [True, 2.0, "8"])
def test_positive_integer_settings_refuse_bools_floats_and_strings(name, field, value):
    with pytest.raises(ConfigError, match=f"setting '{field}'"):
        create_expert(name, **{field: value})


def test_choices_and_collections_are_validated_and_normalised():
    with pytest.raises(ConfigError, match="setting 'image_backend'.*'fast'"):
        create_expert("mask2former", image_backend="fast")
    with pytest.raises(ConfigError, match="setting 'input_order'"):
        create_expert("rapidocr", input_order="rbg")
    with pytest.raises(ConfigError, match="setting 'label_ids_to_fuse'.*COCO-panoptic ids"):
        create_expert("mask2former", label_ids_to_fuse="12")
    assert create_expert("mask2former", label_ids_to_fuse=[5, 3, 5]).settings["label_ids_to_fuse"] == (3, 5)
    with pytest.raises(ConfigError, match="setting 'queries'.*non-empty"):
        create_expert("owlv2", queries=["cat", " "])
    owl = create_expert("owlv2", queries=("cat", "dog"))
    assert owl.settings["queries"] == ["cat", "dog"] and owl.queries == ("cat", "dog")
    with pytest.raises(ConfigError, match="setting 'engine_kwargs'"):
        create_expert("paddleocr", engine_kwargs=["lang"])
    with pytest.raises(ConfigError, match="setting 'allow_tf32'"):
        create_expert("psgtr", allow_tf32="yes")
    with pytest.raises(ConfigError, match="setting 'architecture'.*unknown field.*'depht'"):
        create_expert("psgtr", architecture={"depht": 18})
    # a combination only the PSGTR config can judge still raises ConfigError
    with pytest.raises(ConfigError, match="embed_dim"):
        create_expert("psgtr", architecture={"embed_dim": 192})


def test_shared_types_are_one_rule():
    from pydantic import TypeAdapter, ValidationError

    unit, positive = TypeAdapter(UnitFloat), TypeAdapter(PositiveInt)
    assert unit.validate_python(1) == 1.0 and positive.validate_python(3) == 3
    for bad in (True, 1.5, -0.1, "0.3"):
        with pytest.raises(ValidationError):
            unit.validate_python(bad)
    for bad in (0, True, 2.0):
        with pytest.raises(ValidationError):
            positive.validate_python(bad)


# --- Hub options -------------------------------------------------------------------------------------------


def test_expert_carries_one_hub_value_and_folds_the_legacy_keywords(tmp_path):
    hub = HubOptions(revision="v2", cache_dir=str(tmp_path), token="t")
    exp = create_expert("owlv2", hub=hub)
    assert exp.hub == hub
    assert (exp.revision, exp.cache_dir, exp.token, exp.local_files_only) == ("v2", str(tmp_path), "t", False)
    legacy = create_expert("owlv2", revision="abc", local_files_only=True)
    assert legacy.hub == HubOptions(revision="abc", local_files_only=True)
    both = create_expert("owlv2", hub={"revision": "v1", "token": "x"}, revision="v3")
    assert both.hub == HubOptions(revision="v3", token="x")  # a keyword that is given wins
    with pytest.raises(AttributeError):
        exp.revision = "other"  # read-only: change the expert's hub value instead
    with pytest.raises(ConfigError, match="unknown hub option"):
        create_expert("owlv2", hub={"branch": "main"})
    # the revision is part of the cache key (another revision never shares cached outputs)
    assert create_expert("owlv2", revision="a").cache_key() != create_expert("owlv2", revision="b").cache_key()
