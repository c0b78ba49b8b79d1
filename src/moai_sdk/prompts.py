"""Prompt strings of MoAI: the system prompt and the two conversation templates.

MoAI always starts its prompt with a fixed system sentence followed by one space and the ``<image>``
placeholder; the user's question is then wrapped in one of two templates:

* ``"demo"`` -- what the official demo uses: `` USER: {prompt} ASSISTANT:``;
* ``"chat"`` -- what every official benchmark pipeline uses (InternLM2 chat markers):
  `` [UNUSED_TOKEN_146]user\\n{prompt}[UNUSED_TOKEN_145]\\n[UNUSED_TOKEN_146]assistant\\n``.

Both templates start with a space; together with the space before ``<image>`` this is what the released
weights were trained on, so the strings here must not be "tidied up".
"""

from __future__ import annotations

from typing import Final

from .errors import ConfigError, InputError

#: The placeholder replaced by the image patch tokens inside the language model.
IMAGE_TOKEN: Final[str] = "<image>"

#: The sentence that opens every MoAI prompt (without the image placeholder).
SYSTEM_SENTENCE: Final[str] = (
    "AI assistant should give helpful and detailed answers to user after fully understanding an image."
)

#: The full system prompt: the sentence, one space, the image placeholder.
SYSTEM_PROMPT: Final[str] = SYSTEM_SENTENCE + " " + IMAGE_TOKEN

#: InternLM2 chat markers (user-defined pieces of the tokenizer, always single tokens).
TURN_START: Final[str] = "[UNUSED_TOKEN_146]"
TURN_END: Final[str] = "[UNUSED_TOKEN_145]"

#: The user-turn templates appended to :data:`SYSTEM_PROMPT`; ``{prompt}`` is the user's text.
TEMPLATES: Final[dict[str, str]] = {
    "demo": " USER: {prompt} ASSISTANT:",
    "chat": " " + TURN_START + "user\n{prompt}" + TURN_END + "\n" + TURN_START + "assistant\n",
}

#: The template the SDK uses when none is named (the one all official benchmark numbers come from).
DEFAULT_TEMPLATE: Final[str] = "chat"


def check_template(template: str) -> str:
    """Return ``template`` if it names a known template, else raise :class:`ConfigError`."""
    if not isinstance(template, str) or template not in TEMPLATES:
        valid = ", ".join(repr(name) for name in TEMPLATES)
        raise ConfigError(f"unknown prompt template {template!r}; choose one of {valid}")
    return template


def user_turn(prompt: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The part of the full prompt that follows the ``<image>`` placeholder."""
    check_template(template)
    if not isinstance(prompt, str):
        raise InputError(f"a prompt must be a str; got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(
            f"the prompt is not valid Unicode: {prompt[exc.start : exc.end]!r} at position {exc.start} "
            "(a lone surrogate); decode your input with errors='replace' or remove it"
        ) from exc
    if IMAGE_TOKEN in prompt:
        raise InputError(
            f"the prompt contains the literal image placeholder {IMAGE_TOKEN!r}; MoAI inserts it itself "
            "(once, in the system prompt). Remove it from the prompt text."
        )
    # str.replace, not str.format: user text may contain braces.
    return TEMPLATES[template].replace("{prompt}", prompt)


def prompt_parts(prompt: str, template: str = DEFAULT_TEMPLATE) -> list[tuple[str, bool]]:
    """The full prompt as ``(text, trusted)`` parts: the system prompt and the template are trusted (their control
    strings are control tokens), the user's ``prompt`` is not (see :meth:`MoAITokenizer.encode_parts`).

    ``"".join(text for text, _ in prompt_parts(p, t)) == build_prompt(p, t)``.
    """
    user_turn(prompt, template)  # the checks
    before, after = TEMPLATES[template].split("{prompt}")
    return [(SYSTEM_PROMPT + before, True), (prompt, False), (after, True)]


def build_prompt(prompt: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The full MoAI prompt string for one user ``prompt``: system prompt + the template's user turn.

    >>> build_prompt("Hi?", "demo")[-52:]
    'understanding an image. <image> USER: Hi? ASSISTANT:'
    """
    return SYSTEM_PROMPT + user_turn(prompt, template)


__all__ = [
    "IMAGE_TOKEN",
    "SYSTEM_SENTENCE",
    "SYSTEM_PROMPT",
    "TURN_START",
    "TURN_END",
    "TEMPLATES",
    "DEFAULT_TEMPLATE",
    "check_template",
    "user_turn",
    "build_prompt",
    "prompt_parts",
]
