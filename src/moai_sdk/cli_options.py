"""Command-line options shared by the ``moai`` commands that build a pipeline (``run``, ``batch``, ``serve``...).

One definition of each option group, so every command spells ``--model``, ``--experts`` or ``--max-new-tokens``
the same way, and one way to turn the parsed options into a :class:`~moai_sdk.pipeline.MoAIPipeline` and into
generation keywords. ``moai_sdk.cli`` and the command modules of sub-packages (``moai_sdk.batch.cli``) import
from here; this module imports nothing above the pipeline, so no command module needs to import ``moai_sdk.cli``.

It is imported to build the ``moai`` parser, so at module level it imports only light modules (the choices come
from :mod:`moai_sdk.defaults`); the pipeline and the tiny builders are imported inside the functions that build one.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any, Optional

from .defaults import DEFAULT_MODEL_ID, DTYPE_CHOICES, QUANTIZATION_MODES
from .errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import MoAIPipeline

#: The ``--quantization`` choices: every mode of :data:`~moai_sdk.defaults.QUANTIZATION_MODES`, ``none`` for None.
QUANTIZATION_CHOICES = tuple(m for m in QUANTIZATION_MODES if m is not None) + ("none",)


def add_model_options(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--revision``, ``--quantization``, ``--dtype``."""
    p.add_argument("--model", default=None, help="Hub id or local checkpoint folder (default: BK-Lee/MoAI-7B)")
    p.add_argument("--revision", default=None, help="model revision (branch, tag or commit)")
    p.add_argument(
        "--quantization",
        default="nf4",
        choices=list(QUANTIZATION_CHOICES),
        help="weight quantization (needs CUDA; ignored on CPU; int4 needs torchao). Default: nf4",
    )
    p.add_argument("--dtype", default="auto", choices=list(DTYPE_CHOICES))


def add_hub_options(p: argparse.ArgumentParser) -> None:
    """``--device`` and the Hugging Face Hub options."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--cache-dir", default=None, help="Hugging Face cache folder")
    p.add_argument("--local-files-only", action="store_true", help="never download; use cached files only")
    p.add_argument("--token", default=None, help="Hugging Face token for private or gated repositories")


def add_experts_option(p: argparse.ArgumentParser, default: str = "default") -> None:
    """``--experts``."""
    p.add_argument(
        "--experts",
        default=default,
        help="'default' (mask2former, owlv2, psgtr, rapidocr), 'none', a comma list of names with optional "
        "model ids (mask2former=/path,rapidocr) or a JSON object by task",
    )


def add_generation_options(p: argparse.ArgumentParser) -> None:
    """The generation options of ``moai run`` (``--max-new-tokens``, sampling, beams, stops, seed)."""
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--num-beams", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)


def add_tiny_option(p: argparse.ArgumentParser) -> None:
    """``--tiny DIR``: a tiny random MoAI (built in DIR, offline) instead of ``--model``."""
    p.add_argument(
        "--tiny",
        default=None,
        metavar="DIR",
        help="use a tiny random MoAI built in DIR (offline, CPU, random answers) for demos and tests",
    )


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The generation keywords of a pipeline call from options added by :func:`add_generation_options`
    (options left unset are left out, so the pipeline's defaults apply)."""
    options = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=True if args.do_sample else None,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        num_beams=args.num_beams,
        repetition_penalty=args.repetition_penalty,
        stop=args.stop,
        seed=args.seed,
    )
    return {k: v for k, v in options.items() if v is not None}


def parse_experts(text: Optional[str]) -> Any:
    """The ``--experts`` value as an ``experts=`` specification.

    ``default`` -> ``"default"``; ``none`` / empty -> ``None``; ``{...}`` -> the JSON object; otherwise a comma
    list of ``name`` or ``name=model_id`` items.
    """
    if text is None:
        return "default"
    value = text.strip()
    if value.lower() == "default":
        return "default"
    if value.lower() in ("", "none", "off"):
        return None
    if value.startswith("{"):
        try:
            spec = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InputError(f"--experts is not valid JSON: {exc}") from exc
        if not isinstance(spec, dict):
            raise InputError("--experts JSON must be an object keyed by task or expert name")
        return spec
    items: list[Any] = []
    for raw in value.split(","):
        item = raw.strip()
        if not item:
            continue
        name, sep, model_id = item.partition("=")
        if sep:
            if not name.strip() or not model_id.strip():
                raise InputError(f"--experts item {item!r} must be NAME or NAME=MODEL_ID")
            items.append({"name": name.strip(), "model_id": model_id.strip()})
        else:
            items.append(name)
    return items or None


def pipeline_kwargs(args: argparse.Namespace, *, with_model: bool = True) -> dict[str, Any]:
    """The :meth:`MoAIPipeline.from_pretrained` keywords the parsed options describe.

    With ``--tiny DIR`` (when the command has it) only ``experts`` (``default`` meaning the tiny random experts)
    and ``template``: the rest is fixed by :func:`moai_sdk.testing.tiny_pipeline`. ``with_model=False``: the
    options of an experts-only pipeline (``moai perceive``).
    """
    experts = parse_experts(args.experts)
    if getattr(args, "tiny", None):
        kwargs: dict[str, Any] = {"experts": "tiny" if experts == "default" else experts}
        if with_model and getattr(args, "template", None):
            kwargs["template"] = args.template
        return kwargs
    kwargs = dict(
        device=args.device,
        cache_dir=args.cache_dir,
        local_files_only=args.local_files_only,
        token=args.token,
        experts=experts,
    )
    if with_model:
        kwargs.update(
            revision=args.revision,
            dtype=args.dtype,
            quantization=None if args.quantization == "none" else args.quantization,
            template=args.template,
        )
    else:
        kwargs["quantization"] = None
    return kwargs


def pipeline_from_args(args: argparse.Namespace, *, with_model: bool) -> MoAIPipeline:
    """Build the :class:`~moai_sdk.pipeline.MoAIPipeline` the parsed options describe (see :func:`pipeline_kwargs`;
    ``--tiny DIR`` gives :func:`moai_sdk.testing.tiny_pipeline`)."""
    kwargs = pipeline_kwargs(args, with_model=with_model)
    tiny = getattr(args, "tiny", None)
    if tiny:
        from .testing import tiny_pipeline

        return tiny_pipeline(tiny, **kwargs)
    from .pipeline import MoAIPipeline

    model = (args.model or DEFAULT_MODEL_ID) if with_model else DEFAULT_MODEL_ID
    return MoAIPipeline.from_pretrained(model, **kwargs)


__all__ = [
    "QUANTIZATION_CHOICES",
    "add_model_options",
    "add_hub_options",
    "add_experts_option",
    "add_generation_options",
    "add_tiny_option",
    "generation_kwargs",
    "parse_experts",
    "pipeline_kwargs",
    "pipeline_from_args",
]
