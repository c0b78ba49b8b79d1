"""The MoAI-Mixer's gate weights as an API and per-expert ablation, on the moai-tiny oracle fixture."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import CASE_NAMES, TINY, official_inputs
from moai_sdk.errors import ConfigError, InputError
from moai_sdk.explain import AblationTable, ablation_perceptions, ablation_tasks, mixer_gates
from moai_sdk.gates import IMAGE_GATE_EXPERTS, LANGUAGE_GATE_EXPERTS, MixerGates
from moai_sdk.modeling.mixer import EXPERT_NAMES
from moai_sdk.results import PerceptionResult
from moai_sdk.verbalization import verbalize_parts
from test_verbalization import case_to_result


def _official_gates(cases: dict, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official gate softmax (the fixture's gate logits through the float16 softmax) and the logits."""
    img_logits = cases[f"{name}.layer7.gate_img_logits"]
    lang_logits = cases[f"{name}.layer7.gate_lang_logits"]
    img = F.softmax(img_logits, dim=-1, dtype=torch.float16)
    lang = F.softmax(lang_logits, dim=-1, dtype=torch.float16)
    return img, lang, img_logits, lang_logits


def _fp16_step(x: torch.Tensor) -> torch.Tensor:
    """Spacing of float16 values around ``x`` (the larger of the steps up and down)."""
    h = x.to(torch.float16)
    inf = torch.full_like(h, float("inf"))
    return torch.maximum(torch.nextafter(h, inf) - h, h - torch.nextafter(h, -inf)).float()


def _close_in_fp16(actual: torch.Tensor, expected: torch.Tensor, logits: torch.Tensor | None = None) -> None:
    """Equal within float16 rounding, and nearly all identical.

    The float16 softmax rounds the gate logits to float16 first; ours agree with the oracle's to ~1e-5, which
    moves a few of those roundings (a logit step changes a weight w by at most w * step in relative terms) and
    then the rounding of the weight itself. Without ``logits`` only the weight's own rounding is allowed.
    """
    assert actual.dtype == expected.dtype == torch.float16
    diff = (actual.float() - expected.float()).abs()
    tol = _fp16_step(expected)
    if logits is not None:
        tol = tol + 2 * expected.float() * _fp16_step(logits).amax(-1, keepdim=True)
    assert bool((diff <= tol).all())
    assert float((diff == 0).float().mean()) > 0.95


# ----------------------------------------------------------------------------------------------------------
# the model: forward(..., output_gates=True)
# ----------------------------------------------------------------------------------------------------------


def _forward_with_gate_logits(model, inputs) -> tuple[object, dict[str, torch.Tensor]]:
    """A forward with ``output_gates=True`` that also captures the gate logits of the mixer layer (hooks)."""
    captured: dict[str, torch.Tensor] = {}
    attn = model.model.layers[7].attention
    hooks = [
        attn.moai_GA_img.register_forward_hook(lambda m, a, o: captured.__setitem__("img", o.clone())),
        attn.moai_GA_lang.register_forward_hook(lambda m, a, o: captured.__setitem__("lang", o.clone())),
    ]
    try:
        with torch.no_grad():
            out = model(**inputs, output_gates=True)
    finally:
        for h in hooks:
            h.remove()
    return out, captured


@pytest.mark.numerics
@pytest.mark.parametrize("name", CASE_NAMES)
def test_gate_weights_are_the_softmax_of_the_official_gate_logits(tiny_model, cases, cases_meta, name):
    out, captured = _forward_with_gate_logits(tiny_model, official_inputs(name, cases, cases_meta))
    assert [g.layer for g in out.gate_weights] == [7]  # the fixture's one mixer layer
    g = out.gate_weights[0]
    n_text = cases[f"{name}.input_ids"].shape[1] - 1
    assert g.image.shape == (1, 1225, 3) and g.language.shape == (1, n_text, 3)
    assert g.image.dtype == torch.float16 == g.language.dtype  # the released gate softmax dtype
    assert bool(g.image_mask.all()) and bool(g.language_mask.all())  # one row, no padding
    official_img, official_lang, img_logits, lang_logits = _official_gates(cases, name)
    _close_in_fp16(g.image[0], official_img, img_logits)
    _close_in_fp16(g.language[0], official_lang, lang_logits)
    # exactly the softmax the model applied to its own gate logits
    assert torch.equal(g.image[0], F.softmax(captured["img"][0], -1, dtype=torch.float16))
    assert torch.equal(g.language[0], F.softmax(captured["lang"][0], -1, dtype=torch.float16))
    assert torch.allclose(g.image.float().sum(-1), torch.ones(1, 1225), atol=2e-3)


