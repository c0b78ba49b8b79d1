"""The files the official MoAI evaluators write where they compute no score: MMBench's spreadsheet for the
MMBench server, MathVista's and MM-Vet's files for their GPT-4 graders -- same names, same layout.

* MMBench (``mmbench_evaluation.py``): ``<dataset>.xlsx`` (``mmbench``, ``mmbench_cn``, ``mmbench_test``,
  ``mmbench_test_cn``): the split's TSV without the columns ``hint, category, source, image, comment,
  l2-category`` and with a ``prediction`` column inserted at position 6. (The official code fails when one of
  those columns is missing; we drop the ones present.)
* MathVista (``mathvista_evaluation.py``): ``mathvista_<split>_results.json``: ``{pid: record}``, each record
  the dataset's fields without ``decoded_image`` plus ``response`` (the answer).
* MM-Vet (``mmvet_evaluation.py``): ``mm-vet_results.json``: ``{"v1_<question_id>": answer}``, indented by 2.

Answers go in after the official clean-up (:func:`~moai_sdk.evaluation.scoring.official_answer`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import import_optional
from .datasets import mmbench_frame
from .scoring import official_answer

#: The official dataset name per MMBench split (the spreadsheet's file name).
MMBENCH_DATASET_NAMES = {"dev": "mmbench", "dev_cn": "mmbench_cn", "test": "mmbench_test", "test_cn": "mmbench_test_cn"}
MMBENCH_DROPPED = ["hint", "category", "source", "image", "comment", "l2-category"]


def write_mmbench_xlsx(rows: Sequence[dict[str, Any]], root: Path, split: str, folder: Path) -> Path:
    """MMBench's ``<dataset>.xlsx`` in ``folder``; questions without an answer row keep an empty prediction."""
    import_optional("openpyxl", "writing MMBench's spreadsheet needs openpyxl: pip install 'moai-sdk[eval]'")
    frame = mmbench_frame(Path(root), split)
    index = frame["index"].astype(int)
    out = frame.drop(columns=[c for c in MMBENCH_DROPPED if c in frame.columns])
    out.insert(6, "prediction", None)
    out["index"] = index
    for row in rows:
        if row.get("error") is None:
            out.loc[index == int(row["question_id"]), "prediction"] = official_answer(row.get("answer"))
    path = Path(folder) / f"{MMBENCH_DATASET_NAMES[split]}.xlsx"
    out.to_excel(path, index=False, engine="openpyxl")
    return path


def write_mathvista_results(rows: Sequence[dict[str, Any]], split: str, folder: Path) -> Path:
    """MathVista's ``mathvista_<split>_results.json`` for its grader (rows with an error are left out)."""
    predictions = {}
    for row in rows:
        if row.get("error") is not None:
            continue
        record = dict(row["mathvista"])
        record.pop("width", None)
        record.pop("height", None)
        record["response"] = official_answer(row.get("answer"))
        predictions[str(record["pid"])] = record
    path = Path(folder) / f"mathvista_{split}_results.json"
    path.write_text(json.dumps(predictions), encoding="utf-8")
    return path


def write_mmvet_results(rows: Sequence[dict[str, Any]], folder: Path) -> Path:
    """MM-Vet's ``mm-vet_results.json`` for its grader (rows with an error are left out)."""
    results = {
        f"v1_{row['question_id']}": official_answer(row.get("answer")) for row in rows if row.get("error") is None
    }
    path = Path(folder) / "mm-vet_results.json"
    path.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return path


def write_official_files(task: str, rows: Sequence[dict[str, Any]], root: Any, split: str, folder: Path) -> list[Path]:
    """The official files of ``task`` (MMBench, MathVista, MM-Vet; none for the others) in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if task == "mmbench":
        return [write_mmbench_xlsx(rows, Path(root), split, folder)]
    if task == "mathvista":
        return [write_mathvista_results(rows, split, folder)]
    if task == "mmvet":
        return [write_mmvet_results(rows, folder)]
    return []


__all__ = [
    "MMBENCH_DATASET_NAMES",
    "write_mmbench_xlsx",
    "write_mathvista_results",
    "write_mmvet_results",
    "write_official_files",
]
