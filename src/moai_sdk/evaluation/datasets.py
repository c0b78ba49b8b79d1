"""The paper's eleven benchmarks as the official MoAI code reads them: files, images and prompt strings.

Each loader reads a benchmark's released files from the dataset root (the official code's ``DATASET2``; every
benchmark sits in its folder under the official name) and returns one record per question:

* ``id`` -- the benchmark's own question id as a string (Q-Bench has none: its row number; HallusionBench's
  ``question_id`` repeats across figures: ``category_subcategory_setid_figureid_questionid``, the key
  HallusionBench's own scripts use; a repeated id elsewhere gets ``#2``, ``#3``...);
* ``image`` -- the path the official dataset mapper opens (MMBench: the TSV's base64 image as a ``data:`` URL);
* ``prompt`` -- the user text the official ``pipeline/<Benchmark>Pipeline.py`` passes to the model, built
  character for character as there (the template is added by the pipeline, as in the official code);
* the fields the official evaluator needs to score (ground truth, category, options, ...), with names that do
  not clash with ``moai batch``'s output columns (the ground truth is ``label``).

The facts (file names, folders, prompt strings and their quirks) come from ``datasets/registration``,
``datasets/dataset_mappers`` and ``pipeline`` of github.com/ByungKwanLee/MoAI; each quirk we keep is noted where
it happens.
"""

from __future__ import annotations

import base64
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import InputError, import_optional

logger = logging.getLogger(__name__)

#: The instruction the official pipelines append to the multiple-choice prompts.
LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."
#: MMBench-CN's instruction (``MMBenchPipeline.py`` when the split name contains ``cn``).
LETTER_INSTRUCTION_CN = "请直接回答选项字母。"
#: The instruction the POPE and TextVQA pipelines append.
SHORT_INSTRUCTION = "Answer the question using a single word or phrase."

#: SEED-Bench's image question types (``moai/eval/evaluate_seed.py``).
SEED_CATEGORIES = {
    1: "Scene Understanding",
    2: "Instance Identity",
    3: "Instance Attribute",
    4: "Instance Location",
    5: "Instance Counting",
    6: "Spatial Relation",
    7: "Instance Interaction",
    8: "Visual Reasoning",
    9: "Text Recognition",
}

#: MMBench's TSV per split (``register_mmbench_datasets.py``).
MMBENCH_FILES = {
    "dev": "mmbench_dev_20230712.tsv",
    "dev_cn": "mmbench_dev_cn_20231003.tsv",
    "test": "MMBench_TEST_EN_legacy.tsv",
    "test_cn": "MMBench_TEST_CN_legacy.tsv",
}
#: Q-Bench's question file per split (``register_qbench_datasets.py``).
QBENCH_FILES = {"dev": "llvisionqa_dev.json", "test": "llvisionqa_test.json"}
#: MathVista's parquet files per split (``register_mathvista_datasets.py``).
MATHVISTA_FILES = {
    "testmini": ("testmini-00000-of-00001-725687bf7a18d64b.parquet",),
    "test": ("test-00000-of-00002-6b81bd7f7e2065e6.parquet", "test-00001-of-00002-6a611c71596db30f.parquet"),
}


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its ``moai score`` task name, the official folder under the dataset root, the official
    ``max_new_tokens`` and its splits (the first is the default, the one the official README evaluates)."""

    name: str
    title: str
    folder: str
    max_new_tokens: int
    splits: tuple[str, ...]
    loader: Callable[[Path, str], list[dict[str, Any]]]

    @property
    def default_split(self) -> str:
        return self.splits[0]


# ------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"{str(path)!r} not found: put the benchmark's released files under the dataset root")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{str(path)!r} is not valid JSON: {exc}") from exc


def _json_safe(value: Any) -> Any:
    """numpy arrays/scalars (from parquet) as plain lists/numbers, recursively."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _unique_ids(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Make ``id`` unique (resume keys rows by it): a repeated id gets ``#2``, ``#3``, ..."""
    seen: dict[str, int] = {}
    for record in records:
        base = record["id"]
        count = seen.get(base, 0) + 1
        seen[base] = count
        if count > 1:
            record["id"] = f"{base}#{count}"
    return records


def _options_block(letters: list[str], texts: list[Any]) -> str:
    """AI2D's and Q-Bench's option lines: ``"A. text\\n"`` per option, only A-D (the official ``zip`` with four
    letters drops a fifth option); the block ends with a newline, so the prompt has an empty line before the
    instruction (kept: the official pipelines build it so)."""
    return "".join(f"{letter} {text}\n" for letter, text in zip(letters, texts))


