"""The ``moai`` command line: ``run``, ``perceive``, ``download``, ``info``, ``demo``, ``batch``, ``score``, ``eval``,
``serve``, ``ui``.

* ``moai run IMAGE PROMPT`` -- answer a question about an image (``--json`` for the full typed result,
  ``--stream`` to print the answer while it is generated, ``--plot`` for the perception picture);
* ``moai perceive IMAGE`` -- run the perception experts only (``--json``, ``--plot``);
* ``moai download [MODEL]`` -- fetch the model and every configured expert's weights into the Hugging Face cache;
* ``moai info`` -- versions, CUDA / bitsandbytes availability, registered experts and what is cached;
* ``moai demo`` -- the whole pipeline offline on a tiny random MoAI plus the real offline OCR;
* ``moai batch`` (:mod:`moai_sdk.batch.cli`), ``moai eval`` / ``moai score`` (:mod:`moai_sdk.evaluation.cli`) and
  ``moai serve`` (:mod:`moai_sdk.serve.cli`);
* ``moai ui`` -- the web playground (:mod:`moai_sdk.ui.cli`; arguments here, since importing ``moai_sdk.ui``
  loads the pipeline's image code).

Errors print one line (``moai: error: ...``) on stderr and exit with status 1 (2 for bad arguments).

How a command is defined (and how to add one)
---------------------------------------------
The parser is built, and the arguments are checked, before anything heavy is imported: ``moai --help``,
``moai COMMAND --help`` and usage errors never import torch, torchvision or transformers
(``tests/test_cli_imports.py`` checks ``sys.modules`` of a real ``moai`` process). Each command is one
:class:`Command` in :data:`COMMANDS`:

* ``add_arguments(parser)`` -- adds the command's arguments to its sub-parser. It must live in a *light* module:
  this file, :mod:`moai_sdk.cli_options` (the shared ``--model`` / ``--experts`` / generation option groups) or a
  sub-package's ``cli`` module (``moai_sdk.batch.cli``, ``moai_sdk.serve.cli``) that imports only the standard
  library, ``moai_sdk.errors``, ``moai_sdk.defaults``, ``moai_sdk.prompts`` and ``moai_sdk.cli_options`` at module
  level. Choices that other modules define (quantization modes, the default model) come from
  :mod:`moai_sdk.defaults`, which imports nothing.
* ``handler`` -- ``"package.module:function"``, imported only when the command runs; the function takes the parsed
  ``argparse.Namespace`` and returns the exit status. Its module may import anything (torch, FastAPI, Ray...).
  Raise a :class:`~moai_sdk.errors.MoAIError` subclass for a problem the user can fix: :func:`main` prints it as one
  line and returns 1.

To add ``moai foo``: write ``add_foo_arguments(p)`` and ``cmd_foo(args) -> int`` (for a sub-package, in
``moai_sdk/foo/cli.py``, importing heavy modules inside ``cmd_foo`` or in another module named by the handler),
then append one line to :data:`COMMANDS`::

    Command("foo", "one-line help", add_foo_arguments, "moai_sdk.foo.cli:cmd_foo", description="longer text"),

and add ``moai foo --help`` to the commands ``tests/test_cli_imports.py`` runs (it covers every registered command).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Optional, Sequence, Union

from . import __version__
from .batch import cli as batch_cli
from .cli_options import add_experts_option as _add_experts_option
from .cli_options import add_generation_options as _add_generation_options
from .cli_options import add_hub_options as _add_hub_options
from .cli_options import add_model_options as _add_model_options
from .cli_options import add_tiny_option as _add_tiny_option
from .cli_options import generation_kwargs
from .cli_options import parse_experts as parse_experts
from .cli_options import pipeline_from_args as _pipeline_from_args
from .defaults import DEFAULT_MODEL_ID, DEFAULT_VISION_TOWER_ID
from .errors import ConfigError, InputError, MoAIError
from .evaluation import cli as eval_cli
from .serve import cli as serve_cli

if TYPE_CHECKING:  # pragma: no cover
    from .hub import HubOptions
    from .pipeline import MoAIPipeline

logger = logging.getLogger(__name__)

PROG = "moai"

#: Files of a MoAI checkpoint repository that loading needs (weights fall back to ``.bin`` when a repo has no
#: safetensors).
MODEL_FILE_PATTERNS = (
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
MODEL_BIN_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")

# Packages reported by ``moai info`` (distribution names).
_PACKAGES = (
    "moai-sdk",
    "torch",
    "torchvision",
    "transformers",
    "huggingface-hub",
    "safetensors",
    "tokenizers",
    "sentencepiece",
    "pydantic",
    "numpy",
    "pillow",
    "bitsandbytes",
    "accelerate",
    "rapidocr-onnxruntime",
    "onnxruntime",
    "opencv-python-headless",
    "opencv-python",
    "ultralytics",
    "paddleocr",
    "paddlepaddle",
    "fastapi",
)


def __getattr__(name: str) -> Any:
    # Kept for compatibility, without importing the experts package when the CLI starts: the file patterns of a
    # transformers expert repository (each expert now says what it fetches: Expert.download_plan).
    if name in ("EXPERT_FILE_PATTERNS", "EXPERT_BIN_PATTERNS"):
        from .experts import weights

        return (
            weights.TRANSFORMERS_FILE_PATTERNS if name == "EXPERT_FILE_PATTERNS" else weights.TRANSFORMERS_BIN_PATTERNS
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------------------
# argument parsing
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One ``moai`` sub-command: its name, help, a light argument builder and its handler (imported when run)."""

    name: str
    help: str
    #: Adds the command's arguments to its sub-parser; defined in a module that imports nothing heavy.
    add_arguments: Callable[[argparse.ArgumentParser], None]
    #: ``"package.module:function"`` taking the parsed namespace, returning the exit status; imported when it runs.
    handler: Union[str, Callable[[argparse.Namespace], int]]
    description: Optional[str] = None

    def resolve(self) -> Callable[[argparse.Namespace], int]:
        """The handler function (imports its module)."""
        if callable(self.handler):
            return self.handler
        module, _, function = self.handler.partition(":")
        return getattr(importlib.import_module(module), function)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``moai: error: ...``) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {_one_line(message)} (see `{self.prog} --help`)\n")


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _add_run_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("image", help="image file (or an http(s) URL with --allow-remote)")
    run.add_argument("prompt", help="the question")
    _add_model_options(run)
    _add_hub_options(run)
    _add_experts_option(run)
    run.add_argument("--template", default="chat", choices=["chat", "demo"])
    _add_generation_options(run)
    run.add_argument("--json", action="store_true", help="print the whole MoAIResult as JSON")
    run.add_argument("--stream", action="store_true", help="print the answer while it is generated")
    run.add_argument("--plot", default=None, metavar="OUT.png", help="save the perception picture")
    run.add_argument("--allow-remote", action="store_true", help="fetch the image when it is an http(s) URL")
    run.add_argument(
        "--ablate",
        action="store_true",
        help="also answer without each expert's output (one batch) and print the table; --json/--plot: the table's",
    )


