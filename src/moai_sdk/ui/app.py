"""The playground page (Gradio): one picture, one question, and everything MoAI's experts contributed.

The only module of moai-sdk that imports Gradio. Element ids (stable; tests and users' automation rely on them):
``image``, ``prompt``, ``experts``, ``max_new_tokens``, ``temperature``, ``top_p``, ``ask``, ``ablate``,
``clear``, ``error``, ``answer``, ``perception``, ``verbalization``, ``details``, ``gates``, ``ablation``.

Offline by construction: Gradio's analytics and version check are off (``GRADIO_ANALYTICS_ENABLED=False``, set
before Gradio is imported), the theme uses Gradio's bundled fonts, server-side rendering, the MCP server and the
PWA manifest are off, and a share link is made only with ``share=True``.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

# Before Gradio is imported: no analytics, no version check, no Hub telemetry.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

try:
    import gradio as gr
    import pandas as pd  # a dependency of Gradio's: the ablation table's value
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    from ..errors import DependencyError

    raise DependencyError('moai ui needs the ui extra: pip install "moai-sdk[ui]"') from exc

from ..errors import MoAIError
from ..testing import demo_image
from .backends import (
    DEFAULT_MAX_IMAGE_BYTES,
    MAX_NEW_TOKENS_CAP,
    Finished,
    Settings,
    check_prompt,
    read_upload,
)

logger = logging.getLogger(__name__)

#: Columns of the ablation table.
ABLATION_HEADERS = ["variant", "changed", "aux tokens", "generated tokens", "answer"]
EXAMPLE_PROMPTS = ("What is written in the image?", "Describe the picture.", "What shapes do you see?")
_EXAMPLE_WORDS = ("MOAI", "HELLO", "STOP")

_CSS = """
#error:not(:empty) { color: var(--error-text-color); }
"""


def example_pictures(folder: Path) -> list[Path]:
    """Synthetic example pictures (text over a red square and a blue disc), written once into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for word in _EXAMPLE_WORDS:
        path = folder / f"{word.lower()}.png"
        if not path.exists():
            demo_image(word).save(path)
        paths.append(path)
    return paths


