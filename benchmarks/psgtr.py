"""Stage timings of the PSGTR scene-graph expert for one image, two mask-head settings compared in the same run.

Usage::

    python -m benchmarks.psgtr                       # CPU, the golden 490 x 490 picture, 2 threads
    python -m benchmarks.psgtr --device cuda --dtype float16

The network carries the synthetic weights of the golden fixtures (speed does not depend on their values).
Stages: ``preprocess`` (resize to fit 1333 x 800, normalise, pad), ``backbone`` (ResNet-50), ``transformer``
(input projection, encoder, decoder and the class/box heads), ``mask_heads`` (attention maps and both mask heads
over the 100 queries: the head with masks minus the head without, each timed), ``postprocess`` (MoAI's triplet selection, masks, panoptic map) and ``total``. The two
settings are the default ``mask_head_chunk=25`` (queries pushed through a mask head 25 at a time) and ``None``
(all 100 at once); they run interleaved, and their results are checked to agree. Reported: median, min and max
over ``--repeats`` after ``--warmup`` runs, and the peak memory of each setting (process RSS on CPU, sampled;
``max_memory_allocated`` on CUDA).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from moai_sdk.experts.scene_graph.checkpoint import load_into
from moai_sdk.experts.scene_graph.config import PSGTRConfig
from moai_sdk.experts.scene_graph.modeling import PSGTR
from moai_sdk.experts.scene_graph.processing import postprocess, preprocess_image
from moai_sdk.testing import synthetic_state_dict

from .run import PeakMemory, synchronize

GOLDEN_IMAGE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "psgtr-golden" / "psgtr_golden_sq490.npz"
SETTINGS = {"chunk 25 (default)": 25, "all 100 queries": None}
STAGES = ("preprocess", "backbone", "transformer", "mask_heads", "postprocess", "total")


def run_once(net: PSGTR, image: np.ndarray, config: PSGTRConfig, device: torch.device, dtype: torch.dtype):
    """One image through every stage; returns ({stage: seconds}, prediction)."""
    head = net.bbox_head
    times: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        synchronize(device)
        t0 = time.perf_counter()
        value = fn()
        synchronize(device)
        times[name] = time.perf_counter() - t0
        return value

    with torch.inference_mode():
        prep = timed("preprocess", lambda: preprocess_image(image, config))
        pixels = prep.pixel_values[None].to(device, dtype)
        feats = timed("backbone", lambda: net.backbone(pixels))
        mask = torch.zeros(pixels.shape[0], *pixels.shape[-2:], dtype=torch.bool, device=device)
        timed("transformer", lambda: head(feats, mask, with_masks=False))  # for the split only
        full = timed("head", lambda: head(feats, mask, with_masks=True))
        pred = timed(
            "postprocess",
            lambda: postprocess(
                full.sub_logits[-1, 0],
                full.obj_logits[-1, 0],
                full.rel_logits[-1, 0],
                full.sub_boxes[-1, 0],
                full.obj_boxes[-1, 0],
                full.sub_mask_logits[0],
                full.obj_mask_logits[0],
                prep.img_shape,
                prep.scale_factor,
                config,
            ),
        )
    times["mask_heads"] = times.pop("head") - times["transformer"]
    times["total"] = sum(times[s] for s in ("preprocess", "backbone", "transformer", "mask_heads", "postprocess"))
    return times, pred


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.psgtr", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2, as the reference timing)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    p.add_argument(
        "--scale",
        type=int,
        nargs=2,
        metavar=("LONG", "SHORT"),
        default=list(PSGTRConfig.scale),
        help="resize limits of the network input (default 1333 800, the expert's; smaller for a quick smoke run)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)

    with np.load(GOLDEN_IMAGE) as data:
        image = data["image"]
    weights = synthetic_state_dict()  # the same weights in both settings
    nets = {}
    for name, chunk in SETTINGS.items():
        config = PSGTRConfig(mask_head_chunk=chunk, scale=tuple(args.scale))
        net = PSGTR(config)
        load_into(net, weights)
        nets[name] = (net.to(device, dtype).eval(), config)

    samples: dict[str, dict[str, list[float]]] = {name: {s: [] for s in STAGES} for name in SETTINGS}
    peaks: dict[str, int] = {}
    preds = {}
    for i in range(args.warmup + args.repeats):
        for name, (net, config) in nets.items():  # interleaved, so drifting load hits both alike
            with PeakMemory(device) as mem:
                times, preds[name] = run_once(net, image, config, device, dtype)
            peaks[name] = max(peaks.get(name, 0), mem.peak)
            if i >= args.warmup:
                for stage, value in times.items():
                    samples[name][stage].append(value)

    first, second = (preds[name] for name in SETTINGS)
    agree = bool(
        np.array_equal(first.labels, second.labels) and np.array_equal(first.rel_pair_idxes, second.rel_pair_idxes)
    )
    header = f"{'stage (ms)':<14}" + "".join(f"{name:>26}" for name in SETTINGS)
    lines = [
        f"PSGTR R-50, one {image.shape[1]}x{image.shape[0]} image (resized to fit {args.scale[0]}x{args.scale[1]}), "
        f"{device} {args.dtype}, "
        f"{torch.get_num_threads()} thread(s), {args.repeats} repeats",
        header,
    ]
    for stage in STAGES:
        row = f"{stage:<14}"
        for name in SETTINGS:
            v = np.array(samples[name][stage]) * 1e3
            row += f"{np.median(v):>14.1f} [{v.min():.0f}-{v.max():.0f}]".rjust(26)
        lines.append(row)
    lines.append(f"{'peak memory':<14}" + "".join(f"{peaks[name] / 2**20:>22,.0f} MiB" for name in SETTINGS))
    lines.append(f"results agree (labels, pairs): {agree}")
    print("\n".join(lines))
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "device": str(device),
                    "dtype": args.dtype,
                    "threads": torch.get_num_threads(),
                    "scale": list(args.scale),
                    "samples_s": samples,
                    "peak_bytes": peaks,
                    "agree": agree,
                },
                indent=1,
            )
        )
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
