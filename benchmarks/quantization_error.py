"""Logit error and parameter bytes of each quantization mode on the moai-tiny oracle (CPU).

    python -m benchmarks.quantization_error [--fixture tests/fixtures/moai-tiny]

For every mode it loads the fixture checkpoint, feeds the official inputs of each case and prints the
relative error ||logits - oracle|| / ||oracle|| of the last prefill position and ``model.parameter_bytes()``.
The tiny model is deliberately ill-conditioned (sharp attention, 32-wide layers in 64-value quantization
blocks), so its quantization errors are far larger than a 7B model's; the table shows the modes' relative order
and sizes, not 7B quality.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from moai_sdk.modeling import MoAIForCausalLM
from moai_sdk.modeling.config import CLIP_MEAN, CLIP_STD


def official_inputs(fixture: Path, case: dict, tensors: dict) -> dict:
    name = case["name"]
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255
    images = [
        torch.from_numpy(np.array(Image.open(fixture / f)))[..., :3].permute(2, 0, 1).float()
        for f in case["image_files"]
    ]
    return {
        "input_ids": tensors[f"{name}.input_ids"],
        "pixel_values": (torch.stack(images) - mean) / std,
        "aux_embeds": tensors[f"{name}.aux_embeds"],
        "attention_mask": tensors[f"{name}.attention_mask"],
        "im_mask": tensors[f"{name}.im_mask"].bool(),
        "lang_mask": tensors[f"{name}.lang_mask"].bool(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixture", type=Path, default=Path("tests/fixtures/moai-tiny"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    cases = json.loads((args.fixture / "cases.json").read_text())["cases"]
    tensors = load_file(str(args.fixture / "cases.safetensors"))
    print(
        "| quantization | parameter bytes | last-logit rel. error (" + " / ".join(c["name"][0] for c in cases) + ") |"
    )
    print("| --- | --- | --- |")
    for mode in (None, "nf4", "nf4-lora", "int8", "official"):
        model = MoAIForCausalLM.from_pretrained(args.fixture, device="cpu", dtype="float32", quantization=mode)
        errors = []
        for case in cases:
            with torch.no_grad():
                logits = model(**official_inputs(args.fixture, case, tensors)).logits[:, -1].double()
            ref = tensors[f"{case['name']}.logits_last"].double()
            errors.append(float((logits - ref).norm() / ref.norm()))
        print(f"| {mode} | {model.parameter_bytes():,} | " + " / ".join(f"{e:.2e}" for e in errors) + " |")


if __name__ == "__main__":
    main()
