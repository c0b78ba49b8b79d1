"""OCR experts: a real read-back test of the rapidocr backend (offline, models inside its wheel) and the
PaddleOCR 3.x backend against its documented result shape."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from moai_sdk.errors import ConfigError, DependencyError, ExpertError
from moai_sdk.experts import available_experts, create_expert
from moai_sdk.experts.ocr import PaddleOCRExpert, RapidOCRExpert, paddleocr_lines, rapidocr_lines

pytest.importorskip("rapidocr_onnxruntime")

# 24 lines: letters, digits, punctuation; drawn in four styles (size, text colour, background)
LINES = [
    "The quick brown fox jumps",
    "over the lazy dog 123",
    "Reading text in images",
    "Invoice No. 48213 paid",
    "Total amount: 56.70 EUR",
    "Open daily 9am to 5pm",
    "Platform 7 departures",
    "Keep left at the fork",
    "Fresh bread and coffee",
    "Exit via the north gate",
    "Room 214 Seminar Hall",
    "Speed limit 30 km/h",
    "Welcome to Springfield",
    "Press the green button",
    "Parking for guests only",
    "Call 555-0199 today",
    "Library closes at 8pm",
    "No smoking in this area",
    "Season tickets on sale",
    "Warning: wet floor",
    "Gate B12 now boarding",
    "Mixture of All Intelligence",
    "Bus 42 to Central Station",
    "Return by 12 June",
]
STYLES = [  # (font size, text colour, background colour)
    (22, (0, 0, 0), (255, 255, 255)),
    (28, (255, 255, 255), (20, 40, 120)),
    (18, (200, 30, 30), (250, 240, 200)),
    (32, (0, 90, 0), (230, 230, 230)),
]


def render_page(lines: list[str], size: int, fg, bg) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
    """A 490 x 490 frame with ``lines`` drawn in Pillow's bundled scalable font; returns the frame and each
    line's pixel box."""
    img = Image.new("RGB", (490, 490), bg)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=size)
    boxes, y = [], 20
    for text in lines:
        draw.text((20, y), text, font=font, fill=fg)
        boxes.append(draw.textbbox((20, y), text, font=font))
        y += int(size * 1.8)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous(), boxes


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def read_back(result, boxes) -> list[str]:
    """For each drawn line, the recognised text whose box centre lies on it (pieces joined left to right)."""
    out = []
    for x0, y0, x1, y1 in boxes:
        hits = [t for t in result.text_lines if y0 - 4 <= (t.box.y0 + t.box.y1) / 2 <= y1 + 4]
        out.append(" ".join(t.text for t in sorted(hits, key=lambda t: t.box.x0)))
    return out


@pytest.fixture(scope="module")
def pages():
    chunks = [LINES[i * 6 : (i + 1) * 6] for i in range(4)]
    return [(chunk, *render_page(chunk, *style)) for chunk, style in zip(chunks, STYLES)]


def test_rapidocr_reads_rendered_text(pages, record_property):
    assert "rapidocr" in available_experts()["ocr"]
    exp = create_expert("rapidocr")
    assert isinstance(exp, RapidOCRExpert) and not exp.is_loaded
    results = exp.predict([frame for _, frame, _ in pages])
    errors = errors_nospace = chars = chars_nospace = 0
    for (truth, _, boxes), res in zip(pages, results):
        assert res.sources == {"ocr": "rapidocr"}
        assert all(0.0 <= t.confidence <= 1.0 and len(t.polygon) == 4 for t in res.text_lines)
        for want, got in zip(truth, read_back(res, boxes)):
            errors += levenshtein(" ".join(want.split()), " ".join(got.split()))
            chars += len(want)
            w, g = "".join(want.split()), "".join(got.split())
            errors_nospace += levenshtein(w, g)
            chars_nospace += len(w)
    cer, cer_nospace = errors / chars, errors_nospace / chars_nospace
    record_property("cer", cer)
    record_property("cer_without_spaces", cer_nospace)
    print(
        f"rapidocr on {len(LINES)} rendered lines: CER {cer:.2%} (spaces counted), {cer_nospace:.2%} (spaces ignored)"
    )
    # Measured here: 4.03 % with spaces counted (the PP-OCR Chinese recogniser sometimes drops the space
    # between English words), 0.00 % ignoring spaces.
    assert cer <= 0.05
    assert cer_nospace <= 0.01


