"""MoAIProcessor and the prompt templates against the moai-tiny oracle fixture."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from moai_sdk.errors import ConfigError, InputError
from moai_sdk.imageops import prepare_image
from moai_sdk.processing import (
    CLIP_MEAN,
    CLIP_STD,
    EMPTY_VERBALIZATION,
    MoAIInputs,
    MoAIProcessor,
    merged_image_masks,
    normalize_pixels,
)
from moai_sdk.prompts import SYSTEM_PROMPT, TEMPLATES, build_prompt
from moai_sdk.tokenization import MoAITokenizer

# compares float results (resize, normalisation, float16 panoptic quirk, aux embeds) with the oracle's: rerun
# under every ATEN_CPU_CAPABILITY by .ci/run (about 10 s per run here)
pytestmark = pytest.mark.numerics

FIXTURE = Path(__file__).parent / "fixtures" / "moai-tiny"
CASES = json.loads((FIXTURE / "cases.json").read_text())["cases"]
CASE_NAMES = [c["name"] for c in CASES]
TEMPLATE_OF = {"demo": "demo", "eval": "chat"}


@pytest.fixture(scope="module")
def proc() -> MoAIProcessor:
    return MoAIProcessor.from_pretrained(FIXTURE)


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "cases.safetensors"))


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "model.safetensors"))


def _case(name: str) -> dict:
    return next(c for c in CASES if c["name"] == name)


def _run_case(proc: MoAIProcessor, name: str, **kwargs) -> MoAIInputs:
    case = _case(name)
    return proc(
        [FIXTURE / case["image_files"][0]],
        case["prompt"],
        [v["aux"] for v in case["verbalization"]],
        [FIXTURE / case["panoptic_map_files"][0]],
        template=TEMPLATE_OF[case["template"]],
        **kwargs,
    )


@pytest.fixture(scope="module")
def outputs(proc: MoAIProcessor) -> dict[str, MoAIInputs]:
    return {name: _run_case(proc, name) for name in CASE_NAMES}


# ------------------------------------------------------------------------------------------------ prompts


def test_prompt_templates_are_the_official_strings() -> None:
    assert SYSTEM_PROMPT == (
        "AI assistant should give helpful and detailed answers to user after fully understanding an image. <image>"
    )
    assert build_prompt("Q?", "demo") == SYSTEM_PROMPT + " USER: Q? ASSISTANT:"
    assert build_prompt("Q?", "chat") == (
        SYSTEM_PROMPT + " [UNUSED_TOKEN_146]user\nQ?[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"
    )
    assert build_prompt("{x} {prompt}", "demo").endswith(" USER: {x} {prompt} ASSISTANT:")
    for case in CASES:
        assert build_prompt(case["prompt"][0], TEMPLATE_OF[case["template"]]) == case["full_prompt_string"][0]
    with pytest.raises(ConfigError, match="'demo', 'chat'"):
        build_prompt("Q?", "llava")
    with pytest.raises(InputError, match="<image>"):
        build_prompt("look at <image> please", "chat")
    assert set(TEMPLATES) == {"demo", "chat"}


# ------------------------------------------------------------------------------------------------ per case


@pytest.mark.parametrize("name", CASE_NAMES)
def test_text_and_masks_match_fixture(outputs: dict, ref: dict, name: str) -> None:
    out = outputs[name]
    case = _case(name)
    assert out.texts == case["full_prompt_string"]
    assert torch.equal(out.input_ids, ref[f"{name}.input_ids"])
    assert torch.equal(out.attention_mask, ref[f"{name}.attention_mask"])
    assert out.im_mask.dtype == torch.bool and out.lang_mask.dtype == torch.bool
    assert out.im_mask.shape == (1, case["shapes"]["merged_len"])
    assert torch.equal(out.im_mask, ref[f"{name}.im_mask"].bool())
    assert torch.equal(out.lang_mask, ref[f"{name}.lang_mask"].bool())
    assert int(out.im_mask.sum()) == 1225 == out.num_image_tokens
    # text positions of the oracle's merged sequence are exactly the language positions
    assert torch.equal(out.lang_mask[0].nonzero()[:, 0], ref[f"{name}.text_positions"][0])
    assert out.image_token_index == 1000


@pytest.mark.parametrize("name", CASE_NAMES)
def test_pixel_values_match_fixture(outputs: dict, ref: dict, name: str) -> None:
    out = outputs[name]
    assert out.pixel_values.shape == (1, 3, 490, 490) and out.pixel_values.dtype == torch.float32
    torch.testing.assert_close(out.pixel_values[:, :, ::7, ::7], ref[f"{name}.pixel_values_sub7"], rtol=1e-5, atol=0)
    pv = out.pixel_values.double()
    checksum = _case(name)["pixel_values_checksum"]
    assert pv.sum().item() == pytest.approx(checksum["sum_f64"], rel=1e-12)
    assert (pv * pv).sum().item() == pytest.approx(checksum["sumsq_f64"], rel=1e-12)
    assert pv.min().item() == checksum["min"] and pv.max().item() == checksum["max"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_verbalization_ids_match_fixture(outputs: dict, name: str) -> None:
    out = outputs[name]
    tokens = _case(name)["tokens"]
    assert out.aux_input_ids.tolist() == tokens["verbalization_ids"]
    assert out.aux_attention_mask.tolist() == [[1] * len(tokens["verbalization_ids"][0])]
    assert out.aux_texts == [v["aux"] for v in _case(name)["verbalization"]]


def test_empty_verbalization_default(proc: MoAIProcessor, outputs: dict) -> None:
    case = _case("c_raw640x480_empty")
    out = proc(FIXTURE / case["image_files"][0], case["prompt"][0], template="demo")
    assert out.aux_texts == ["   "]
    assert out.aux_input_ids.tolist() == case["tokens"]["verbalization_ids"] == [[1, 930, 930, 930, 930]]
    # no panoptic map = all black = what the fixture's all-black map PNG gives
    assert torch.equal(out.panoptic_pixel_values, outputs["c_raw640x480_empty"].panoptic_pixel_values)


def test_raw_rgba_image_goes_through_the_official_resize(proc: MoAIProcessor, ref: dict) -> None:
    name = "c_raw640x480_empty"
    raw = FIXTURE / f"{name}.raw_image0.png"
    assert Image.open(raw).size == (640, 480) and Image.open(raw).mode == "RGBA"
    resized = prepare_image(raw)
    expected = torch.from_numpy(np.array(Image.open(FIXTURE / f"{name}.resized_image0.png"))).permute(2, 0, 1)[:3]
    diff = (resized.int() - expected.int()).abs()
    assert diff.max() <= 1 and int((diff > 0).sum()) <= 50  # the kernel can flip exact .5 values (README)
    out = proc(raw, _case(name)["prompt"][0], template="demo")
    one_level = 1.0 / (255 * min(CLIP_STD))
    sub7 = out.pixel_values[:, :, ::7, ::7]
    torch.testing.assert_close(sub7, ref[f"{name}.pixel_values_sub7"], rtol=0, atol=one_level * 1.01)
    with pytest.raises(InputError, match="resize=True"):
        proc(raw, "Q?", resize=False)


# ------------------------------------------------------------------------------------------------ panoptic map


def test_panoptic_map_input_forms_agree(proc: MoAIProcessor) -> None:
    png = FIXTURE / "a_demo_full.panoptic_map0.png"
    u8 = np.array(Image.open(png).convert("RGB"))
    assert len(np.unique(u8.reshape(-1, 3), axis=0)) > 2  # a real multi-colour map
    as_float = u8.astype(np.float64) / 255.0
    forms = [png, png.read_bytes(), Image.open(png), u8, as_float, as_float.astype(np.float32)]
    forms.append(torch.from_numpy(u8).permute(2, 0, 1))

    class _Perception:
        def panoptic_color_map(self) -> np.ndarray:
            return as_float

    forms.append(_Perception())
    results = [proc.panoptic_pixel_values([f]) for f in forms]
    for r in results[1:]:
        assert torch.equal(r, results[0])


def test_panoptic_numerics_are_the_official_float16_quirk(proc: MoAIProcessor) -> None:
    png = FIXTURE / "a_demo_full.panoptic_map0.png"
    as_float = np.array(Image.open(png).convert("RGB")).astype(np.float64) / 255.0
    out = proc.panoptic_pixel_values([as_float])
    assert out.dtype == torch.float32 and out.shape == (1, 3, 490, 490)
    x16 = torch.from_numpy(as_float).permute(2, 0, 1)[None].to(torch.float16).to(torch.float32)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1) * 255
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1) * 255
    assert torch.equal(out, (x16 - mean) / std)
    # the colours survive only as a ~1/68 ripple on the constant of black
    black = proc.panoptic_pixel_values([None])[0, :, 0, 0]
    torch.testing.assert_close(black, torch.tensor([-1.7922626, -1.7520971, -1.4802197]), rtol=0, atol=1e-6)
    assert float((out - black.view(1, 3, 1, 1)).abs().max()) <= 1.0 / (255 * min(CLIP_STD)) + 1e-6
    # and the float16 rounding of the [0, 1] colours is visible in float32
    exact = (torch.from_numpy(as_float).permute(2, 0, 1)[None].float() - mean) / std
    assert not torch.equal(out, exact)


def _clip_and_project(w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The fixture's tiny CLIP tower (last layer, before post-LN, CLS dropped) + projector, plain torch."""
    p = "vit.vision_tower.vision_model."
    width, heads = 40, 2
    b = x.shape[0]
    h = F.conv2d(x, w[p + "embeddings.patch_embedding.weight"], stride=14).flatten(2).transpose(1, 2)
    h = torch.cat([w[p + "embeddings.class_embedding"].expand(b, 1, -1), h], 1)
    h = h + w[p + "embeddings.position_embedding.weight"]
    h = F.layer_norm(h, (width,), w[p + "pre_layrnorm.weight"], w[p + "pre_layrnorm.bias"], 1e-5)
    for i in range(2):
        lp = f"{p}encoder.layers.{i}."
        r = h
        h = F.layer_norm(h, (width,), w[lp + "layer_norm1.weight"], w[lp + "layer_norm1.bias"], 1e-5)
        q, k, v = (
            F.linear(h, w[f"{lp}self_attn.{n}_proj.weight"], w[f"{lp}self_attn.{n}_proj.bias"])
            .view(b, -1, heads, width // heads)
            .transpose(1, 2)
            for n in "qkv"
        )
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // heads), -1) @ v
        a = a.transpose(1, 2).reshape(b, -1, width)
        h = r + F.linear(a, w[lp + "self_attn.out_proj.weight"], w[lp + "self_attn.out_proj.bias"])
        r = h
        h = F.layer_norm(h, (width,), w[lp + "layer_norm2.weight"], w[lp + "layer_norm2.bias"], 1e-5)
        h = F.linear(h, w[lp + "mlp.fc1.weight"], w[lp + "mlp.fc1.bias"])
        h = r + F.linear(h * torch.sigmoid(1.702 * h), w[lp + "mlp.fc2.weight"], w[lp + "mlp.fc2.bias"])
    h = F.gelu(F.linear(h[:, 1:], w["vision_proj.0.weight"], w["vision_proj.0.bias"]))
    return F.linear(h, w["vision_proj.2.weight"], w["vision_proj.2.bias"])


@pytest.mark.parametrize("name", ["a_demo_full", "b_eval_template"])
def test_inputs_reproduce_the_oracle_aux_embeds_and_image_features(
    outputs: dict, ref: dict, weights: dict, name: str
) -> None:
    """End to end: our pixel tensors through the fixture's vision tower give the stored oracle tensors."""
    out = outputs[name]
    with torch.no_grad():
        image_tokens = _clip_and_project(weights, out.pixel_values)
        map_tokens = _clip_and_project(weights, out.panoptic_pixel_values)
        wrong_map = _clip_and_project(weights, proc_wrong_map_normalisation(out))
    torch.testing.assert_close(image_tokens, ref[f"{name}.image_features"], rtol=0, atol=1e-4)
    aux = ref[f"{name}.aux_embeds"]
    lv = out.aux_input_ids.shape[1]
    assert aux.shape[1] == lv + 1225
    assert torch.equal(weights["model.tok_embeddings.weight"][out.aux_input_ids], aux[:, :lv])
    torch.testing.assert_close(map_tokens, aux[:, lv:], rtol=0, atol=1e-4)
    # normalising the map like an ordinary 0-255 image would be far off: the quirk matters
    assert float((wrong_map - aux[:, lv:]).abs().max()) > 0.1


def proc_wrong_map_normalisation(out: MoAIInputs) -> torch.Tensor:
    """The colour map treated as a 0-255 image (what a 'fixed' re-implementation might do)."""
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255
    colours01 = out.panoptic_pixel_values * std + mean
    return normalize_pixels((colours01 * 255).round().clamp(0, 255).to(torch.uint8))


# ------------------------------------------------------------------------------------------------ batching


def test_batch_of_all_cases_equals_left_shifted_single_rows(proc: MoAIProcessor, outputs: dict) -> None:
    cases = [_case(n) for n in CASE_NAMES]
    out = proc(
        [FIXTURE / c["image_files"][0] for c in cases],
        [c["prompt"][0] for c in cases],
        [c["verbalization"][0]["aux"] for c in cases],
        [FIXTURE / c["panoptic_map_files"][0] for c in cases],
        template=[TEMPLATE_OF[c["template"]] for c in cases],
    )
    t = max(outputs[n].input_ids.shape[1] for n in CASE_NAMES)
    m = t - 1 + 1225
    lv = max(outputs[n].aux_input_ids.shape[1] for n in CASE_NAMES)
    assert out.input_ids.shape == (3, t) and out.im_mask.shape == (3, m) and out.aux_input_ids.shape == (3, lv)
    assert out.merged_length == m and out.batch_size == 3
    for row, name in enumerate(CASE_NAMES):
        single = outputs[name]
        n, nm, nv = single.input_ids.shape[1], single.im_mask.shape[1], single.aux_input_ids.shape[1]
        assert torch.equal(out.input_ids[row, t - n :], single.input_ids[0])
        assert torch.equal(out.input_ids[row, : t - n], torch.full((t - n,), 2))
        assert torch.equal(out.attention_mask[row], torch.cat([torch.zeros(t - n), torch.ones(n)]).long())
        # official batched layout: each row's mask right-aligned, padding in neither mask
        for key in ("im_mask", "lang_mask"):
            expected = torch.zeros(m, dtype=torch.bool)
            expected[m - nm :] = getattr(single, key)[0]
            assert torch.equal(getattr(out, key)[row], expected)
        assert torch.equal(out.aux_input_ids[row, lv - nv :], single.aux_input_ids[0])
        assert torch.equal(out.aux_input_ids[row, : lv - nv], torch.full((lv - nv,), 2))
        assert int(out.aux_attention_mask[row].sum()) == nv
        assert torch.equal(out.pixel_values[row], single.pixel_values[0])
        assert torch.equal(out.panoptic_pixel_values[row], single.panoptic_pixel_values[0])
    assert not (out.im_mask & out.lang_mask).any()
    assert torch.equal((out.im_mask | out.lang_mask).sum(1), out.attention_mask.sum(1) - 1 + 1225)


def test_single_prompt_is_broadcast_and_batch_tensors_accepted(proc: MoAIProcessor) -> None:
    img = np.array(Image.open(FIXTURE / "a_demo_full.image0.png"))
    batch = np.stack([img, img[::-1].copy()])
    out = proc(batch, "What is this?")
    assert out.batch_size == 2 and out.texts[0] == out.texts[1] == build_prompt("What is this?", "chat")
    chw = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
    out2 = proc(chw, ["What is this?"])
    assert torch.equal(out.pixel_values, out2.pixel_values)
    assert torch.equal(out.input_ids, out2.input_ids)


def test_merged_image_masks_rejects_bad_rows() -> None:
    ids = torch.tensor([[1, 5, 1000, 6], [1, 5, 6, 7]])
    with pytest.raises(InputError, match="exactly one"):
        merged_image_masks(ids, torch.ones_like(ids), 1000, 4)
    with pytest.raises(InputError, match="left padded"):
        merged_image_masks(ids[:1], torch.tensor([[1, 1, 1, 0]]), 1000, 4)
    im, lang = merged_image_masks(torch.tensor([[2, 1, 1000, 6]]), torch.tensor([[0, 1, 1, 1]]), 1000, 3)
    assert im.tolist() == [[False, False, True, True, True, False]]
    assert lang.tolist() == [[False, True, False, False, False, True]]


# ------------------------------------------------------------------------------------------------ dtypes, .to()


def test_float16_normalisation_option(ref: dict) -> None:
    proc16 = MoAIProcessor.from_pretrained(FIXTURE, normalize_dtype="float16")
    out = _run_case(proc16, "a_demo_full")
    assert out.pixel_values.dtype == torch.float16 and out.panoptic_pixel_values.dtype == torch.float16
    # float16 constants and float16 arithmetic, as the official fp16 load computes it
    img = prepare_image(FIXTURE / "a_demo_full.image0.png")[None]
    m16 = torch.tensor(CLIP_MEAN, dtype=torch.float16).view(1, 3, 1, 1) * 255
    s16 = torch.tensor(CLIP_STD, dtype=torch.float16).view(1, 3, 1, 1) * 255
    assert torch.equal(out.pixel_values, (img.half() - m16) / s16)
    diff = (out.pixel_values.float()[:, :, ::7, ::7] - ref["a_demo_full.pixel_values_sub7"]).abs()
    assert 0 < float(diff.max()) < 5e-3
    # bfloat16 constants: the float16 map and bfloat16 constants promote to float32 (torch rules)
    proc_bf = MoAIProcessor.from_pretrained(FIXTURE, normalize_dtype=torch.bfloat16)
    assert proc_bf.panoptic_pixel_values([None]).dtype == torch.float32
    with pytest.raises(ConfigError, match="normalize_dtype"):
        MoAIProcessor.from_pretrained(FIXTURE, normalize_dtype="int8")


def test_inputs_mapping_and_to(outputs: dict) -> None:
    out = outputs["b_eval_template"]
    assert set(out.keys()) == {
        "input_ids",
        "attention_mask",
        "pixel_values",
        "im_mask",
        "lang_mask",
        "aux_input_ids",
        "aux_attention_mask",
        "panoptic_pixel_values",
    }
    as_kwargs = dict(**out)
    assert as_kwargs["input_ids"] is out.input_ids and out["im_mask"] is out.im_mask
    moved = out.to("cpu", dtype=torch.float16)
    assert moved.pixel_values.dtype == torch.float16 and moved.input_ids.dtype == torch.int64
    assert moved.im_mask.dtype == torch.bool and moved.image_token_index == 1000
    assert out.pixel_values.dtype == torch.float32  # the original is untouched
    with pytest.raises(KeyError):
        out["texts"]
    # the mapping views agree with each other and hold the tensors themselves (no copies), in field order
    assert list(out) == list(out.keys()) and len(out) == 8
    assert "input_ids" in out and "texts" not in out and "image_token_index" not in out
    assert [k for k, _ in out.items()] == list(out.keys())
    assert all(v is getattr(out, k) for k, v in out.items())
    assert all(v is getattr(out, k) for k, v in zip(out.keys(), out.values(), strict=True))
    as_dict = out.to_dict()
    assert type(as_dict) is dict and list(as_dict) == list(out.keys())
    assert all(as_dict[k] is getattr(out, k) for k in out.keys())
    shapes = ", ".join(f"{k}={tuple(getattr(out, k).shape)}" for k in out.keys())
    assert repr(out) == f"MoAIInputs({shapes}, image_token_index=1000)"


# ------------------------------------------------------------------------------------------------ validation


def test_input_validation(proc: MoAIProcessor) -> None:
    img = FIXTURE / "a_demo_full.image0.png"
    with pytest.raises(InputError, match="2 prompts for 3 images"):
        proc([img, img, img], ["a", "b"])
    with pytest.raises(InputError, match="<image>"):
        proc(img, "what is in <image>?")
    with pytest.raises(ConfigError, match="'demo', 'chat'"):
        proc(img, "hi", template="eval")
    with pytest.raises(InputError, match="unsupported image type"):
        proc([{"not": "an image"}], "hi")
    with pytest.raises(InputError, match="no images"):
        proc([], "hi")
    with pytest.raises(InputError, match="prompts"):
        proc(img, 42)
    with pytest.raises(InputError, match=r"aux_texts\[0\]"):
        proc(img, "hi", aux_texts=[3])
    with pytest.raises(InputError, match="490x490"):
        proc(img, "hi", panoptic_maps=[np.zeros((480, 640, 3), np.uint8)])
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        proc(img, "hi", panoptic_maps=[np.full((490, 490, 3), 3.0)])
    with pytest.raises(InputError, match="panoptic maps for 1 images"):
        proc(img, "hi", panoptic_maps=[None, None])
    with pytest.raises(InputError, match="uint8"):
        proc(img, "hi", panoptic_maps=[np.zeros((490, 490, 3), np.int32)])


def test_from_pretrained_reads_image_settings(tmp_path: Path) -> None:
    shutil.copy(FIXTURE / "tokenizer.model", tmp_path / "tokenizer.model")
    defaults = MoAIProcessor.from_pretrained(tmp_path)  # no config.json: MoAI-7B settings
    assert (defaults.image_size, defaults.num_image_tokens) == (490, 1225)
    assert defaults.image_mean == CLIP_MEAN and defaults.image_std == CLIP_STD

    structure = {"image_size": 28, "patch_size": 14, "image_mean_0_1": [0.5] * 3, "image_std_0_1": [0.25] * 3}
    config = {"image_token_index": 1000, "moai_structure": structure}
    (tmp_path / "config.json").write_text(json.dumps(config))
    small = MoAIProcessor.from_pretrained(tmp_path)
    assert (small.image_size, small.num_image_tokens) == (28, 4)
    buf = io.BytesIO()
    Image.new("RGB", (50, 30), (255, 0, 128)).save(buf, format="PNG")
    out = small(buf.getvalue(), "hi", template="demo")
    assert out.pixel_values.shape == (1, 3, 28, 28) and out.im_mask.shape[1] == out.input_ids.shape[1] - 1 + 4
    torch.testing.assert_close(out.pixel_values[0, :, 0, 0], torch.tensor([2.0, -2.0, (128 - 127.5) / 63.75]))

    config["image_token_index"] = 92544
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="image_token_index"):
        MoAIProcessor.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="tokenizer must be a MoAITokenizer"):
        MoAIProcessor("tokenizer")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        MoAIProcessor(MoAITokenizer.from_pretrained(FIXTURE), image_size=500)


