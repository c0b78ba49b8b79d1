"""``moai ui``: the playground in a real browser.

``moai ui --tiny DIR`` (and ``moai ui --server URL`` over a ``moai serve --tiny DIR``) run as subprocesses on
127.0.0.1; Debian's Chromium, driven by Playwright for Python, uploads pictures, asks, ablates and reads the page
by its element ids. The answers must equal the in-process pipeline's with the same greedy settings; errors must
be messages on the page that leave it usable; the browser console must stay free of errors; the page must not
reach for anything but the playground's own address.

``MOAI_UI_SCREENSHOT=shot.png python -m pytest -q tests/test_ui.py -k ablate`` saves the page after Ask and
Ablate (the README's docs/images/ui.png is the same page under ``moai ui --tiny /tmp/moai-tiny``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from benchmarks.serve import MoaiProcess, ServerProcess
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from conftest import allow_loopback_only
from moai_sdk.errors import InputError
from moai_sdk.explain import ALL_EXPERTS
from moai_sdk.results import TASKS
from moai_sdk.testing import demo_image, tiny_pipeline
from moai_sdk.ui.backends import Settings, read_upload

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
browser_only = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"no Chromium at {CHROMIUM}: install Debian's chromium (apt-get install -y chromium) to run the browser tests",
)
STARTUP_S = 240
MAX_NEW_TOKENS = 8
MAX_IMAGE_BYTES = 400_000
PROMPT = "What is written in the image?"
ANSWER_TIMEOUT_MS = 180_000
#: An output's status tracker while its event runs: Gradio 6 draws it as ``div.wrap.<variant>.<show_progress>``
#: and adds ``hide`` when idle (``generating`` while a generator streams). Non-generator events (Ablate) are
#: only ever in this state, never ``generating``.
BUSY = ".wrap.default:not(.hide), .wrap.center:not(.hide), .wrap.generating"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Loopback only (overrides the suite's no-network guard): the playground and the server listen on
    127.0.0.1; any other address fails loudly."""
    allow_loopback_only(monkeypatch)


class UIProcess(MoaiProcess):
    """``moai ui ...`` in a subprocess on 127.0.0.1 (log in ``log``); a failed start fails the test with the log."""

    def __init__(self, log: Path, *args: str) -> None:
        super().__init__(["ui", *args], log, startup_s=STARTUP_S)
        self.url = self.base
        try:
            self.wait_ready("/")
        except RuntimeError as exc:
            pytest.fail(f"{exc}:\n{log.read_text()[-4000:]}")


# ----------------------------------------------------------------------------------------------------------
# pictures
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pictures")
    good = folder / "moai.png"
    demo_image("MOAI", (320, 240)).save(good)
    other = folder / "hello.png"
    demo_image("HELLO", (400, 300)).save(other)
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a picture " * 20)
    noise = np.random.default_rng(0).integers(0, 256, (600, 600, 3), dtype=np.uint8)
    big = folder / "noise.png"
    Image.fromarray(noise).save(big)  # ~1 MB of incompressible pixels: over the playground's --max-image-bytes
    assert big.stat().st_size > MAX_IMAGE_BYTES
    return {"good": good, "other": other, "corrupt": corrupt, "big": big}


# ----------------------------------------------------------------------------------------------------------
# the backends without a browser: uploads and settings
# ----------------------------------------------------------------------------------------------------------


def test_read_upload_checks_size_content_and_folder(pictures, tmp_path):
    upload = read_upload(pictures["good"], roots=[pictures["good"].parent])
    assert upload.image.shape == (3, 240, 320) and upload.data == pictures["good"].read_bytes()
    with pytest.raises(InputError, match="MiB"):
        read_upload(pictures["big"], max_bytes=MAX_IMAGE_BYTES)
    with pytest.raises(InputError, match="not a picture"):
        read_upload(pictures["corrupt"])
    with pytest.raises(InputError, match="upload one"):
        read_upload(None)
    with pytest.raises(InputError, match="through the page"):
        read_upload(pictures["good"], roots=[tmp_path])  # a path outside the upload folders is refused
    with pytest.raises(InputError, match="cannot be read"):
        read_upload(tmp_path / "gone.png")


@given(st.binary(max_size=2048))
def test_read_upload_of_any_bytes_is_a_picture_or_an_input_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("bytes") / "upload.bin"
    path.write_bytes(data)
    try:
        upload = read_upload(path)
    except InputError as exc:
        assert str(exc)
    else:
        assert upload.image.ndim == 3 and upload.image.shape[0] in (3, 4)