def test_rapidocr_line_geometry_and_order(pages):
    truth, frame, boxes = pages[1]
    (res,) = create_expert("rapidocr").predict([frame])
    assert len(res.text_lines) == len(truth)
    # reading order (top to bottom) and boxes on the drawn lines
    centres = [(t.box.y0 + t.box.y1) / 2 for t in res.text_lines]
    assert centres == sorted(centres)
    for line, (x0, y0, x1, y1) in zip(res.text_lines, boxes):
        assert line.box.x0 <= x0 + 6 and line.box.x1 >= x1 - 6
        assert line.box.y0 <= y1 and line.box.y1 >= y0
        assert line.box.frame_width == 490
        xs = [p[0] for p in line.polygon]
        assert line.box.x0 == min(xs) and line.box.x1 == max(xs)


def test_rapidocr_gets_bgr_and_empty_images(monkeypatch, pages):
    """The real RapidOCR engine, wrapped to see the array it is handed: BGR by default, RGB on request; an image
    without text gives no lines, a page gives the engine's own lines."""
    exp = create_expert("rapidocr").load()
    real, seen, answers = exp.model, [], []

    def engine(arr, *args, **kwargs):
        seen.append(arr.copy())
        answers.append(real(arr, *args, **kwargs))
        return answers[-1]

    monkeypatch.setattr(exp, "model", engine)
    frame = torch.zeros(3, 8, 8, dtype=torch.uint8)
    frame[0] = 200  # red
    (res,) = exp.predict([frame])
    assert answers[0][0] is None and res.text_lines == []  # the engine found nothing
    assert seen[0].shape == (8, 8, 3) and seen[0][0, 0].tolist() == [0, 0, 200]  # BGR as the engine expects
    truth, page, _ = pages[0]
    (read,) = exp.predict([page])
    assert seen[1].shape == (490, 490, 3) and np.array_equal(seen[1], page.permute(1, 2, 0).numpy()[:, :, ::-1])
    assert [t.text for t in read.text_lines] == [line[1] for line in answers[1][0]]  # the engine's own lines
    assert len(read.text_lines) == len(truth)
    rgb = create_expert("rapidocr", input_order="rgb").load()
    monkeypatch.setattr(rgb, "model", engine)
    rgb.predict([frame])
    assert seen[2][0, 0].tolist() == [200, 0, 0]


def test_rapidocr_settings_validation(tmp_path):
    with pytest.raises(ConfigError, match="input_order"):
        create_expert("rapidocr", input_order="hsv")
    with pytest.raises(ConfigError, match="num_threads"):
        create_expert("rapidocr", num_threads=0)
    with pytest.raises(ConfigError, match="config.yaml"):
        create_expert("rapidocr", model_id=str(tmp_path / "missing.yaml"))
    assert create_expert("rapidocr").cache_key() != create_expert("rapidocr", text_score=0.7).cache_key()


def test_rapidocr_lines_parsing():
    assert rapidocr_lines(None) == []
    box = [[1, 2], [30, 2], [30, 12], [1, 12]]
    assert rapidocr_lines([[box, "abc", 0.9]]) == [(box, "abc", 0.9)]
    with pytest.raises(ValueError, match="unexpected RapidOCR line"):
        rapidocr_lines([[box, "abc"]])


# --- PaddleOCR 3.x ------------------------------------------------------------------------------------------


class FakeOCRResult(dict):
    """The documented shape of a PaddleOCR 3.x page result (dict-like)."""


