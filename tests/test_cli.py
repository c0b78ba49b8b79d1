"""The `moai` command line, through subprocesses (and in-process where the Hub must be faked)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from moai_sdk import MoAIResult, PerceptionResult
from moai_sdk.testing import build_tiny_experts, build_tiny_moai, demo_image


def moai_command() -> list[str]:
    script = Path(sys.executable).parent / ("moai.exe" if os.name == "nt" else "moai")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "moai_sdk.cli"]


def run(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "2"}
    return subprocess.run([*moai_command(), *args], capture_output=True, text=True, timeout=timeout, env=env)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


_PROGRESS_BAR = re.compile(r"^[^|]*\d+%\|.*\| *\d+/\d+ \[")  # tqdm: "Loading weights: 100%|███| 66/66 [00:00<...]"


def foreign_lines(stderr: str) -> list[str]:
    """The stderr lines that are neither ours (``moai...``: the command's own lines and moai_sdk's loggers) nor a
    progress bar: third-party warnings and log records (torch's ``W1208 ... _pytree.py`` lines, Python warnings)."""
    pieces = (piece.strip() for line in stderr.splitlines() for piece in line.split("\r"))
    return [p for p in pieces if p and not p.startswith("moai") and not _PROGRESS_BAR.match(p)]


def test_foreign_lines_keeps_ours_and_progress_bars_and_reports_the_rest():
    torch_notice = (
        "W1208 01:25:21.567000 9199 torch/utils/_pytree.py:630] <enum 'KernelPreference'> is an Enum subclass and is "
        "now natively supported by torch.compile as an opaque value type."
    )
    py_warning = "/x/site-packages/foo.py:3: FutureWarning: `bar` is deprecated"
    stderr = (
        "moai demo: a tiny randomly initialised MoAI\n"
        f"{torch_notice}\n"
        "\rLoading weights:   0%|          | 0/66 [00:00<?, ?it/s]\rLoading weights: 100%|##########| 66/66 [00:00<00:00]\n"
        "moai: WARNING: scene graph expert not configured\n"
        f"{py_warning}\n"
    )
    assert foreign_lines(stderr) == [torch_notice, py_warning]


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "moai-sdk-tiny"
    build_tiny_moai(root / "moai")
    build_tiny_experts(root / "experts")
    return root


@pytest.fixture(scope="module")
def text_image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "text.png"
    demo_image("MOAI").save(path)
    return path


def test_demo_prints_a_typed_result_and_writes_the_picture(tmp_path):
    picture = tmp_path / "demo.png"
    proc = run("demo", "--json", "--plot", str(picture), "--max-new-tokens", "4", "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 0, proc.stderr
    result = MoAIResult.from_json(proc.stdout)
    assert result.perception is not None and result.aux_text.endswith("The image includes text descriptions: MOAI.")
    assert 1 <= result.token_counts["generated"] <= 4
    assert "random" in proc.stderr  # the demo says its answer is random tokens
    assert Image.open(picture).size == (490, 490)
    assert foreign_lines(proc.stderr) == []  # no third-party warnings (torchao's pytree notices) between our lines


def test_perceive_json_reads_rendered_text(text_image):
    proc = run("perceive", str(text_image), "--experts", "rapidocr", "--json")
    assert proc.returncode == 0, proc.stderr
    result = PerceptionResult.from_json(proc.stdout)
    assert result.sources == {"ocr": "rapidocr"}
    assert [line.text for line in result.text_lines] == ["MOAI"]
    assert result.text_lines[0].confidence > 0.85
    assert (result.image_width, result.image_height) == (640, 480)
    assert proc.stderr.count("scene graph expert not configured") == 1  # warned once, not by every layer


def test_run_on_the_tiny_model_streams_and_prints_json(tiny_root, text_image, tmp_path):
    picture = tmp_path / "run.png"
    proc = run(
        "run",
        str(text_image),
        "What does it say?",
        "--model",
        str(tiny_root / "moai"),
        "--device",
        "cpu",
        "--quantization",
        "none",
        "--experts",
        "rapidocr",
        "--max-new-tokens",
        "5",
        "--json",
        "--stream",
        "--plot",
        str(picture),
        "--local-files-only",
    )
    assert proc.returncode == 0, proc.stderr
    result = MoAIResult.from_json(proc.stdout)
    assert result.prompt == "What does it say?"
    assert result.aux_text == "   The image includes text descriptions: MOAI."
    assert result.model_id == str(tiny_root / "moai")
    assert 1 <= len(result.new_token_ids) <= 5
    assert proc.stderr.endswith(result.text + "\n")  # with --json the streamed pieces go to stderr
    assert picture.is_file()
    assert foreign_lines(proc.stderr[: -len(result.text + "\n")]) == []


@pytest.mark.parametrize(
    "args, status, message",
    [
        ((), 2, "choose a command"),
        (("run",), 2, "required: image, prompt"),
        (("launch",), 2, "invalid choice"),
        (("run", "x.png", "hi", "--quantization", "fp3"), 2, "invalid choice"),
        (("run", "/no/such/picture.png", "hi"), 1, "image file not found"),
        (("demo", "--max-new-tokens", "0"), 1, "--max-new-tokens must be >= 1"),
    ],
)
def test_bad_arguments_exit_non_zero_with_one_line(args, status, message):
    proc = run(*args, timeout=120)
    assert proc.returncode == status
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("moai: error:") and message in lines[0]
    assert proc.stdout == ""


def test_unknown_expert_is_one_line(text_image):
    proc = run("perceive", str(text_image), "--experts", "no-such-expert")
    assert proc.returncode == 1
    assert error_lines(proc) == [error_lines(proc)[0]] and "unknown expert 'no-such-expert'" in proc.stderr


def test_info_json():
    proc = run("info", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["versions"]["moai-sdk"] and data["versions"]["torch"]
    assert isinstance(data["cuda"]["available"], bool)
    assert "rapidocr" in data["experts"]["ocr"]
    assert data["cache"]["moai"].keys() >= {"BK-Lee/MoAI-7B", "openai/clip-vit-large-patch14-336"}


@pytest.mark.parametrize(
    ("value", "offline"), [("false", False), ("0", False), ("", False), ("1", True), ("TRUE", True)]
)
def test_info_reads_hf_hub_offline_and_the_given_cache(value, offline, tmp_path, monkeypatch, capsys):
    from moai_sdk import cli

    snapshot = tmp_path / "models--BK-Lee--MoAI-7B" / "snapshots" / ("a" * 40)  # the Hub cache layout
    blob = tmp_path / "models--BK-Lee--MoAI-7B" / "blobs" / "c0ffee"
    blob.parent.mkdir(parents=True)
    blob.write_text("{}")
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to(blob)
    (tmp_path / "models--BK-Lee--MoAI-7B" / "refs").mkdir()
    (tmp_path / "models--BK-Lee--MoAI-7B" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert cli.main(["info", "--json", "--cache-dir", str(tmp_path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["hub_offline"] is offline
    assert data["cache"]["path"] == str(tmp_path)
    assert data["cache"]["moai"]["BK-Lee/MoAI-7B"] is True
    assert data["cache"]["moai"]["openai/clip-vit-large-patch14-336"] is False
    [repo] = data["cache"]["repos"]
    assert repo["repo_id"] == "BK-Lee/MoAI-7B" and repo["used_by"] == "model" and repo["refs"] == ["main"]


# --- download: in-process, the real huggingface_hub over a local Hub-layout cache (offline) ----------------

COMMIT = "c" * 40


def _cache_file(cache: Path, repo_id: str, filename: str, content: bytes, repo_type: str = "model") -> None:
    """Put ``filename`` into the cached ``main`` snapshot of ``repo_id``, the way huggingface_hub lays it out
    (``<type>s--owner--name/blobs/<sha256>``, a relative symlink under ``snapshots/<commit>/``, ``refs/main``)."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(content)
    link = repo / "snapshots" / COMMIT / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)


def _hub_cache(cache: Path, tiny_model: Path, with_vision: bool) -> None:
    """The files ``moai download`` fetches for the model and the experts, in a local cache."""
    from safetensors.torch import load_file, save

    state = load_file(str(tiny_model / "model.safetensors"))
    if not with_vision:
        state = {k: v for k, v in state.items() if not k.startswith("vit.")}
    _cache_file(cache, "BK-Lee/MoAI-7B", "model.safetensors", save(state))
    _cache_file(cache, "BK-Lee/MoAI-7B", "config.json", (tiny_model / "config.json").read_bytes())
    _cache_file(cache, "BK-Lee/MoAI-7B", "README.md", b"not in the allow patterns")
    for repo in ("facebook/mask2former-swin-base-coco-panoptic", "google/owlv2-base-patch16-ensemble"):
        _cache_file(cache, repo, "config.json", b"{}")
        _cache_file(cache, repo, "model.safetensors", b"")
    _cache_file(cache, "ECCV2022/PSG", "OpenPSG/checkpoints/epoch_60.pth", b"x", repo_type="space")
    _cache_file(cache, "openai/clip-vit-large-patch14-336", "model.safetensors", b"x")


class HubSpy:
    """Records the calls to huggingface_hub's real download functions and passes them through unchanged (an
    unknown keyword fails in huggingface_hub itself)."""

    def __init__(self) -> None:
        from huggingface_hub import hf_hub_download, snapshot_download

        self.snapshots: list[dict] = []
        self.files: list[dict] = []
        self.folders: list[Path] = []
        self._snapshot, self._file = snapshot_download, hf_hub_download

    def snapshot_download(self, repo_id, **kwargs):
        self.snapshots.append({"repo_id": repo_id, **kwargs})
        folder = self._snapshot(repo_id, **kwargs)
        self.folders.append(Path(folder))
        return folder

    def hf_hub_download(self, repo_id, filename, **kwargs):
        self.files.append({"repo_id": repo_id, "filename": filename, "repo_type": kwargs.get("repo_type")})
        return self._file(repo_id, filename, **kwargs)


@pytest.mark.parametrize("with_vision", [True, False])
def test_download_fetches_model_and_expert_weights(tiny_root, tmp_path, monkeypatch, capsys, with_vision):
    from moai_sdk import cli
    from moai_sdk import hub as hub_module

    cache = tmp_path / "cache"
    _hub_cache(cache, tiny_root / "moai", with_vision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the real functions resolve from the cache, never the network
    hub = HubSpy()
    monkeypatch.setattr(hub_module, "snapshot_download", hub.snapshot_download)
    monkeypatch.setattr(hub_module, "hf_hub_download", hub.hf_hub_download)
    status = cli.main(
        ["download", "--cache-dir", str(cache), "--json", "--experts", "mask2former,owlv2,psgtr,rapidocr"]
    )
    assert status == 0
    report = json.loads(capsys.readouterr().out)["downloaded"]
    repos = [s["repo_id"] for s in hub.snapshots]
    assert repos == [
        "BK-Lee/MoAI-7B",
        "facebook/mask2former-swin-base-coco-panoptic",
        "google/owlv2-base-patch16-ensemble",
    ]
    model_patterns = hub.snapshots[0]["allow_patterns"]
    assert {"config.json", "*.safetensors", "tokenizer.model"} <= set(model_patterns)
    assert all(s["cache_dir"] == str(cache) for s in hub.snapshots)
    # the real snapshot folders, inside the given cache
    model_folder = hub.folders[0]
    assert model_folder == cache / "models--BK-Lee--MoAI-7B" / "snapshots" / COMMIT
    assert (model_folder / "model.safetensors").is_file()
    psgtr = [f for f in hub.files if f["repo_id"] == "ECCV2022/PSG"]
    assert psgtr == [{"repo_id": "ECCV2022/PSG", "filename": "OpenPSG/checkpoints/epoch_60.pth", "repo_type": "space"}]
    clip = [f for f in hub.files if f["repo_id"] == "openai/clip-vit-large-patch14-336"]
    assert clip == (
        []
        if with_vision
        else [{"repo_id": "openai/clip-vit-large-patch14-336", "filename": "model.safetensors", "repo_type": None}]
    )
    methods = {s["component"]: s["method"] for s in report}
    assert methods["expert.rapidocr"] == "bundled"
    assert methods["vision_tower"] == ("skipped" if with_vision else "file")


def test_download_dry_run_lists_the_plan(capsys):
    from moai_sdk import cli

    assert cli.main(["download", "my/moai", "--revision", "v1", "--dry-run", "--json", "--experts", "owlv2"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert [p["component"] for p in plan] == ["model", "vision_tower", "expert.owlv2"]
    assert plan[0]["repo_id"] == "my/moai" and plan[0]["revision"] == "v1"
    assert plan[2]["repo_id"] == "google/owlv2-base-patch16-ensemble"
    # a task name means that task's default expert
    assert cli.main(["download", "--dry-run", "--json", "--experts", "ocr,detection"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert [p["component"] for p in plan] == ["model", "vision_tower", "expert.owlv2", "expert.rapidocr"]


def test_parse_experts():
    from moai_sdk.cli import parse_experts
    from moai_sdk.errors import InputError

    assert parse_experts("default") == "default" and parse_experts("none") is None
    assert parse_experts("rapidocr, mask2former=/m") == ["rapidocr", {"name": "mask2former", "model_id": "/m"}]
    assert parse_experts('{"ocr": "paddleocr"}') == {"ocr": "paddleocr"}
    with pytest.raises(InputError):
        parse_experts("{bad json")
    with pytest.raises(InputError):
        parse_experts("owlv2=")


def test_only_torchaos_enum_notices_are_dropped():
    """The filter moai_sdk installs on torch's pytree logger drops torchao's two notices, nothing else."""
    import enum
    import logging

    import moai_sdk

    [quiet] = [f for f in logging.getLogger("torch.utils._pytree").filters if type(f).__name__ == "_TorchaoEnumNotice"]
    message = "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type."

    def record(cls, msg=message):
        return logging.LogRecord("torch.utils._pytree", logging.WARNING, "_pytree.py", 630, msg, (cls,), None)

    ours = enum.Enum("Mine", "A B")  # defined here: not torchao's
    theirs = enum.Enum("KernelPreference", "AUTO", module="torchao.quantization.quantize_.common.kernel_preference")
    assert quiet.filter(record(theirs)) is False
    assert quiet.filter(record(ours)) is True
    assert quiet.filter(record(theirs, "%s is registered twice")) is True
    assert moai_sdk.__version__  # the filter is installed by importing the package