def test_prompt_lengths_count_the_text_tokens_the_processor_builds(proc: MoAIProcessor) -> None:
    """What the context check counts is each row's attended tokens minus the one ``<image>`` placeholder, per
    template; with ``raw`` a special token written in the prompt is one token instead of its characters."""
    img = np.zeros((20, 30, 3), np.uint8)
    prompts = ["hi", "a much longer prompt here", "x </s> y"]
    templates = ["chat", "demo", "chat"]
    out = proc([img] * 3, prompts, template=templates)
    attended = out["attention_mask"].sum(dim=1)
    placeholders = (out["input_ids"] == proc.image_token_index).sum(dim=1)
    assert placeholders.tolist() == [1, 1, 1]
    assert proc.prompt_lengths(prompts, templates) == (attended - 1).tolist()
    assert proc.prompt_lengths(prompts, "demo") != proc.prompt_lengths(prompts, "chat")  # the template counts
    raw = proc([img], prompts[2], template="chat", allow_special_tokens=True)
    assert proc.prompt_lengths(prompts[2:], "chat", raw=True) == [int(raw["attention_mask"].sum()) - 1]
    assert proc.prompt_lengths(prompts[2:], "chat", raw=True)[0] < proc.prompt_lengths(prompts[2:], "chat")[0]
    assert proc.prompt_lengths([], "chat") == []


