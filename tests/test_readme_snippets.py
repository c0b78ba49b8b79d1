"""Every ```python block of README.md, read from the file at test time and run on the tiny offline MoAI.

What the test changes in a block, and why (only what cannot run on a CPU machine without the Hub):

* the Hub id ``BK-Lee/MoAI-7B`` becomes a tiny MoAI checkpoint folder (:func:`moai_sdk.testing.build_tiny_moai`),
  and the default experts (Hub checkpoints) become the tiny random ones (:func:`~moai_sdk.testing.build_tiny_experts`,
  the real offline RapidOCR); CUDA-only options stay as written (``quantization="nf4"`` is dropped on CPU by the
  pipeline, which logs it);
* it runs in an empty folder where every image file name the block reads (``"street.jpg"``, ...) is a small
  synthetic picture, and every image the block writes (``.save("gates.png")``) must exist afterwards;
* names a block uses as context without defining them (``pipe``, ``image``, ``prompt``, ``perception``: the
  README's "given these" placeholders) are supplied (:data:`GIVEN`); any other free name fails the test;
* ``max_new_tokens=N`` is capped at a few tokens, and pipelines generate a few tokens by default (runtime only).

A block that cannot run here by nature is marked in README.md on the line just before its fence:

* ``<!-- readme-test: skip REASON -->`` -- not run, for the stated reason;
* ``<!-- readme-test: elsewhere tests/FILE.py::TEST -->`` -- run by that test (e.g. against a live server), which
  must exist and read README.md itself.

:func:`test_every_block_is_run_or_accounted_for` counts the fences, so a block can never go untested silently; a
new block without a marker is run.
"""

from __future__ import annotations

import ast
import builtins
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest
from PIL import Image

from moai_sdk import MoAIPipeline
from moai_sdk.experts import selection
from moai_sdk.testing import build_tiny_experts, build_tiny_moai, demo_image

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
HUB_ID = "BK-Lee/MoAI-7B"
FENCE = "```python"
PYTHONISH = re.compile(r"^\s*```\s*(python|py|python3|pycon)\s*$", re.IGNORECASE)  # what a reader takes for Python
MARKER = re.compile(r"^<!--\s*readme-test:\s*(?P<kind>\S+)\s*(?P<detail>.*?)\s*-->$")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
WRITERS = ("save", "savefig")  # method calls whose string argument is a file the block writes
MAX_NEW_TOKENS = 4  # runtime cap: the tiny model's answers are random tokens, a few show the plumbing


@dataclass(frozen=True)
class Block:
    """One ```python block of the README: its first code line, section, code and marker (if any)."""

    line: int
    section: str
    code: str
    kind: Optional[str] = None  # None (run), "skip" or "elsewhere"
    detail: str = ""

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.section.lower()).strip("-")[:40]
        return f"L{self.line}-{slug}"


def parse_readme(text: str) -> list[Block]:
    """The ```python blocks of ``text`` with the marker comment on the last non-blank line before each fence."""
    lines = text.splitlines()
    blocks: list[Block] = []
    section, in_other_block, i = "top", False, 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped == FENCE:
            start = i + 1
            end = next((j for j in range(start, len(lines)) if lines[j].strip() == "```"), None)
            if end is None:
                raise AssertionError(f"README.md:{i + 1}: the ```python block is never closed")
            before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            match = MARKER.match(before)
            kind, detail = (match["kind"], match["detail"]) if match else (None, "")
            blocks.append(Block(start + 1, section, "\n".join(lines[start:end]) + "\n", kind, detail))
            i = end + 1
            continue
        if stripped.startswith("```"):
            in_other_block = not in_other_block
        elif lines[i].startswith("#") and not in_other_block:  # a heading, not a comment in a bash block
            section = lines[i].lstrip("#").strip()
        i += 1
    return blocks


BLOCKS = parse_readme(README.read_text(encoding="utf-8"))
RUN = [b for b in BLOCKS if b.kind is None]


def test_every_block_is_run_or_accounted_for():
    text = README.read_text(encoding="utf-8")
    fences = [n for n, line in enumerate(text.splitlines(), 1) if PYTHONISH.match(line)]
    assert [b.line - 1 for b in BLOCKS] == fences, "a Python block was not parsed: open Python blocks with ```python"
    assert len(RUN) + sum(b.kind in ("skip", "elsewhere") for b in BLOCKS) == len(fences)
    assert RUN, "no README block is run here"
    # every marker in the README is a known kind with a reason and sits right before a python block
    markers = [n for n, line in enumerate(text.splitlines(), 1) if MARKER.match(line.strip())]
    assert len(markers) == sum(b.kind is not None for b in BLOCKS), "a readme-test marker is not before a block"
    for block in BLOCKS:
        if block.kind is None:
            continue
        assert block.kind in ("skip", "elsewhere"), f"README.md:{block.line}: unknown marker {block.kind!r}"
        assert len(block.detail) >= 10, f"README.md:{block.line}: a {block.kind} marker must say why / where"
        if block.kind == "elsewhere":
            path, _, name = block.detail.partition("::")
            source = (REPO / path).read_text(encoding="utf-8")
            assert f"def {name}(" in source, f"README.md:{block.line}: {block.detail} does not exist"
            assert "README.md" in source, f"{path} must read the block from README.md, not retype it"