# ------------------------------------------------------------------------------------------------------------
# loaders, one per benchmark
# ------------------------------------------------------------------------------------------------------------


def mme_ground_truth(folder: Path) -> dict[tuple[str, str, str], str]:
    """MME's answers by ``(subtask, txt file, question)``, read like ``MMEEvaluator.get_gt``: per subtask folder,
    ``questions_answers_YN/*.txt`` when it has an ``images`` folder, else the ``*.txt`` beside the images; one
    ``question<TAB>answer`` per line."""
    gt: dict[tuple[str, str, str], str] = {}
    for category_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        qa_dir = category_dir / "questions_answers_YN" if (category_dir / "images").exists() else category_dir
        if not qa_dir.is_dir():
            continue
        for txt in sorted(qa_dir.glob("*.txt")):
            for number, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.strip().split("\t")
                if len(parts) != 2:
                    raise InputError(f"{txt} line {number}: expected 'question<TAB>answer'; got {line!r}")
                gt[(category_dir.name, txt.name, parts[0])] = parts[1]
    return gt


def mme_gt_question(question: str, category: str, file: str, gt: dict[tuple[str, str, str], str]) -> str:
    """The question as ``MMEEvaluator.evaluate`` looks it up: LLaVA's short-answer instruction removed, " Please
    answer yes or no." appended when missing -- with two spaces when the one-space form is not in the answers
    (MME's files have both)."""
    prompt = question.strip()
    if SHORT_INSTRUCTION in prompt:
        prompt = prompt.replace(SHORT_INSTRUCTION, "").strip()
    if "Please answer yes or no." not in prompt:
        prompt = prompt + " Please answer yes or no."
        if (category, file, prompt) not in gt:
            prompt = prompt.replace(" Please answer yes or no.", "  Please answer yes or no.")
    return prompt


def load_mme(root: Path, split: str) -> list[dict[str, Any]]:
    folder = root / "MME_Benchmark_release_version"
    questions = _read_json(folder / "llava_mme.json")
    gt = mme_ground_truth(folder)
    records = []
    for q in questions:
        qid = str(q["question_id"])
        # the subtask and the answer file come from the question id, as in MMEEvaluator (not from "category")
        task = qid.split("/")[0]
        file = qid.split("/")[-1].split(".")[0] + ".txt"
        key_question = mme_gt_question(q["text"], task, file, gt)
        label = gt.get((task, file, key_question))
        if label is None:
            raise InputError(
                f"MME question {qid!r}: no answer for {key_question!r} in {task}/…/{file} "
                "(the official evaluator stops here too); check the MME release folder"
            )
        records.append(
            {
                "id": qid,
                "image": str(folder / q["image"]),
                "prompt": q["text"],  # MMEPipeline: the question as it is
                "question_id": qid,
                "question": q["text"].strip(),
                "category": q.get("category"),
                "mme_task": task,
                "gt_file": file,
                "gt_question": key_question,
                "label": label,
            }
        )
    return _unique_ids(records)  # LLaVA's MME ids are image paths: two questions per image share one


