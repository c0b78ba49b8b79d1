"""Perception only: run the experts on an image, save the picture and print what MoAI would read.

    python examples/perception_only.py photo.jpg --out perception.png --experts mask2former,owlv2,rapidocr

No language model is loaded. ``--tiny DIR`` uses tiny random segmentation / detection experts built in DIR plus
the real offline OCR.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from moai_sdk import MoAIPipeline, PerceptionResult


def main(argv: Optional[Sequence[str]] = None) -> PerceptionResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", nargs="?", help="image file (default: a generated picture with text)")
    parser.add_argument("--experts", default="default", help="'default' or a comma list of expert names")
    parser.add_argument("--out", default="perception.png", help="where to save the picture")
    parser.add_argument("--json", default=None, help="also save the result as JSON (with masks) here")
    parser.add_argument("--tiny", metavar="DIR", help="tiny random experts built in DIR + the real OCR (offline)")
    args = parser.parse_args(argv)

    if args.tiny:
        from moai_sdk.testing import tiny_pipeline

        pipe = tiny_pipeline(args.tiny)
    else:
        experts = "default" if args.experts == "default" else [e.strip() for e in args.experts.split(",")]
        pipe = MoAIPipeline.from_pretrained(experts=experts, quantization=None)  # the model is not used here
    if args.image is None:
        from moai_sdk.testing import demo_image

        image = demo_image("MOAI")
    else:
        image = args.image

    perception = pipe.perceive(image)  # experts only; the model is never loaded
    print(
        f"{len(perception.segments)} segments, {len(perception.detections)} detections, "
        f"{len(perception.relations)} relations, {len(perception.text_lines)} text lines"
    )
    for line in perception.text_lines:
        print(f"  text {line.text!r} ({line.confidence:.2f})")
    print("verbalization:", repr(pipe.verbalize(perception)))
    perception.save(args.out)
    print("picture saved to", Path(args.out).resolve())
    if args.json:
        perception.save(args.json, include_masks=True)
    return perception


if __name__ == "__main__":
    main()
