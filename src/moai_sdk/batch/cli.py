"""``moai batch`` and ``moai score``: their arguments and handlers (registered in :data:`moai_sdk.cli.COMMANDS`).

Imported to build the ``moai`` parser, so only light modules at module level; the handlers import the batch
runner (torch, the pipeline) when they run.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..cli_options import (
    add_experts_option,
    add_generation_options,
    add_hub_options,
    add_model_options,
    add_tiny_option,
    generation_kwargs,
    pipeline_kwargs,
)
from ..errors import InputError
from .output import read_rows
from .scoring import TASKS, format_table, score, skipped

BATCH_HELP = "answer a dataset: a folder of images, a JSONL/CSV/Parquet manifest or a video"
BATCH_DESCRIPTION = (
    "Answer every image of INPUT and write OUTPUT (.jsonl or .parquet) with the columns id, prompt, "
    "answer, verbalization, token_counts, timings, error and the manifest's other columns. Completed batches "
    "are journaled, so a killed run can be continued with --resume."
)
SCORE_HELP = "score a moai eval / moai batch output: the paper's benchmarks, multiple choice, exact match"
SCORE_DESCRIPTION = "Score OUTPUT's answers against its label column. Rows with an error are not scored."


def add_batch_arguments(batch: argparse.ArgumentParser) -> None:
    """The arguments of ``moai batch``."""
    batch.add_argument("input", help="folder of images (recursive), .jsonl/.csv/.parquet manifest, or a video")
    batch.add_argument("output", help="output file: .jsonl or .parquet")
    batch.add_argument("--prompt", default=None, help="the question (for folders and videos; default for manifests)")
    batch.add_argument(
        "--every", type=float, default=None, metavar="SECONDS", help="video: one frame every SECONDS (1)"
    )
    batch.add_argument(
        "--batch-size", type=int, default=8, help="rows decoding together (static: rows per pipeline call; default 8)"
    )
    batch.add_argument(
        "--scheduling",
        default="continuous",
        choices=["continuous", "static"],
        help="local runner: continuous batching on the engine (default) or consecutive static batches",
    )
    batch.add_argument("--resume", action="store_true", help="continue an earlier run: skip ids already written")
    batch.add_argument("--overwrite", action="store_true", help="replace an existing output")
    batch.add_argument("--save-perception", action="store_true", help="add the perception JSON per row")
    batch.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs of a manifest")
    batch.add_argument("--id-column", default="id", help="manifest column with the row id (default: id)")
    batch.add_argument("--image-column", default="image", help="manifest column with the image (default: image)")
    batch.add_argument("--prompt-column", default="prompt", help="manifest column with the prompt (default: prompt)")
    batch.add_argument("--no-progress", action="store_true", help="no progress bar")
    ray = batch.add_argument_group("Ray (distributed)")
    ray.add_argument("--ray", action="store_true", help="run on Ray Data (pip install 'moai-sdk[ray]')")
    ray.add_argument("--ray-address", default=None, help="cluster address ('auto', 'ray://head:10001'); default: local")
    ray.add_argument("--concurrency", type=int, default=1, help="actors per model stage (default 1)")
    ray.add_argument("--num-gpus-per-actor", type=float, default=None, help="GPUs per model actor (default: 1 if any)")
    ray.add_argument("--num-cpus-per-actor", type=float, default=1.0, help="CPUs per actor (default 1)")
    ray.add_argument(
        "--cpu-experts",
        default=None,
        help="comma list of experts run in a CPU-only stage (default: ocr when the actors have GPUs)",
    )
    add_model_options(batch)
    add_hub_options(batch)
    add_experts_option(batch)
    add_tiny_option(batch)
    batch.add_argument("--template", default="chat", choices=["chat", "demo"])
    add_generation_options(batch)


def add_score_arguments(sc: argparse.ArgumentParser) -> None:
    """The arguments of ``moai score``."""
    sc.add_argument("output", help="a moai batch output (.jsonl or .parquet) with a label column")
    sc.add_argument("--task", required=True, choices=list(TASKS), help="pope, choice or exact")
    sc.add_argument("--label-column", default="label", help="the column with the ground truth (default: label)")
    sc.add_argument("--json", action="store_true", help="print the metrics as JSON")


def cmd_batch(args: argparse.Namespace) -> int:
    """``moai batch INPUT OUTPUT``."""
    from . import run

    cpu_experts = None
    if args.cpu_experts is not None:
        cpu_experts = [name.strip() for name in args.cpu_experts.split(",") if name.strip()]
    if not args.ray and (args.ray_address or args.concurrency != 1 or args.num_gpus_per_actor is not None):
        raise InputError("--ray-address, --concurrency and --num-gpus-per-actor need --ray")
    stats = run(
        args.input,
        args.output,
        prompt=args.prompt,
        every=args.every,
        model=args.model,
        tiny=args.tiny,
        pipeline_options=pipeline_kwargs(args),
        generation=generation_kwargs(args),
        batch_size=args.batch_size,
        scheduling=args.scheduling,
        resume=args.resume,
        overwrite=args.overwrite,
        save_perception=args.save_perception,
        allow_remote=args.allow_remote_images,
        progress=not args.no_progress,
        ray=args.ray,
        ray_address=args.ray_address,
        concurrency=args.concurrency,
        num_gpus_per_actor=args.num_gpus_per_actor,
        num_cpus_per_actor=args.num_cpus_per_actor,
        cpu_experts=cpu_experts,
        columns={"id": args.id_column, "image": args.image_column, "prompt": args.prompt_column},
    )
    sys.stderr.write(
        f"moai batch: {stats['rows']} rows written ({stats['errors']} with an error, {stats['skipped']} already done) "
        f"in {stats['seconds']:.1f}s, {stats['items_per_second']:.2f} items/s -> {stats['output']}\n"
    )
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """``moai score OUTPUT --task pope|choice|exact``."""
    rows = read_rows(args.output)
    metrics = score(rows, args.task, args.label_column)
    left_out = skipped(rows)
    if left_out:
        sys.stderr.write(f"moai score: {left_out} row(s) with an error were not scored\n")
    if args.json:
        sys.stdout.write(json.dumps(metrics) + "\n")
    else:
        sys.stdout.write(f"{args.task} on {args.output}\n{format_table(metrics)}\n")
    return 0


__all__ = ["add_batch_arguments", "add_score_arguments", "cmd_batch", "cmd_score"]