def _add_perceive_arguments(perceive: argparse.ArgumentParser) -> None:
    perceive.add_argument("image", help="image file (or an http(s) URL with --allow-remote)")
    perceive.add_argument("--allow-remote", action="store_true", help="fetch the image when it is an http(s) URL")
    _add_experts_option(perceive)
    _add_hub_options(perceive)
    perceive.add_argument("--json", action="store_true", help="print the PerceptionResult as JSON")
    perceive.add_argument("--include-masks", action="store_true", help="with --json: include masks (COCO RLE)")
    perceive.add_argument("--plot", default=None, metavar="OUT.png", help="save the perception picture")


def _add_download_arguments(download: argparse.ArgumentParser) -> None:
    download.add_argument("model", nargs="?", default=None, help=f"Hub id (default: {DEFAULT_MODEL_ID})")
    download.add_argument("--revision", default=None)
    download.add_argument("--cache-dir", default=None, help="Hugging Face cache folder")
    download.add_argument("--token", default=None)
    _add_experts_option(download)
    download.add_argument("--dry-run", action="store_true", help="list what would be fetched, fetch nothing")
    download.add_argument("--json", action="store_true", help="print the plan / outcome as JSON")


def _add_info_arguments(info: argparse.ArgumentParser) -> None:
    info.add_argument("--cache-dir", default=None, help="Hugging Face cache folder to inspect")
    info.add_argument("--json", action="store_true")


