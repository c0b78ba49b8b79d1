"""`moai --help`, `moai COMMAND --help` and usage errors answer without importing torch (or any heavy package).

The checks run in fresh processes (the test process itself has torch loaded) and look at ``sys.modules``, not at
a time. Every registered command is covered, so a command added to ``moai_sdk.cli.COMMANDS`` whose argument
builder imports something heavy fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from moai_sdk import cli

#: Top-level packages that must not be imported to parse arguments (heavy, or optional back-ends).
HEAVY = (
    "torch",
    "torchvision",
    "torchao",
    "transformers",
    "numpy",
    "PIL",
    "huggingface_hub",
    "safetensors",
    "pydantic",
    "fastapi",
    "uvicorn",
    "ray",
    "pyarrow",
    "av",
    "ultralytics",
    "paddle",
    "cv2",
    "onnxruntime",
    "rapidocr_onnxruntime",
    "bitsandbytes",
)

# Runs moai_sdk.cli.main on each argv given as JSON in argv[1]; reports, per argv, the exit status and the heavy
# packages imported so far (one process for all: heavy modules imported by one argv are attributed to it).
_PROBE = """
import contextlib, io, json, sys
from moai_sdk.cli import main
heavy = set(json.loads(sys.argv[2]))
report = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as exc:
            status = exc.code
    loaded = sorted({name.split(".")[0] for name in sys.modules} & heavy)
    report.append({"argv": argv, "status": status, "heavy": loaded, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(report))
"""


def _env() -> dict[str, str]:
    src = str(Path(cli.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def _probe(argvs: list[list[str]]) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(argvs), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_help_of_every_command_and_usage_errors_import_nothing_heavy():
    names = [command.name for command in cli.COMMANDS]
    assert {"run", "perceive", "download", "info", "demo", "batch", "score", "serve"} <= set(names)
    usage_errors = [
        [],  # no command
        ["launch"],  # unknown command
        ["run", "x.png", "hi", "--quantization", "fp3"],  # a choice taken from moai_sdk.defaults
        ["run", "x.png", "hi", "--dtype", "float8"],
        ["serve", "--port", "eighty"],
        ["score", "out.jsonl", "--task", "nope"],
        ["batch", "in/"],  # OUTPUT missing
    ]
    argvs = [["--help"], ["--version"]] + [[name, "--help"] for name in names] + usage_errors
    report = _probe(argvs)
    assert [r["argv"] for r in report] == argvs
    for r in report:
        assert r["heavy"] == [], f"`moai {' '.join(r['argv'])}` imported {r['heavy']}"
    by_argv = {tuple(r["argv"]): r for r in report}
    top = by_argv[("--help",)]
    assert top["status"] == 0 and all(name in top["stdout"] for name in names)
    for name in names:
        r = by_argv[(name, "--help")]
        assert r["status"] == 0 and r["stdout"].startswith(f"usage: moai {name}"), r
    for argv in usage_errors:
        r = by_argv[tuple(argv)]
        lines = r["stderr"].splitlines()
        assert r["status"] == 2 and len(lines) == 1 and lines[0].startswith("moai: error:"), r
    quant = by_argv[("run", "x.png", "hi", "--quantization", "fp3")]["stderr"]
    assert all(f"'{mode}'" in quant for mode in ("nf4", "nf4-lora", "int8", "int4", "official", "none"))


def test_the_console_script_answers_help_without_torch():
    """The installed ``moai`` script itself (``-X importtime`` lists every module the process imports)."""
    script = Path(sys.executable).parent / ("moai.exe" if os.name == "nt" else "moai")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "moai_sdk.cli"]
    env = {**_env(), "PYTHONPROFILEIMPORTTIME": "1"}
    proc = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and "serve" in proc.stdout, proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "moai_sdk.cli" in imported  # the profile is real
    assert not {name.split(".")[0] for name in imported} & set(HEAVY)


def test_every_handler_resolves_to_a_function():
    for command in cli.COMMANDS:
        handler = command.resolve()
        assert callable(handler), command.name
