"""Logit error and parameter bytes of each quantization mode on the moai-tiny oracle (CPU).

    python -m benchmarks.quantization_error [--fixture tests/fixtures/moai-tiny]

For every mode it loads the fixture checkpoint, feeds the official inputs of each case and prints the
relative error ||logits - oracle|| / ||oracle|| of the last prefill position and ``model.parameter_bytes()``.
The tiny model is deliberately ill-conditioned (sharp attention, 32-wide layers in 64-value quantization
blocks), so its quantization errors are far larger than a 7B model's; the table shows the modes' relative order
and sizes, not 7B quality.

``int4 (simulated on CPU)``: torchao's int4 kernel runs on CUDA only, so this row replaces every ``Plora_main``
linear of the float32 model by what that kernel computes, written with torchao's own quantization primitives
(same scales, zero points and 4-bit codes; activations rounded to bfloat16, float32 accumulation, bfloat16
output; :func:`moai_sdk.modeling.int4.simulate_int4`). Its parameter bytes are computed: the float32 model with
each such weight counted at its packed int4 size. torchao pads input widths to a multiple of 1024, so on this
32/56-wide model the packed weights are larger than the float32 ones; at MoAI-7B widths there is no padding.
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
from moai_sdk.modeling.int4 import int4_packed_bytes, simulate_int4
from moai_sdk.modeling.quantization import select_linears

SIMULATED_INT4 = "int4 (simulated on CPU)"


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


def load_mode(fixture: Path, mode: str | None) -> tuple[MoAIForCausalLM, int]:
    """The float32 CPU model of ``mode`` and its parameter bytes (computed for the simulated int4 row)."""
    if mode != SIMULATED_INT4:
        model = MoAIForCausalLM.from_pretrained(fixture, device="cpu", dtype="float32", quantization=mode)
        return model, model.parameter_bytes()
    model = MoAIForCausalLM.from_pretrained(fixture, device="cpu", dtype="float32")
    names = select_linears(model, "int4")
    size = model.parameter_bytes()
    for name in names:
        linear = model.get_submodule(name)
        size += int4_packed_bytes(linear.out_features, linear.in_features) - linear.weight.numel() * 4
    return simulate_int4(model, names), size


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
    for mode in (None, "nf4", "nf4-lora", "int8", "official", SIMULATED_INT4):
        model, size = load_mode(args.fixture, mode)
        errors = []
        for case in cases:
            with torch.no_grad():
                logits = model(**official_inputs(args.fixture, case, tensors)).logits[:, -1].double()
            ref = tensors[f"{case['name']}.logits_last"].double()
            errors.append(float((logits - ref).norm() / ref.norm()))
        print(f"| {mode} | {size:,} | " + " / ".join(f"{e:.2e}" for e in errors) + " |")


if __name__ == "__main__":
    main()
