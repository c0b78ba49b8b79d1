"""Image inputs: every accepted type, the official resize, and clear errors (also after ultralytics' PIL patch)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from moai_sdk import InputError
from moai_sdk.imageops import load_image_chw, official_resize, prepare_image


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_all_input_types_agree(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(arr).save(path)
    expected = torch.from_numpy(arr).permute(2, 0, 1)
    for value in (Image.fromarray(arr), path, str(path), _png_bytes(arr), arr, expected.clone()):
        out = load_image_chw(value)
        assert out.dtype == torch.uint8 and torch.equal(out, expected)
    gray = load_image_chw(arr[..., 0])
    assert gray.shape == (3, 30, 40) and torch.equal(gray[1], expected[0])
    readonly = arr.copy()
    readonly.setflags(write=False)
    assert torch.equal(load_image_chw(readonly), expected)


def test_rgba_keeps_alpha_until_resize():
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[..., 3] = 7
    assert load_image_chw(rgba).shape[0] == 4
    out = prepare_image(rgba)
    assert out.shape == (3, 490, 490)  # alpha dropped after the official resize, without compositing
    assert int(out.max()) == 0


def test_official_resize_is_torchvision_bilinear_without_antialias():
    from torchvision.transforms.functional import InterpolationMode, resize

    x = torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8)
    expected = resize(x, [490, 490], interpolation=InterpolationMode.BILINEAR, antialias=False)
    assert torch.equal(official_resize(x), expected)


@settings(max_examples=40, deadline=None)
@given(
    channels=st.sampled_from([1, 3, 4]),
    height=st.integers(1, 600),
    width=st.integers(1, 600),
    size=st.sampled_from([490, 336, 64, 7]),
    seed=st.integers(0, 2**31 - 1),
)
def test_official_resize_equals_torchvision_bit_for_bit(channels, height, width, size, seed):
    """The torch-only resize is torchvision's tensor resize exactly: up and down, odd sizes, grey, alpha, no-op."""
    from torchvision.transforms.functional import InterpolationMode, resize

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (channels, height, width), dtype=torch.uint8, generator=g)
    expected = resize(x, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=False)[:3]
    out = official_resize(x, size)
    assert out.dtype == torch.uint8 and out.is_contiguous()
    assert torch.equal(out, expected)


def test_importing_the_image_code_does_not_import_torchvision():
    import subprocess
    import sys

    code = "import sys, moai_sdk.imageops, moai_sdk.pipeline; print('torchvision' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((4, 4, 3), dtype=np.float32), "uint8"),
        (np.zeros((4, 4, 5), dtype=np.uint8), "channels"),
        (torch.zeros(3, 4, 4), "uint8"),
        (12, "unsupported image type"),
        (b"not an image", "not an image"),
        ("/no/such/file.png", "not found"),
    ],
)
def test_bad_images_raise_input_error(bad, message):
    with pytest.raises(InputError, match=message):
        load_image_chw(bad)


def test_bad_bytes_after_ultralytics_patches_pil():
    pytest.importorskip("ultralytics")
    import ultralytics.utils.patches  # noqa: F401  (replaces PIL.Image.open process-wide)

    with pytest.raises(InputError, match="not an image"):
        load_image_chw(b"definitely not an image")