def test_check_context_refuses_one_position_past_the_window(proc: MoAIProcessor) -> None:
    from types import SimpleNamespace

    prompts = ["hi", "a much longer prompt here"]
    longest = max(proc.prompt_lengths(prompts, "chat"))
    window = longest + proc.num_image_tokens + 10
    config = SimpleNamespace(context_window=window, max_position_embeddings=window, rope_scaling=None)
    proc.check_context(prompts, "chat", 10, config)  # exactly fits: the longest prompt, the image, 10 new tokens
    with pytest.raises(InputError, match=rf"needs {window + 1:,} positions -- prompt {longest} tokens"):
        proc.check_context(prompts, "chat", 11, config)
    with pytest.raises(InputError, match="needs"):  # the longest row counts, not the first
        proc.check_context(prompts[::-1], "chat", 11, config)
    proc.check_context([], "chat", window - proc.num_image_tokens, config)  # no prompt: nothing but the image
    # raw (allow_special_tokens) counts "</s>" as one control token; by default it is text of several tokens
    special = ["x </s> y"]
    raw = proc.prompt_lengths(special, "chat", raw=True)[0]
    assert raw < proc.prompt_lengths(special, "chat")[0]
    edge = raw + proc.num_image_tokens + 1
    tight = SimpleNamespace(context_window=edge, max_position_embeddings=edge, rope_scaling=None)
    proc.check_context(special, "chat", 1, tight, raw=True)
    with pytest.raises(InputError, match="needs"):
        proc.check_context(special, "chat", 1, tight)