def _add_demo_arguments(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--json", action="store_true", help="print the MoAIResult as JSON")
    demo.add_argument("--plot", default=None, metavar="OUT.png", help="save the perception picture")
    demo.add_argument("--prompt", default="What is written in the image?")
    demo.add_argument("--image", default=None, help="use this image instead of the generated one")
    demo.add_argument("--max-new-tokens", type=int, default=16)
    demo.add_argument("--workdir", default=None, help="where to build the tiny model (default: a temporary folder)")


def _add_ui_arguments(ui: argparse.ArgumentParser) -> None:
    ui.add_argument("model_arg", nargs="?", default=None, metavar="MODEL", help="Hub id or checkpoint folder")
    _add_model_options(ui)
    _add_hub_options(ui)
    _add_experts_option(ui)
    _add_tiny_option(ui)
    ui.add_argument("--server", default=None, metavar="URL", help="use a running `moai serve` at URL instead")
    ui.add_argument("--api-key", default=None, help="the server's API key (default: $MOAI_API_KEY if set)")
    ui.add_argument("--template", default="chat", choices=["chat", "demo"])
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    ui.add_argument("--port", type=int, default=7860)
    ui.add_argument("--share", action="store_true", help="also open a public Gradio share link (off by default)")
    ui.add_argument("--max-image-bytes", type=int, default=20 * 2**20, help="largest upload (default: 20 MiB)")
    ui.add_argument("--max-new-tokens", type=int, default=64, help="the page's initial maximum (default: 64)")


#: Every ``moai`` command, in the order of ``moai --help`` (see the module docstring to add one).
COMMANDS: tuple[Command, ...] = (
    Command("run", "answer a question about an image", _add_run_arguments, "moai_sdk.cli:cmd_run"),
    Command("perceive", "run the perception experts on an image", _add_perceive_arguments, "moai_sdk.cli:cmd_perceive"),
    Command(
        "download", "prefetch the model and the experts' weights", _add_download_arguments, "moai_sdk.cli:cmd_download"
    ),
    Command(
        "info",
        "versions, CUDA and bitsandbytes, registered experts, cached models",
        _add_info_arguments,
        "moai_sdk.cli:cmd_info",
    ),
    Command(
        "demo",
        "the full pipeline offline on a tiny random MoAI (random answer)",
        _add_demo_arguments,
        "moai_sdk.cli:cmd_demo",
    ),
    Command(
        "batch",
        batch_cli.BATCH_HELP,
        batch_cli.add_batch_arguments,
        "moai_sdk.batch.cli:cmd_batch",
        description=batch_cli.BATCH_DESCRIPTION,
    ),
    Command(
        "score",
        batch_cli.SCORE_HELP,
        eval_cli.add_score_arguments,
        "moai_sdk.evaluation.cli:cmd_score",
        description=batch_cli.SCORE_DESCRIPTION,
    ),
    Command(
        "eval",
        eval_cli.EVAL_HELP,
        eval_cli.add_eval_arguments,
        "moai_sdk.evaluation.cli:cmd_eval",
        description=eval_cli.EVAL_DESCRIPTION,
    ),
    Command(
        "serve", serve_cli.HELP, serve_cli.add_arguments, "moai_sdk.serve.cli:run", description=serve_cli.DESCRIPTION
    ),
    Command(
        "ui",
        "a web playground (Gradio): answer, what the experts saw, gates, ablation",
        _add_ui_arguments,
        "moai_sdk.ui.cli:run",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The ``moai`` argument parser: one sub-parser per :data:`COMMANDS` entry (imports nothing heavy)."""
    parser = _Parser(prog=PROG, description="MoAI (Mixture of All Intelligence) from the command line.")
    parser.add_argument("--version", action="version", version=f"moai-sdk {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_arguments(sub.add_parser(command.name, help=command.help, description=command.description))
    return parser


def tiny_pipeline(directory: Union[str, Path], **options: Any) -> MoAIPipeline:
    """:func:`moai_sdk.testing.tiny_pipeline` (imported when ``moai demo`` runs)."""
    from .testing import tiny_pipeline as build

    return build(directory, **options)


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def _check_image(path: str, allow_remote: bool = False) -> str:
    """Refuse, before anything loads, an image argument that is neither a file nor an allowed URL."""
    if path.lower().startswith(("http://", "https://")):
        if not allow_remote:
            raise InputError(f"{path!r} is a URL; pass --allow-remote to fetch it, or download it and pass the file")
        return path
    try:
        found = Path(path).is_file()
    except (OSError, ValueError) as exc:
        raise InputError(f"{path[:120]!r} is not a usable file path: {exc}") from exc
    if not found:
        raise InputError(f"image file not found: {path!r}")
    return path


def _check_output(path: Optional[str], option: str = "--plot") -> None:
    """Refuse, before any work, an output file that cannot be written (not after minutes of generation)."""
    if not path:
        return
    out = Path(path).expanduser()
    folder = out.parent
    if out.is_dir():
        raise InputError(f"{option} {path!r} is a folder; give a file name such as out.png or out.json")
    if not folder.is_dir():
        raise InputError(f"{option} {path!r}: the folder {str(folder)!r} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{option} {path!r}: the folder {str(folder)!r} is not writable")
    suffix = out.suffix.lower()
    from PIL import Image

    if suffix != ".json" and suffix not in Image.registered_extensions():
        raise InputError(f"{option} {path!r}: {suffix or 'no suffix'} is not a picture format; use .png, .jpg or .json")


def _write(text: str, stream: Any = None) -> None:
    out = stream or sys.stdout
    out.write(text)
    out.flush()


def _summary(result: Any) -> str:
    """A readable multi-line view of a MoAIResult."""
    lines = [
        f"prompt:  {result.prompt}",
        f"answer:  {result.text}",
        f"aux:     {result.aux_text!r}",
        "tokens:  " + ", ".join(f"{k}={v}" for k, v in result.token_counts.items()),
        "timings: " + ", ".join(f"{k}={v:.3f}s" for k, v in result.timings.items()),
        f"model:   {result.model_id}" + (f"@{result.revision}" if result.revision else ""),
    ]
    if result.perception is not None:
        p = result.perception
        lines.append(
            f"found:   {len(p.segments)} segments, {len(p.detections)} detections, {len(p.relations)} relations, "
            f"{len(p.text_lines)} text lines"
        )
        lines.extend(f"warning: {w}" for w in p.warnings)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    _check_image(args.image, args.allow_remote)
    _check_output(args.plot)
    pipe = _pipeline_from_args(args, with_model=True)
    options = generation_kwargs(args)
    if args.allow_remote:
        options["allow_remote"] = True
    if args.ablate:
        return _run_ablation(pipe, args, options)
    if args.stream:
        piece_stream = sys.stderr if args.json else sys.stdout
        result = None
        for item in pipe.stream(args.image, args.prompt, **options):
            if isinstance(item, str):
                _write(item, piece_stream)
            else:
                result = item
        _write("\n", piece_stream)
    else:
        result = pipe(args.image, args.prompt, **options)
    if args.json:
        _write(result.to_json() + "\n")
    elif not args.stream:
        _write(result.text + "\n")
    if args.plot:
        result.save(args.plot)
        logger.info("wrote %s", args.plot)
    return 0


def _run_ablation(pipe: Any, args: argparse.Namespace, options: dict[str, Any]) -> int:
    """``moai run --ablate``: the ablation table as text (or JSON), and its picture with --plot."""
    if args.stream:
        raise InputError("--ablate answers all variants as one batch and cannot --stream; drop one of them")
    table = pipe.ablate(args.image, args.prompt, return_gates=True, **options)
    _write((table.to_json() if args.json else str(table)) + "\n")
    if args.plot:
        table.save(args.plot)
        logger.info("wrote %s", args.plot)
    return 0


def cmd_perceive(args: argparse.Namespace) -> int:
    _check_image(args.image, args.allow_remote)
    _check_output(args.plot)
    spec = parse_experts(args.experts)
    if spec is None:
        raise InputError("moai perceive needs at least one expert; --experts none leaves nothing to run")
    pipe = _pipeline_from_args(args, with_model=False)
    result = pipe.perceive(args.image, allow_remote=args.allow_remote)
    if args.json:
        _write(result.to_json(args.include_masks) + "\n")
    else:
        lines = [f"{task}: {pipe.experts[task].name}" for task in result.tasks if task in pipe.experts]
        for seg in result.segments:
            lines.append(f"segment  {seg.label} score={seg.score:.2f} box={[round(v, 1) for v in seg.box.xyxy]}")
        for det in result.detections:
            lines.append(f"detect   {det.label} score={det.score:.2f} box={[round(v, 1) for v in det.box.xyxy]}")
        for rel in result.relations:
            lines.append(f"relation {rel.subject_label} {rel.predicate} {rel.object_label} score={rel.score:.2f}")
        for line in result.text_lines:
            lines.append(f"text     {line.text!r} confidence={line.confidence:.2f}")
        lines.append(f"verbalization: {pipe.verbalize(result)!r}")
        lines.extend(f"warning: {w}" for w in result.warnings)
        _write("\n".join(lines) + "\n")
    if args.plot:
        result.save(args.plot)
    return 0


def _checkpoint_has_vision(folder: Path) -> bool:
    """Whether the downloaded MoAI checkpoint in ``folder`` carries the CLIP tower weights."""
    from .modeling.loading import VISION_PREFIX, WeightReader, resolve_checkpoint

    reader = WeightReader(resolve_checkpoint(folder))
    try:
        return any(k.startswith(VISION_PREFIX) for k in reader.keys())
    finally:
        reader.release()


def download_plan(model: str, experts: Any, *, revision: Optional[str] = None) -> list[dict[str, Any]]:
    """What ``moai download`` fetches: one entry per component with its repository and file patterns.

    The model and its CLIP tower are described here; each expert describes itself
    (:meth:`~moai_sdk.experts.Expert.download_plan`).
    """
    return _model_plan(model, revision) + [exp.download_plan() for exp in _experts(experts).values()]


def _model_plan(model: str, revision: Optional[str]) -> list[dict[str, Any]]:
    from .hub import WEIGHT_FORMATS

    return [
        {
            "component": "model",
            "repo_id": model,
            "revision": revision,
            "method": "snapshot",
            "allow_patterns": list(MODEL_FILE_PATTERNS),
            "fallback_patterns": list(MODEL_BIN_PATTERNS),
        },
        {
            "component": "vision_tower",
            "repo_id": DEFAULT_VISION_TOWER_ID,
            "revision": None,
            "method": "file",
            "filenames": [single for _, _, single in WEIGHT_FORMATS],  # safetensors, else .bin
            "when": "the checkpoint has no vision weights",
        },
    ]


def _experts(spec: Any, hub: Optional[HubOptions] = None) -> dict[str, Any]:
    from .experts.selection import resolve_experts
    from .hub import HubOptions

    return resolve_experts(spec, device="cpu", hub=hub or HubOptions())


def cmd_download(args: argparse.Namespace) -> int:
    model = args.model or DEFAULT_MODEL_ID
    if Path(model).expanduser().exists():
        raise InputError(f"{model!r} is a local folder; moai download fetches Hub repositories")
    experts = parse_experts(args.experts)
    if args.dry_run:
        plan = download_plan(model, experts, revision=args.revision)
        if args.json:
            _write(json.dumps({"plan": plan}, indent=2) + "\n")
        else:
            for entry in plan:
                what = entry.get("allow_patterns") or entry.get("filenames") or ""
                _write(f"{entry['component']}: {entry['method']} {entry['repo_id'] or ''} {what}\n")
        return 0

    from .hub import HubOptions

    hub = HubOptions(cache_dir=args.cache_dir, token=args.token or None)
    done = _download_model(model, args.revision, hub, report=not args.json)
    for exp in _experts(experts, hub).values():
        done.append(_fetch(exp.download_plan(), exp.prefetch, report=not args.json))
    if args.json:
        _write(json.dumps({"downloaded": done}, indent=2) + "\n")
    return 0


def _download_model(model: str, revision: Optional[str], hub: HubOptions, *, report: bool) -> list[dict[str, Any]]:
    """Fetch the MoAI checkpoint, then the CLIP tower unless the checkpoint holds the vision weights."""
    from .hub import download_first, snapshot

    model_entry, vision_entry = _model_plan(model, revision)
    folders: list[Path] = []

    def fetch_model() -> dict[str, Any]:
        folders.append(
            snapshot(
                model,
                model_entry["allow_patterns"],
                model_entry["fallback_patterns"],
                hub=hub.replace(revision=revision),
            )
        )
        return {"path": str(folders[0])}

    def fetch_vision() -> dict[str, Any]:
        if _checkpoint_has_vision(folders[0]):
            return {"method": "skipped", "reason": "the checkpoint holds the vision weights"}
        return {"path": str(download_first(vision_entry["repo_id"], vision_entry["filenames"], hub=hub))}

    return [_fetch(model_entry, fetch_model, report=report), _fetch(vision_entry, fetch_vision, report=report)]


def _fetch(entry: dict[str, Any], action: Callable[[], dict[str, Any]], *, report: bool) -> dict[str, Any]:
    """Run one component's download and return its status (``component``, ``method``, ``repo_id``, ``path`` or
    ``reason``); an unexpected failure names the component."""
    component = entry["component"]
    status: dict[str, Any] = {"component": component, "method": entry["method"], "repo_id": entry.get("repo_id")}
    try:
        status.update(action())
    except MoAIError:
        raise
    except Exception as exc:  # backends fetching their own files raise many unrelated types; say which failed
        raise MoAIError(
            f"downloading {component} ({entry.get('repo_id')}) failed: {type(exc).__name__}: {exc}"
        ) from exc
    if report:
        where = status.get("path") or status.get("reason") or status["method"]
        _write(f"{component}: {where}\n")
    return status


def collect_info(cache_dir: Optional[str] = None) -> dict[str, Any]:
    """What ``moai info`` reports, as a dict."""
    import importlib.metadata as md
    import importlib.util
    import platform

    import torch

    from .experts.base import available_experts
    from .hub import env_offline

    versions: dict[str, Optional[str]] = {"python": platform.python_version()}
    for dist in _PACKAGES:
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    cuda: dict[str, Any] = {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if cuda["available"]:
        cuda["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    bnb_installed = importlib.util.find_spec("bitsandbytes") is not None
    quant = {
        "bitsandbytes_installed": bnb_installed,
        "quantization_usable": bnb_installed and cuda["available"],
        "note": None
        if (bnb_installed and cuda["available"])
        else (
            "bitsandbytes runs 4/8-bit on CPU too, but slowly: the pipeline loads unquantized without a CUDA GPU"
            if bnb_installed
            else "nf4/int8 quantization needs bitsandbytes: pip install 'moai-sdk[quant]'; the model loads unquantized"
        ),
    }
    return {
        "versions": versions,
        "cuda": cuda,
        "quantization": quant,
        "experts": available_experts(),
        "hub_offline": env_offline(),
        "cache": _cache_report(cache_dir),
    }


def _cache_report(cache_dir: Optional[str]) -> dict[str, Any]:
    """Repositories in the Hugging Face cache, with the ones MoAI uses marked."""
    from .experts.base import get_expert_class
    from .experts.selection import DEFAULT_EXPERTS
    from .hub import cache_path, scan_cache

    wanted = {DEFAULT_MODEL_ID: "model", DEFAULT_VISION_TOWER_ID: "vision_tower"}
    for name in DEFAULT_EXPERTS.values():
        try:
            mid = get_expert_class(name).default_model_id
        except ConfigError:
            continue
        if isinstance(mid, str) and mid.count("/") == 1:
            wanted[mid] = f"expert.{name}"
    repos = [{**r, "used_by": wanted.get(r["repo_id"])} for r in scan_cache(cache_dir)]
    present = {r["repo_id"] for r in repos}
    return {"path": str(cache_path(cache_dir)), "repos": repos, "moai": {repo: repo in present for repo in wanted}}


def cmd_info(args: argparse.Namespace) -> int:
    data = collect_info(args.cache_dir)
    if args.json:
        _write(json.dumps(data, indent=2) + "\n")
        return 0
    lines = ["versions:"]
    lines += [f"  {k}: {v or '-'}" for k, v in data["versions"].items()]
    c = data["cuda"]
    state = "available" if c["available"] else "not available"
    lines.append(f"cuda: {state} (torch built with CUDA {c['torch_cuda']})")
    lines += [f"  {i}: {name}" for i, name in enumerate(c.get("devices", []))]
    q = data["quantization"]
    lines.append(
        f"bitsandbytes: {'installed' if q['bitsandbytes_installed'] else 'not installed'}; "
        f"quantization {'usable (CUDA)' if q['quantization_usable'] else 'off in the pipeline'}"
        + (f" ({q['note']})" if q.get("note") else "")
    )
    lines.append("experts: " + "; ".join(f"{t}: {', '.join(n) or '-'}" for t, n in data["experts"].items()))
    cache = data["cache"]
    lines.append(f"hub cache: {cache['path']}{' [offline]' if data['hub_offline'] else ''}")
    lines += [f"  {repo}: {'cached' if ok else 'not cached'}" for repo, ok in cache["moai"].items()]
    others = [r for r in cache["repos"] if r["used_by"] is None]
    if others:
        lines.append(f"  (+{len(others)} other cached repositories)")
    _write("\n".join(lines) + "\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.image is not None:
        _check_image(args.image)
    _check_output(args.plot)
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1; got {args.max_new_tokens}")
    with tempfile.TemporaryDirectory(prefix="moai-demo-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        _write(
            "moai demo: a tiny randomly initialised MoAI built locally, with tiny random experts and the real "
            "offline OCR; the answer text is random tokens, the pipeline around it is real.\n",
            sys.stderr,
        )
        pipe = tiny_pipeline(workdir)
        from .testing import demo_image

        image = args.image if args.image is not None else demo_image("MOAI")
        result = pipe(image, args.prompt, max_new_tokens=args.max_new_tokens)
        if args.json:
            _write(result.to_json() + "\n")
        else:
            _write(_summary(result))
        if args.plot:
            result.save(args.plot)
            _write(f"moai demo: picture written to {args.plot}\n", sys.stderr)
    return 0


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    root = logging.getLogger("moai_sdk")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``moai`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("choose a command: " + ", ".join(c.name for c in COMMANDS))
    _setup_logging(args.verbose)
    [command] = [c for c in COMMANDS if c.name == args.command]
    try:
        return command.resolve()(args)
    except KeyboardInterrupt:
        _write(f"{PROG}: interrupted\n", sys.stderr)
        return 130
    except MoAIError as exc:
        if args.debug:
            raise
        _write(f"{PROG}: error: {_one_line(exc)}\n", sys.stderr)
        return 1
    except Exception as exc:  # anything else still ends in one line (the traceback with --debug)
        if args.debug:
            raise
        _write(
            f"{PROG}: error: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the traceback)\n",
            sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
