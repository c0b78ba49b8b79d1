"""Hostile and unusual images: every Pillow mode to the right 8-bit RGB, EXIF orientation, animation, truncated
files, decompression bombs, empty arrays, unusable paths, URLs (only when allowed) and the batch index in errors."""

from __future__ import annotations

import _socket
import http.server
import io
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from moai_sdk import InputError
from moai_sdk.imageops import load_image_chw, prepare_frames


def _encode(im: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _rgb_of(chw: torch.Tensor) -> np.ndarray:
    return chw.permute(1, 2, 0).numpy()


# ------------------------------------------------------------------------------------------------ pixel types
def test_16_bit_gray_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    im = Image.fromarray(values)  # mode I;16
    assert im.mode == "I;16"
    for source in (im, _encode(im)):
        out = load_image_chw(source)
        assert out.shape == (3, 1, 4)
        assert out[0, 0].tolist() == [0, 1, 128, 255]
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


@pytest.mark.parametrize(
    "values, expected",
    [
        ([0, 100, 255], [0, 100, 255]),  # 8-bit data in a 32-bit container stays as it is
        ([0, 257, 65535], [0, 1, 255]),  # 16-bit data (16-bit PNGs in older Pillow) scaled by 65535 -> 255
        ([-1000, 0, 1000], [0, 128, 255]),  # anything else stretched from its own minimum..maximum
    ],
)
def test_32_bit_integer_images_use_the_smallest_range_holding_the_data(values, expected):
    im = Image.fromarray(np.array([values], dtype=np.int32))
    assert im.mode == "I"
    assert load_image_chw(im)[0, 0].tolist() == expected


@pytest.mark.parametrize(
    "values, expected",
    [([0.0, 0.5, 1.0], [0, 128, 255]), ([0.0, 127.6, 255.0], [0, 128, 255]), ([-1.0, 0.0, 1.0], [0, 128, 255])],
)
def test_float_images_are_scaled(values, expected):
    im = Image.fromarray(np.array([values], dtype=np.float32))
    assert im.mode == "F"
    assert load_image_chw(im)[0, 0].tolist() == expected


def test_float_image_with_nan_is_refused():
    im = Image.fromarray(np.array([[0.0, np.nan]], dtype=np.float32))
    with pytest.raises(InputError, match="NaN"):
        load_image_chw(im)


MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "I;16", "I;16B", "LA", "PA", "La"]
MODES += ["RGBa", "RGBX"]


@pytest.mark.parametrize("mode", MODES)
def test_every_pillow_mode_gives_8_bit_rgb(mode):
    im = Image.new(mode, (5, 3))
    out = load_image_chw(im)
    assert out.dtype == torch.uint8 and out.shape[1:] == (3, 5) and out.shape[0] in (3, 4)


def test_cmyk_and_palette_colours_are_right():
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red
    assert _rgb_of(load_image_chw(cmyk))[0, 0].tolist() == [255, 0, 0]
    pal = Image.new("RGB", (2, 2), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert _rgb_of(load_image_chw(pal))[0, 0].tolist() == [10, 200, 30]


# ------------------------------------------------------------------------------------------------ EXIF, animation
def test_exif_orientation_is_applied():
    arr = np.zeros((10, 20, 3), dtype=np.uint8)
    arr[:, :10] = (255, 0, 0)  # left half red, right half blue
    arr[:, 10:] = (0, 0, 255)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = _encode(im, "PNG", exif=exif.tobytes())
    out = load_image_chw(data)
    expected = np.array(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert out.shape == (3, 20, 10)  # portrait now
    assert np.array_equal(_rgb_of(out), expected)
    assert _rgb_of(out)[0, 0].tolist() == [255, 0, 0] and _rgb_of(out)[-1, 0].tolist() == [0, 0, 255]


def test_animated_image_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert _rgb_of(load_image_chw(data))[4, 4].tolist() == [255, 0, 0]


# ------------------------------------------------------------------------------------------------ broken inputs
def test_truncated_files_name_the_source(tmp_path):
    rng = np.random.default_rng(0)
    full = _encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(InputError, match="truncated or corrupt") as info:
        load_image_chw(path)
    assert "cut.jpg" in str(info.value) and info.value.__cause__ is not None
    png = _encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(InputError, match="image bytes"):
        load_image_chw(png[:200])


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb's first bytes)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bombs_are_refused_before_decoding():
    with pytest.raises(InputError, match="decompression bomb"):
        load_image_chw(_png_header_only(30000, 30000))  # Pillow's own limit (2 x MAX_IMAGE_PIXELS)
    with pytest.raises(InputError, match="cap of 1,000"):
        load_image_chw(_encode(Image.new("RGB", (50, 50))), max_pixels=1000)
    assert load_image_chw(_encode(Image.new("RGB", (50, 50))), max_pixels=2500).shape == (3, 50, 50)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((0, 5, 3), np.uint8), np.zeros((5, 0), np.uint8), torch.zeros(3, 0, 4, dtype=torch.uint8)],
    ids=["hwc-0-rows", "hw-0-cols", "chw-0-rows"],
)
def test_empty_arrays_are_refused(bad):
    with pytest.raises(InputError, match="empty"):
        load_image_chw(bad)


