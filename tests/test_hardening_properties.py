"""Property-based hardening of the public API (hypothesis, the bounded "ci" profile of conftest.py).

Generated images (modes, sizes, dtypes, shapes, encodings, broken bytes, paths, URLs), prompts (arbitrary Unicode
with lone surrogates, control strings, lengths past the context window) and generation options (types, NaN/inf,
bools, huge integers) go through ``MoAIPipeline.__call__``. Each must give a valid result or a ``MoAIError`` --
never another exception -- and afterwards the pipeline's greedy answer to a fixed request must be unchanged.
Inputs the documented contract accepts (any non-empty PIL image, a uint8 HWC array, a short text prompt, in-range
options) must give a valid result, and each category must have produced both valid results and typed errors. Counts
per category and outcome are printed at the end of the module (``pytest -s``).
"""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from moai_sdk import MoAIError, MoAIResult
from moai_sdk.imageops import prepare_image
from moai_sdk.testing import demo_image, tiny_pipeline

OUTCOMES: Counter[tuple[str, str]] = Counter()
FIXED_PROMPT = "What is written in the image?"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("moai-hardening"), experts=None)


@pytest.fixture(scope="module", autouse=True)
def fixed(pipe):
    """The fixed request and its greedy answer, taken before any hostile input (autouse: set up before the
    module's first test, whatever the order; check with ``pytest --setup-plan``)."""
    image = demo_image("MOAI")
    return image, pipe(image, FIXED_PROMPT, max_new_tokens=6).text


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    categories = sorted({c for c, _ in OUTCOMES})
    print("\nhardening property tests: generated inputs per category and outcome")
    for category in categories:
        rows = {o: n for (c, o), n in OUTCOMES.items() if c == category}
        print(f"  {category}: {sum(rows.values())} inputs -- " + ", ".join(f"{o} {n}" for o, n in sorted(rows.items())))


def _outcome(category: str, call, must_be_valid: bool = False) -> str:
    """Run ``call``; record and return "valid" or the MoAIError subclass. Any other exception fails the test, and
    so does an error where ``must_be_valid`` (an input the documented contract accepts)."""
    try:
        result = call()
    except MoAIError as exc:
        assert str(exc), "a MoAIError must say what went wrong"
        outcome = type(exc).__name__
        assert not must_be_valid, f"a valid input was rejected: {exc}"
    else:
        results = result if isinstance(result, list) else [result]  # a 4-D array is a batch
        assert results and all(isinstance(r, MoAIResult) and isinstance(r.text, str) for r in results)
        outcome = "valid"
    OUTCOMES[(category, outcome)] += 1
    return outcome


def _unchanged(pipe, fixed, category: str) -> None:
    image, answer = fixed
    assert pipe(image, FIXED_PROMPT, max_new_tokens=6).text == answer
    # the category's generated inputs reached both sides: valid results and typed errors
    outcomes = {o for (c, o), n in OUTCOMES.items() if c == category and n}
    assert "valid" in outcomes and outcomes - {"valid"}, f"{category}: outcomes {sorted(outcomes)}"


# ------------------------------------------------------------------------------------------------ images
PIL_MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "I;16", "I;16B", "LA", "PA"]
PIL_MODES += ["La", "RGBa", "RGBX"]
DTYPES = [np.uint8, np.uint16, np.int32, np.int64, np.float16, np.float32, np.float64, np.bool_]


@st.composite
def pil_images(draw):
    mode = draw(st.sampled_from(PIL_MODES))
    size = (draw(st.integers(0, 24)), draw(st.integers(0, 24)))
    im = Image.new(mode, size)
    if size[0] and size[1]:
        raw = draw(st.binary(min_size=len(im.tobytes()), max_size=len(im.tobytes())))
        im = Image.frombytes(mode, size, raw)
    return im


@st.composite
def encoded_images(draw):
    im = draw(pil_images())
    fmt = draw(st.sampled_from(["PNG", "GIF", "JPEG", "WEBP", "TIFF", "BMP"]))
    buf = io.BytesIO()
    try:
        if fmt == "GIF" and draw(st.booleans()) and im.width and im.height:
            frames = [im.convert("RGB"), Image.new("RGB", im.size, (255, 0, 0))]
            frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
        else:
            im.save(buf, format=fmt)
    except (OSError, ValueError, KeyError, SystemError, MemoryError):
        return b"\x89PNG\r\n\x1a\n"  # Pillow cannot write this mode/format: a header only
    data = buf.getvalue()
    cut = draw(st.sampled_from([None, 1, 8, 30, -20, -1]))
    return data if cut is None else data[:cut]


