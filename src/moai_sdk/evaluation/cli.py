"""``moai eval`` and the benchmark tasks of ``moai score`` (registered by :mod:`moai_sdk.cli`).

Importing this module is cheap (argparse only): the work is imported inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..cli_options import (
    add_experts_option,
    add_generation_options,
    add_hub_options,
    add_model_options,
    add_tiny_option,
)

#: The eleven benchmarks' task names (kept here too so that building the parser imports nothing heavy).
BENCHMARK_TASKS = (
    "mme",
    "mmbench",
    "seed",
    "pope",
    "sqa",
    "textvqa",
    "ai2d",
    "qbench",
    "hallusionbench",
    "mathvista",
    "mmvet",
)


def _add_judge_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("judge (MathVista, MM-Vet; ours, not the official code's)")
    g.add_argument("--judge-url", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--judge-model", default=None, help="the judge's model name")
    g.add_argument("--judge-key", default=None, help="the judge's API key (default: none)")
    g.add_argument("--judge-image", action="store_true", help="attach the question's image (multimodal judges)")


EVAL_HELP = "the paper's benchmarks: official prompts, settings and scoring"
EVAL_DESCRIPTION = (
    "Answer BENCHMARK's questions read from the dataset root DIR (the official code's DATASET2: each benchmark's "
    "released folder under its official name) with the official prompts and generation settings, write OUTPUT "
    "(one row per question) and score it as the official evaluator does."
)


def add_eval_arguments(ev: argparse.ArgumentParser) -> None:
    """The arguments of ``moai eval``."""
    ev.add_argument("benchmark", choices=list(BENCHMARK_TASKS), help="which benchmark")
    ev.add_argument("output", help="answers file: .jsonl or .parquet")
    ev.add_argument("--data", required=True, metavar="DIR", help="the dataset root (holds e.g. POPE/, MMBench/)")
    ev.add_argument("--split", default=None, help="mmbench: dev|test|dev_cn|test_cn; qbench: dev|test; mathvista")
    ev.add_argument("--limit", type=int, default=None, metavar="N", help="the first N questions only")
    ev.add_argument("--scoring", default="official", choices=["official", "strict"])
    ev.add_argument("--report", default=None, metavar="REPORT.md", help="Markdown report vs the paper (+ PNG)")
    ev.add_argument("--json", action="store_true", help="print the score as JSON")
    ev.add_argument("--batch-size", type=int, default=8, help="questions per pipeline call (default 8)")
    ev.add_argument("--resume", action="store_true", help="continue an earlier run: skip questions already answered")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    ev.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) images (Q-Bench has some)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ray = ev.add_argument_group("Ray (distributed)")
    ray.add_argument("--ray", action="store_true", help="run on Ray Data (pip install 'moai-sdk[ray]')")
    ray.add_argument("--ray-address", default=None)
    ray.add_argument("--concurrency", type=int, default=1)
    ray.add_argument("--num-gpus-per-actor", type=float, default=None)
    _add_judge_options(ev)
    add_model_options(ev)
    add_hub_options(ev)
    add_experts_option(ev)
    add_tiny_option(ev)
    ev.add_argument("--template", default="chat", choices=["chat", "demo"], help="chat: the official benchmarks'")
    add_generation_options(ev)


def add_score_arguments(score: argparse.ArgumentParser) -> None:
    """The arguments of ``moai score``: :mod:`moai_sdk.batch.cli`'s, with the benchmark tasks added."""
    from ..batch.cli import add_score_arguments as add_batch_score_arguments

    add_batch_score_arguments(score)
    for action in score._actions:
        if action.dest == "task" and action.choices is not None:
            action.choices = list(dict.fromkeys([*action.choices, *BENCHMARK_TASKS]))
            action.help = "a benchmark (" + "|".join(BENCHMARK_TASKS) + ") or choice|exact"
    score.add_argument("--scoring", default="official", choices=["official", "strict"])
    score.add_argument("--split", default=None, help="the split the answers are from (for the report)")
    score.add_argument("--report", default=None, metavar="REPORT.md", help="Markdown report vs the paper")
    _add_judge_options(score)


def _judge(args: argparse.Namespace) -> Any:
    if not args.judge_url:
        return None
    from .judge import Judge

    return Judge(args.judge_url, args.judge_model, args.judge_key, image=args.judge_image)


def _print(result: dict[str, Any], as_json: bool) -> None:
    from .scoring import format_result

    if as_json:
        keys = ("task", "n", "scoring", "metrics", "categories", "split", "skipped", "notes", "files")
        sys.stdout.write(json.dumps({k: result[k] for k in keys if k in result}) + "\n")
    else:
        sys.stdout.write(format_result(result) + "\n")


def cmd_eval(args: argparse.Namespace) -> int:
    """``moai eval BENCHMARK --data DIR OUTPUT``."""
    from ..cli_options import generation_kwargs, pipeline_kwargs
    from ..errors import InputError
    from .runner import evaluate

    if not args.ray and (args.ray_address or args.concurrency != 1 or args.num_gpus_per_actor is not None):
        raise InputError("--ray-address, --concurrency and --num-gpus-per-actor need --ray")
    result = evaluate(
        args.benchmark,
        args.data,
        args.output,
        split=args.split,
        limit=args.limit,
        scoring=args.scoring,
        generation=generation_kwargs(args),
        judge=_judge(args),
        report=args.report,
        model=args.model,
        tiny=args.tiny,
        pipeline_options=pipeline_kwargs(args),
        batch_size=args.batch_size,
        resume=args.resume,
        overwrite=args.overwrite,
        allow_remote=args.allow_remote_images,
        progress=not args.no_progress,
        ray=args.ray,
        ray_address=args.ray_address,
        concurrency=args.concurrency,
        num_gpus_per_actor=args.num_gpus_per_actor,
    )
    batch = result["batch"]
    sys.stderr.write(
        f"moai eval {args.benchmark}: {batch.get('rows', 0)} answered ({batch.get('errors', 0)} with an error, "
        f"{batch.get('skipped', 0)} already done) -> {args.output}\n"
    )
    _print(result, args.json)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """``moai score``: the benchmark tasks here; ``choice``/``exact`` (and ``pope`` on a plain ``moai batch``
    output without a ``category`` column) by :func:`moai_sdk.batch.cli.cmd_score`."""
    from ..batch.cli import cmd_score as cmd_batch_score

    if args.task not in BENCHMARK_TASKS:
        return cmd_batch_score(args)
    from ..batch.output import read_rows

    rows = read_rows(args.output)
    if args.task == "pope" and not any("category" in r for r in rows):
        return cmd_batch_score(args)  # a plain moai batch output with a label column: the flat POPE metrics
    from .judge import judge_rows
    from .report import write_report
    from .scoring import score_benchmark

    judge = _judge(args)
    if judge is not None and args.task in ("mathvista", "mmvet"):
        rows = judge_rows(rows, args.task, judge)
    result = score_benchmark(rows, args.task, args.scoring)
    if args.split:
        result["split"] = args.split
    if result["skipped"]:
        sys.stderr.write(f"moai score: {result['skipped']} row(s) with an error were not scored\n")
    if args.report:
        write_report([result], args.report)
    _print(result, args.json)
    return 0


__all__ = ["BENCHMARK_TASKS", "add_eval_arguments", "add_score_arguments", "cmd_eval", "cmd_score"]