def test_empty_pil_image_is_refused():
    with pytest.raises(InputError, match="empty"):
        load_image_chw(Image.new("RGB", (0, 0)))


@pytest.mark.parametrize("path", ["x" * 5000 + ".png", "bad\0name.png"], ids=["too-long", "nul-byte"])
def test_unusable_paths_are_input_errors_with_a_short_name(path):
    with pytest.raises(InputError, match="not a usable file path") as info:
        load_image_chw(path)
    assert len(str(info.value)) < 400


def test_batch_errors_name_the_image_index():
    good = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(InputError, match=r"image 2 of the batch: .*not an image"):
        prepare_frames([good, good, b"junk", good])
    with pytest.raises(InputError) as single:
        prepare_frames([b"junk"])
    assert "of the batch" not in str(single.value)


# ------------------------------------------------------------------------------------------------ URLs
def test_url_without_permission_says_so():
    with pytest.raises(InputError, match="is a URL, and loading remote images is off: pass allow_remote=True"):
        load_image_chw("https://example.com/cat.png")
    with pytest.raises(InputError, match="'ftp' URLs are not supported"):
        load_image_chw("ftp://example.com/cat.png")


@pytest.fixture
def loopback(monkeypatch):
    """Undo the suite's network block for 127.0.0.1 only (a real local HTTP server)."""
    real_getaddrinfo = _socket.getaddrinfo

    def local_only(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost"):
            raise OSError(f"test may only reach 127.0.0.1, not {host}")
        return real_getaddrinfo("127.0.0.1", *args, **kwargs)

    def connect_local(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, **kwargs):
        host, port = address
        if host not in ("127.0.0.1", "localhost"):
            raise OSError(f"test may only reach 127.0.0.1, not {host}")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
            sock.settimeout(timeout)
        _socket.socket.connect(sock, ("127.0.0.1", port))
        return sock

    monkeypatch.setattr(socket, "getaddrinfo", local_only)
    monkeypatch.setattr(socket, "create_connection", connect_local)


@pytest.fixture
def image_server(loopback):
    png = _encode(Image.new("RGB", (6, 4), (1, 2, 3)))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/slow.png":
                time.sleep(2.0)
            body = png if self.path != "/big.png" else png + b"\0" * 5000
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            if self.path != "/nolength.png":
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body if self.path != "/nolength.png" else png + b"\0" * 5000)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_url_loaded_when_allowed_with_timeout_and_byte_cap(image_server):
    out = load_image_chw(f"{image_server}/ok.png", allow_remote=True)
    assert out.shape == (3, 4, 6) and _rgb_of(out)[0, 0].tolist() == [1, 2, 3]
    with pytest.raises(InputError, match="over the 1,000-byte cap"):
        load_image_chw(f"{image_server}/big.png", allow_remote=True, max_bytes=1000)
    with pytest.raises(InputError, match="larger than the 1,000-byte cap"):
        load_image_chw(f"{image_server}/nolength.png", allow_remote=True, max_bytes=1000)
    with pytest.raises(InputError, match=r"cannot fetch .*timeout 0.3 s"):
        load_image_chw(f"{image_server}/slow.png", allow_remote=True, timeout=0.3)


def test_processor_batch_errors_name_the_image_index(tiny_dir):
    from moai_sdk.processing import MoAIProcessor

    proc = MoAIProcessor.from_pretrained(tiny_dir)
    good = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(InputError, match=r"image 1 of the batch: .*truncated or corrupt"):
        noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        proc([good, _encode(Image.fromarray(noise))[:200]], "Hi")
