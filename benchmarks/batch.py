"""Throughput of ``moai batch``: the local runner (batch size 1, static batches, the continuous engine) and Ray.

Usage::

    python -m benchmarks.batch                       # tiny MoAI on CPU, 16 images, light experts
    python -m benchmarks.batch --images 32 --max-new-tokens 16 --out benchmarks/results/batch-cpu.json
    python -m benchmarks.batch --images 24 --max-new-tokens 96 --stop-ids 40 --skip-ray   # mixed answer lengths

All three runs answer the same images with the same greedy settings, and the benchmark checks that they wrote
the same answers (a disagreement exits with status 1). Reported per run: items/s over the run (model loading
excluded for the local runs: the pipeline is warmed up first; included for Ray, whose actors each build their
pipeline when the run starts), and for Ray the start-up cost of ``ray.init`` (a fresh local cluster) and the
first-row latency. ``--experts``: ``light`` (a tiny segmentation expert and the real offline OCR, as in the
tests), ``tiny`` (all four tiny experts) or ``none``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from moai_sdk.batch import read_rows, run
from moai_sdk.testing import build_tiny_experts, demo_image, tiny_pipeline


def experts_for(kind: str, root: Path) -> Any:
    """The ``experts=`` specification of ``--experts``."""
    if kind == "none":
        return None
    spec = build_tiny_experts(root / "experts")
    if kind == "tiny":
        return spec
    return {"segmentation": spec["segmentation"], "ocr": spec["ocr"]}


def answers(path: Path) -> list[tuple[str, Any]]:
    return [(r["id"], r["answer"]) for r in read_rows(path)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--experts", default="light", choices=["light", "tiny", "none"])
    parser.add_argument("--ray-actors", type=int, default=2)
    parser.add_argument(
        "--stop-ids",
        type=int,
        default=0,
        help="mixed answer lengths: end answers at any of this many token ids (the tiny model's tokens are random)",
    )
    parser.add_argument("--skip-ray", action="store_true", help="only the local runs")
    parser.add_argument("--workdir", default=None, help="where to build the tiny model (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="moai-batch-bench-") as tmp:
        root = Path(args.workdir or tmp)
        images = root / "images"
        images.mkdir(parents=True, exist_ok=True)
        for i in range(args.images):
            demo_image(f"B{i}", size=(96 + 4 * i, 80)).save(images / f"{i:03d}.png")
        experts = experts_for(args.experts, root)
        gen: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
        if args.stop_ids:  # mixed answer lengths: the tiny model's random answers end at any of these ids
            gen["eos_token_id"] = list(range(2, 2 + args.stop_ids))
        pipe = tiny_pipeline(root / "tiny", experts=experts)
        pipe(str(images / "000.png"), "warm-up", **gen)  # load the model and the experts outside the timings

        results: list[dict[str, Any]] = []
        outputs: dict[str, Path] = {}
        runs = [
            ("local, batch size 1", 1, "static"),
            (f"local, batch size {args.batch_size} (static batches)", args.batch_size, "static"),
            (f"local, batch size {args.batch_size} (continuous, engine)", args.batch_size, "continuous"),
        ]
        for name, batch_size, scheduling in runs:
            out = root / f"local-{batch_size}-{scheduling}.jsonl"
            pipe.cache.clear()  # no expert results reused from the warm-up or the previous run
            stats = run(
                images,
                out,
                prompt="Describe the image.",
                pipeline=pipe,
                generation=gen,
                batch_size=batch_size,
                overwrite=True,
                progress=False,
                scheduling=scheduling,
            )
            lengths = [
                json.loads(r["token_counts"])["generated"]
                if isinstance(r["token_counts"], str)
                else r["token_counts"]["generated"]
                for r in read_rows(out)
                if r["error"] is None
            ]
            results.append(
                {
                    "run": name,
                    "items": stats["rows"],
                    "seconds": stats["seconds"],
                    "items_per_second": stats["items_per_second"],
                    "mean_answer_tokens": sum(lengths) / max(1, len(lengths)),
                    "max_answer_tokens": max(lengths, default=0),
                }
            )
            outputs[name] = out

        if args.skip_ray:
            reference = answers(outputs["local, batch size 1"])
            mismatched = [name for name, path in outputs.items() if answers(path) != reference]
            return _report(args, results, mismatched, None)

        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        startup = time.perf_counter() - t0
        try:
            out = root / "ray.jsonl"
            stats = run(
                images,
                out,
                prompt="Describe the image.",
                tiny=root / "tiny",
                pipeline_options={"experts": experts},
                generation=gen,
                batch_size=args.batch_size,
                overwrite=True,
                progress=False,
                ray=True,
                concurrency=args.ray_actors,
                num_gpus_per_actor=0,
                num_cpus_per_actor=0.5,
            )
        finally:
            ray.shutdown()
        name = f"Ray, {args.ray_actors} actors per stage, batch size {args.batch_size}"
        results.append(
            {
                "run": name,
                "items": stats["rows"],
                "seconds": stats["seconds"],
                "items_per_second": stats["items_per_second"],
                "ray_init_seconds": startup,
            }
        )
        outputs[name] = out

        reference = answers(outputs["local, batch size 1"])
        mismatched = [name for name, path in outputs.items() if answers(path) != reference]
    return _report(args, results, mismatched, startup)


def _report(args: Any, results: list[dict[str, Any]], mismatched: list[str], startup: float | None) -> int:
    print(
        f"moai batch throughput: tiny MoAI, {args.images} images, experts={args.experts}, "
        f"max_new_tokens={args.max_new_tokens}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()})"
    )
    print("| run | items | seconds | items/s | answer tokens (mean / max) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in results:
        tokens = f"{r['mean_answer_tokens']:.1f} / {r['max_answer_tokens']}" if "mean_answer_tokens" in r else ""
        print(f"| {r['run']} | {r['items']} | {r['seconds']:.1f} | {r['items_per_second']:.3f} | {tokens} |")
    if startup is not None:
        print(
            f"Ray start-up (ray.init of a local cluster): {startup:.1f} s; the Ray run's seconds include building "
            "one pipeline per actor"
        )
    print("same answers in every run" if not mismatched else f"ANSWERS DIFFER in: {mismatched}")
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "results": results,
                    "mismatched": mismatched,
                    "images": args.images,
                    "experts": args.experts,
                    "max_new_tokens": args.max_new_tokens,
                },
                indent=2,
            )
            + "\n"
        )
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
