"""``moai eval``: read a benchmark, answer it through the ``moai batch`` machinery with the official settings,
write the official files, score, judge and report.

The official generation settings (``pipeline/*Pipeline.py``): beam search with 3 beams, no sampling,
``max_new_tokens`` 5 for MME and POPE and 128 for the others, the chat template; the answer is cleaned as the
official pipelines do at scoring time (:func:`~moai_sdk.evaluation.scoring.official_answer`). Options given
explicitly (``generation``) replace them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from ..batch import run as batch_run
from ..batch.output import read_rows
from ..errors import InputError
from .datasets import get_benchmark, load_benchmark
from .judge import Judge, judge_rows
from .official_files import write_official_files
from .report import write_report
from .scoring import score_benchmark

logger = logging.getLogger(__name__)


def official_generation(task: str) -> dict[str, Any]:
    """The official pipeline's generation settings for ``task``."""
    return {"do_sample": False, "num_beams": 3, "max_new_tokens": get_benchmark(task).max_new_tokens}


def questions_path(output: Path) -> Path:
    """Where ``moai eval`` writes the questions it answers (a ``moai batch`` manifest), beside OUTPUT."""
    return output.with_name(output.name + ".questions.jsonl")


def write_questions(records: list[dict[str, Any]], path: Path) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def evaluate(
    benchmark: str,
    data: Any,
    output: Any,
    *,
    split: Optional[str] = None,
    limit: Optional[int] = None,
    scoring: str = "official",
    generation: Optional[dict[str, Any]] = None,
    judge: Optional[Judge] = None,
    report: Any = None,
    **batch_options: Any,
) -> dict[str, Any]:
    """Answer and score ``benchmark`` from the dataset root ``data``; answers go to ``output`` (JSONL/Parquet).

    ``limit``: the first N questions only. ``generation`` overrides the official settings. ``batch_options``
    go to :func:`moai_sdk.batch.run` (``pipeline``/``model``/``tiny``, ``pipeline_options``, ``batch_size``,
    ``resume``, ``overwrite``, ``ray``...). ``judge`` grades MathVista / MM-Vet; ``report`` writes the Markdown
    report there. Returns the score (see :func:`~moai_sdk.evaluation.scoring.score_benchmark`) with ``split``,
    ``batch`` (the run's summary) and ``files`` (the official files, the judged rows, the report).
    """
    bench = get_benchmark(benchmark)
    split = split or bench.default_split
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise InputError(f"--limit must be a positive integer; got {limit!r}")
    records = load_benchmark(bench.name, data, split)
    if limit is not None:
        records = records[:limit]
    if bench.name in ("mathvista", "mmvet"):
        for record in records:
            record["image_path"] = record["image"]  # the judge may attach it
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    manifest = write_questions(records, questions_path(output))
    settings = {**official_generation(bench.name), **(generation or {})}
    summary = batch_run(manifest, output, generation=settings, **batch_options)
    rows = read_rows(output)
    files: dict[str, Any] = {"answers": str(output), "questions": str(manifest)}
    official = write_official_files(bench.name, rows, data, split, output.parent)
    files["official"] = [str(p) for p in official]
    if judge is not None and bench.name in ("mathvista", "mmvet"):
        rows = judge_rows(rows, bench.name, judge, progress=batch_options.get("progress", True))
        judged = output.with_name(output.stem + ".judged.jsonl")
        write_questions(rows, judged)
        files["judged"] = str(judged)
    if bench.name in ("mathvista", "mmvet") and judge is None:
        result: dict[str, Any] = {
            "task": bench.name,
            "n": len(rows),
            "scoring": scoring,
            "metrics": {},
            "skipped": sum(r.get("error") is not None for r in rows),
            "notes": [f"{bench.title} has no official score: send {', '.join(files['official'])} to its grader, "
                      "or pass --judge-url/--judge-model"],
        }  # fmt: skip
    else:
        result = score_benchmark(rows, bench.name, scoring)
    result["split"] = split
    result["batch"] = {k: summary[k] for k in ("rows", "errors", "skipped", "total") if k in summary}
    if report is not None and result["metrics"]:
        files["report"] = {k: str(v) for k, v in write_report([result], report).items()}
    result["files"] = files
    return result


__all__ = ["evaluate", "official_generation", "questions_path"]
