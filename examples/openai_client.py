"""Ask `moai serve` about an image with the official ``openai`` client: one answer, then the same question streamed.

    moai serve --tiny /tmp/moai-tiny                 # offline tiny model (random answers); or: moai serve BK-Lee/MoAI-7B
    python examples/openai_client.py photo.jpg "What is written here?"

The image travels inline as a ``data:`` URL (the server fetches ``http(s)`` URLs only when started with
``--allow-remote-images``). ``temperature=0`` is greedy decoding. The ``moai`` extension
(``extra_body={"moai": {"return_perception": True}}``) adds what the perception experts saw. Without an image
argument a generated picture with the word "MOAI" is used.
"""

from __future__ import annotations

import argparse
import base64
import io
import mimetypes
import os
from typing import Optional, Sequence

from openai import OpenAI


def data_url(path: Optional[str]) -> str:
    """The image file (or a generated demo picture) as a ``data:`` URL."""
    if path is None:
        from moai_sdk.testing import demo_image

        buf = io.BytesIO()
        demo_image("MOAI").save(buf, format="PNG")
        raw, media = buf.getvalue(), "image/png"
    else:
        with open(path, "rb") as f:
            raw = f.read()
        media = mimetypes.guess_type(path)[0] or "application/octet-stream"
    return f"data:{media};base64," + base64.b64encode(raw).decode()


def main(argv: Optional[Sequence[str]] = None) -> tuple[str, str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", nargs="?", default=None, help="image file (default: a generated picture)")
    parser.add_argument("prompt", nargs="?", default="What is written in the image?")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default=os.environ.get("MOAI_API_KEY", "unused"))
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id  # "moai-tiny" for --tiny, else the served model id
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": args.prompt},
                {"type": "image_url", "image_url": {"url": data_url(args.image)}},
            ],
        }
    ]

    answer = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=args.max_tokens,
        temperature=0,
        extra_body={"moai": {"return_perception": True}},
    )
    text = answer.choices[0].message.content
    print(f"answer:  {text}")
    print(f"finish:  {answer.choices[0].finish_reason}; usage: {answer.usage.model_dump()}")
    print(f"experts: {answer.model_extra['moai']['aux_text']!r}")

    print("stream:  ", end="", flush=True)
    pieces = []
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=args.max_tokens, temperature=0, stream=True
    )
    for chunk in stream:
        piece = chunk.choices[0].delta.content if chunk.choices else None
        if piece:
            pieces.append(piece)
            print(piece, end="", flush=True)
    print()
    return text, "".join(pieces)


if __name__ == "__main__":
    main()