arrays = hnp.arrays(
    dtype=st.sampled_from(DTYPES),
    shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=6),
)
tensors = arrays.map(lambda a: torch.from_numpy(a.astype(np.float32) if a.dtype == np.float16 else a))
strings = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["http://127.0.0.1:1/x.png", "https://example.com/cat.jpg", "ftp://h/x.png", "file:///etc/hosts"]),
    st.integers(250, 5000).map(lambda n: "a" * n + ".png"),
)
images = st.one_of(pil_images(), encoded_images(), arrays, tensors, strings, st.binary(max_size=40), st.none())


def _accepted_image(image) -> bool:
    """What load_image_chw documents as accepted: any non-empty PIL image (every mode becomes RGB(A)), a uint8
    numpy HWC / HW array or torch CHW / HW tensor with 1, 3 or 4 channels."""
    if isinstance(image, Image.Image):
        return image.width > 0 and image.height > 0
    if isinstance(image, np.ndarray | torch.Tensor):
        shape = tuple(image.shape)
        uint8 = image.dtype in (np.uint8, torch.uint8)
        if len(shape) == 2:
            return uint8 and min(shape) > 0
        channels, hw = (shape[2], shape[:2]) if isinstance(image, np.ndarray) else (shape[0], shape[1:])
        return uint8 and len(shape) == 3 and channels in (1, 3, 4) and min(hw) > 0
    return False


@given(image=images)
def test_any_image_gives_a_result_or_a_moai_error(pipe, image):
    _outcome("images", lambda: pipe(image, "Hi", max_new_tokens=1), must_be_valid=_accepted_image(image))


@settings(max_examples=max(1, settings().max_examples // 2))  # each valid batch runs the model on 2-3 images
@given(batch=st.lists(st.one_of(pil_images(), st.binary(max_size=20)), min_size=2, max_size=3))
def test_a_batch_error_names_the_image(pipe, batch):
    bad = [i for i, image in enumerate(batch) if not _loads(image)]
    try:
        pipe(batch, "Hi", max_new_tokens=1)
    except MoAIError as exc:
        assert bad, f"a batch of loadable images was rejected: {exc}"
        assert f"image {bad[0]} of the batch" in str(exc)  # the first image that does not load on its own
        OUTCOMES[("image batches", type(exc).__name__)] += 1
    else:
        assert not bad, f"images {bad} do not load alone but the batch was accepted"
        OUTCOMES[("image batches", "valid")] += 1


def _loads(image) -> bool:
    try:
        prepare_image(image)
    except MoAIError:
        return False
    return True


def test_images_leave_the_pipeline_unchanged(pipe, fixed):
    _unchanged(pipe, fixed, "images")
    _unchanged(pipe, fixed, "image batches")


# ------------------------------------------------------------------------------------------------ prompts
CONTROL = ["</s>", "<s>", "<unk>", "<image>", "[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]", "\x00", "\ufeff"]
unicode_text = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=40)  # surrogates too
prompts = st.one_of(
    unicode_text,
    st.lists(st.one_of(st.sampled_from(CONTROL), unicode_text), max_size=6).map("".join),
    st.tuples(st.sampled_from(["word ", "漢字", "🙂 ", "</s>"]), st.integers(300, 4000)).map(lambda t: t[0] * t[1]),
    st.one_of(st.none(), st.integers(), st.binary(max_size=4)),
)


@given(prompt=prompts, template=st.sampled_from(["chat", "demo"]))
def test_any_prompt_gives_a_result_or_a_moai_error(pipe, prompt, template):
    _outcome("prompts", lambda: pipe(demo_image("P"), prompt, template=template, max_new_tokens=1))


def test_prompts_leave_the_pipeline_unchanged(pipe, fixed):
    _unchanged(pipe, fixed, "prompts")


# ------------------------------------------------------------------------------------------------ options
junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.lists(st.integers(-3, 3), max_size=2),
)
small_ints = st.integers(-2, 3)
OPTIONS = {
    "max_new_tokens": st.one_of(junk.filter(lambda v: not (isinstance(v, int) and 3 < v < 10**6)), small_ints),
    "do_sample": junk,
    "temperature": st.one_of(junk, st.floats(1e-6, 5)),
    "top_p": st.one_of(junk, st.floats(0, 1)),
    "top_k": st.one_of(junk, small_ints),
    "num_beams": st.one_of(junk.filter(lambda v: not (isinstance(v, int) and 4 < v < 10**6)), small_ints),
    "length_penalty": junk,
    "repetition_penalty": st.one_of(junk, st.floats(0.5, 2)),
    "eos_token_id": junk,
    "stop": st.one_of(junk, st.lists(st.text(max_size=3), max_size=2)),
    "seed": junk,
}
options = st.fixed_dictionaries({}, optional=OPTIONS)


@given(opts=options)
def test_any_generation_options_give_a_result_or_a_moai_error(pipe, opts):
    opts.setdefault("max_new_tokens", 2)
    _outcome("options", lambda: pipe(demo_image("O"), "Hi", **opts))


def test_options_leave_the_pipeline_unchanged(pipe, fixed):
    _unchanged(pipe, fixed, "options")