def pope_labels(folder: Path, records: list[dict[str, Any]]) -> None:
    """Attach POPE's labels as the official evaluator pairs them: per category, the questions sorted by
    ``question_id`` are zipped with the lines of ``coco_pope_<category>.json`` in file order (a positional
    pairing, kept). Pairing happens on the full question file, so ``--limit`` keeps each question's label."""
    by_category: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_category.setdefault(str(record["category"]), []).append(record)
    for category, rows in by_category.items():
        path = folder / f"coco_pope_{category}.json"
        if not path.is_file():
            raise InputError(f"POPE labels {str(path)!r} not found (the official evaluator reads them there)")
        labels = [json.loads(line)["label"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        ordered = sorted(rows, key=lambda r: r["question_id"])
        for row, label in zip(ordered, labels):
            row["label"] = label
        for row in ordered[len(labels) :]:
            row["label"] = None  # zip drops it in the official code: not scored


def load_pope(root: Path, split: str) -> list[dict[str, Any]]:
    folder = root / "POPE"
    questions = _read_json(folder / "new_pope_test.json")
    records = [
        {
            "id": str(q["question_id"]),
            "image": str(root / "coco2014" / "val2014" / q["image"]),
            "prompt": f"{q['text']}\n{SHORT_INSTRUCTION}",
            "question_id": q["question_id"],
            "question": q["text"].strip(),
            "category": q["category"],
        }
        for q in questions
    ]
    pope_labels(folder, records)
    return records


def load_sqa(root: Path, split: str) -> list[dict[str, Any]]:
    folder = root / "ScienceQA"
    questions = _read_json(folder / "llava_test_CQM-A.json")
    problems = _read_json(folder / "problems.json")
    records = []
    for q in questions:
        if "image" not in q:  # only the questions with an image (SQA-IMG), as the official registration
            continue
        text = q["conversations"][0]["value"]
        problem = problems.get(str(q["id"]))
        records.append(
            {
                "id": str(q["id"]),
                "image": str(folder / "images" / "test" / q["image"]),
                # SQAPipeline: '<image>' removed without a strip, so the prompt keeps the newline after it
                "prompt": f"{text.replace('<image>', '')}\n{LETTER_INSTRUCTION}",
                "question_id": str(q["id"]),
                "question": text,
                "n_choices": len(problem["choices"]) if problem else None,
                "label": problem["answer"] if problem else None,  # the index of the right choice
            }
        )
    return records


def textvqa_question(prompt: str) -> str:
    """The question ``TextVQAEvaluator.prompt_processor`` recovers from the question text to find its answers.

    The official code stops (``assert False``) on a text it does not recognise; we take its first line."""
    if prompt.startswith("OCR tokens: "):
        import re

        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        question = match.group(1) if match else prompt.split("\n")[0]
    elif "Reference OCR token: " in prompt and len(prompt.split("\n")) == 3:
        question = prompt.split("\n")[1] if prompt.startswith("Reference OCR token:") else prompt.split("\n")[0]
    else:
        question = prompt.split("\n")[0]
    return question.lower()


def load_textvqa(root: Path, split: str) -> list[dict[str, Any]]:
    folder = root / "TextVQA"
    questions = _read_json(folder / "llava_textvqa_val_v051_ocr.json")
    annotations = _read_json(folder / "TextVQA_0.5.1_val.json")["data"]
    # keyed (image_id, question) and looked up with the LLaVA file's question_id, as the official evaluator
    answers = {(a["image_id"], a["question"].lower()): a["answers"] for a in annotations}
    records = []
    for q in questions:
        records.append(
            {
                "id": str(q["question_id"]),
                "image": str(folder / "train_images" / q["image"]),
                # TextVQAPipeline appends the instruction even though LLaVA's text may already end with it: kept
                "prompt": f"{q['text']}\n{SHORT_INSTRUCTION}",
                "question_id": q["question_id"],
                "question": q["text"],
                "gt_answers": answers.get((q["question_id"], textvqa_question(q["text"]))),
            }
        )
    return _unique_ids(records)


def seed_options(q: dict[str, Any]) -> str:
    """SEEDPipeline's one-line options: ``"A. x B. y C. z D. w"`` (C, D, E only when the key is present)."""
    text = f"A. {q['choice_a']} B. {q['choice_b']} "
    for letter in "cde":
        if f"choice_{letter}" in q:
            text += f"{letter.upper()}. {q[f'choice_{letter}']} "
    return text.strip()


def load_seed(root: Path, split: str) -> list[dict[str, Any]]:
    folder = root / "SEED-Bench"
    data = _read_json(folder / "SEED-Bench.json")
    records = []
    for q in data["questions"]:
        if q.get("data_type") != "image":
            continue
        type_id = q.get("question_type_id")
        records.append(
            {
                "id": str(q["question_id"]),
                "image": str(folder / "SEED-Bench-image" / q["data_id"]),
                "prompt": f"{q['question']}\n{seed_options(q)}\n{LETTER_INSTRUCTION}",
                "question_id": q["question_id"],
                "question": q["question"],
                "question_type_id": type_id,
                "category": SEED_CATEGORIES.get(type_id, str(type_id)),
                "label": q["answer"],
            }
        )
    return records


def load_ai2d(root: Path, split: str) -> list[dict[str, Any]]:
    folder = root / "ai2d"
    questions = _read_json(folder / "ai2d_test.json")
    records = []
    for q in questions:
        meta = q["metadata"]
        sub = "abc_images" if meta.get("abcLabel") else "images"
        options = _options_block(["A.", "B.", "C.", "D."], meta["answerTexts"])
        records.append(
            {
                "id": str(meta["questionId"]),
                "image": str(folder / "ai2d_images" / sub / q["imageName"]),
                "prompt": f"{q['question']}\n{options}\n{LETTER_INSTRUCTION}",
                "question_id": meta["questionId"],
                "question": q["question"],
                "label": meta["correctAnswer"],  # the index of the right answer text
            }
        )
    return _unique_ids(records)


def load_qbench(root: Path, split: str) -> list[dict[str, Any]]:
    folder = root / "LLVisionQA-QBench"
    questions = _read_json(folder / QBENCH_FILES[split])
    records = []
    for index, q in enumerate(questions):
        path = str(q["img_path"])
        image = path if path.startswith(("http://", "https://")) else str(folder / "images" / path)
        records.append(
            {
                "id": str(index),  # Q-Bench questions carry no id: the row number in the file
                "image": image,
                "prompt": f"{q['question']}\n{_options_block(['A.', 'B.', 'C.', 'D.'], q['candidates'])}\n"
                f"{LETTER_INSTRUCTION}",
                "question": q["question"],
                "candidates": list(q["candidates"]),
                "label": q.get("correct_ans"),
                "question_type": q.get("type"),
                "concern": q.get("concern"),
            }
        )
    return records


def hallusionbench_image(folder: Path, filename: str) -> Path:
    """``hallusion_bench/<filename without './'>``; on a missing file the other case of the ``png``/``PNG``
    suffix, as the official mapper's file-name correction."""
    path = folder / "hallusion_bench" / filename[2:]
    if path.exists():
        return path
    if "png" in filename:
        return folder / "hallusion_bench" / filename[2:].replace("png", "PNG")
    return folder / "hallusion_bench" / filename[2:].replace("PNG", "png")


def load_hallusionbench(root: Path, split: str) -> list[dict[str, Any]]:
    folder = root / "HallusionBench"
    questions = _read_json(folder / "HallusionBench.json")
    records = []
    for q in questions:
        if q.get("filename") is None:  # the questions without an image are left out, as the registration does
            continue
        key = "_".join(str(q.get(k)) for k in ("category", "subcategory", "set_id", "figure_id", "question_id"))
        records.append(
            {
                "id": key,
                "image": str(hallusionbench_image(folder, q["filename"])),
                "prompt": q["question"],
                "question_id": q.get("question_id"),
                "question": q["question"],
                "category": q.get("category"),
                "subcategory": q.get("subcategory"),
                "label": str(q["gt_answer"]),
            }
        )
    return _unique_ids(records)


def load_mathvista(root: Path, split: str) -> list[dict[str, Any]]:
    folder = root / "MathVista"
    pd = import_optional("pandas", "MathVista's parquet files need pandas and pyarrow: pip install 'moai-sdk[eval]'")
    records = []
    for name in MATHVISTA_FILES[split]:
        path = folder / name
        if not path.is_file():
            raise InputError(f"{str(path)!r} not found: put MathVista's parquet files under the dataset root")
        frame = pd.read_parquet(path, engine="pyarrow")
        for raw in frame.to_dict("records"):
            record = {k: _json_safe(v) for k, v in raw.items() if k != "decoded_image"}
            records.append(
                {
                    "id": str(record["pid"]),
                    "image": str(folder / record["image"]),
                    "prompt": record["query"],  # MathVistaPipeline: the dataset's query as it is
                    "question": record.get("question"),
                    "mathvista": record,  # the fields the grader file carries (its "answer" is the ground truth)
                }
            )
    return records


def load_mmvet(root: Path, split: str) -> list[dict[str, Any]]:
    folder = root / "mm-vet"
    questions = _read_json(folder / "llava-mm-vet.json")
    # MM-Vet's own answers (for our judge; the official code only writes the grader's file)
    truth_path = folder / "mm-vet.json"
    truth = _read_json(truth_path) if truth_path.is_file() else {}
    records = []
    for q in questions:
        gt = truth.get(f"v1_{q['question_id']}", {})
        records.append(
            {
                "id": str(q["question_id"]),
                "image": str(folder / "images" / q["image"]),
                "prompt": q["text"],
                "question_id": q["question_id"],
                "question": q["text"],
                "label": gt.get("answer"),
                "capability": gt.get("capability"),
            }
        )
    return records


def _is_none(value: Any) -> bool:
    """MMBench's ``is_none``: None, NaN, or the strings 'nan' / 'none' in any case."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.lower() in ("nan", "none")


def mmbench_frame(root: Path, split: str) -> Any:
    """The split's TSV as a pandas frame, every cell text (the official ``read_table`` parses all-number option
    columns as floats and then fails to join them to the prompt; as text they join as written)."""
    pd = import_optional("pandas", "MMBench's TSV needs pandas: pip install 'moai-sdk[eval]'")
    path = root / "MMBench" / MMBENCH_FILES[split]
    if not path.is_file():
        raise InputError(f"{str(path)!r} not found: put MMBench's TSV under the dataset root")
    return pd.read_table(path, dtype=str)


def mmbench_question(row: dict[str, Any]) -> tuple[str, list[str]]:
    """The question text ``register_mmbench_datasets.py`` builds (hint, newline, question, then one
    ``"\\nA. option"`` per option A-D up to the first missing one) and the option letters used."""
    options = []
    for letter in "ABCD":
        value = row.get(letter)
        if _is_none(value):
            break
        options.append(str(value))
    question = str(row["question"])
    hint = row.get("hint")
    if not _is_none(hint):
        question = f"{hint}\n{question}"
    for letter, option in zip("ABCD", options):
        question = f"{question}\n{letter}. {option}"
    return question, list("ABCD"[: len(options)])


def load_mmbench(root: Path, split: str) -> list[dict[str, Any]]:
    frame = mmbench_frame(root, split)
    instruction = LETTER_INSTRUCTION_CN if "cn" in split else LETTER_INSTRUCTION
    records = []
    for row in frame.to_dict("records"):
        question, letters = mmbench_question(row)
        index = int(row["index"])
        payload = "".join(str(row["image"]).split())
        try:
            base64.b64decode(payload, validate=True)
        except ValueError as exc:
            raise InputError(f"MMBench row {index}: the image cell is not base64 ({exc})") from exc
        records.append(
            {
                "id": str(index),
                "image": f"data:image/jpeg;base64,{payload}",
                "prompt": f"{question}\n{instruction}",
                "question_id": index,
                "question": question.strip(),
                "letters": "".join(letters),
                "label": None if _is_none(row.get("answer")) else str(row.get("answer")),
                "category": None if _is_none(row.get("category")) else row.get("category"),
                "split": split,
            }
        )
    return records


#: The eleven benchmarks of the paper, by ``moai score`` task name.
BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("mme", "MME", "MME_Benchmark_release_version", 5, ("test",), load_mme),
        Benchmark("mmbench", "MMBench", "MMBench", 128, ("dev", "test", "dev_cn", "test_cn"), load_mmbench),
        Benchmark("seed", "SEED-Bench (image)", "SEED-Bench", 128, ("test",), load_seed),
        Benchmark("pope", "POPE", "POPE", 5, ("test",), load_pope),
        Benchmark("sqa", "ScienceQA-IMG", "ScienceQA", 128, ("test",), load_sqa),
        Benchmark("textvqa", "TextVQA", "TextVQA", 128, ("val",), load_textvqa),
        Benchmark("ai2d", "AI2D", "ai2d", 128, ("test",), load_ai2d),
        Benchmark("qbench", "Q-Bench", "LLVisionQA-QBench", 128, ("dev", "test"), load_qbench),
        Benchmark("hallusionbench", "HallusionBench", "HallusionBench", 128, ("test",), load_hallusionbench),
        Benchmark("mathvista", "MathVista", "MathVista", 128, ("testmini", "test"), load_mathvista),
        Benchmark("mmvet", "MM-Vet", "mm-vet", 128, ("test",), load_mmvet),
    )
}


def get_benchmark(name: str) -> Benchmark:
    """The benchmark named ``name`` (:class:`InputError` naming the choices otherwise)."""
    key = name.lower().replace("-", "").replace("_", "")
    aliases = {"scienceqa": "sqa", "mmvet": "mmvet", "seedbench": "seed", "hallusion": "hallusionbench"}
    key = aliases.get(key, key)
    if key not in BENCHMARKS:
        raise InputError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[key]


def load_benchmark(name: str, root: Any, split: Optional[str] = None) -> list[dict[str, Any]]:
    """The records of benchmark ``name`` read from the dataset root ``root`` (``split``: its default)."""
    bench = get_benchmark(name)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise InputError(f"the dataset root {str(root)!r} is not a folder (give the folder that holds {bench.folder}/)")
    split = split or bench.default_split
    if split not in bench.splits:
        raise InputError(f"{bench.title} has the splits {', '.join(bench.splits)}; got {split!r}")
    records = bench.loader(root, split)
    if not records:
        raise InputError(f"{bench.title}: no questions found under {str(root / bench.folder)!r}")
    logger.info("%s (%s): %d questions from %s", bench.title, split, len(records), root)
    return records


__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "get_benchmark",
    "load_benchmark",
    "LETTER_INSTRUCTION",
    "LETTER_INSTRUCTION_CN",
    "SHORT_INSTRUCTION",
    "SEED_CATEGORIES",
    "mme_ground_truth",
    "mme_gt_question",
    "mmbench_question",
    "mmbench_frame",
    "seed_options",
    "textvqa_question",
]
