"""The official MoAI scoring of the paper's benchmarks, quirks included, on an answers file's rows.

``scoring="official"`` (the default) gives the numbers the official evaluators give (``datasets/evaluation/*``,
``moai/eval/*`` of github.com/ByungKwanLee/MoAI), with their metric names and units. Where the official code
crashes we count instead, and say so in the result's ``notes``:

* MME: an answer with a newline or tab (the official file round trip breaks the line) is scored on its text; a
  missing subtask is left out of its group's sum; an odd number of questions in a subtask leaves a last
  "image" of one question (``acc_plus`` needs all of its questions right).
* POPE: a category without a positive prediction or label gets precision/recall/F1 of 0 (the official code
  divides by zero).
* SEED: an empty answer is wrong (``answer[0]`` fails); a category without questions is left out.
* AI2D: an answer without a capital letter is wrong (``findall(...)[0]`` fails).
* Q-Bench: a letter past the last option is wrong (``options[index]`` fails); an answer that is not a substring
  of "ABCD" picks the *last* option (``find`` gives -1) and an empty answer picks A (``find`` gives 0) -- kept.
* TextVQA: a question whose answers were not found, or whose text the official parser does not recognise, is
  scored against the answers found by its first line (the official code stops); any number of human answers
  is scored with the same leave-one-out formula (the official code asserts ten).

MMBench, MathVista and MM-Vet have no official score (the official code writes files for their servers and
graders): MMBench gets our circular evaluation (dev split), MathVista and MM-Vet our judge (:mod:`.judge`).

``scoring="strict"`` reads the choice a little more fairly ("(B)", "b", "B)" and "The answer is B" without a
period are understood); it is never the default.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Optional

from ..errors import InputError
from .datasets import BENCHMARKS, SEED_CATEGORIES

SCORINGS = ("official", "strict")

#: MME's subtasks per group (``mme_calculate_metrics.process_result``).
MME_GROUPS = {
    "Perception": [
        "existence",
        "count",
        "position",
        "color",
        "posters",
        "celebrity",
        "scene",
        "landmark",
        "artwork",
        "OCR",
    ],
    "Cognition": ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"],
}


def official_answer(text: Optional[str]) -> str:
    """The official pipelines' answer clean-up: the text after the last ``"assistant\\n"``, stripped, cut at
    the first ``"[UN"`` (nothing is stripped after the cut)."""
    return (text or "").split("assistant\n")[-1].strip().split("[UN")[0]


def _letter_strict(text: str, letters: str) -> Optional[str]:
    """A fair reading of the option letter: "B", "b", "(B)", "B)", "B. cat", "The answer is B"."""
    text = text.strip()
    opts = re.escape(letters)
    for pattern in (
        rf"^\(?([{opts}])(?:[).:,\s]|$)",
        rf"^\(?([{opts.lower()}])(?:[).:,\s]|$)",
        rf"(?i:answer|option|choice)\s*(?:is|:)?\s*\(?([{opts}{opts.lower()}])\b",
        rf"\(([{opts}])\)",
    ):
        match = re.search(pattern, text)
        if match:
            return match.group(1).upper()
    return None


def _first_word(text: str) -> str:
    words = re.findall(r"[a-z]+", text.lower())
    return words[0] if words else ""


# ------------------------------------------------------------------------------------------------------------
# per benchmark
# ------------------------------------------------------------------------------------------------------------


def mme_parse(answer: str) -> str:
    """``mme_calculate_metrics.parse_pred_ans`` on the lower-cased answer: "yes"/"no", else the first four
    characters decide ("yes" checked first), else "other"."""
    pred = answer.lower()
    if pred in ("yes", "no"):
        return pred
    prefix = pred[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def score_mme(rows: list[dict[str, Any]], strict: bool, notes: list[str]) -> tuple[dict, dict]:
    by_task: dict[str, list[tuple[str, str]]] = OrderedDict()
    odd_text = 0
    for row in rows:
        answer = official_answer(row.get("answer"))
        odd_text += "\n" in answer or "\t" in answer
        if strict:
            word = _first_word(answer)
            pred = word if word in ("yes", "no") else "other"
        else:
            pred = mme_parse(answer)
        label = str(row["label"]).lower()
        if label not in ("yes", "no"):
            raise InputError(f"MME labels are 'yes' or 'no'; row {row.get('id')!r} has {row['label']!r}")
        task = row.get("mme_task") or str(row.get("question_id", row.get("id"))).split("/")[0]
        by_task.setdefault(task, []).append((label, pred))
    if odd_text:
        notes.append(f"{odd_text} MME answer(s) hold a newline or tab: scored on their text (the official code fails)")
    categories: dict[str, dict[str, float]] = {}
    metrics: dict[str, float] = {}
    for group, tasks in MME_GROUPS.items():
        total = 0.0
        present = [t for t in tasks if t in by_task]
        for task in present:
            pairs = by_task[task]
            acc = sum(gt == pred for gt, pred in pairs) / len(pairs)
            # questions pair up per image in file order (two per image); a trailing single is its own image
            chunks = [pairs[i : i + 2] for i in range(0, len(pairs), 2)]
            if len(pairs) % 2:
                notes.append(f"MME {task}: odd number of questions; the last one is an image of its own")
            acc_plus = sum(all(gt == pred for gt, pred in chunk) for chunk in chunks) / len(chunks)
            score = acc * 100 + acc_plus * 100
            categories[task] = {
                "acc": acc,
                "acc_plus": acc_plus,
                "score": score,
                "other_num": sum(pred == "other" for _, pred in pairs),
                "n": len(pairs),
            }
            total += score
        missing = [t for t in tasks if t not in by_task]
        if missing and present:
            notes.append(f"MME {group}: subtask(s) {', '.join(missing)} missing, left out of the sum")
        if present:
            metrics[group] = total
    unknown = [t for t in by_task if all(t not in ts for ts in MME_GROUPS.values())]
    if unknown:
        notes.append(f"MME subtask(s) {', '.join(unknown)} are not in the official lists: not summed")
    return metrics, categories


def pope_yes_no(answer: str) -> str:
    """POPE's reading (``eval_pope``): lower case, first sentence, commas dropped, split on spaces; "no" or
    "not" among the words means no, anything else yes."""
    text = answer.lower()
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _pope_metrics(pairs: list[tuple[str, str]], notes: list[str], category: str) -> dict[str, float]:
    tp = fp = tn = fn = 0
    for pred, label in pairs:
        positive_label = label != "no"  # the official code maps every label but "no" to 1
        if pred == "yes":
            tp, fp = tp + positive_label, fp + (not positive_label)
        else:
            tn, fn = tn + (not positive_label), fn + positive_label
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    if not (tp + fp and tp + fn and precision + recall):
        notes.append(f"POPE {category}: a zero denominator (the official code fails); counted as 0")
    n = len(pairs)
    return {
        "accuracy": (tp + tn) / n,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n,
    }


def score_pope(rows: list[dict[str, Any]], strict: bool, notes: list[str]) -> tuple[dict, dict]:
    categories: dict[str, dict[str, float]] = {}
    unlabelled = 0
    for category in ("adversarial", "popular", "random"):
        mine = [r for r in rows if r.get("category") == category]
        pairs = []
        for row in mine:
            if row.get("label") is None:
                unlabelled += 1
                continue
            answer = official_answer(row.get("answer"))
            if strict:
                word = _first_word(answer)
                pred = "no" if word == "no" else ("yes" if word == "yes" else pope_yes_no(answer))
            else:
                pred = pope_yes_no(answer)
            pairs.append((pred, str(row["label"]).lower()))
        if pairs:
            categories[category] = {**_pope_metrics(pairs, notes, category), "n": len(pairs)}
    if unlabelled:
        notes.append(f"{unlabelled} POPE question(s) without a label (past the label file's end) not scored")
    others = {r.get("category") for r in rows} - {"adversarial", "popular", "random"}
    if others:
        notes.append(f"POPE categories {sorted(map(str, others))} are not official: not scored")
    metrics: dict[str, float] = {}
    for category, values in categories.items():
        for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            metrics[f"{category}/{key}"] = values[key]
    return metrics, categories


SQA_OPTIONS = ["A", "B", "C", "D", "E"]


def sqa_letter(answer: str) -> str:
    """ScienceQA's parse: exactly a letter A-E, or "X. ..." , or exactly one match of ``The answer is ([A-Z]).``
    (the ``.`` matches any character, so "The answer is C" at the very end does not match); else "FAILED"."""
    if answer in SQA_OPTIONS:
        return answer
    if len(answer) >= 3 and answer[0] in SQA_OPTIONS and answer[1:3] == ". ":
        return answer[0]
    found = re.findall(r"The answer is ([A-Z]).", answer)
    return found[0] if len(found) == 1 else "FAILED"


def score_sqa(rows: list[dict[str, Any]], strict: bool, notes: list[str]) -> tuple[dict, dict]:
    correct = total = mm_correct = mm_total = 0
    for row in rows:
        if row.get("label") is None:
            continue  # not in problems.json: the official loop never visits it
        answer = official_answer(row.get("answer")).strip()
        n_choices = int(row.get("n_choices") or 0)
        letter = _letter_strict(answer, "ABCDE") if strict else sqa_letter(answer)
        index = SQA_OPTIONS.index(letter) if letter in SQA_OPTIONS[:n_choices] else -1
        ok = index == int(row["label"])
        correct += ok
        total += 1
        if "<image>" in str(row.get("question", "")):
            mm_correct += ok
            mm_total += 1
    if not total:
        raise InputError("ScienceQA: no row with a label (problems.json answer) to score")
    metrics = {
        "accuracy": correct / total * 100,
        "image_accuracy": mm_correct / mm_total * 100 if mm_total else 0.0,
        "correct": correct,
        "count": total,
    }
    return metrics, {}


# -- TextVQA: the EvalAI answer processor (m4c_evaluator.EvalAIAnswerProcessor) -----------------------------

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = ("a", "an", "the")
# The official pattern: "(?!<=\d)" is a look-AHEAD for the text "<=" + digit (a typo for a look-behind), so a
# period right after a digit is stripped too ("5." -> "5"). Kept for official scoring; strict fixes it.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_STRIP_FIXED = re.compile(r"(?<!\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
_PUNCTUATIONS = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]  # fmt: skip


def vqa_normalize(text: str, fixed_periods: bool = False) -> str:
    """The EvalAI/M4C answer normalisation: lower case, ``,``/``?`` dropped, ``'s`` split, punctuation,
    periods (see ``_PERIOD_STRIP``; the official call passes ``re.UNICODE`` as the *count*, so at most 32
    periods go -- kept), number words to digits, articles dropped, contractions restored."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCTUATIONS:
        if (p + " " in text or " " + p in text) or (re.search(_COMMA_STRIP, text) is not None):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    if fixed_periods:
        out = _PERIOD_STRIP_FIXED.sub("", out)
    else:
        out = _PERIOD_STRIP.sub("", out, re.UNICODE)
    words = []
    for word in out.lower().split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(word)
    words = [_CONTRACTIONS.get(w, w) for w in words]
    return " ".join(words)


