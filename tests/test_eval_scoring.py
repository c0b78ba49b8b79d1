"""moai eval's data side without a model: the official prompts from synthetic files in the released layouts,
the official metrics hand-computed on answers with tricky text, the official crash cases, the official files,
the report and ``moai score --json``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval_fixtures import MMBENCH_HEADER, build_dataset_root
from moai_sdk.cli import main
from moai_sdk.errors import InputError
from moai_sdk.evaluation import BENCHMARKS, load_benchmark, score_benchmark
from moai_sdk.evaluation.official_files import write_official_files
from moai_sdk.evaluation.report import write_report
from moai_sdk.evaluation.scoring import official_answer, vqa_normalize


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("eval-data")
    return root, build_dataset_root(root)


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_prompts_equal_the_official_strings_and_images_exist(data_root, name):
    root, expected = data_root
    records = load_benchmark(name, root)
    assert [(r["id"], r["prompt"]) for r in records] == expected[name]
    for record in records:
        if not record["image"].startswith("data:"):
            assert Path(record["image"]).is_file(), record["image"]


def test_loaders_attach_the_ground_truth_the_official_evaluators_read(data_root):
    root, _ = data_root
    mme = load_benchmark("mme", root)
    # the two-space variant of "Please answer yes or no." is found as the official evaluator retries it
    assert [r["label"] for r in mme] == ["Yes", "No", "Yes", "No", "No", "Yes", "Yes", "No"]
    assert mme[-1]["gt_question"] == "Will the code print 4?  Please answer yes or no."
    assert {r["mme_task"] for r in mme} == {"artwork", "existence", "code_reasoning"}
    pope = load_benchmark("pope", root)
    assert [(r["category"], r["label"]) for r in pope] == [
        ("adversarial", "yes"),
        ("adversarial", "no"),
        ("popular", "no"),
        ("random", "yes"),
    ]
    sqa = load_benchmark("sqa", root)
    assert [(r["id"], r["label"], r["n_choices"]) for r in sqa] == [("5", 0, 2), ("7", 1, 3)]
    assert len(load_benchmark("textvqa", root)[0]["gt_answers"]) == 10
    hb = load_benchmark("hallusionbench", root)
    assert hb[1]["image"].endswith("0_1.PNG")  # the png/PNG correction of the official mapper
    mmb = load_benchmark("mmbench", root)
    assert [r["letters"] for r in mmb] == ["ABCD", "ABCD", "AB"] and mmb[0]["image"].startswith("data:image/")
    assert load_benchmark("mathvista", root)[0]["mathvista"]["choices"] == ["circle", "square"]
    assert load_benchmark("mmvet", root)[0]["label"] == "14"


def test_bad_dataset_roots_and_names_are_input_errors(tmp_path, data_root):
    with pytest.raises(InputError, match="unknown benchmark"):
        load_benchmark("vqav2", tmp_path)
    with pytest.raises(InputError, match="not found"):
        load_benchmark("pope", tmp_path)
    with pytest.raises(InputError, match="not a folder"):
        load_benchmark("pope", tmp_path / "nope")
    with pytest.raises(InputError, match="splits"):
        load_benchmark("mmbench", data_root[0], "val")


def rows(answers, **fields_per_row):
    keys = list(fields_per_row)
    return [
        {"id": str(i), "answer": a, "error": None, **{k: fields_per_row[k][i] for k in keys}}
        for i, a in enumerate(answers)
    ]


def test_official_answer_cleanup():
    assert official_answer("  yes[UNUSED_TOKEN_145]\n") == "yes"
    assert official_answer("B [UNUSED") == "B "  # nothing stripped after the cut, as the official pipelines
    assert official_answer(None) == ""


def test_mme_official_metrics_hand_computed():
    answers = ["Yes.", " NO", "Not sure", "No, it is not"]  # existence: 2 images
    answers += ["The answer is yes", "no\tmaybe"]  # artwork: "the " is no yes/no -> other; a tab
    answers += ["yes[UNUSED_TOKEN_145]", "\n\nno\nyes"]  # code_reasoning: cut at [UN; a newline
    answers += ["", "no", "yes"]  # count: three questions (odd)
    labels = ["Yes", "No", "No", "Yes", "Yes", "No", "Yes", "No", "Yes", "No", "Yes"]
    tasks = ["existence"] * 4 + ["artwork"] * 2 + ["code_reasoning"] * 2 + ["count"] * 3
    result = score_benchmark(rows(answers, label=labels, mme_task=tasks), "mme")
    cats = result["categories"]
    assert cats["existence"]["acc"] == 0.75 and cats["existence"]["acc_plus"] == 0.5
    assert cats["existence"]["score"] == pytest.approx(125.0)
    assert cats["artwork"]["score"] == pytest.approx(50.0) and cats["artwork"]["other_num"] == 1
    assert cats["code_reasoning"]["score"] == pytest.approx(200.0)
    assert cats["count"]["acc"] == pytest.approx(2 / 3) and cats["count"]["acc_plus"] == 0.5
    assert result["metrics"]["Perception"] == pytest.approx(125 + 50 + 200 / 3 + 50)
    assert result["metrics"]["Cognition"] == pytest.approx(200.0)
    notes = " ".join(result["notes"])
    assert "newline or tab" in notes and "missing" in notes and "odd number" in notes
    strict = score_benchmark(rows(answers, label=labels, mme_task=tasks), "mme", "strict")
    assert strict["categories"]["existence"]["acc"] == 0.5  # "Not sure": no first-word yes/no


def test_pope_official_metrics_hand_computed_and_zero_denominators_give_numbers():
    answers = ["Yes.", " NO", "Not sure", "No, it is not", "There is no dog. Yes.", "Yes, there is a tree"]
    labels = ["yes", "no", "yes", "no", "no", "yes"]
    cats = ["adversarial"] * 4 + ["popular", "random"]
    result = score_benchmark(rows(answers, label=labels, category=cats), "pope")
    adv = result["categories"]["adversarial"]
    assert (adv["accuracy"], adv["precision"], adv["recall"], adv["yes_ratio"]) == (0.75, 1.0, 0.5, 0.25)
    assert adv["f1"] == pytest.approx(2 / 3)
    pop = result["categories"]["popular"]  # no positive prediction or label: the official code divides by zero
    assert pop == {"accuracy": 1.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0, "n": 1}
    assert result["categories"]["random"]["f1"] == 1.0
    assert result["metrics"]["adversarial/accuracy"] == 0.75
    assert any("zero denominator" in n for n in result["notes"])


def test_sqa_parse_accepts_only_the_official_forms():
    answers = ["B", "B. milk", "The answer is B.", "The answer is B", "(B)", "b"]
    answers += ["The answer is B. The answer is C.", "D", ""]
    n = len(answers)
    fields = {"label": [1] * n, "n_choices": [3] * n, "question": ["<image>\nQ"] * n}
    result = score_benchmark(rows(answers, **fields), "sqa")
    assert result["metrics"]["correct"] == 3 and result["metrics"]["count"] == 9
    assert result["metrics"]["accuracy"] == pytest.approx(100 / 3)
    assert result["metrics"]["image_accuracy"] == pytest.approx(100 / 3)
    strict = score_benchmark(rows(answers, **fields), "sqa", "strict")
    assert strict["metrics"]["correct"] == 7  # "The answer is B", "(B)", "b", the first of two answers


def test_textvqa_soft_accuracy_numbers_articles_and_the_period_quirk():
    sign = ["stop"] * 6 + ["stop sign"] * 3 + ["the stop"]
    cars = ["2"] * 2 + ["two"] * 2 + ["3"] * 6
    answers = ["Stop.", "the stop sign", "Two", "none", "", "3."]
    gts = [sign, sign, cars, cars, sign, cars]
    result = score_benchmark(rows(answers, gt_answers=gts), "textvqa")
    # 1 + 0.9 (3 of 10 said "stop sign") + 1 ("two" -> "2") + 0 ("none" -> "0") + 0 + 1 ("3." -> "3")
    assert result["metrics"]["accuracy"] == pytest.approx(100 * 3.9 / 6)
    strict = score_benchmark(rows(answers, gt_answers=gts), "textvqa", "strict")
    assert strict["metrics"]["accuracy"] == pytest.approx(100 * 2.9 / 6)  # "3." keeps its period when fixed
    assert vqa_normalize("The  Dogs' ball, 1,000.") == "dogs' ball 1000"


def test_seed_first_character_and_the_empty_answer():
    answers = ["B", "a", "", "The answer is C"]
    result = score_benchmark(rows(answers, label=["B", "A", "B", "C"], question_type_id=[5, 3, 5, 1]), "seed")
    assert result["metrics"]["accuracy"] == 50.0
    assert result["categories"]["Instance Counting"] == {"accuracy": 50.0, "n": 2}
    assert result["categories"]["Scene Understanding"]["accuracy"] == 0.0
    assert any("empty SEED" in n for n in result["notes"])


def test_ai2d_first_capital_letter_anywhere():
    answers = ["B", "The answer is B", "b", "(B)", "I think C"]
    result = score_benchmark(rows(answers, label=[1] * 5), "ai2d")
    assert result["metrics"]["accuracy"] == 40.0
    assert any("without a capital" in n for n in result["notes"])
    strict = score_benchmark(rows(answers, label=[1] * 5), "ai2d", "strict")
    assert strict["metrics"]["accuracy"] == 80.0


def test_qbench_find_quirks_and_a_letter_past_the_last_option():
    answers = ["C", "", "C. Low", "D", "AB"]
    cands = [["High", "Medium", "Low"]] * 5
    result = score_benchmark(rows(answers, candidates=cands, label=["Low"] * 5), "qbench")
    # "C" right; "" -> find 0 -> High; "C. Low" -> find -1 -> the last option, Low (right); "D" past the end
    assert result["metrics"]["accuracy"] == 40.0
    assert any("past the last option" in n for n in result["notes"])


def test_hallusionbench_yes_anywhere():
    answers = ["Yes, it is.", "No.", "The eyes are closed", "yes"]
    result = score_benchmark(rows(answers, label=["1", "0", "0", "1"]), "hallusionbench")
    assert result["metrics"]["accuracy"] == 75.0  # "eyes" reads as yes, as in the official pipeline


def test_mmbench_circular_evaluation_is_ours_and_all_rotations_must_be_right():
    answers = ["A", "D.", "(A)", "A"]
    result = score_benchmark(
        rows(answers, question_id=[0, 1000000, 1, 1000001], label=["A", "D", "B", "A"], letters=["ABCD"] * 4),
        "mmbench",
    )
    assert result["metrics"]["circular_accuracy"] == 50.0 and result["metrics"]["accuracy"] == 75.0
    assert any("ours" in n for n in result["notes"])


def test_error_rows_are_skipped_and_unscorable_tasks_say_why():
    r = rows(["yes", "no"], label=["yes", "no"], category=["random", "random"])
    r[1]["error"] = "InputError: bad image"
    assert score_benchmark(r, "pope")["skipped"] == 1
    with pytest.raises(InputError, match="judge"):
        score_benchmark(rows(["x"], label=["y"]), "mmvet")
    with pytest.raises(InputError, match="unknown task"):
        score_benchmark(r, "vqa")


def test_official_files_have_the_official_layout(data_root, tmp_path):
    openpyxl = pytest.importorskip("openpyxl")
    root, _ = data_root
    mmb = [
        dict(r, answer=f" {a}[UNUSED_TOKEN_145]", error=None) for r, a in zip(load_benchmark("mmbench", root), "ADB")
    ]
    (xlsx,) = write_official_files("mmbench", mmb, root, "dev", tmp_path)
    assert xlsx.name == "mmbench.xlsx"
    sheet = list(openpyxl.load_workbook(xlsx).active.values)
    expected_columns = [c for c in MMBENCH_HEADER if c not in ("hint", "category", "source", "image", "comment",
                                                                "l2-category")]  # fmt: skip
    expected_columns.insert(6, "prediction")
    assert list(sheet[0]) == expected_columns
    assert [(row[0], row[6]) for row in sheet[1:]] == [(0, "A"), (1000000, "D"), (1, "B")]

    mv = [dict(r, answer="(B) square", error=None) for r in load_benchmark("mathvista", root)]
    (path,) = write_official_files("mathvista", mv, root, "testmini", tmp_path)
    grader = json.loads(path.read_text())
    assert path.name == "mathvista_testmini_results.json" and list(grader) == ["1", "2"]
    assert grader["1"]["response"] == "(B) square" and grader["1"]["image"] == "images/1.jpg"
    assert "decoded_image" not in grader["1"] and grader["1"]["metadata"]["task"] == "figure question answering"

    vet = [dict(r, answer=" 14 dollars", error=None) for r in load_benchmark("mmvet", root)]
    (path,) = write_official_files("mmvet", vet, root, "test", tmp_path)
    assert path.name == "mm-vet_results.json"
    assert path.read_text() == json.dumps({"v1_0": "14 dollars", "v1_1": "14 dollars"}, indent=2)


def test_report_table_cites_the_paper_and_draws_the_chart(tmp_path):
    mme = {"task": "mme", "n": 4, "scoring": "official", "metrics": {"Perception": 1500.0, "Cognition": 300.0}}
    pope_cats = {c: {"accuracy": 0.8, "precision": 0.8, "recall": 0.8, "f1": f, "yes_ratio": 0.5} for c, f in
                 (("adversarial", 0.8), ("popular", 0.9), ("random", 1.0))}  # fmt: skip
    pope = {"task": "pope", "n": 6, "scoring": "official", "metrics": {}, "categories": pope_cats}
    seed = {"task": "seed", "n": 2, "scoring": "official", "metrics": {"accuracy": 50.0}, "notes": ["a note"]}
    written = write_report([mme, pope, seed], tmp_path / "report.md")
    text = written["report"].read_text()
    assert "arXiv:2403.07508" in text and "Table 1" in text
    assert "| mme | Perception | 1500.00 | 1714 |" in text and "| mme | Cognition | 300.00 | 561 |" in text
    assert "| pope | mean_f1 | 90.00 | 87.1 |" in text and "| seed | accuracy | 50.00 | -- |" in text
    assert written["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_moai_score_json_on_an_answers_file(tmp_path, capsys):
    path = tmp_path / "answers.jsonl"
    answers = ["Yes.", " NO", "Not sure", "No, it is not"]
    lines = rows(answers, label=["yes", "no", "yes", "no"], category=["adversarial"] * 4)
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert main(["score", str(path), "--task", "pope", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["task"], out["n"], out["scoring"]) == ("pope", 4, "official")
    assert out["metrics"]["adversarial/recall"] == 0.5 and set(out["categories"]) == {"adversarial"}
    assert main(["score", str(path), "--task", "ai2d"]) == 1  # "yes" is no answer index: a clear error
    assert "does not fit ai2d" in capsys.readouterr().err