def test_settings_are_greedy_at_temperature_zero():
    assert Settings(8, 0.0, 0.5).pipeline_options() == {"max_new_tokens": 8, "do_sample": False}
    assert Settings(8, 0.0, 0.5).request_fields() == {"max_tokens": 8, "temperature": 0.0}
    sampled = Settings(8, 0.7, 0.9)
    assert sampled.pipeline_options() == {"max_new_tokens": 8, "do_sample": True, "temperature": 0.7, "top_p": 0.9}
    assert sampled.request_fields() == {"max_tokens": 8, "temperature": 0.7, "top_p": 0.9}
    for bad in ((0, 0.0, 1.0), (8, -1.0, 1.0), (8, 0.5, 0.0)):
        with pytest.raises(InputError):
            Settings(*bad)


# ----------------------------------------------------------------------------------------------------------
# the browser
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ui") / "tiny"


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    """The tiny pipeline the playground loads (built here first, so the subprocesses reuse the folder)."""
    return tiny_pipeline(tiny_dir)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Page:
    """One browser tab on the playground: console errors and requests to other addresses are recorded (and
    the latter refused)."""

    def __init__(self, browser, url: str) -> None:
        self.url = url
        self.page = browser.new_page(viewport={"width": 1280, "height": 1000})
        self.console_errors: list[str] = []
        self.foreign: list[str] = []
        self.page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.console_errors.append(f"page error: {e}"))
        self.page.route("**/*", self._route)
        self.page.goto(url)
        self.page.wait_for_selector("#ask")

    def _route(self, route) -> None:
        if route.request.url.startswith(self.url):
            route.continue_()
        else:
            self.foreign.append(route.request.url)
            route.abort()

    def upload(self, path: Path) -> None:
        self.page.set_input_files("#image input[type=file]", str(path))
        # the upload is done when the component shows its preview (an <img>, broken for an unreadable file)
        self.page.wait_for_selector("#image img", state="attached", timeout=30_000)
        time.sleep(0.3)

    def set_prompt(self, text: str) -> None:
        self.page.fill("#prompt textarea", text)

    def set_max_new_tokens(self, n: int) -> None:
        box = self.page.locator("#max_new_tokens input[type=number]")
        if not box.is_visible():
            self.page.get_by_text("Generation settings").click()
        box.fill(str(n))
        box.press("Enter")

    def ask(self) -> None:
        """Click Ask and wait until the event has run to its end."""
        self.run("#ask")

    def run(self, button: str) -> None:
        """Click ``button`` and wait until Gradio has shown the event busy and then idle again (a
        MutationObserver notes the busy state, however short)."""
        self.page.evaluate(
            """(BUSY) => {
                window.__moaiBusy = false;
                const busy = () => document.querySelector(BUSY) !== null;
                if (window.__moaiObserver) window.__moaiObserver.disconnect();
                window.__moaiObserver = new MutationObserver(() => { if (busy()) window.__moaiBusy = true; });
                window.__moaiObserver.observe(document.body, {subtree: true, attributes: true, childList: true});
            }""",
            BUSY,
        )
        self.page.click(button)
        self.page.wait_for_function(
            "(BUSY) => window.__moaiBusy && !document.querySelector(BUSY)",
            arg=BUSY,
            timeout=ANSWER_TIMEOUT_MS,
        )
        time.sleep(0.3)

    def answer(self) -> str:
        return self.page.input_value("#answer textarea")

    def error(self) -> str:
        return self.page.inner_text("#error").strip()

    def shown(self, elem_id: str) -> bool:
        """Whether the image output ``elem_id`` shows a decoded picture."""
        return bool(
            self.page.evaluate(
                f"() => {{ const i = document.querySelector('#{elem_id} img'); return !!i && i.complete && i.naturalWidth > 0; }}"
            )
        )

    def close(self) -> None:
        self.page.close()


@pytest.fixture(scope="module")
def ui(pipe, tiny_dir, tmp_path_factory):
    server = UIProcess(
        tmp_path_factory.mktemp("logs") / "ui.log",
        "--tiny",
        str(tiny_dir),
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),
        "--max-image-bytes",
        str(MAX_IMAGE_BYTES),
    )
    yield server
    server.stop()


@pytest.fixture
def page(browser, ui):
    tab = Page(browser, ui.url)
    yield tab
    tab.close()
    assert tab.console_errors == [], f"errors in the browser console: {tab.console_errors}"
    assert tab.foreign == [], f"the page reached beyond the playground: {tab.foreign}"