def textvqa_soft_scores(gt_answers: Sequence[str], fixed_periods: bool = False) -> dict[str, float]:
    """The VQA soft score of each distinct human answer: mean over leave-one-out subsets of min(1, matches/3)."""
    answers = [vqa_normalize(a, fixed_periods) for a in gt_answers]
    scores: dict[str, float] = {}
    for unique in set(answers):
        accs = []
        for i in range(len(answers)):
            others = [a for j, a in enumerate(answers) if j != i]
            accs.append(min(1.0, sum(a == unique for a in others) / 3))
        scores[unique] = sum(accs) / len(accs)
    return scores


def score_textvqa(rows: list[dict[str, Any]], strict: bool, notes: list[str]) -> tuple[dict, dict]:
    total = 0.0
    n = missing = 0
    for row in rows:
        gts = row.get("gt_answers")
        if not gts:
            missing += 1
            continue
        pred = vqa_normalize(official_answer(row.get("answer")).strip().lower(), strict)
        total += textvqa_soft_scores(gts, strict).get(pred, 0.0)
        n += 1
    if missing:
        notes.append(f"{missing} TextVQA question(s) without human answers not scored (the official code fails)")
    if not n:
        raise InputError("TextVQA: no row with human answers (gt_answers) to score")
    return {"accuracy": 100.0 * total / n}, {}


