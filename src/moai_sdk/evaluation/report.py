"""``--report report.md``: every metric next to the paper's published MoAI-7B number, and a bar chart PNG.

The published numbers are Table 1 of the MoAI paper (Lee et al., "MoAI: Mixture of All Intelligence for Large
Language and Vision Models", arXiv:2403.07508), repeated in the official README: Q-Bench 70.2, SQA-IMG 83.5,
TextVQA 67.8, POPE 87.1, MME-P 1714, MME-C 561, MMBench 79.3, MMBench-CN 76.5, MM-Vet 43.7. SEED-Bench, AI2D,
HallusionBench and MathVista have no number in that table: their column shows "--".

Which of our metrics each compares with: MME ``Perception`` / ``Cognition``; POPE the mean of the three
categories' F1 (in percent); SQA-IMG ``image_accuracy``; TextVQA, Q-Bench ``accuracy``; MM-Vet the judge's
``total``; MMBench our ``circular_accuracy`` -- the paper's MMBench numbers are the test server's (test split),
so a dev-split number is marked as not comparable.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from ..errors import import_optional

PAPER_CITATION = (
    "MoAI paper, Table 1 (Lee et al., arXiv:2403.07508), as in the official README of github.com/ByungKwanLee/MoAI"
)
#: (task, metric) -> the published MoAI-7B number.
PAPER_NUMBERS: dict[tuple[str, str], float] = {
    ("qbench", "accuracy"): 70.2,
    ("sqa", "image_accuracy"): 83.5,
    ("textvqa", "accuracy"): 67.8,
    ("pope", "mean_f1"): 87.1,
    ("mme", "Perception"): 1714.0,
    ("mme", "Cognition"): 561.0,
    ("mmbench", "circular_accuracy"): 79.3,
    ("mmbench_cn", "circular_accuracy"): 76.5,
    ("mmvet", "total"): 43.7,
}


def _rows_of(result: dict[str, Any]) -> list[tuple[str, str, float, Optional[float], str]]:
    """(benchmark, metric, ours, paper, remark) for one :func:`score_benchmark` result."""
    task = result["task"]
    split = result.get("split", "")
    metrics = dict(result["metrics"])
    if task == "pope" and result.get("categories"):
        f1s = [v["f1"] for v in result["categories"].values()]
        metrics["mean_f1"] = 100.0 * sum(f1s) / len(f1s)
    key = "mmbench_cn" if task == "mmbench" and "cn" in split else task
    out = []
    for metric, value in metrics.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        paper = PAPER_NUMBERS.get((key, metric))
        remark = ""
        if task == "mmbench" and paper is not None and not split.startswith("test"):
            remark = "ours on dev; the paper's is the test server's"
        out.append((task if key == task else key, metric, float(value), paper, remark))
    return out


def write_report(results: Sequence[dict[str, Any]], path: Any, *, chart: bool = True) -> dict[str, Path]:
    """Write the Markdown report to ``path`` and (``chart``) a bar chart PNG beside it (``<stem>.png``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = [row for result in results for row in _rows_of(result)]
    lines = [
        "# MoAI-7B benchmark report",
        "",
        f"Published numbers: {PAPER_CITATION}. `--` : the table has no number for it.",
        "",
        "| benchmark | metric | ours | paper (MoAI-7B) | remark |",
        "|---|---|---:|---:|---|",
    ]
    for bench, metric, ours, paper, remark in table:
        shown_paper = "--" if paper is None else f"{paper:g}"
        lines.append(f"| {bench} | {metric} | {ours:.2f} | {shown_paper} | {remark} |")
    for result in results:
        info = f"- {result['task']}: n={result['n']}, scoring={result['scoring']}"
        if result.get("split"):
            info += f", split={result['split']}"
        lines.append(info)
        lines += [f"  - {note}" for note in result.get("notes", [])]
    written = {"report": path}
    if chart:
        png = path.with_suffix(".png")
        _bar_chart([r for r in table if r[3] is not None] or table, png)
        lines += ["", f"![ours vs paper]({png.name})"]
        written["chart"] = png
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return written


def _bar_chart(rows: list[tuple[str, str, float, Optional[float], str]], png: Path) -> None:
    matplotlib = import_optional("matplotlib", "the report's chart needs matplotlib: pip install 'moai-sdk[eval]'")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{b}\n{m}" for b, m, *_ in rows]
    ours = [r[2] for r in rows]
    paper = [r[3] if r[3] is not None else 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(rows)), 3.6))
    xs = list(range(len(rows)))
    ax.bar([x - 0.2 for x in xs], ours, width=0.4, label="ours")
    ax.bar([x + 0.2 for x in xs], paper, width=0.4, label="paper (MoAI-7B)")
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=7)
    if any(v > 200 for v in ours + paper):
        ax.set_yscale("symlog")  # MME's scores (0-2000) next to percentages
    ax.legend(fontsize=7)
    ax.set_title("MoAI-7B: ours vs published")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


__all__ = ["PAPER_NUMBERS", "PAPER_CITATION", "write_report"]