@pytest.mark.numerics
def test_reference_mixer_records_the_same_gates(tiny_model, cases, cases_meta):
    inputs = official_inputs("b_eval_template", cases, cases_meta)
    with torch.no_grad():
        fast = tiny_model(**inputs, output_gates=True).gate_weights[0]
        tiny_model.set_mixer_mode("reference")
        try:
            ref = tiny_model(**inputs, output_gates=True).gate_weights[0]
        finally:
            tiny_model.set_mixer_mode("batched")
    _close_in_fp16(ref.image, fast.image)
    _close_in_fp16(ref.language, fast.language)
    assert torch.equal(ref.language_mask, fast.language_mask)


@pytest.mark.numerics
def test_output_gates_changes_nothing_else(tiny_model, cases, cases_meta):
    inputs = official_inputs("b_eval_template", cases, cases_meta)
    with torch.no_grad():
        plain = tiny_model(**inputs)
        recorded = tiny_model(**inputs, output_gates=True)
    assert plain.gate_weights is None and recorded.gate_weights
    assert torch.equal(plain.logits, recorded.logits)
    assert torch.equal(plain.compressed_aux, recorded.compressed_aux)


@pytest.mark.numerics
def test_generate_returns_the_prefill_gates_and_the_official_tokens(tiny_model, cases, cases_meta):
    name = "c_raw640x480_empty"
    inputs = official_inputs(name, cases, cases_meta)
    gated = tiny_model.generate(**inputs, max_new_tokens=4, eos_token_id=[], return_dict=True, output_gates=True)
    assert gated.new_tokens == [cases[f"{name}.new_tokens"][0, :4].tolist()]  # decoding is unchanged
    assert [g.layer for g in gated.gate_weights] == [7]
    official_img, official_lang, img_logits, lang_logits = _official_gates(cases, name)
    _close_in_fp16(gated.gate_weights[0].image[0], official_img, img_logits)
    _close_in_fp16(gated.gate_weights[0].language[0], official_lang, lang_logits)


def test_a_decoding_step_records_no_gates(tiny_model, cases, cases_meta):
    """Generated tokens never reach the mixer: a cached step returns an empty list."""
    from moai_sdk.modeling import KVCache

    inputs = official_inputs("a_demo_full", cases, cases_meta)
    cache = KVCache.allocate(tiny_model.config, 1, 1300, tiny_model.dtype, tiny_model.device)
    with torch.no_grad():
        pre = tiny_model(**inputs, cache=cache, output_gates=True)
        step = tiny_model(
            pre.logits[:, -1].argmax(-1, keepdim=True),
            attention_mask=torch.cat((pre.attention_mask, torch.ones(1, 1, dtype=torch.long)), 1),
            cache=cache,
            output_gates=True,
        )
    assert len(pre.gate_weights) == 1
    assert step.gate_weights == []


# ----------------------------------------------------------------------------------------------------------
# batches: padding rows are masked, each row's gates equal its single run's
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor():
    from moai_sdk import MoAIProcessor

    return MoAIProcessor.from_pretrained(TINY)


def _case_inputs(processor, metas: list[dict]):
    """Our processor on the cases' raw inputs (case c from its stored resized image: the resize is
    thread-sensitive)."""
    images, prompts, auxes, maps, templates = [], [], [], [], []
    for m in metas:
        image_file = (m["resized_image_files"] or m["image_files"])[0]
        images.append(np.array(Image.open(TINY / image_file))[..., :3])
        prompts.append(m["prompt"][0])
        auxes.append(m["verbalization"][0]["aux"])
        maps.append(np.array(Image.open(TINY / m["panoptic_map_files"][0])))
        templates.append("chat" if m["template"] != "demo" else "demo")
    return processor(images, prompts, auxes, maps, template=templates)


