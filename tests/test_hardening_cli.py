"""The CLI refuses unusable arguments before any work: output paths, URLs without --allow-remote; task names work."""

from __future__ import annotations

import pytest

from moai_sdk import cli
from moai_sdk.cli_options import parse_experts
from moai_sdk.experts.selection import resolve_experts


@pytest.fixture
def no_work(monkeypatch):
    """Fail if a pipeline or the tiny demo model is built."""

    def boom(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(cli, "_pipeline_from_args", boom)
    monkeypatch.setattr(cli, "tiny_pipeline", boom)


@pytest.fixture
def image(tmp_path):
    from PIL import Image

    path = tmp_path / "in.png"
    Image.new("RGB", (8, 8)).save(path)
    return str(path)


@pytest.mark.parametrize(
    "plot, message",
    [
        ("{tmp}/missing/out.png", "does not exist; create it first"),
        ("{tmp}", "is a folder"),
        ("{tmp}/out.xyz", ".xyz is not a picture format"),
    ],
)
@pytest.mark.parametrize("command", ["run", "perceive", "demo"])
def test_bad_output_paths_are_refused_before_any_work(no_work, image, tmp_path, capsys, command, plot, message):
    args = {"run": ["run", image, "What?"], "perceive": ["perceive", image], "demo": ["demo"]}[command]
    status = cli.main([*args, "--plot", plot.format(tmp=tmp_path)])
    err = capsys.readouterr().err
    assert status == 1 and message in err and err.count("\n") == 1  # one line


def test_a_url_needs_allow_remote_and_is_not_called_a_missing_file(no_work, capsys):
    status = cli.main(["run", "https://example.com/street.jpg", "What does the sign say?"])
    err = capsys.readouterr().err
    assert status == 1 and "is a URL; pass --allow-remote" in err and "not found" not in err


def test_a_too_long_path_is_an_input_error(no_work, capsys):
    assert cli.main(["perceive", "x" * 5000 + ".png"]) == 1
    assert "error:" in capsys.readouterr().err


def test_task_names_pick_the_default_backend():
    experts = resolve_experts(parse_experts("ocr,detection"))
    assert {task: e.name for task, e in experts.items()} == {"ocr": "rapidocr", "detection": "owlv2"}
