"""MoAI as an ``lmms-eval`` model: ``lmms-eval --model moai --model_args pretrained=BK-Lee/MoAI-7B ...``.

moai-sdk registers :func:`manifest` under lmms-eval's plugin entry point group ``lmms_eval.models`` (see
``pyproject.toml``), so the model is found once ``moai-sdk[eval]`` is installed; nothing to copy into lmms-eval.

``--model_args``: ``pretrained`` (Hub id or folder; default BK-Lee/MoAI-7B) or ``tiny=DIR`` (the tiny random
MoAI, for tests), ``device``, ``dtype``, ``quantization``, ``experts`` (``default``, ``none``, a comma list),
``template`` (``chat``: the official benchmarks'), ``batch_size``, ``loglikelihood`` (``nll``, ``mean_nll``,
``logprob``; below).

* ``generate_until``: requests with the same generation settings are answered in batches of ``batch_size``
  through the pipeline (one pipeline call per batch: experts, verbalization, one batched generation). lmms-eval's
  ``until`` strings become stop strings; ``temperature`` > 0 samples, else greedy or ``num_beams`` beams.
* ``loglikelihood``: through ``pipe.score``; the requests of one document and context (a multiple-choice
  question's choices) share one perception and one prefill, ``batch_size`` prompts per call, and the answers come
  back in lmms-eval's request order. Each answer is ``(value, whether greedy decoding gives the continuation)``.
  lmms-eval's ``multiple_choice`` picks the choice with the LOWEST value (``argmin``: its own models return a
  loss), so ``value`` is by default the continuation's negative log-likelihood, ``-ContinuationScore.logprob``
  (the summed token logprobs, negated), and lmms-eval picks the most likely choice. ``--model_args
  loglikelihood=mean_nll`` divides it by the continuation's token count (the per-token mean loss that lmms-eval's
  LLaVA-family models return); ``loglikelihood=logprob`` returns the log-probability itself (the sign
  lmms-eval's ``lmms.loglikelihood`` docstring names; its ``multiple_choice`` then picks the least likely choice).
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


LOGLIKELIHOOD_MODES = ("nll", "mean_nll", "logprob")


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


def _for_evaluator(pairs: list[tuple[float, bool]]) -> list[Any]:
    """The ``(value, is_greedy)`` pairs in the form the installed lmms-eval's evaluator keeps intact.

    lmms-eval 0.7.3 passes every model output through ``unwrap_generation_output``, which turns anything that is
    not a string, a ``GenerationResult`` or a ``(str, dict)`` pair into ``str(output)``: a loglikelihood pair
    becomes the string ``"(-1.5, False)"`` and ``multiple_choice`` scoring fails (``zip(*results)`` over
    characters). Where the installed evaluator does that, each pair travels as ``GenerationResult(text=pair)``,
    which it unwraps to the pair itself; elsewhere the pairs are returned as they are.
    """
    try:
        from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
    except ImportError:  # an lmms-eval without the unwrapping step keeps the pairs as they are
        return list(pairs)
    if unwrap_generation_output((0.0, True))[0] == (0.0, True):
        return list(pairs)
    return [GenerationResult(text=pair) for pair in pairs]  # type: ignore[arg-type]


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
        loglikelihood: str = "nll",
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
        if loglikelihood not in LOGLIKELIHOOD_MODES:
            raise InputError(f"loglikelihood must be one of {', '.join(LOGLIKELIHOOD_MODES)}; got {loglikelihood!r}")
        self.ll_mode = loglikelihood
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

    def loglikelihood(self, requests: list[Any]) -> list[Any]:
        """Per request ``(value, is_greedy)`` through ``pipe.score``, in the order of ``requests`` (each pair
        wrapped where the installed lmms-eval needs it: :func:`_for_evaluator`).

        Requests with the same document and context are scored together (one perception and one prefill per
        prompt, shared by all its continuations -- a multiple-choice question's choices); ``batch_size`` prompts
        go through one ``pipe.score`` call. ``value`` follows the ``loglikelihood`` model_arg (see the module).
        """
        score = getattr(self.pipe, "score", None)
        if score is None:
            raise DependencyError(
                "loglikelihood needs MoAIPipeline.score (continuation scoring), which this moai-sdk does not have"
            )
        from tqdm import tqdm

        # 1. group the requests by prompt: (task, split, doc) gives the image, the context the text
        groups: OrderedDict[tuple[Any, ...], tuple[Any, list[tuple[int, str]]]] = OrderedDict()
        for i, req in enumerate(requests):
            context, target, doc_to_visual, doc_id, task, split = req.args
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            key = (task, split, doc_id, context)
            groups.setdefault(key, (doc_to_visual, []))[1].append((i, continuation))
        # 2. batch_size prompts per pipe.score call; answers go back to their request's position
        out: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        keys = list(groups)
        bar = tqdm(total=len(requests), desc="moai loglikelihood", disable=self.rank != 0)
        for start in range(0, len(keys), self.batch_size):
            chunk = keys[start : start + self.batch_size]
            images = [self._image(groups[k][0], k[0], k[1], k[2]) for k in chunk]
            results = score(images, [k[3] for k in chunk], [[c for _, c in groups[k][1]] for k in chunk])
            for key, result in zip(chunk, results, strict=True):
                for (i, continuation), scored in zip(groups[key][1], result.continuations, strict=True):
                    pair = (self._ll_value(scored), bool(scored.is_greedy))
                    out[i] = pair
                    self.cache_hook.add_partial("loglikelihood", (key[3], continuation), pair)
                bar.update(len(groups[key][1]))
        bar.close()
        return _for_evaluator(out)  # type: ignore[arg-type]  # every position is filled above

    def _ll_value(self, scored: Any) -> float:
        """The number lmms-eval records for one scored continuation (the ``loglikelihood`` model_arg)."""
        if self.ll_mode == "logprob":
            return float(scored.logprob)
        if self.ll_mode == "mean_nll":
            return -float(scored.logprob) / max(len(scored.token_ids), 1)
        return -float(scored.logprob)

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("MoAI answers one question per image: multi-round generation is not supported")


__all__ = ["LOGLIKELIHOOD_MODES", "MoAI", "manifest", "generation_options"]