def test_decode_skips_special_tokens_by_default(proc: MoAIProcessor) -> None:
    ids = proc.tokenizer.encode("hello world")
    assert ids[0] == proc.tokenizer.bos_token_id
    assert proc.decode(ids) == "hello world"
    assert proc.decode(ids, skip_special_tokens=False) != "hello world"  # BOS written out
    assert proc.batch_decode([ids, ids[:2]]) == ["hello world", proc.decode(ids[:2])]
    assert proc.batch_decode([ids], skip_special_tokens=False) == [proc.decode(ids, skip_special_tokens=False)]


def test_decode_forwards_tokenizer_keywords(proc: MoAIProcessor) -> None:
    # keep_chat_markers is a MoAITokenizer keyword the processor passes through (**kwargs)
    marker = next(iter(proc.tokenizer.chat_marker_ids))
    ids = proc.tokenizer.encode("hello") + [marker]
    kept = proc.tokenizer.decode(ids, keep_chat_markers=True)
    assert kept != proc.tokenizer.decode(ids)  # the marker is written out only on request
    assert proc.decode(ids, keep_chat_markers=True) == kept
    assert proc.batch_decode([ids], keep_chat_markers=True) == [kept]


# ------------------------------------------------------------------------------------------------ edges found by
# mutation testing (tools/mutation.sh processing). Survivors judged equivalent, so left without a test:
# * MoAIInputs.to: ``non_blocking`` default / forwarding -- only pinned-memory copies to an accelerator can differ;
# * normalize_pixels: ``view(-1, 1, 1)`` for ``view(1, -1, 1, 1)`` broadcasts to the same [B, 3, H, W] result;
# * merged_image_masks: the left-padding test ``any(valid[:n_pad]) or not all(valid[n_pad:])`` -- the first part
#   implies the second (n_pad = width - ones), so ``and`` / dropping the first part decide the same;
# * panoptic_map_array: ``np.zeros(..., dtype=None)`` / ``astype(None)`` are float64 too;
# * prompt_lengths / __call__: ``zip(..., strict=...)`` -- per_row already made the lists the same length;
#   ``allow_none=None`` for the prompts and templates is as falsy as False;
# * from_pretrained: ``resolve_model_file(..., required=None)`` is as falsy as False.


