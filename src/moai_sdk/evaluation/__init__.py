"""The paper's eleven benchmarks: official prompts, settings and scoring (``moai eval``, ``moai score``).

::

    from moai_sdk.evaluation import evaluate, score_benchmark

    result = evaluate("pope", "/data/eval", "pope.jsonl", model="BK-Lee/MoAI-7B")
    result["metrics"]          # {"adversarial/accuracy": ..., ...}
    score_benchmark(rows, "mme")

Modules: :mod:`.datasets` (released files -> questions with the official prompts), :mod:`.scoring` (the official
evaluators, quirks included; ``strict``), :mod:`.official_files` (MMBench's spreadsheet, MathVista's and
MM-Vet's grader files), :mod:`.judge` (an OpenAI-compatible judge, ours), :mod:`.report` (vs the paper),
:mod:`.runner` (``evaluate``: through :func:`moai_sdk.batch.run`). Importing this package does not import torch.
"""

from __future__ import annotations

from typing import Any

from .datasets import BENCHMARKS, Benchmark, get_benchmark, load_benchmark
from .scoring import SCORINGS, format_result, official_answer, score_benchmark


def __getattr__(name: str) -> Any:
    if name == "evaluate":  # imports the batch runner (torch): only when asked for
        from .runner import evaluate

        return evaluate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "SCORINGS",
    "evaluate",
    "format_result",
    "get_benchmark",
    "load_benchmark",
    "official_answer",
    "score_benchmark",
]
