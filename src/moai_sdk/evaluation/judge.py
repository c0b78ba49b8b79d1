"""An optional judge for MathVista and MM-Vet through any OpenAI-compatible endpoint -- ours, not the MoAI
code's (which only writes the files for the benchmarks' GPT-4 graders, see :mod:`.official_files`).

* MM-Vet: the judge compares the answer with the ground truth and replies with a correctness in [0, 1]
  (MM-Vet's grading scale); the first number in [0, 1] of its reply is the row's ``judge_score``. A reply
  without one scores 0 and is counted in ``judge_failures``.
* MathVista: the judge extracts the final answer from the response (MathVista's answer-extraction step); we
  then compare it with the ground truth as MathVista's own scorer does (a multiple-choice letter maps to its
  choice; numbers compared after rounding to the question's precision; text case-insensitively). Columns:
  ``judge_extraction``, ``judge_correct``.

The prompts are ours. ``image=True`` attaches the question's image to each request (for multimodal judges --
e.g. a ``moai serve`` judge, which needs one).
"""

from __future__ import annotations

import base64
import logging
import mimetypes
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import InputError, import_optional
from .scoring import official_answer

logger = logging.getLogger(__name__)

MMVET_PROMPT = (
    "Compare the model's answer with the ground truth and rate how correct it is, from 0.0 (wrong) to 1.0 "
    "(fully correct); partial credit is allowed. Reply with the number only.\n"
    "Question: {question}\nGround truth: {truth}\nModel answer: {answer}\nCorrectness:"
)
MATHVISTA_PROMPT = (
    "Extract the final answer from the model's response to the question below. Reply with the answer only: "
    "an option's text or letter for a multiple-choice question, a number for a numeric one.\n"
    "Question: {question}\nModel response: {answer}\nExtracted answer:"
)


@dataclass
class Judge:
    """An OpenAI-compatible chat endpoint: ``url`` (its base URL, e.g. ``http://127.0.0.1:8000/v1``),
    ``model``, ``key``; ``image``: attach the question's image; ``max_tokens`` of a reply."""

    url: str
    model: str
    key: Optional[str] = None
    image: bool = False
    max_tokens: int = 32
    timeout: float = 300.0

    def __post_init__(self) -> None:
        if not self.url or not self.model:
            raise InputError("the judge needs --judge-url and --judge-model")
        openai = import_optional("openai", "the judge needs the openai client: pip install 'moai-sdk[eval]'")
        self._client = openai.OpenAI(
            base_url=self.url, api_key=self.key or "unused", max_retries=1, timeout=self.timeout
        )

    def ask(self, text: str, image: Any = None) -> str:
        content: Any = text
        if self.image:
            if image is None:
                raise InputError("--judge-image: this row has no image to attach")
            content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": _data_url(image)}}]
        reply = self._client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": content}],
            max_tokens=self.max_tokens,
            temperature=0.0,
        )
        return reply.choices[0].message.content or ""


def _data_url(image: Any) -> str:
    text = str(image)
    if text.startswith("data:"):
        return text
    path = Path(text)
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def parse_score(reply: str) -> Optional[float]:
    """The first number in [0, 1] of the judge's reply, or ``None``."""
    for match in re.findall(r"\d+(?:\.\d+)?", reply or ""):
        value = float(match)
        if 0.0 <= value <= 1.0:
            return value
    return None


def mathvista_correct(extraction: str, record: dict[str, Any]) -> bool:
    """MathVista's comparison of an extracted answer with the ground truth."""
    answer = str(record.get("answer", "")).strip()
    text = (extraction or "").strip()
    if record.get("question_type") == "multi_choice":
        choices = [str(c) for c in record.get("choices") or []]
        letter = re.fullmatch(r"\(?([A-Za-z])\)?\.?", text)
        if letter and choices:
            k = ord(letter.group(1).upper()) - ord("A")
            if 0 <= k < len(choices):
                text = choices[k]
        return text.lower() == answer.lower()
    kind = record.get("answer_type")
    if kind in ("integer", "float"):
        try:
            value = float(re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))[0])
            truth = float(answer)
        except (IndexError, ValueError):
            return False
        if kind == "integer":
            return int(round(value)) == int(round(truth))
        digits = int(record.get("precision") or 0)
        return round(value, digits) == round(truth, digits)
    return text.lower() == answer.lower()


def judge_rows(rows: Sequence[dict[str, Any]], task: str, judge: Judge, progress: bool = False) -> list[dict]:
    """The rows with the judge's columns added (rows with an error are returned unchanged)."""
    if task not in ("mathvista", "mmvet"):
        raise InputError(f"the judge grades mathvista and mmvet; got {task!r}")
    tqdm = import_optional("tqdm", "progress bars need tqdm").tqdm
    out = []
    for row in tqdm(rows, desc=f"judge {task}", disable=not progress):
        row = dict(row)
        if row.get("error") is None:
            answer = official_answer(row.get("answer"))
            image = row.get("image_path")
            if task == "mmvet":
                if row.get("label") is None:
                    raise InputError("MM-Vet's ground truth (mm-vet/mm-vet.json) is needed to judge the answers")
                prompt = MMVET_PROMPT.format(question=row.get("question"), truth=row["label"], answer=answer)
                reply = judge.ask(prompt, image)
                score = parse_score(reply)
                row["judge_reply"] = reply
                row["judge_failed"] = score is None
                row["judge_score"] = score if score is not None else 0.0
            else:
                record = row["mathvista"]
                reply = judge.ask(MATHVISTA_PROMPT.format(question=record.get("question"), answer=answer), image)
                row["judge_extraction"] = reply.strip()
                row["judge_correct"] = mathvista_correct(reply, record)
        out.append(row)
    return out


__all__ = ["Judge", "judge_rows", "parse_score", "mathvista_correct", "MMVET_PROMPT", "MATHVISTA_PROMPT"]