def score_seed(rows: list[dict[str, Any]], strict: bool, notes: list[str]) -> tuple[dict, dict]:
    per = {name: [0, 0] for name in SEED_CATEGORIES.values()}
    correct = empty = 0
    for row in rows:
        answer = official_answer(row.get("answer"))
        if strict:
            letter = _letter_strict(answer, "ABCDE") or ""
        else:
            empty += not answer
            letter = answer[0].upper() if answer else ""
        ok = letter == str(row["label"])
        category = SEED_CATEGORIES.get(row.get("question_type_id"), str(row.get("category")))
        counts = per.setdefault(category, [0, 0])
        counts[0] += ok
        counts[1] += 1
        correct += ok
    if empty:
        notes.append(f"{empty} empty SEED answer(s) counted wrong (the official code fails on them)")
    categories = {name: {"accuracy": c / t * 100, "n": t} for name, (c, t) in per.items() if t}
    return {"accuracy": correct / len(rows) * 100}, categories


def score_ai2d(rows: list[dict[str, Any]], strict: bool, notes: list[str]) -> tuple[dict, dict]:
    correct = no_capital = 0
    for row in rows:
        answer = official_answer(row.get("answer"))
        if strict:
            letter = _letter_strict(answer, "ABCD")
        else:
            found = re.findall(r"[A-Z]", answer)  # the first capital letter anywhere, as the official evaluator
            letter = found[0] if found else None
            no_capital += letter is None
        correct += letter is not None and ord(letter.upper()) - ord("A") == int(row["label"])
    if no_capital:
        notes.append(f"{no_capital} AI2D answer(s) without a capital letter counted wrong (the official code fails)")
    return {"accuracy": correct / len(rows) * 100}, {}


