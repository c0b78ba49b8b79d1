"""Streaming: print MoAI's answer while it is being generated.

    python examples/streaming.py photo.jpg --prompt "Describe the scene."

``pipe.stream`` yields text pieces as tokens arrive and finally the complete ``MoAIResult``; the pieces add up
to ``result.text``. ``--tiny DIR`` runs offline on a tiny random MoAI (random answer).
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from moai_sdk import MoAIPipeline, MoAIResult


def main(argv: Optional[Sequence[str]] = None) -> tuple[list[str], MoAIResult]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", nargs="?", help="image file (default: a generated picture with text)")
    parser.add_argument("--prompt", default="Describe this image in detail.")
    parser.add_argument("--model", default="BK-Lee/MoAI-7B")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--sample", action="store_true", help="sample like the official demo (seeded)")
    parser.add_argument("--tiny", metavar="DIR", help="use a tiny random MoAI built in DIR (offline, random answer)")
    args = parser.parse_args(argv)

    if args.tiny:
        from moai_sdk.testing import tiny_pipeline

        pipe = tiny_pipeline(args.tiny)
    else:
        pipe = MoAIPipeline.from_pretrained(args.model)
    if args.image is None:
        from moai_sdk.testing import demo_image

        image = demo_image("MOAI")
    else:
        image = args.image

    options = {"max_new_tokens": args.max_new_tokens}
    if args.sample:
        options.update(do_sample=True, temperature=0.9, top_p=0.95, seed=0)

    pieces: list[str] = []
    result: Optional[MoAIResult] = None
    for item in pipe.stream(image, args.prompt, **options):
        if isinstance(item, str):
            pieces.append(item)
            print(item, end="", flush=True)
        else:
            result = item
    print()
    assert result is not None
    print(f"[{result.token_counts['generated']} tokens, decode {result.timings['decode']:.2f}s]")
    return pieces, result


if __name__ == "__main__":
    main()
