"""Quickstart: ask MoAI a question about an image.

    python examples/quickstart.py photo.jpg --prompt "What is happening here?"

The first run downloads MoAI-7B and the perception experts (run `moai download` to fetch them ahead of time).
``--tiny DIR`` instead builds a tiny randomly initialised MoAI in DIR and runs offline on CPU: the pipeline is
real, the answer is random tokens.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from moai_sdk import MoAIPipeline, MoAIResult


def main(argv: Optional[Sequence[str]] = None) -> MoAIResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", nargs="?", help="image file (default: a generated picture with text)")
    parser.add_argument("--prompt", default="Describe this image in detail.")
    parser.add_argument("--model", default="BK-Lee/MoAI-7B", help="Hub id or local checkpoint folder")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--tiny", metavar="DIR", help="use a tiny random MoAI built in DIR (offline, random answer)")
    args = parser.parse_args(argv)

    if args.tiny:
        from moai_sdk.testing import tiny_pipeline

        pipe = tiny_pipeline(args.tiny)
    else:
        pipe = MoAIPipeline.from_pretrained(args.model)  # NF4 on a GPU, the four official experts
    print(pipe)

    if args.image is None:
        from moai_sdk.testing import demo_image

        image = demo_image("MOAI")
    else:
        image = args.image

    result = pipe(image, args.prompt, max_new_tokens=args.max_new_tokens)
    print("answer:", result.text)
    print("the model also read:", repr(result.aux_text))
    print("tokens:", result.token_counts)
    print("seconds:", {stage: round(t, 3) for stage, t in result.timings.items()})
    return result


if __name__ == "__main__":
    main()