def score_qbench(rows: list[dict[str, Any]], strict: bool, notes: list[str]) -> tuple[dict, dict]:
    correct = past = 0
    for row in rows:
        answer = official_answer(row.get("answer")).strip()
        options = list(row.get("candidates") or [])
        if strict:
            letter = _letter_strict(answer, "ABCD")
            index = "ABCD".find(letter) if letter else len(options)
        else:
            index = "ABCD".find(answer)  # -1 (not found) indexes the last option, "" gives 0: both kept
        if index >= len(options) or -index > len(options):
            past += not strict
            continue
        correct += str(options[index]).lower() == str(row["label"]).lower()
    if past:
        notes.append(f"{past} Q-Bench letter(s) past the last option counted wrong (the official code fails)")
    return {"accuracy": correct / len(rows) * 100}, {}


def hallusion_binary(answer: str) -> str:
    """HallusionBenchPipeline's reading: "1" when "yes" occurs anywhere in the lower-cased answer (also inside
    a word, e.g. "eyes"), else "0"."""
    return "1" if answer.lower().find("yes") != -1 else "0"


def score_hallusionbench(rows: list[dict[str, Any]], strict: bool, notes: list[str]) -> tuple[dict, dict]:
    correct = 0
    for row in rows:
        answer = official_answer(row.get("answer"))
        pred = ("1" if _first_word(answer) == "yes" else "0") if strict else hallusion_binary(answer)
        correct += pred == str(row["label"])
    return {"accuracy": correct / len(rows) * 100}, {}  # printed as "aAcc" by the official code


def mmbench_letter(answer: str, letters: str) -> Optional[str]:
    """Our MMBench reading (the official code scores nothing): the answer's option letter, as strict."""
    return _letter_strict(answer, letters or "ABCD")


def score_mmbench(rows: list[dict[str, Any]], strict: bool, notes: list[str]) -> tuple[dict, dict]:
    """Ours, not the MoAI code's: MMBench's circular evaluation -- rows whose ``index`` agree modulo 10^6 are
    one question with its options rotated; it counts as right only if every rotation is right. Also the plain
    per-row accuracy. Needs the dev split (the test split has no answers)."""
    labelled = [r for r in rows if r.get("label") is not None]
    if not labelled:
        raise InputError("MMBench: no answers in this split (test has none): score the dev split, or send the .xlsx")
    groups: dict[int, list[bool]] = OrderedDict()
    per_category: dict[str, list[bool]] = {}
    for row in labelled:
        ok = mmbench_letter(official_answer(row.get("answer")), str(row.get("letters") or "ABCD")) == row["label"]
        groups.setdefault(int(row["question_id"]) % 1_000_000, []).append(ok)
        per_category.setdefault(str(row.get("category")), []).append(ok)
    notes.append("MMBench: circular evaluation on the dev split is ours (the official code only writes the .xlsx)")
    circular = sum(all(v) for v in groups.values()) / len(groups) * 100
    plain = sum(sum(v) for v in groups.values()) / len(labelled) * 100
    categories = {c: {"accuracy": sum(v) / len(v) * 100, "n": len(v)} for c, v in per_category.items()}
    return {"circular_accuracy": circular, "accuracy": plain, "questions": len(groups)}, categories


