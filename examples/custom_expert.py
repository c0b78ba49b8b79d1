"""A custom perception expert: plug your own detector into MoAI.

An expert turns images (uint8 RGB tensors [3, H, W] in the 490 x 490 frame the experts share) into
``PerceptionResult`` objects for one task. Register it, then name it in ``experts=``; MoAI reads its output
through the official verbalization like any built-in expert.

This one finds strongly coloured regions (red, green, blue, yellow) with plain NumPy and reports them as
detections -- a stand-in for your own model.

    python examples/custom_expert.py photo.jpg
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import numpy as np
import torch

from moai_sdk import Expert, MoAIPipeline, MoAIResult, register_expert
from moai_sdk.results import Box, Detection, PerceptionResult

#: Reference colours (RGB) the detector looks for.
COLOURS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 90, 200), "yellow": (230, 210, 40)}


@register_expert(replace=True)
class ColourBlobDetector(Expert):
    """Detects one box per reference colour: the extent of the pixels within ``tolerance`` of that colour,
    kept when they cover at least ``min_fraction`` of the image. The score is the covered fraction of the box."""

    name = "colour-blobs"
    task = "detection"
    default_model_id = None
    default_settings = {"tolerance": 60.0, "min_fraction": 0.01}

    def _load(self) -> None:
        self.model = {name: np.asarray(rgb, dtype=np.float32) for name, rgb in COLOURS.items()}

    def _predict(self, images: list[torch.Tensor]) -> list[PerceptionResult]:
        tol, min_fraction = float(self.settings["tolerance"]), float(self.settings["min_fraction"])
        results = []
        for frame in images:
            h, w = int(frame.shape[1]), int(frame.shape[2])
            pixels = frame.permute(1, 2, 0).numpy().astype(np.float32)
            detections = []
            for index, (label, rgb) in enumerate(self.model.items()):
                mask = np.linalg.norm(pixels - rgb, axis=-1) < tol
                if mask.sum() < min_fraction * h * w:
                    continue
                rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
                box = Box(
                    x0=float(cols[0]),
                    y0=float(rows[0]),
                    x1=float(cols[-1] + 1),
                    y1=float(rows[-1] + 1),
                    frame_width=w,
                    frame_height=h,
                )
                score = float(mask.sum() / max(box.area, 1.0))
                detections.append(Detection(label=f"{label} object", label_index=index, score=score, box=box))
            results.append(self.make_result(frame, detections=detections))
        return results


def main(argv: Optional[Sequence[str]] = None) -> MoAIResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", nargs="?", help="image file (default: a generated picture)")
    parser.add_argument("--prompt", default="What colours are the objects?")
    parser.add_argument("--model", default="BK-Lee/MoAI-7B")
    parser.add_argument("--tiny", metavar="DIR", help="use a tiny random MoAI built in DIR (offline, random answer)")
    args = parser.parse_args(argv)

    # Our detector replaces OWLv2 for the detection task; the OCR is the built-in offline one.
    experts = {"detection": "colour-blobs", "ocr": "rapidocr"}
    if args.tiny:
        from moai_sdk.testing import tiny_pipeline

        pipe = tiny_pipeline(args.tiny, experts=experts)
    else:
        experts = {"segmentation": "mask2former", "scene_graph": "psgtr", **experts}
        pipe = MoAIPipeline.from_pretrained(args.model, experts=experts)
    if args.image is None:
        from moai_sdk.testing import demo_image

        image = demo_image("MOAI")
    else:
        image = args.image

    result = pipe(image, args.prompt, max_new_tokens=32)
    for det in result.perception.detections:
        print(f"{det.label}: score {det.score:.2f}, box {[round(v) for v in det.box.xyxy]}")
    print("the model read:", repr(result.aux_text))
    print("answer:", result.text)
    return result


if __name__ == "__main__":
    main()