def fake_page() -> FakeOCRResult:
    return FakeOCRResult(
        input_path=None,
        rec_texts=["HELLO", "world 42"],
        rec_scores=[0.98, 0.61],
        rec_polys=[
            np.array([[10, 20], [110, 20], [110, 40], [10, 40]], dtype=np.int16),
            np.array([[12, 60], [90, 58], [91, 80], [13, 82]], dtype=np.int16),
        ],
        rec_boxes=np.array([[10, 20, 110, 40], [12, 58, 91, 82]], dtype=np.int16),
    )


def test_paddleocr_result_shapes():
    lines = paddleocr_lines(fake_page())
    assert [(t, s) for _, t, s in lines] == [("HELLO", 0.98), ("world 42", 0.61)]
    legacy = [[[[10, 20], [110, 20], [110, 40], [10, 40]], ("HELLO", 0.98)]]  # PaddleOCR 2.x ocr()
    assert paddleocr_lines(legacy)[0][1:] == ("HELLO", 0.98)
    assert paddleocr_lines(None) == []
    bad = fake_page()
    bad["rec_scores"] = [0.9]
    with pytest.raises(ValueError, match="2 texts, 1 scores"):
        paddleocr_lines(bad)


def test_paddleocr_expert_with_documented_api(monkeypatch):
    created, inputs = [], []

    class FakePaddleOCR:
        def __init__(self, **kwargs):
            created.append(kwargs)

        def predict(self, array):
            inputs.append(array)
            return [fake_page()]

    monkeypatch.setitem(sys.modules, "paddleocr", types.SimpleNamespace(PaddleOCR=FakePaddleOCR, __version__="3.1"))
    exp = create_expert("paddleocr", device="cpu")
    assert isinstance(exp, PaddleOCRExpert)
    frame = torch.zeros(3, 100, 120, dtype=torch.uint8)
    frame[0] = 255
    (res,) = exp.predict([frame])
    opts = created[0]
    assert opts["lang"] == "ch" and opts["use_textline_orientation"] is True and opts["device"] == "cpu"
    assert opts["text_rec_score_thresh"] == 0.5 and opts["ocr_version"] == "PP-OCRv4"
    assert inputs[0][0, 0].tolist() == [255, 0, 0]  # the official code handed over the RGB array unchanged
    assert [(t.text, t.confidence) for t in res.text_lines] == [("HELLO", 0.98), ("world 42", 0.61)]
    first = res.text_lines[0]
    assert first.box.xyxy == (10.0, 20.0, 110.0, 40.0) and (first.box.frame_width, first.box.frame_height) == (120, 100)
    assert res.text_lines[1].polygon[1] == (90.0, 58.0)
    assert res.sources == {"ocr": "paddleocr"}

    gpu = create_expert("paddleocr", device="cuda:1", engine_kwargs={"text_recognition_batch_size": 4})
    assert gpu.engine_options()["device"] == "gpu:1"
    assert gpu.engine_options()["text_recognition_batch_size"] == 4


def test_paddleocr_missing_or_old(monkeypatch):
    monkeypatch.setitem(sys.modules, "paddleocr", None)  # makes the import fail
    with pytest.raises(DependencyError, match=r"pip install 'moai-sdk\[experts\]'"):
        create_expert("paddleocr").load()

    class Legacy:  # PaddleOCR 2.x: no predict()
        def __init__(self, **kwargs):
            pass

    monkeypatch.setitem(sys.modules, "paddleocr", types.SimpleNamespace(PaddleOCR=Legacy, __version__="2.7.3"))
    with pytest.raises(DependencyError, match="older than 3.0"):
        create_expert("paddleocr").load()


def test_paddleocr_engine_failure_is_wrapped(monkeypatch):
    class Broken:
        def __init__(self, **kwargs):
            pass

        def predict(self, array):
            raise RuntimeError("paddle inference failed")

    monkeypatch.setitem(sys.modules, "paddleocr", types.SimpleNamespace(PaddleOCR=Broken))
    with pytest.raises(ExpertError, match="paddleocr.*paddle inference failed"):
        create_expert("paddleocr").predict([torch.zeros(3, 10, 10, dtype=torch.uint8)])