def score_judged(rows: list[dict[str, Any]], strict: bool, notes: list[str], task: str) -> tuple[dict, dict]:
    """MathVista / MM-Vet from a judged answers file (``judge_score`` / ``judge_correct`` columns)."""
    if task == "mmvet":
        scored = [r for r in rows if r.get("judge_score") is not None]
        if not scored:
            raise InputError("MM-Vet has no official score: run moai eval/score with --judge-url to grade it")
        notes.append("MM-Vet: scored by our judge (the official code writes the grader's file only)")
        per: dict[str, list[float]] = {}
        for r in scored:
            for cap in r.get("capability") or []:
                per.setdefault(cap, []).append(float(r["judge_score"]))
        total = sum(float(r["judge_score"]) for r in scored) / len(scored) * 100
        cats = {c: {"score": sum(v) / len(v) * 100, "n": len(v)} for c, v in per.items()}
        return {"total": total}, cats
    scored = [r for r in rows if r.get("judge_correct") is not None]
    if not scored:
        raise InputError("MathVista has no official score: run moai eval/score with --judge-url to grade it")
    notes.append("MathVista: scored by our judge (the official code writes the grader's file only)")
    return {"accuracy": sum(bool(r["judge_correct"]) for r in scored) / len(scored) * 100}, {}


_SCORERS = {
    "mme": score_mme,
    "pope": score_pope,
    "sqa": score_sqa,
    "textvqa": score_textvqa,
    "seed": score_seed,
    "ai2d": score_ai2d,
    "qbench": score_qbench,
    "hallusionbench": score_hallusionbench,
    "mmbench": score_mmbench,
}

#: Which tasks the official code scores itself.
OFFICIALLY_SCORED = tuple(_SCORERS.keys() - {"mmbench"})


def score_benchmark(rows: Sequence[dict[str, Any]], task: str, scoring: str = "official") -> dict[str, Any]:
    """The ``task`` metrics of an answers file's rows: ``{"task", "n", "scoring", "metrics", "categories",
    "skipped", "notes"}``. Rows with an ``error`` are not scored (``skipped``)."""
    if task not in BENCHMARKS:
        raise InputError(f"unknown task {task!r}; choose one of {', '.join(BENCHMARKS)}")
    if scoring not in SCORINGS:
        raise InputError(f"--scoring is 'official' or 'strict'; got {scoring!r}")
    usable = [dict(r) for r in rows if r.get("error") is None]
    skipped = len(rows) - len(usable)
    if not usable:
        raise InputError("no rows to score: the answers file has no rows without an error")
    notes: list[str] = []
    if task in ("mathvista", "mmvet"):
        metrics, categories = score_judged(usable, scoring == "strict", notes, task)
    else:
        need = {"sqa": "label", "textvqa": "gt_answers"}.get(task, "label")
        if task not in ("sqa", "textvqa", "pope") and any(need not in r for r in usable):
            raise InputError(f"{task}: the answers file has no {need!r} column (write it with moai eval)")
        try:
            metrics, categories = _SCORERS[task](usable, scoring == "strict", notes)
        except (KeyError, ValueError, TypeError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(
                f"the answers file does not fit {task}: {type(exc).__name__}: {exc} (write it with moai eval {task})"
            ) from exc
    result: dict[str, Any] = {"task": task, "n": len(usable), "scoring": scoring, "metrics": metrics}
    if categories:
        result["categories"] = categories
    result["skipped"] = skipped
    result["notes"] = notes
    return result


def format_result(result: dict[str, Any]) -> str:
    """A text table of :func:`score_benchmark`'s result."""
    lines = [f"{result['task']} ({result['scoring']} scoring, n={result['n']})"]
    rows = [(k, v) for k, v in result["metrics"].items()]
    for name, values in (result.get("categories") or {}).items():
        rows += [(f"{name}/{k}", v) for k, v in values.items() if f"{name}/{k}" not in result["metrics"]]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {shown}")
    lines += [f"note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines)


__all__ = [
    "SCORINGS",
    "OFFICIALLY_SCORED",
    "MME_GROUPS",
    "official_answer",
    "mme_parse",
    "pope_yes_no",
    "sqa_letter",
    "vqa_normalize",
    "textvqa_soft_scores",
    "hallusion_binary",
    "score_benchmark",
    "format_result",
]
