"""``moai score``: the paper's metrics against hand-computed values on small handmade output files."""

from __future__ import annotations

import json

import pytest

from moai_sdk import InputError
from moai_sdk.batch.output import OutputWriter
from moai_sdk.batch.scoring import extract_choice, extract_yes_no, score, score_file
from moai_sdk.cli import main

POPE_ROWS = [
    # answer, label -> the usual extraction's prediction
    ("Yes, there is a dog in the image.", "yes"),  # yes: TP
    ("No, there is no cat.", "no"),  # no: TN
    ("There is not a cat.", "yes"),  # "not" -> no: FN
    ("yes", "no"),  # yes: FP
    ("Yes.", "yes"),  # yes: TP
    ("I do not know. Yes", "no"),  # first sentence has "not" -> no: TN
    ("NO", "no"),  # lower-cased first, as MoAI's evaluation does -> no: TN (LLaVA's script would say yes)
]


def write(path, pairs, *, error_row=True):
    rows = [{"id": str(i), "answer": a, "error": None, "label": label} for i, (a, label) in enumerate(pairs)]
    if error_row:
        rows.append({"id": "err", "answer": None, "error": "InputError: broken", "label": "yes"})
    w = OutputWriter(path)
    w.append(rows)
    w.finalize()
    return path


def test_pope_metrics_match_the_hand_computed_confusion_matrix(tmp_path):
    # TP = 2, TN = 3, FP = 1, FN = 1 over n = 7 (the error row is not scored)
    metrics = score_file(write(tmp_path / "pope.jsonl", POPE_ROWS), "pope")
    assert metrics == pytest.approx(
        {"accuracy": 5 / 7, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 3 / 7, "n": 7}
    )
    assert [extract_yes_no(a) for a, _ in POPE_ROWS] == ["yes", "no", "no", "yes", "yes", "no", "no"]


def test_multiple_choice_and_exact_match(tmp_path):
    choice = [
        ("B", "B"),  # right
        ("(C) a red car", "C"),  # right
        ("The answer is D.", "D"),  # right
        ("A. The cat", "B"),  # wrong
        ("I think it is (B) because", "(B)"),  # right
        ("Egg", "E"),  # no option letter: wrong
        ("none of them", "A"),  # no option letter: wrong
    ]
    assert score_file(write(tmp_path / "c.parquet", choice), "choice") == pytest.approx({"accuracy": 4 / 7, "n": 7})
    assert [extract_choice(a) for a, _ in choice] == ["B", "C", "D", "A", "B", None, None]
    exact = [("Paris.", "paris"), ("  New   York ", "new york"), ("London", "Paris"), ("", "x")]
    assert score_file(write(tmp_path / "e.jsonl", exact), "exact") == pytest.approx({"accuracy": 0.5, "n": 4})


def test_bad_labels_and_tasks_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="'yes' or 'no'"):
        score([{"id": "1", "answer": "yes", "error": None, "label": "maybe"}], "pope")
    with pytest.raises(InputError, match="no 'label' value"):
        score([{"id": "1", "answer": "yes", "error": None}], "pope")
    with pytest.raises(InputError, match="unknown task"):
        score([{"id": "1", "answer": "yes", "error": None, "label": "yes"}], "bleu")


def test_moai_score_prints_json_and_a_table(tmp_path, capsys):
    path = write(tmp_path / "pope.jsonl", POPE_ROWS)
    assert main(["score", str(path), "--task", "pope", "--json"]) == 0
    captured = capsys.readouterr()
    metrics = json.loads(captured.out)
    assert list(metrics) == ["accuracy", "precision", "recall", "f1", "yes_ratio", "n"]
    assert metrics["n"] == 7 and "1 row(s) with an error were not scored" in captured.err
    assert main(["score", str(path), "--task", "pope"]) == 0
    table = capsys.readouterr().out
    assert "accuracy" in table and "71.43" in table and "yes_ratio" in table
    assert main(["score", str(tmp_path / "missing.jsonl"), "--task", "exact"]) == 1