def test_inputs_and_normalisation_follow_the_device() -> None:
    # the meta device stands in for an accelerator: no data, but a tensor built on the wrong device fails
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8, device="meta")
    out = normalize_pixels(images)
    assert out.device.type == "meta" and out.shape == (2, 3, 4, 4) and out.dtype == torch.float32
    with pytest.raises(InputError, match=r"expected images of shape \[B, 3, H, W\]; got \(1, 4, 2, 2\)"):
        normalize_pixels(torch.zeros(1, 4, 2, 2, dtype=torch.uint8))


def test_inputs_move_to_another_device(outputs: dict) -> None:
    moved = outputs["a_demo_full"].to("meta")
    assert {t.device.type for t in moved.values()} == {"meta"} and moved.device.type == "meta"
    with pytest.raises(KeyError, match="texts"):  # the KeyError names the key
        moved["texts"]


def test_merged_image_masks_edges() -> None:
    # <image> right after the padding is valid; inside the padding it is not
    im, lang = merged_image_masks(torch.tensor([[2, 1000, 6]]), torch.tensor([[0, 1, 1]]), 1000, 2)
    assert im.tolist() == [[False, True, True, False]] and lang.tolist() == [[False, False, False, True]]
    with pytest.raises(InputError, match="row 0: the image token sits inside the padding"):
        merged_image_masks(torch.tensor([[1000, 5, 6]]), torch.tensor([[0, 1, 1]]), 1000, 2)
    with pytest.raises(InputError, match=r"input_ids \(1, 4\) and attention_mask \(1, 3\) must both be \[B, T\]"):
        merged_image_masks(torch.tensor([[1, 1000, 5, 6]]), torch.ones(1, 3, dtype=torch.long), 1000, 2)


