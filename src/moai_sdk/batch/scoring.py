"""The paper's benchmark metrics from a ``moai batch`` output that carries a label column (``moai score``).

* ``pope`` -- POPE (object hallucination): the answer is reduced to yes/no as the official MoAI evaluation
  (``moai/eval/evalaute_pope.py``, the POPE/LLaVA script with the answer lower-cased first) does: lower case,
  keep the first sentence, drop commas, split on spaces; ``no`` or ``not`` among the words means *no*, anything
  else *yes*; *yes* is the positive class. Metrics: ``accuracy``, ``precision``, ``recall``, ``f1``,
  ``yes_ratio`` (share of *yes* predictions), ``n``.
* ``choice`` -- multiple choice (MMBench, SEED, ...): the option letter is taken from the answer (a leading
  ``B``, ``(B)``, ``B.``, ``B)``; else "answer is B"/"option B"; else the first ``(B)``; else the first standalone
  capital option letter) and compared with the label's letter. Metrics: ``accuracy``, ``n``.
* ``exact`` -- exact match after normalising case, surrounding whitespace and punctuation, inner whitespace.

Rows with an ``error`` have no answer to score: they are left out of ``n`` (and reported as skipped), so a
metric is never computed on answers that do not exist.
"""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import InputError
from .output import read_rows

logger = logging.getLogger(__name__)

TASKS = ("pope", "choice", "exact")
#: Option letters recognised by the multiple-choice extraction.
CHOICE_LETTERS = "ABCDEFGH"


def extract_yes_no(text: Optional[str]) -> str:
    """The official MoAI POPE yes/no extraction (lower case, first sentence; ``no``/``not`` as a word means
    ``"no"``)."""
    text = (text or "").lower()
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def extract_choice(text: Optional[str], letters: str = CHOICE_LETTERS) -> Optional[str]:
    """The option letter an answer picks, or ``None`` when it names none."""
    text = (text or "").strip()
    opts = re.escape(letters)
    patterns = (
        rf"^\(?([{opts}])(?:[).:,\s]|$)",  # "B", "B.", "(B) cat", "B) cat"
        rf"(?i:answer|option|choice)\s*(?:is|:)?\s*\(?([{opts}])\b",  # "The answer is B"
        rf"\(([{opts}])\)",  # "... (B) ..."
        rf"(?<![A-Za-z])([{opts}])(?![A-Za-z])",  # a standalone capital letter
    )
    for pattern in patterns:
        match = re.search(pattern, text)
        if match:
            return match.group(1)
    return None


def normalize_answer(text: Optional[str]) -> str:
    """Lower case, inner whitespace collapsed, surrounding whitespace and punctuation stripped."""
    text = " ".join((text or "").lower().split())
    return text.strip(string.punctuation + " ")


def _label(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InputError(
            f"row {row.get('id')!r} has no {column!r} value; moai score needs a label column "
            "(name it with --label-column)"
        )
    return str(value).strip()


def _pope(pairs: list[tuple[str, str]]) -> dict[str, float]:
    tp = fp = tn = fn = 0
    for answer, label in pairs:
        truth = label.lower()
        if truth not in ("yes", "no"):
            raise InputError(f"POPE labels are 'yes' or 'no'; got {label!r}")
        pred = extract_yes_no(answer)
        if pred == "yes":
            tp, fp = tp + (truth == "yes"), fp + (truth == "no")
        else:
            tn, fn = tn + (truth == "no"), fn + (truth == "yes")
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "n": n,
    }


def _choice(pairs: list[tuple[str, str]]) -> dict[str, float]:
    correct = 0
    for answer, label in pairs:
        truth = extract_choice(label)
        if truth is None:
            raise InputError(f"a multiple-choice label must name an option letter ({CHOICE_LETTERS}); got {label!r}")
        correct += extract_choice(answer) == truth
    return {"accuracy": correct / len(pairs) if pairs else 0.0, "n": len(pairs)}


def _exact(pairs: list[tuple[str, str]]) -> dict[str, float]:
    correct = sum(normalize_answer(a) == normalize_answer(label) for a, label in pairs)
    return {"accuracy": correct / len(pairs) if pairs else 0.0, "n": len(pairs)}


def score(rows: Sequence[dict[str, Any]], task: str, label_column: str = "label") -> dict[str, float]:
    """The ``task`` metrics (``"pope"``, ``"choice"`` or ``"exact"``) of output ``rows`` against ``label_column``.

    Rows with an ``error`` are not scored (see :func:`skipped`).
    """
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    pairs = [(row.get("answer") or "", _label(row, label_column)) for row in rows if row.get("error") is None]
    if not pairs:
        raise InputError("no rows to score: the output has no rows without an error")
    return {"pope": _pope, "choice": _choice, "exact": _exact}[task](pairs)


def skipped(rows: Sequence[dict[str, Any]]) -> int:
    """How many rows :func:`score` leaves out because they carry an error."""
    return sum(row.get("error") is not None for row in rows)


def score_file(path: Union[str, Path], task: str, label_column: str = "label") -> dict[str, float]:
    """:func:`score` on a ``moai batch`` output file (JSONL or Parquet)."""
    return score(read_rows(path), task, label_column)


def format_table(metrics: dict[str, float]) -> str:
    """The metrics as a two-column text table (rates in percent, ``n`` as a count)."""
    width = max(len(k) for k in metrics)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -------"]
    for key, value in metrics.items():
        shown = f"{int(value)}" if key == "n" else f"{100 * value:.2f}"
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)


__all__ = [
    "TASKS",
    "score",
    "score_file",
    "skipped",
    "format_table",
    "extract_yes_no",
    "extract_choice",
    "normalize_answer",
]