def _upload_path(value: Any) -> Optional[str]:
    """The file path of an image component's raw value (a FileData dict, or a path string)."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("path")
    return str(value)


def _message(exc: Exception) -> str:
    if isinstance(exc, MoAIError):
        return f"**Error:** {exc}"
    logger.exception("moai ui: unexpected error")
    return f"**Error:** {type(exc).__name__}: {exc} (see the server log)"


def create_ui(
    backend: Any,
    *,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_new_tokens: int = 64,
    examples_dir: Optional[Path] = None,
) -> gr.Blocks:
    """The playground page over ``backend`` (:class:`~moai_sdk.ui.backends.LocalBackend` or
    :class:`~moai_sdk.ui.backends.ServerBackend`)."""
    examples_dir = Path(examples_dir or Path(tempfile.gettempdir()) / "moai-ui-examples")
    pictures = example_pictures(examples_dir)
    experts = backend.experts()

    with gr.Blocks(title="MoAI playground", analytics_enabled=False) as page:
        gr.Markdown(
            "## MoAI playground\nAsk about a picture and see what the perception experts saw, the words the "
            f"model was told, which experts the mixer leaned on, and the answer without each expert. Serving "
            f"{backend.describe()}."
        )
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(
                    label="Picture (drop, paste or upload)",
                    type="filepath",
                    image_mode=None,
                    sources=["upload", "clipboard"],
                    elem_id="image",
                    height=320,
                )
                gr.Examples(examples=[[str(p)] for p in pictures], inputs=[image], label="Example pictures")
                prompt = gr.Textbox(label="Question", value=EXAMPLE_PROMPTS[0], lines=2, elem_id="prompt", max_lines=8)
                chosen = gr.CheckboxGroup(
                    choices=experts,
                    value=[task for _, task in experts],
                    label="Experts",
                    info="switch an expert off to answer without its output"
                    if backend.can_ablate
                    else "what /v1/perceive runs and draws (the server answers with all its experts)",
                    elem_id="experts",
                )
                with gr.Accordion("Generation settings", open=False):
                    max_tokens = gr.Slider(
                        1,
                        MAX_NEW_TOKENS_CAP,
                        value=max_new_tokens,
                        step=1,
                        label="Max new tokens",
                        elem_id="max_new_tokens",
                    )
                    temperature = gr.Slider(
                        0.0, 2.0, value=0.0, step=0.05, label="Temperature (0: greedy)", elem_id="temperature"
                    )
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p (when sampling)", elem_id="top_p")
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                    ablate = gr.Button("Ablate experts", elem_id="ablate", interactive=backend.can_ablate)
                    clear = gr.Button("Clear", elem_id="clear")
            with gr.Column(scale=1):
                error = gr.Markdown("", elem_id="error")
                answer = gr.Textbox(label="Answer", lines=4, interactive=False, elem_id="answer")
                perception = gr.Image(
                    label="What the experts saw",
                    type="pil",
                    format="png",
                    interactive=False,
                    height=490,
                    elem_id="perception",
                )
                verbalization = gr.Textbox(
                    label="What the model was told (verbalization)",
                    lines=5,
                    max_lines=12,
                    interactive=False,
                    elem_id="verbalization",
                )
        with gr.Row():
            with gr.Column(scale=1):
                gates = gr.Image(
                    label="Mixer gates: the experts each layer leaned on",
                    type="pil",
                    format="png",
                    interactive=False,
                    height=300,
                    elem_id="gates",
                )
            with gr.Column(scale=1):
                details = gr.JSON(label="Details: timings and token counts", elem_id="details")
        with gr.Row():
            with gr.Column():
                ablation = gr.Dataframe(
                    headers=ABLATION_HEADERS,
                    label="Ablation: the answer without each expert",
                    interactive=False,
                    wrap=True,
                    elem_id="ablation",
                )

        roots = [Path(image.GRADIO_CACHE), examples_dir]

        def prepare(value: Any, question: str, tasks: list[str], tokens: float, temp: float, p: float) -> tuple:
            question = check_prompt(question)
            settings = Settings(int(tokens), float(temp), float(p))
            upload = read_upload(_upload_path(value), max_bytes=max_image_bytes, roots=roots)
            return upload, question, list(tasks or []), settings

        def on_ask(value: Any, question: str, tasks: list[str], tokens: float, temp: float, p: float) -> Iterator:
            # outputs: error, answer, perception, verbalization, gates, details
            yield "", "", None, "", None, None
            try:
                upload, question, tasks, settings = prepare(value, question, tasks, tokens, temp, p)
                seen = backend.perceive(upload, tasks)
                yield "", "", seen.picture, seen.verbalization, None, None
                text = ""
                for piece in backend.answer(upload, question, seen, settings):
                    if isinstance(piece, Finished):
                        words = piece.verbalization if piece.verbalization is not None else seen.verbalization
                        yield "", piece.text, seen.picture, words, piece.gates, piece.details
                    else:
                        text += piece
                        yield "", text, gr.skip(), gr.skip(), gr.skip(), gr.skip()
            except Exception as exc:  # shown on the page; the page stays usable
                yield _message(exc), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()

        def on_ablate(value: Any, question: str, tasks: list[str], tokens: float, temp: float, p: float) -> tuple:
            try:
                upload, question, tasks, settings = prepare(value, question, tasks, tokens, temp, p)
                seen = backend.perceive(upload, tasks)
                rows = backend.ablate(upload, question, seen, settings)
                return "", pd.DataFrame(rows, columns=ABLATION_HEADERS)
            except Exception as exc:  # shown on the page; the page stays usable
                return _message(exc), gr.skip()

        inputs = [image, prompt, chosen, max_tokens, temperature, top_p]
        # preprocess=False: the handlers read the uploaded file themselves (decoding errors become page messages)
        ask.click(
            on_ask,
            inputs=inputs,
            outputs=[error, answer, perception, verbalization, gates, details],
            preprocess=False,
            api_name="ask",
        )
        prompt.submit(
            on_ask,
            inputs=inputs,
            outputs=[error, answer, perception, verbalization, gates, details],
            preprocess=False,
            api_name=False,
        )
        ablate.click(on_ablate, inputs=inputs, outputs=[error, ablation], preprocess=False, api_name="ablate")
        clear.click(
            lambda: ("", None, "", None, "", None, None, pd.DataFrame(columns=ABLATION_HEADERS)),
            outputs=[error, image, answer, perception, verbalization, gates, details, ablation],
            api_name=False,
        )
    page.queue(default_concurrency_limit=1)  # one model: one generation at a time
    page.moai_examples_dir = examples_dir  # type: ignore[attr-defined]
    return page


def launch(
    backend: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_new_tokens: int = 64,
    block: bool = True,
) -> gr.Blocks:
    """Build the page over ``backend`` and serve it on ``host:port`` (a public share link only with ``share``)."""
    page = create_ui(backend, max_image_bytes=max_image_bytes, max_new_tokens=max_new_tokens)
    print(f"moai ui: {backend.describe()}; open http://{host}:{port}", file=sys.stderr, flush=True)
    page.launch(
        server_name=host,
        server_port=port,
        share=share,
        inbrowser=False,
        show_error=True,
        quiet=True,
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        footer_links=[],
        allowed_paths=[str(page.moai_examples_dir)],  # type: ignore[attr-defined]
        prevent_thread_lock=not block,
        css=_CSS,
    )
    return page


__all__ = ["ABLATION_HEADERS", "create_ui", "example_pictures", "launch"]
