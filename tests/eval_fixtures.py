"""Tiny synthetic copies of the eleven benchmarks in their released layouts (the folders and files the official
MoAI code reads under its DATASET2 root), with the prompt strings the official mapper/pipeline logic builds.

``build_dataset_root(root)`` writes everything and returns ``EXPECTED_PROMPTS``: benchmark -> [(id, prompt)].
The expected prompts are written out by hand from the official code's string building.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from PIL import Image

INSTR = "Answer with the option's letter from the given choices directly."
SHORT = "Answer the question using a single word or phrase."


def _img(path: Path, seed: int, size=(40, 32), fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = ((seed * 53) % 256, (seed * 97) % 256, (seed * 31) % 256)
    Image.new("RGB", size, colour).save(path, format=fmt)


def _jpeg_b64(seed: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (36, 30), ((seed * 41) % 256, 120, 200)).save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _dump(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")


def build_mme(root: Path) -> list[tuple[str, str]]:
    d = root / "MME_Benchmark_release_version"
    # a subtask with images/ + questions_answers_YN/ (artwork) and two flat ones (existence, code_reasoning)
    _img(d / "artwork/images/10002.jpg", 1)
    (d / "artwork/questions_answers_YN").mkdir(parents=True)
    (d / "artwork/questions_answers_YN/10002.txt").write_text(
        "Is this artwork created by Monet? Please answer yes or no.\tYes\n"
        "Is this artwork created by Dali? Please answer yes or no.\tNo\n"
    )
    for k in (1, 2):
        _img(d / f"existence/00000{k}.jpg", 10 + k)
        (d / f"existence/00000{k}.txt").write_text(
            f"Is there a dog in this image? Please answer yes or no.\t{'Yes' if k == 1 else 'No'}\n"
            f"Is there a cat in this image? Please answer yes or no.\t{'No' if k == 1 else 'Yes'}\n"
        )
    _img(d / "code_reasoning/0020.png", 20)
    (d / "code_reasoning/0020.txt").write_text(
        "Will the code print 3? Please answer yes or no.\tYes\n"
        # MME's files have a few questions with two spaces before "Please": the evaluator retries with two
        "Will the code print 4?  Please answer yes or no.\tNo\n"
    )
    questions = [
        ("artwork/10002.jpg", "artwork/images/10002.jpg", "Is this artwork created by Monet?", "artwork"),
        ("artwork/10002.jpg", "artwork/images/10002.jpg", "Is this artwork created by Dali?", "artwork"),
        ("existence/000001.jpg", "existence/000001.jpg", "Is there a dog in this image?", "existence"),
        ("existence/000001.jpg", "existence/000001.jpg", "Is there a cat in this image?", "existence"),
        ("existence/000002.jpg", "existence/000002.jpg", "Is there a dog in this image?", "existence"),
        ("existence/000002.jpg", "existence/000002.jpg", "Is there a cat in this image?", "existence"),
        ("code_reasoning/0020.png", "code_reasoning/0020.png", "Will the code print 3?", "code_reasoning"),
        ("code_reasoning/0020.png", "code_reasoning/0020.png", "Will the code print 4?", "code_reasoning"),
    ]
    items = [
        {"question_id": q, "image": img, "text": f"{text}\n{SHORT}", "category": cat} for q, img, text, cat in questions
    ]
    _dump(d / "llava_mme.json", items)
    # MMEPipeline: the question text as it is; ids repeat per image: the second gets "#2"
    ids = ["artwork/10002.jpg", "artwork/10002.jpg#2", "existence/000001.jpg", "existence/000001.jpg#2"]
    ids += ["existence/000002.jpg", "existence/000002.jpg#2", "code_reasoning/0020.png", "code_reasoning/0020.png#2"]
    return [(i, f"{text}\n{SHORT}") for i, (_, _, text, _) in zip(ids, questions)]


def build_pope(root: Path) -> list[tuple[str, str]]:
    d = root / "POPE"
    items, expected = [], []
    for n, (cat, obj) in enumerate(
        [("adversarial", "dog"), ("adversarial", "cup"), ("popular", "car"), ("random", "tree")]
    ):
        qid = n + 1
        name = f"COCO_val2014_00000000000{qid}.jpg"
        _img(root / "coco2014/val2014" / name, 30 + qid)
        items.append({"question_id": qid, "image": name, "text": f"Is there a {obj} in the image?", "category": cat})
        expected.append((str(qid), f"Is there a {obj} in the image?\n{SHORT}"))
    _dump(d / "new_pope_test.json", items)
    labels = {"adversarial": ["yes", "no"], "popular": ["no"], "random": ["yes"]}
    for cat, ls in labels.items():
        (d / f"coco_pope_{cat}.json").write_text("".join(json.dumps({"label": lab}) + "\n" for lab in ls))
    return expected


def build_sqa(root: Path) -> list[tuple[str, str]]:
    d = root / "ScienceQA"
    _img(d / "images/test/5/image.png", 50)
    _img(d / "images/test/7/image.png", 51)
    v5 = "<image>\nContext: A photo of a pet.\nQuestion: Which animal is shown?\nOptions: (A) cat (B) dog"
    v7 = "Context: \nQuestion: Which is a liquid?\nOptions: (A) rock (B) milk (C) wood\n<image>"
    items = [
        {"id": "5", "image": "5/image.png", "conversations": [{"from": "human", "value": v5}, {"from": "gpt", "value": "A"}]},
        {"id": "6", "conversations": [{"from": "human", "value": "No image here"}, {"from": "gpt", "value": "A"}]},
        {"id": "7", "image": "7/image.png", "conversations": [{"from": "human", "value": v7}, {"from": "gpt", "value": "B"}]},
    ]  # fmt: skip
    _dump(d / "llava_test_CQM-A.json", items)
    _dump(
        d / "problems.json",
        {
            "5": {"choices": ["cat", "dog"], "answer": 0, "split": "test"},
            "6": {"choices": ["x", "y"], "answer": 1, "split": "test"},
            "7": {"choices": ["rock", "milk", "wood"], "answer": 1, "split": "test"},
        },
    )
    # SQAPipeline: '<image>' removed without strip -> the first prompt starts with a newline
    return [
        ("5", "\nContext: A photo of a pet.\nQuestion: Which animal is shown?\nOptions: (A) cat (B) dog\n" + INSTR),
        ("7", "Context: \nQuestion: Which is a liquid?\nOptions: (A) rock (B) milk (C) wood\n\n" + INSTR),
    ]


def build_textvqa(root: Path) -> list[tuple[str, str]]:
    d = root / "TextVQA"
    _img(d / "train_images/aa01.jpg", 60)
    _img(d / "train_images/bb02.jpg", 61)
    t1 = f"what is written on the sign?\nReference OCR token: stop, here\n{SHORT}"
    t2 = f"how many cars are there?\n{SHORT}"
    _dump(
        d / "llava_textvqa_val_v051_ocr.json",
        [{"question_id": "aa01", "image": "aa01.jpg", "text": t1}, {"question_id": "bb02", "image": "bb02.jpg", "text": t2}],
    )  # fmt: skip
    answers1 = ["stop"] * 6 + ["stop sign"] * 3 + ["the stop"]
    answers2 = ["2"] * 2 + ["two"] * 2 + ["3"] * 6
    _dump(
        d / "TextVQA_0.5.1_val.json",
        {
            "data": [
                {"image_id": "aa01", "question": "What is written on the sign?", "answers": answers1},
                {"image_id": "bb02", "question": "How many cars are there?", "answers": answers2},
            ]
        },
    )
    # TextVQAPipeline appends the instruction once more (LLaVA's text already ends with it)
    return [("aa01", f"{t1}\n{SHORT}"), ("bb02", f"{t2}\n{SHORT}")]


def build_seed(root: Path) -> list[tuple[str, str]]:
    d = root / "SEED-Bench"
    _img(d / "SEED-Bench-image/img_a.jpg", 70)
    _img(d / "SEED-Bench-image/img_b.jpg", 71)
    qs = [
        {"answer": "B", "choice_a": "one", "choice_b": "two", "choice_c": "three", "choice_d": "four",
         "data_id": "img_a.jpg", "data_type": "image", "question": "How many birds?", "question_id": "101",
         "question_type_id": 5},
        {"answer": "A", "choice_a": "left", "choice_b": "right", "data_id": "clip.mp4", "data_type": "video",
         "question": "Where?", "question_id": "102", "question_type_id": 10},
        {"answer": "A", "choice_a": "red", "choice_b": "blue", "data_id": "img_b.jpg", "data_type": "image",
         "question": "Which colour?", "question_id": "103", "question_type_id": 3},
    ]  # fmt: skip
    _dump(d / "SEED-Bench.json", {"questions": qs})
    return [
        ("101", f"How many birds?\nA. one B. two C. three D. four\n{INSTR}"),
        ("103", f"Which colour?\nA. red B. blue\n{INSTR}"),
    ]


def build_ai2d(root: Path) -> list[tuple[str, str]]:
    d = root / "ai2d"
    _img(d / "ai2d_images/images/1.png", 80)
    _img(d / "ai2d_images/abc_images/2.png", 81)
    qs = [
        {"imageName": "1.png", "question": "Which stage comes first?",
         "metadata": {"questionId": "1.png-0", "answerTexts": ["egg", "larva", "pupa", "adult", "extra"],
                      "correctAnswer": 0, "abcLabel": False}},
        {"imageName": "2.png", "question": "What does label B show?",
         "metadata": {"questionId": "2.png-0", "answerTexts": ["sun", "moon"], "correctAnswer": 1, "abcLabel": True}},
    ]  # fmt: skip
    _dump(d / "ai2d_test.json", qs)
    return [
        # four letters only (the fifth answer text is dropped), a trailing newline, then an empty line
        ("1.png-0", f"Which stage comes first?\nA. egg\nB. larva\nC. pupa\nD. adult\n\n{INSTR}"),
        ("2.png-0", f"What does label B show?\nA. sun\nB. moon\n\n{INSTR}"),
    ]


def build_qbench(root: Path) -> list[tuple[str, str]]:
    d = root / "LLVisionQA-QBench"
    _img(d / "images/00001.jpg", 90)
    _img(d / "images/00002.jpg", 91)
    qs = [
        {"img_path": "00001.jpg", "question": "How is the clarity of this image?",
         "candidates": ["High", "Medium", "Low"], "correct_ans": "High", "type": 0, "concern": 0},
        {"img_path": "00002.jpg", "question": "Is this image blurry?", "candidates": ["Yes", "No"],
         "correct_ans": "No", "type": 1, "concern": 1},
    ]  # fmt: skip
    _dump(d / "llvisionqa_dev.json", qs)
    return [
        ("0", f"How is the clarity of this image?\nA. High\nB. Medium\nC. Low\n\n{INSTR}"),
        ("1", f"Is this image blurry?\nA. Yes\nB. No\n\n{INSTR}"),
    ]


def build_hallusionbench(root: Path) -> list[tuple[str, str]]:
    d = root / "HallusionBench"
    _img(d / "hallusion_bench/VD/illusion/0_0.png", 100, fmt="PNG")
    _img(d / "hallusion_bench/VD/illusion/0_1.PNG", 101, fmt="PNG")  # the file-name case the mapper corrects
    qs = [
        {"category": "VD", "subcategory": "illusion", "visual_input": "1", "set_id": "0", "figure_id": "0",
         "question_id": "0", "question": "Is the left line longer than the right one?", "gt_answer": "0",
         "filename": "./VD/illusion/0_0.png"},
        {"category": "VD", "subcategory": "illusion", "visual_input": "1", "set_id": "0", "figure_id": "1",
         "question_id": "0", "question": "Is the left line longer than the right one?", "gt_answer": "1",
         "filename": "./VD/illusion/0_1.png"},
        {"category": "VS", "subcategory": "chart", "visual_input": "0", "set_id": "1", "figure_id": "0",
         "question_id": "0", "question": "Was GDP higher in 2020?", "gt_answer": "1", "filename": None},
    ]  # fmt: skip
    _dump(d / "HallusionBench.json", qs)
    q = "Is the left line longer than the right one?"
    return [("VD_illusion_0_0_0", q), ("VD_illusion_0_1_0", q)]


def build_mathvista(root: Path) -> list[tuple[str, str]]:
    import pandas as pd

    d = root / "MathVista"
    _img(d / "images/1.jpg", 110)
    _img(d / "images/2.jpg", 111)
    q1 = "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.\n"
    q1 += "Question: Which shape is larger?\nChoices:\n(A) circle\n(B) square"
    q2 = "Hint: Please answer the question requiring an integer answer.\nQuestion: How many dots?"
    rows = [
        {"pid": "1", "question": "Which shape is larger?", "image": "images/1.jpg",
         "decoded_image": {"bytes": b"x", "path": None}, "choices": ["circle", "square"], "unit": None,
         "precision": None, "answer": "square", "question_type": "multi_choice", "answer_type": "text",
         "metadata": {"category": "math-targeted-vqa", "task": "figure question answering"}, "query": q1},
        {"pid": "2", "question": "How many dots?", "image": "images/2.jpg",
         "decoded_image": {"bytes": b"y", "path": None}, "choices": None, "unit": None, "precision": None,
         "answer": "7", "question_type": "free_form", "answer_type": "integer",
         "metadata": {"category": "general-vqa", "task": "visual question answering"}, "query": q2},
    ]  # fmt: skip
    d.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(d / "testmini-00000-of-00001-725687bf7a18d64b.parquet", engine="pyarrow")
    return [("1", q1), ("2", q2)]


def build_mmvet(root: Path) -> list[tuple[str, str]]:
    d = root / "mm-vet"
    _img(d / "images/v1_0.png", 120)
    _img(d / "images/v1_1.png", 121)
    _dump(
        d / "llava-mm-vet.json",
        [{"question_id": 0, "image": "v1_0.png", "text": "What is the total price?"},
         {"question_id": 1, "image": "v1_1.png", "text": "What is the man doing?"}],
    )  # fmt: skip
    _dump(
        d / "mm-vet.json",
        {"v1_0": {"imagename": "v1_0.png", "capability": ["ocr", "math"], "question": "What is the total price?",
                  "answer": "14"},
         "v1_1": {"imagename": "v1_1.png", "capability": ["rec"], "question": "What is the man doing?",
                  "answer": "running"}},
    )  # fmt: skip
    return [("0", "What is the total price?"), ("1", "What is the man doing?")]


MMBENCH_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                  "l2-category", "comment", "split"]  # fmt: skip


def build_mmbench(root: Path) -> list[tuple[str, str]]:
    d = root / "MMBench"
    d.mkdir(parents=True, exist_ok=True)
    rows = [
        # a hint and four options; its circular copy (index + 1e6) with the options rotated
        ["0", "What is shown?", "The picture is a photo.", "cat", "dog", "bird", "fish", "A", "recognition",
         _jpeg_b64(1), "src", "l2", "nan", "dev"],
        ["1000000", "What is shown?", "The picture is a photo.", "dog", "bird", "fish", "cat", "D", "recognition",
         _jpeg_b64(1), "src", "l2", "nan", "dev"],
        # no hint, two options (C missing stops the list), numbers as options
        ["1", "How many apples?", "nan", "3", "4", "nan", "nan", "B", "counting", _jpeg_b64(2), "src", "l2", "nan",
         "dev"],
    ]  # fmt: skip
    text = "\t".join(MMBENCH_HEADER) + "\n" + "".join("\t".join(r) + "\n" for r in rows)
    (d / "mmbench_dev_20230712.tsv").write_text(text)
    return [
        ("0", f"The picture is a photo.\nWhat is shown?\nA. cat\nB. dog\nC. bird\nD. fish\n{INSTR}"),
        ("1000000", f"The picture is a photo.\nWhat is shown?\nA. dog\nB. bird\nC. fish\nD. cat\n{INSTR}"),
        ("1", f"How many apples?\nA. 3\nB. 4\n{INSTR}"),
    ]


BUILDERS = {
    "mme": build_mme,
    "mmbench": build_mmbench,
    "seed": build_seed,
    "pope": build_pope,
    "sqa": build_sqa,
    "textvqa": build_textvqa,
    "ai2d": build_ai2d,
    "qbench": build_qbench,
    "hallusionbench": build_hallusionbench,
    "mathvista": build_mathvista,
    "mmvet": build_mmvet,
}


def build_dataset_root(root: Path) -> dict[str, list[tuple[str, str]]]:
    """Write all eleven benchmarks under ``root``; return the expected (id, prompt) per benchmark."""
    root.mkdir(parents=True, exist_ok=True)
    return {name: build(root) for name, build in BUILDERS.items()}
