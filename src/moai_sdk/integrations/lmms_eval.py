"""MoAI as an ``lmms-eval`` model: ``lmms-eval --model moai --model_args pretrained=BK-Lee/MoAI-7B ...``.

moai-sdk registers :func:`manifest` under lmms-eval's plugin entry point group ``lmms_eval.models`` (see
``pyproject.toml``), so the model is found once ``moai-sdk[eval]`` is installed; nothing to copy into lmms-eval.

``--model_args``: ``pretrained`` (Hub id or folder; default BK-Lee/MoAI-7B) or ``tiny=DIR`` (the tiny random
MoAI, for tests), ``device``, ``dtype``, ``quantization``, ``experts`` (``default``, ``none``, a comma list),
``template`` (``chat``: the official benchmarks'), ``batch_size``.

* ``generate_until``: requests with the same generation settings are answered in batches of ``batch_size``
  through the pipeline (one pipeline call per batch: experts, verbalization, one batched generation). lmms-eval's
  ``until`` strings become stop strings; ``temperature`` > 0 samples, else greedy or ``num_beams`` beams.
* ``loglikelihood``: through ``pipe.score`` (one perception and one prefill per prompt, shared by its
  continuations); returns ``(sum of the continuation's token logprobs, whether greedy decoding gives it)``.
* Each request uses the first image of its document (MoAI reads one image per question).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Optional

from ..errors import DependencyError, InputError

logger = logging.getLogger(__name__)

try:  # lmms-eval is optional (moai-sdk[eval]); the class below needs its base class
    from lmms_eval.api.model import lmms as _LMMBase
except ImportError:  # pragma: no cover - exercised only without lmms-eval
    _LMMBase = object  # type: ignore[assignment,misc]


def manifest() -> Any:
    """The lmms-eval model manifest of ``moai`` (the ``lmms_eval.models`` entry point's payload)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="moai", simple_class_path="moai_sdk.integrations.lmms_eval.MoAI")


def _as_bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


def generation_options(gen_kwargs: dict[str, Any]) -> dict[str, Any]:
    """lmms-eval's ``generation_kwargs`` as pipeline generation options."""
    gen = dict(gen_kwargs or {})
    until = gen.pop("until", None)
    options: dict[str, Any] = {}
    if until:
        stops = [until] if isinstance(until, str) else list(until)
        options["stop"] = [s for s in stops if s]
    if "max_new_tokens" in gen:
        options["max_new_tokens"] = int(gen["max_new_tokens"])
    temperature = float(gen.get("temperature") or 0.0)
    if temperature > 0 or _as_bool(gen.get("do_sample", False)):
        options.update(do_sample=True, temperature=temperature if temperature > 0 else 1.0)
        if gen.get("top_p") is not None:
            options["top_p"] = float(gen["top_p"])
    elif gen.get("num_beams") is not None and int(gen["num_beams"]) > 1:
        options["num_beams"] = int(gen["num_beams"])
    return options


class MoAI(_LMMBase):  # type: ignore[misc,valid-type]
    """lmms-eval's ``lmms`` over a :class:`~moai_sdk.pipeline.MoAIPipeline`."""

    is_simple = True

    def __init__(
        self,
        pretrained: Optional[str] = None,
        tiny: Optional[str] = None,
        device: str = "auto",
        dtype: str = "auto",
        quantization: Optional[str] = None,
        experts: str = "default",
        template: str = "chat",
        batch_size: Any = 1,
        pipeline: Any = None,
        **kwargs: Any,
    ) -> None:
        if _LMMBase is object:
            raise DependencyError("the lmms-eval model needs lmms-eval: pip install 'moai-sdk[eval]'")
        super().__init__()
        if kwargs:
            logger.warning("moai: ignoring unknown model_args %s", sorted(kwargs))
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise InputError(f"batch_size must be a positive integer; got {batch_size!r}")
        if pipeline is not None:
            self.pipe = pipeline
        else:
            from ..cli_options import parse_experts

            parsed = parse_experts(experts)
            if tiny:
                from ..testing import tiny_pipeline

                self.pipe = tiny_pipeline(tiny, experts="tiny" if parsed == "default" else parsed, template=template)
            else:
                from ..pipeline import DEFAULT_MODEL_ID, MoAIPipeline

                options: dict[str, Any] = {"device": device, "dtype": dtype, "template": template, "experts": parsed}
                if quantization not in (None, "", "none", "None"):
                    options["quantization"] = quantization
                self.pipe = MoAIPipeline.from_pretrained(pretrained or DEFAULT_MODEL_ID, **options)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def _image(self, doc_to_visual: Any, task: str, split: str, doc_id: int) -> Any:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        visuals = [v for v in (visuals or []) if v is not None]
        if not visuals:
            raise InputError(f"{task} doc {doc_id}: MoAI answers about an image and this document has none")
        if len(visuals) > 1:
            logger.warning("%s doc %s: %d images; MoAI reads the first", task, doc_id, len(visuals))
        return visuals[0]

    def generate_until(self, requests: list[Any]) -> list[str]:
        from tqdm import tqdm

        groups: OrderedDict[str, list[int]] = OrderedDict()
        args = [r.args for r in requests]
        for i, (_, gen_kwargs, *_rest) in enumerate(args):
            groups.setdefault(repr(sorted((gen_kwargs or {}).items(), key=lambda kv: kv[0])), []).append(i)
        answers: list[Optional[str]] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="moai generate_until", disable=self.rank != 0)
        for indices in groups.values():
            options = generation_options(args[indices[0]][1])
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                images = [self._image(args[i][2], args[i][4], args[i][5], args[i][3]) for i in chunk]
                prompts = [args[i][0] for i in chunk]
                results = self.pipe(images, prompts, **options)
                for i, result in zip(chunk, results):
                    answers[i] = result.text
                    self.cache_hook.add_partial("generate_until", (args[i][0], args[i][1]), result.text)
                bar.update(len(chunk))
        bar.close()
        return [a if a is not None else "" for a in answers]

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        score = getattr(self.pipe, "score", None)
        if score is None:
            raise DependencyError(
                "loglikelihood needs MoAIPipeline.score (continuation scoring), which this moai-sdk does not have"
            )
        out: list[tuple[float, bool]] = []
        for req in requests:
            context, target, doc_to_visual, doc_id, task, split = req.args
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            image = self._image(doc_to_visual, task, split, doc_id)
            result = score(image, context, [continuation])
            best = result.continuations[0]
            out.append((float(best.logprob), bool(best.is_greedy)))
        return out

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("MoAI answers one question per image: multi-round generation is not supported")


__all__ = ["MoAI", "manifest", "generation_options"]