@pytest.mark.numerics
def test_gates_of_a_batch_equal_the_single_runs(tiny_model, processor, cases_meta):
    metas = [cases_meta[n] for n in ("a_demo_full", "b_eval_template")]  # prompts of different lengths
    batch = _case_inputs(processor, metas)
    assert batch.attention_mask.min() == 0  # left padding in the batch
    with torch.no_grad():
        gb = tiny_model(**batch, output_gates=True).gate_weights[0]
    singles = [_forward_with_gate_logits(tiny_model, _case_inputs(processor, [m])) for m in metas]
    for i, (single, logits) in enumerate(singles):
        gs = single.gate_weights[0]
        n_pad = int((batch.attention_mask[i] == 0).sum())
        # padding rows come first (left padding), are masked and hold zeros
        assert not bool(gb.language_mask[i, :n_pad].any()) and bool(gb.language_mask[i, n_pad:].all())
        assert bool((gb.language[i, :n_pad] == 0).all())
        _close_in_fp16(gb.image[i], gs.image[0], logits["img"][0])
        _close_in_fp16(gb.language[i][gb.language_mask[i]], gs.language[0], logits["lang"][0])
        typed_b, typed_s = mixer_gates([gb], i), mixer_gates([gs], 0)
        assert typed_b.num_language_tokens == typed_s.num_language_tokens == gs.language.shape[1]
        for col in range(3):
            assert typed_b.layers[0].image[col] == pytest.approx(typed_s.layers[0].image[col], abs=1e-4)
            assert typed_b.layers[0].language[col] == pytest.approx(typed_s.layers[0].language[col], abs=1e-4)


# ----------------------------------------------------------------------------------------------------------
# typed gate results
# ----------------------------------------------------------------------------------------------------------


def test_gate_column_names_follow_the_official_order():
    assert IMAGE_GATE_EXPERTS + LANGUAGE_GATE_EXPERTS == EXPERT_NAMES


def test_mixer_gates_means_tokens_and_json(tiny_model, cases, cases_meta):
    name = "a_demo_full"
    inputs = official_inputs(name, cases, cases_meta)
    with torch.no_grad():
        gw = tiny_model(**inputs, output_gates=True).gate_weights
    summary = mixer_gates(gw, 0)
    assert summary.layers[0].image_tokens is None and summary.language_token_ids is None
    official_img, official_lang, _, _ = _official_gates(cases, name)
    assert summary.layers[0].image == pytest.approx(tuple(official_img.double().mean(0).tolist()), abs=1e-4)
    assert summary.layers[0].language == pytest.approx(tuple(official_lang.double().mean(0).tolist()), abs=1e-4)
    assert summary.dtype == "float16" and summary.num_image_tokens == 1225

    detailed = mixer_gates(gw, 0, tokens=True, input_ids=inputs["input_ids"], image_token_id=1000)
    ids = inputs["input_ids"][0]
    assert detailed.language_token_ids == ids[ids != 1000].tolist()
    assert np.array_equal(np.array(detailed.layers[0].image_tokens), gw[0].image[0].double().numpy())
    back = MixerGates.model_validate_json(detailed.model_dump_json())
    assert back == detailed  # float16 values are exact floats: the JSON round trip is lossless
    assert detailed.shares().shape == (1, 6)
    with pytest.raises(InputError):
        mixer_gates(gw, 1)


def test_gate_plot_draws_the_layers(tmp_path):
    gates = MixerGates(
        num_image_tokens=2,
        num_language_tokens=1,
        layers=[
            {"layer": 7, "image": (0.1, 0.6, 0.3), "language": (0.5, 0.25, 0.25)},
            {"layer": 15, "image": (0.2, 0.2, 0.6), "language": (0.0, 0.5, 0.5)},
        ],
    )
    picture = gates.plot(title="two layers")
    assert picture.mode == "RGB" and picture.height > 150
    # the image-gate bar of the first layer shows the image->aux colour and the language->aux colour appears
    pixels = set(map(tuple, np.asarray(picture).reshape(-1, 3).tolist()))
    from moai_sdk.viz_explain import IMAGE_COLOURS, LANGUAGE_COLOURS

    assert set(IMAGE_COLOURS) <= pixels and LANGUAGE_COLOURS[0] in pixels
    path = gates.save(tmp_path / "g.png")
    assert Image.open(path).size == gates.plot().size
    assert MixerGates.model_validate_json(gates.save(tmp_path / "g.json").read_text()) == gates