def test_settings_are_validated_with_messages_naming_the_value() -> None:
    tok = MoAITokenizer.from_pretrained(FIXTURE)
    bad = [
        (dict(image_size="490"), "image_size must be a positive int; got '490'"),
        (dict(image_size=0), "image_size must be a positive int; got 0"),
        (dict(patch_size=14.0), "multiple of patch_size 14.0"),
        (dict(patch_size=0), "multiple of patch_size 0"),
        (dict(img_length=0), "img_length must be a positive int; got 0"),
        (dict(img_length=2.5), "img_length must be a positive int; got 2.5"),
        (dict(image_mean=(0.5, 0.5)), r"3 values each, std > 0; got \(0.5, 0.5\)"),
        (dict(image_std=(0.5, 0.5)), "3 values each"),
        (dict(image_std=(0.5, 0.0, 0.5)), "3 values each"),
        (dict(normalize_dtype="int8"), "unsupported normalize_dtype 'int8'"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ConfigError, match=message):
            MoAIProcessor(tok, **kwargs)
    with pytest.raises(ConfigError, match="tokenizer must be a MoAITokenizer; got str"):
        MoAIProcessor("tokenizer")  # type: ignore[arg-type]
    one = MoAIProcessor(tok, image_size=1, patch_size=1, img_length=1)  # the smallest positive values are valid
    assert (one.image_size, one.patch_size, one.num_image_tokens) == (1, 1, 1)
    assert MoAIProcessor(tok, image_size=2, patch_size=1).num_image_tokens == 4


def test_from_pretrained_reads_each_structure_key_and_the_hub_options(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "local"
    folder.mkdir()
    shutil.copy(FIXTURE / "tokenizer.model", folder / "tokenizer.model")
    with caplog.at_level("INFO", logger="moai_sdk.processing"):
        MoAIProcessor.from_pretrained(folder)
    assert [r.getMessage() for r in caplog.records if r.name == "moai_sdk.processing"] == [
        "no config.json next to the tokenizer; using the MoAI-7B image settings"
    ]
    for structure, expected in (
        ({"image_size": 28, "patch_size": 7}, (7, 16)),
        ({"image_size": 28, "img_length": 9}, (14, 9)),
    ):
        (folder / "config.json").write_text(json.dumps({"moai_structure": structure}))
        p = MoAIProcessor.from_pretrained(folder)
        assert (p.patch_size, p.num_image_tokens) == expected
    (folder / "config.json").write_text(json.dumps({"moai_structure": [28]}))
    with pytest.raises(ConfigError, match=r"'moai_structure' in '.*config.json' must be an object"):
        MoAIProcessor.from_pretrained(folder)

    # a Hub repo from a cache folder: the tokenizer and config.json both come through the hub options
    repo = tmp_path / "cache" / "models--someone--tiny"
    snapshot = repo / "snapshots" / ("b" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    shutil.copy(FIXTURE / "tokenizer.model", snapshot / "tokenizer.model")
    (snapshot / "config.json").write_text(json.dumps({"moai_structure": {"image_size": 28}}))
    cache = str(tmp_path / "cache")
    from moai_sdk.hub import HubOptions

    by_options = MoAIProcessor.from_pretrained("someone/tiny", hub=HubOptions(cache_dir=cache, local_files_only=True))
    by_keywords = MoAIProcessor.from_pretrained("someone/tiny", cache_dir=cache, local_files_only=True)
    assert by_options.image_size == by_keywords.image_size == 28


def test_load_images_resizes_by_default_and_checks_exact_sizes(proc: MoAIProcessor) -> None:
    small = np.zeros((20, 30, 3), np.uint8)
    assert proc.load_images([small]).shape == (1, 3, 490, 490)
    rgba = np.random.default_rng(0).integers(0, 256, (490, 490, 4), dtype=np.uint8)
    exact = proc.load_images([rgba], resize=False)
    assert exact.shape == (1, 3, 490, 490) and torch.equal(exact[0], torch.from_numpy(rgba[..., :3]).permute(2, 0, 1))
    with pytest.raises(InputError, match="image 1 is 480x470 but resize=False needs exactly 490x490"):
        proc.load_images([rgba, np.zeros((470, 480, 3), np.uint8)], resize=False)
    with pytest.raises(InputError, match="^unsupported image type"):  # one image: the loader's own message
        proc.load_images([{"not": "an image"}])
    with pytest.raises(InputError, match="^image 1 of the batch: unsupported image type"):
        proc.load_images([small, {"not": "an image"}])
    with pytest.raises(InputError, match="normalize expects uint8 pixels; got torch.float32"):
        proc.normalize(torch.zeros(1, 3, 490, 490))


def test_panoptic_map_checks(proc: MoAIProcessor, tmp_path: Path) -> None:
    white = np.ones((490, 490, 3))  # colour 1.0 is in range
    assert proc.panoptic_map_array(white).max() == 1.0
    rgb = np.random.default_rng(1).integers(0, 256, (490, 490, 3), dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, np.full((490, 490), 7, np.uint8)]), "RGBA").save(tmp_path / "map.png")
    assert np.array_equal(proc.panoptic_map_array(tmp_path / "map.png"), rgb / 255.0)  # alpha dropped
    bad = [
        (torch.zeros(4, 490, 490), r"a torch panoptic map must be 3 x H x W; got shape \(4, 490, 490\)"),
        (np.zeros((490, 490, 4)), r"a numpy panoptic map must be H x W x 3; got shape \(490, 490, 4\)"),
        (
            np.full((490, 490, 3), np.nan),
            r"^a float panoptic map must hold colours in \[0, 1\]; for 0-255 values pass a uint8 array$",
        ),
        (np.full((490, 490, 3), 1.5), r"a float panoptic map must hold colours in \[0, 1\]"),
        (np.zeros((480, 640, 3)), r"the panoptic map is 640x480 but must match the 490x490 frame the experts run on"),
    ]
    for value, message in bad:
        with pytest.raises(InputError, match=message):
            proc.panoptic_map_array(value)


def test_call_argument_forms(proc: MoAIProcessor) -> None:
    img = np.zeros((20, 30, 3), np.uint8)
    out = proc([img, img], "hi", aux_texts=["a cat", None])
    assert out.aux_texts == ["a cat", EMPTY_VERBALIZATION]  # None = the official empty verbalization
    empty = proc([img], "hi")
    assert out.aux_input_ids[1, -empty.aux_input_ids.shape[1] :].tolist() == empty.aux_input_ids[0].tolist()
    # an aux text is text: a control string written in it is not a control token
    aux = proc([img], "hi", aux_texts=["a </s> b"]).aux_input_ids[0].tolist()
    assert aux == proc.tokenizer.encode_parts([("a </s> b", False)]) and proc.tokenizer.eos_token_id not in aux
    # one panoptic map (not a list) for a single image; a batch needs a list
    map0 = np.full((490, 490, 3), 0.5)
    assert torch.equal(
        proc(img, "hi", panoptic_maps=map0).panoptic_pixel_values,
        proc(img, "hi", [None], [map0])["panoptic_pixel_values"],
    )
    with pytest.raises(InputError, match="pass a list of 2 panoptic maps"):
        proc([img, img], "hi", panoptic_maps=map0)
    for kwargs, message in (
        (dict(prompts=["hi", None]), r"prompts\[1\] must be a str; got NoneType"),
        (dict(prompts="hi", template=["chat", None]), r"template\[1\] must be a str; got NoneType"),
        (dict(prompts="hi", template=["chat"] * 3), "got 3 template for 2 images"),
        (dict(prompts=42), "prompts must be a str or a list of str; got int"),
    ):
        with pytest.raises(InputError, match=message):
            proc([img, img], **kwargs)
    with pytest.raises(InputError, match=r"template\[1\] must be a str; got NoneType"):
        proc.prompt_lengths(["a", "b"], ["chat", None])
    with pytest.raises(InputError, match="got 3 template for 2 images"):
        proc.prompt_lengths(["a", "b"], ["chat"] * 3)
    with pytest.raises(InputError, match="^no images given; MoAI needs exactly one image per prompt$"):
        proc([], "hi")