@browser_only
def test_answer_equals_the_pipeline_with_the_perception_shown(page, pipe, pictures):
    expected = pipe(str(pictures["good"]), PROMPT, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    page.upload(pictures["good"])
    page.set_prompt(PROMPT)
    page.ask()
    assert page.error() == ""
    assert page.answer() == expected.text
    assert page.shown("perception") and page.shown("gates")
    assert page.page.input_value("#verbalization textarea") == expected.aux_text and "MOAI" in expected.aux_text
    details = "".join(page.page.inner_text("#details").split())  # the JSON viewer puts tokens on lines of their own
    assert f'"generated":{expected.token_counts["generated"]},' in details and '"prefill":' in details


@browser_only
def test_the_answer_streams_as_it_is_generated(page, pipe, pictures):
    tokens = 48
    expected = pipe(str(pictures["other"]), "Describe the picture.", max_new_tokens=tokens, do_sample=False)
    assert expected.token_counts["generated"] > 16, "the tiny model stops too early for this test"
    page.upload(pictures["other"])
    page.set_prompt("Describe the picture.")
    page.set_max_new_tokens(tokens)
    page.page.evaluate(
        """() => {
            window.__answers = [];
            const box = document.querySelector('#answer textarea');
            const seen = () => { const v = box.value; if (window.__answers.at(-1) !== v) window.__answers.push(v); };
            window.__poll = setInterval(seen, 5);
        }"""
    )
    page.ask()
    values = [v for v in page.page.evaluate("() => { clearInterval(window.__poll); return window.__answers; }") if v]
    assert page.answer() == expected.text
    assert len(values) >= 3, f"the answer arrived in {len(values)} piece(s), not streamed: {values}"
    assert all(expected.text.startswith(v) for v in values), values


@browser_only
def test_ablate_fills_one_row_per_expert(page, pipe, pictures, tmp_path):
    expected = pipe.ablate(str(pictures["good"]), PROMPT, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    page.upload(pictures["good"])
    page.set_prompt(PROMPT)
    page.ask()  # the screenshot shows an answer too
    page.run("#ablate")
    # Gradio 6 draws the table as a virtual grid: one div[role=row] per data row (the <tbody> only sizes columns)
    rows = page.page.eval_on_selector_all(
        "#ablation [role=grid] [role=row][data-index]",
        "rows => rows.map(r => Array.from(r.querySelectorAll('[role=gridcell]')).map(c => c.innerText.trim()))",
    )
    tasks = [t for t in TASKS if t in pipe.experts]
    assert [r[0] for r in rows] == [ALL_EXPERTS] + [f"without {t}" for t in tasks]
    assert len(rows) == 1 + len(pipe.experts)
    for row, want in zip(rows, expected.rows):
        assert row[0] == want.variant and row[-1] == " ".join(want.text.split())
        assert row[1] == ("yes" if want.changed else "")
    assert page.error() == ""
    shot = Path(os.environ.get("MOAI_UI_SCREENSHOT") or tmp_path / "ui.png")
    page.page.screenshot(path=str(shot), full_page=True)


@browser_only
def test_errors_are_messages_and_the_page_stays_usable(page, pipe, pictures):
    page.upload(pictures["corrupt"])
    page.set_prompt(PROMPT)
    page.ask()
    assert "not a picture that can be read" in page.error()
    page.upload(pictures["big"])
    page.ask()
    assert "MiB" in page.error() and "--max-image-bytes" in page.error()
    page.upload(pictures["good"])
    page.set_prompt("   ")
    page.ask()
    assert "question is empty" in page.error()
    page.set_prompt("word " * 1200)  # with the picture's 1225 positions, past the tiny model's 2048
    page.ask()
    assert "context" in page.error()
    expected = pipe(str(pictures["good"]), PROMPT, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    page.set_prompt(PROMPT)
    page.ask()
    assert page.error() == "" and page.answer() == expected.text


# ----------------------------------------------------------------------------------------------------------
# --server: over a running `moai serve`
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow  # the playground in process is tested above; this adds a second server process
@browser_only
def test_server_mode_answers_through_moai_serve_and_says_when_it_is_down(browser, pipe, tiny_dir, pictures, tmp_path):
    # both processes load at once (the playground does not ask the server anything until a question is asked)
    served = ServerProcess(tiny_dir, tmp_path / "serve.log", ["--max-batch-size", "1"], startup_s=STARTUP_S, wait=False)
    front = None
    tab = None
    try:
        front = UIProcess(tmp_path / "ui.log", "--server", served.base, "--max-new-tokens", str(MAX_NEW_TOKENS))
        served.wait_ready()
        tab = Page(browser, front.url)
        assert tab.page.locator("#ablate").is_disabled()  # the server has no ablation endpoint
        expected = pipe(str(pictures["good"]), PROMPT, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        tab.upload(pictures["good"])
        tab.set_prompt(PROMPT)
        tab.ask()
        assert tab.error() == ""
        assert tab.answer() == expected.text
        assert tab.shown("perception")
        assert tab.page.input_value("#verbalization textarea") == expected.aux_text
        served.stop()
        tab.ask()
        assert "cannot reach the server" in tab.error() and served.base in tab.error()
        assert tab.console_errors == [] and tab.foreign == []
    finally:
        if tab is not None:
            tab.close()
        if front is not None:
            front.stop()
        served.stop()