# ----------------------------------------------------------------------------------------------------------
# ablation variants (no model)
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_perception(cases_meta) -> PerceptionResult:
    return case_to_result(cases_meta["a_demo_full"])


def test_ablation_variants_empty_one_part_and_blank_the_map(full_perception):
    assert ablation_tasks(full_perception) == ["segmentation", "detection", "scene_graph", "ocr"]
    variants = ablation_perceptions(full_perception, ["segmentation", "ocr"])
    assert [v[0] for v in variants] == ["all experts", "without segmentation", "without ocr"]
    full = verbalize_parts(full_perception)
    no_seg, no_ocr = variants[1][2], variants[2][2]
    assert verbalize_parts(no_seg) == full.model_copy(update={"segmentation": ""})
    assert verbalize_parts(no_ocr) == full.model_copy(update={"ocr": ""})
    assert full.segmentation and full.ocr  # the parts were not empty to begin with
    assert not no_seg.panoptic_color_map().any()  # blank (black) map without segmentation
    assert np.array_equal(no_ocr.panoptic_color_map(), full_perception.panoptic_color_map())
    assert "segmentation" not in no_seg.sources and not no_seg.has_task("segmentation")


def test_ablation_task_names_are_checked(full_perception):
    assert ablation_tasks(full_perception, "ocr") == ["ocr"]
    with pytest.raises(ConfigError, match="cannot ablate 'lidar'"):
        ablation_tasks(full_perception, ["lidar"])
    with pytest.raises(InputError, match="no ocr output"):
        ablation_tasks(full_perception.without("ocr"), ["ocr"])


def test_ablation_table_json_and_text():
    table = AblationTable(
        prompt="q",
        rows=[
            {"variant": "all experts", "text": "a cat", "token_counts": {"aux": 40, "generated": 2}},
            {"variant": "without ocr", "removed": "ocr", "text": "a dog", "changed": True},
        ],
    )
    assert AblationTable.from_json(table.to_json()) == table
    text = str(table)
    assert "without ocr" in text and "a dog" in text and "yes" in text
    assert table.row("ocr").text == "a dog" and table.full.text == "a cat"
    picture = table.plot()
    assert picture.width > 500
    with pytest.raises(InputError):
        AblationTable.from_json(json.dumps({"prompt": "q"}))


# ----------------------------------------------------------------------------------------------------------
# the pipeline: pipe(..., return_gates=...), pipe.ablate(...), moai run --ablate
# ----------------------------------------------------------------------------------------------------------

CASE_A = "a_demo_full"
#: Greedy, no EOS, few tokens: enough to compare answers exactly.
GREEDY = {"template": "demo", "max_new_tokens": 4, "eos_token_id": []}


@pytest.fixture(scope="module")
def oracle_pipe():
    """The pipeline on the oracle checkpoint, without experts (perceptions are given)."""
    from moai_sdk.pipeline import MoAIPipeline

    return MoAIPipeline.from_pretrained(
        str(TINY), experts=None, device="cpu", dtype="float32", quantization=None, local_files_only=True
    )


@pytest.fixture(scope="module")
def case_a(cases_meta):
    meta = cases_meta[CASE_A]
    return Image.open(TINY / meta["image_files"][0]).convert("RGB"), meta["prompt"][0], case_to_result(meta)


def _lacking(full: PerceptionResult, task: str) -> PerceptionResult:
    """The fixture perception built again without one task's output (written out field by field, independently
    of PerceptionResult.without): no segments and an all -1 id map, or no detections / scene graph / text."""
    fields = {
        "image_width": full.image_width,
        "image_height": full.image_height,
        "segments": [] if task == "segmentation" else full.segments,
        "panoptic_ids": np.full_like(full.panoptic_ids, -1) if task == "segmentation" else full.panoptic_ids,
        "detections": [] if task == "detection" else full.detections,
        "scene_graph_objects": [] if task == "scene_graph" else full.scene_graph_objects,
        "relations": [] if task == "scene_graph" else full.relations,
        "text_lines": [] if task == "ocr" else full.text_lines,
    }
    return PerceptionResult(**fields)