def test_parser_sees_markers_and_headings():
    text = "# A\n\n<!-- readme-test: skip needs a GPU here -->\n```python\nx = 1\n# not a heading\n```\n## B\n" + (
        "```python\ny = 2\n```\n"
    )
    first, second = parse_readme(text)
    assert (first.line, first.section, first.kind, first.detail, first.code) == (
        5,
        "A",
        "skip",
        "needs a GPU here",
        "x = 1\n# not a heading\n",
    )
    assert (second.section, second.kind, second.code) == ("B", None, "y = 2\n")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.getbasetemp() / "moai-sdk-tiny"  # shared with tests/test_examples.py
    build_tiny_moai(root / "moai")
    build_tiny_experts(root / "experts")
    return root


def _strings(tree: ast.AST) -> tuple[set[str], set[str]]:
    """The file names a block reads and writes: image-suffixed string constants, split by whether they are the
    argument of a ``.save(...)`` call."""
    written = {
        arg.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in WRITERS
        for arg in node.args
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
    }
    named = {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.lower().endswith(IMAGE_SUFFIXES)
    }
    return named - written, written


def _free_names(tree: ast.AST) -> set[str]:
    """Names a block reads but never binds (nor imports), builtins aside."""
    bound, loaded = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return loaded - bound - set(dir(builtins))


def _given(names: set[str], model_dir: Path) -> dict[str, Any]:
    """Values for the README's context names a block uses without defining them: the pipeline of the README's
    first block, a picture, a question and that picture's perception."""
    values: dict[str, Any] = {"image": demo_image("MOAI", (320, 240)), "prompt": "What is written here?"}
    if names & {"pipe", "perception"}:
        values["pipe"] = MoAIPipeline.from_pretrained(str(model_dir))
    if "perception" in names:
        values["perception"] = values["pipe"].perceive(values["image"])
    return {k: values[k] for k in names}


GIVEN = ("pipe", "image", "prompt", "perception")


@pytest.fixture(scope="module")
def tiny_experts(tiny_root) -> dict[str, Any]:
    """The tiny experts by task, built once: every block's pipeline shares them (their weights load once)."""
    return selection.resolve_experts(build_tiny_experts(tiny_root / "experts"), device="cpu")


@pytest.fixture
def offline_readme(tiny_root, tiny_experts, tmp_path, monkeypatch):
    """The tiny stand-ins for the Hub's checkpoints, a few tokens per answer, and an empty working folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for task, expert in tiny_experts.items():  # the default experts, ``experts="default"``, are these
        monkeypatch.setitem(selection.DEFAULT_EXPERTS, task, expert)
    real_init = MoAIPipeline.__init__

    @functools.wraps(real_init)
    def few_tokens(self, *args, **kwargs):
        kwargs.setdefault("generation_config", {"max_new_tokens": MAX_NEW_TOKENS})
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(MoAIPipeline, "__init__", few_tokens)
    monkeypatch.chdir(tmp_path)
    return tiny_root / "moai"


@pytest.mark.parametrize("block", RUN, ids=[b.id for b in RUN])
def test_readme_block_runs(block, offline_readme, tmp_path, capsys):
    code = block.code.replace(HUB_ID, str(offline_readme))
    code = re.sub(r"max_new_tokens=\d+", f"max_new_tokens={MAX_NEW_TOKENS}", code)
    tree = ast.parse(code, filename="README.md")
    reads, writes = _strings(tree)
    free = _free_names(tree)
    unknown = free - set(GIVEN)
    assert not unknown, f"README.md:{block.line} uses {sorted(unknown)} without defining them (define them there)"
    for name in reads:
        demo_image(Path(name).stem.upper()[:8] or "MOAI", (320, 240)).save(tmp_path / name)
    namespace = {"__name__": "__readme__", **_given(free, offline_readme)}
    exec(
        compile(code, f"README.md:{block.line}", "exec", dont_inherit=True), namespace
    )  # as a script: no __future__ flags of this module
    for name in writes:
        with Image.open(tmp_path / name) as written:
            assert written.size[0] > 0 and written.size[1] > 0
    if any(isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print" for n in ast.walk(tree)):
        assert capsys.readouterr().out.strip(), f"README.md:{block.line} prints nothing"