@pytest.mark.numerics
def test_return_gates_fills_a_json_result(oracle_pipe, case_a, cases):
    image, prompt, perception = case_a
    result = oracle_pipe(image, prompt, perception=perception, return_gates="tokens", **GREEDY)
    assert result.new_token_ids == cases[f"{CASE_A}.new_tokens"][0, :4].tolist()  # answers are unchanged
    gates = result.mixer
    assert [lg.layer for lg in gates.layers] == [7] and gates.dtype == "float16"
    official_img, official_lang, _, _ = _official_gates(cases, CASE_A)
    assert gates.layers[0].image == pytest.approx(tuple(official_img.double().mean(0).tolist()), abs=1e-4)
    assert gates.layers[0].language == pytest.approx(tuple(official_lang.double().mean(0).tolist()), abs=1e-4)
    assert len(gates.layers[0].image_tokens) == 1225 and len(gates.layers[0].language_tokens) == 29
    ids = cases[f"{CASE_A}.input_ids"][0]
    assert gates.language_token_ids == ids[ids != 1000].tolist()
    back = type(result).from_json(result.to_json())
    assert back.mixer == gates
    assert result.plot_gates().width > 300


@pytest.mark.numerics
def test_ablation_rows_equal_single_calls_without_the_expert(oracle_pipe, case_a, cases_meta):
    image, prompt, perception = case_a
    table = oracle_pipe.ablate(
        image, prompt, experts=["ocr", "segmentation"], perception=perception, return_gates=True, **GREEDY
    )
    assert [r.variant for r in table.rows] == ["all experts", "without segmentation", "without ocr"]
    official = cases_meta[CASE_A]["verbalization"][0]
    assert table.full.aux_text == official["aux"]
    expected_aux = {
        "segmentation": " ".join(["", official["od"], official["sgg"], official["ocr"]]),
        "ocr": " ".join([official["seg"], official["od"], official["sgg"], ""]),
    }
    for task in ("segmentation", "ocr"):
        row = table.row(task)
        single = oracle_pipe(image, prompt, perception=_lacking(perception, task), return_gates=True, **GREEDY)
        assert row.aux_text == single.aux_text == expected_aux[task]
        assert row.text == single.text
        assert row.changed == (row.text != table.full.text)
        assert row.token_counts == single.token_counts
        assert row.token_counts["aux"] < table.full.token_counts["aux"]
        for got, want in zip(row.gates.layers, single.mixer.layers):
            assert got.image == pytest.approx(want.image, abs=1e-4)
            assert got.language == pytest.approx(want.language, abs=1e-4)
    # the perception enters only through the mixers, so the first mixer layer's gates (the fixture's only one)
    # weigh states computed before any aux token: they are the same in every variant
    for task in ("segmentation", "ocr"):
        assert table.row(task).gates.layers[0].image == pytest.approx(table.full.gates.layers[0].image, abs=1e-6)
        assert table.row(task).gates.layers[0].language == pytest.approx(table.full.gates.layers[0].language, abs=1e-6)
    text = str(table)
    assert "without segmentation" in text and "image gate" in text
    assert AblationTable.from_json(table.to_json()) == table


def test_moai_run_ablate_prints_the_table(tmp_path, capsys):
    from moai_sdk import cli
    from moai_sdk.testing import demo_image

    image = tmp_path / "moai.png"
    demo_image("MOAI").save(image)
    picture = tmp_path / "ablation.png"
    args = ["run", str(image), "What does it say?", "--model", str(TINY), "--device", "cpu", "--quantization"]
    args += ["none", "--experts", "rapidocr", "--max-new-tokens", "3", "--local-files-only", "--ablate"]
    assert cli.main(args + ["--plot", str(picture)]) == 0
    out = capsys.readouterr().out
    assert "all experts" in out and "without ocr" in out
    assert Image.open(picture).width > 500


def test_streaming_keeps_the_gates(oracle_pipe, case_a):
    image, prompt, perception = case_a
    *pieces, result = oracle_pipe.stream(image, prompt, perception=perception, return_gates=True, **GREEDY)
    assert "".join(pieces) == result.text
    assert [lg.layer for lg in result.mixer.layers] == [7]


def test_return_gates_values_are_checked(tiny_model):
    from moai_sdk.explain import recording_gates

    with pytest.raises(InputError, match="return_gates"):
        with recording_gates(tiny_model, "all"):
            pass
    with recording_gates(tiny_model, False) as nothing:
        pass
    assert nothing == []
