"""See inside MoAI: the MoAI-Mixer's gate weights for an answer, and per-expert ablation.

* :func:`mixer_gates` turns the gate weights the model recorded (``generate(..., output_gates=True)``, one
  :class:`~moai_sdk.modeling.mixer.GateWeights` per mixer layer) into the typed, JSON-ready
  :class:`~moai_sdk.gates.MixerGates` of one batch row: per layer the mean weights over the image tokens and
  over the language tokens, and optionally the per-token weights. ``pipe(image, prompt, return_gates=True)``
  stores it in :attr:`MoAIResult.mixer <moai_sdk.results.MoAIResult.mixer>`.
* :func:`recording_gates` records them around any call of the model (the pipeline uses it for
  ``return_gates``), and :func:`batch_gates` gives the typed gates of every row of a batch.
* :func:`ablate` answers once with every expert and once without each chosen expert, as one batch reusing one
  perception. "Without expert X" means: X's verbalization part is the official empty string ``""`` (the other
  parts stay character for character) and, for segmentation, the panoptic colour map is blank (black, as when
  no segment is found) -- exactly what the model sees when X finds nothing. The result is an
  :class:`AblationTable` (answer, whether it changed, token counts and, with ``return_gates``, the gate
  weights per variant), printable, JSON-serialisable and plottable.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image as PILImage
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError, InputError, MoAIError
from .gates import LayerGates, MixerGates
from .modeling.mixer import GateRecorder, GateWeights
from .results import TASKS, MoAIResult, PerceptionResult
from .verbalization import VerbalizationParts, verbalize_parts
from .viz_explain import plot_ablation

logger = logging.getLogger(__name__)

#: Name of the variant that keeps every expert.
ALL_EXPERTS = "all experts"


# ----------------------------------------------------------------------------------------------------------
# gate weights -> typed results
# ----------------------------------------------------------------------------------------------------------


def _rows(values: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """The applied rows of one batch row as float64 (exact for float16/bfloat16/float32 weights)."""
    return values[mask].detach().to("cpu", torch.float64).numpy().reshape(-1, 3)


def _mean(rows: np.ndarray) -> tuple[float, float, float]:
    m = rows.mean(0) if len(rows) else np.zeros(3)
    return float(m[0]), float(m[1]), float(m[2])


def mixer_gates(
    gate_weights: Sequence[GateWeights],
    row: int = 0,
    *,
    tokens: bool = False,
    input_ids: Optional[torch.Tensor] = None,
    image_token_id: Optional[int] = None,
) -> MixerGates:
    """The typed gate weights of batch row ``row``.

    ``gate_weights``: what ``forward``/``generate(..., output_gates=True)`` returned. Means are computed in
    float64 over the rows the gates were applied to (padding excluded). ``tokens=True`` keeps the per-token
    weights; with ``input_ids`` (the prompt ids [B, T]) and ``image_token_id`` it also records the token id of
    each language row.
    """
    if not gate_weights:
        return MixerGates(num_image_tokens=0, num_language_tokens=0, dtype="none", layers=[])
    first = gate_weights[0]
    if not 0 <= row < first.image.shape[0]:
        raise InputError(f"row {row} is outside the batch of {first.image.shape[0]}")
    layers = []
    for gw in gate_weights:
        image = _rows(gw.image[row], gw.image_mask[row])
        language = _rows(gw.language[row], gw.language_mask[row])
        layers.append(
            LayerGates(
                layer=gw.layer,
                image=_mean(image),
                language=_mean(language),
                image_tokens=[tuple(r) for r in image.tolist()] if tokens else None,
                language_tokens=[tuple(r) for r in language.tolist()] if tokens else None,
            )
        )
    ids = None
    if tokens and input_ids is not None and image_token_id is not None:
        prompt = input_ids[row].detach().cpu()
        text_ids = prompt[prompt != image_token_id]  # the non-image positions, in the order of the language rows
        ids = [int(t) for t in text_ids[first.language_mask[row].cpu()]]
    return MixerGates(
        dtype=str(first.image.dtype).replace("torch.", ""),
        num_image_tokens=int(first.image_mask[row].sum()),
        num_language_tokens=int(first.language_mask[row].sum()),
        language_token_ids=ids,
        layers=layers,
    )


def _check_mode(return_gates: Any) -> None:
    if return_gates not in (False, True, None, "tokens"):
        raise InputError(f"return_gates is True, False or 'tokens' (per-token weights too); got {return_gates!r}")


@contextmanager
def recording_gates(model: Any, return_gates: Union[bool, str, None] = True) -> Iterator[list[GateWeights]]:
    """Record the gate weights of the mixers of ``model`` that run inside the block (in this thread).

    Yields a list that holds, when the block ends, one :class:`~moai_sdk.modeling.mixer.GateWeights` per mixer
    layer that ran, in layer order (the prefill's: generated tokens never reach the mixer). With
    ``return_gates`` false nothing is recorded and the list stays empty.
    """
    _check_mode(return_gates)
    recorded: list[GateWeights] = []
    if not return_gates:
        yield recorded
        return
    recorder = GateRecorder()
    with recorder.recording():
        yield recorded
    recorded.extend(recorder.collect(model.mixers_by_layer()))


def batch_gates(
    gate_weights: Sequence[GateWeights], inputs: Any, return_gates: Union[bool, str, None]
) -> list[Optional[MixerGates]]:
    """The typed gates of every row of a batch (``inputs``: its :class:`~moai_sdk.processing.MoAIInputs`), or
    ``None`` per row when ``return_gates`` is false; ``"tokens"`` keeps the per-token weights and token ids."""
    _check_mode(return_gates)
    n = int(inputs.input_ids.shape[0])
    if not return_gates:
        return [None] * n
    tokens = return_gates == "tokens"
    ids, image_id = inputs.input_ids, inputs.image_token_index
    return [mixer_gates(gate_weights, i, tokens=tokens, input_ids=ids, image_token_id=image_id) for i in range(n)]


# ----------------------------------------------------------------------------------------------------------
# ablation
# ----------------------------------------------------------------------------------------------------------


class AblationRow(BaseModel):
    """One variant of an ablation: ``removed`` is the task whose expert output was removed (``None`` for the
    run with every expert); ``changed`` says whether the answer differs from that run's."""

    model_config = ConfigDict(extra="forbid")

    variant: str
    removed: Optional[str] = None
    text: str
    changed: bool = False
    aux_text: str = ""
    token_counts: dict[str, int] = Field(default_factory=dict)
    gates: Optional[MixerGates] = None


class AblationTable(BaseModel):
    """Answers of one prompt with every expert and without each chosen expert (first row: every expert)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    rows: list[AblationRow]

    @property
    def full(self) -> AblationRow:
        """The run with every expert."""
        return self.rows[0]

    def row(self, removed: Optional[str]) -> AblationRow:
        """The variant without the task ``removed`` (``None``: every expert)."""
        for r in self.rows:
            if r.removed == removed:
                return r
        raise InputError(f"no variant without {removed!r}; variants: {[r.variant for r in self.rows]}")

    def __str__(self) -> str:
        with_gates = all(r.gates is not None and r.gates.layers for r in self.rows)
        head = f"{'variant':<24} {'aux':>5} {'gen':>4} {'changed':>7}"
        if with_gates:
            head += f"  {'image gate aux/lang/self':<25} {'language gate aux/img/self':<26}"
        lines = [f"prompt: {self.prompt}", head + "  answer"]
        for r in self.rows:
            line = (
                f"{r.variant:<24} {r.token_counts.get('aux', 0):>5} {r.token_counts.get('generated', 0):>4} "
                f"{'yes' if r.changed else '':>7}"
            )
            if with_gates:
                img, lang = r.gates.mean()
                line += f"  {'/'.join(f'{v:.3f}' for v in img):<25} {'/'.join(f'{v:.3f}' for v in lang):<26}"
            lines.append(line + "  " + " ".join(r.text.split()))
        return "\n".join(lines)

    def to_json(self, indent: Optional[int] = None) -> str:
        return self.model_dump_json(indent=indent)

    @classmethod
    def from_json(cls, text: str | bytes) -> AblationTable:
        """Parse :meth:`to_json` output; raises :class:`InputError` on malformed input."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise InputError(f"not a valid AblationTable JSON: {exc}") from exc

    def plot(self, title: Optional[str] = None, **kwargs: Any) -> PILImage.Image:
        """One row per variant: answer (red when it changed), aux tokens and, with gates, the gate weights
        averaged over the mixer layers (see :func:`moai_sdk.viz_explain.plot_ablation`)."""
        means = [r.gates.mean() for r in self.rows] if all(r.gates and r.gates.layers for r in self.rows) else None
        return plot_ablation(
            [r.variant for r in self.rows],
            [r.text for r in self.rows],
            [r.token_counts.get("aux", 0) for r in self.rows],
            [r.changed for r in self.rows],
            image=[m[0] for m in means] if means else None,
            language=[m[1] for m in means] if means else None,
            title=self.prompt if title is None else title,
            **kwargs,
        )

    def save(self, path: str | Path, **kwargs: Any) -> Path:
        """``*.json`` writes :meth:`to_json`; other suffixes the :meth:`plot` picture."""
        path = Path(path)
        if path.suffix.lower() == ".json":
            path.write_text(self.to_json(**kwargs), encoding="utf-8")
        else:
            self.plot(**kwargs).save(path)
        return path


def ablation_tasks(perception: PerceptionResult, experts: Any = None, configured: Any = None) -> list[str]:
    """The tasks to ablate: ``None`` = every task the perception holds; otherwise task names or the names of
    configured experts (``configured``: the pipeline's task -> expert mapping)."""
    if experts is None:
        tasks = list(perception.tasks)
        if not tasks:
            raise InputError("the perception holds no expert output, so there is nothing to ablate")
        return tasks
    items = [experts] if isinstance(experts, str) else list(experts)
    by_name = {getattr(e, "name", None): t for t, e in dict(configured or {}).items()}
    tasks: list[str] = []
    for item in items:
        task = item if item in TASKS else by_name.get(item)
        if task is None:
            raise ConfigError(
                f"cannot ablate {item!r}: name a task ({', '.join(TASKS)}) or a configured expert "
                f"({', '.join(sorted(n for n in by_name if n)) or 'none configured'})"
            )
        if not perception.has_task(task):
            raise InputError(f"the perception holds no {task} output, so removing it would change nothing")
        if task not in tasks:
            tasks.append(task)
    return sorted(tasks, key=TASKS.index)


def ablation_perceptions(
    perception: PerceptionResult, tasks: Sequence[str], *, corrected: bool = False
) -> list[tuple[str, Optional[str], PerceptionResult]]:
    """(variant name, removed task, perception) for the full run and one per task.

    Checks the ablation semantics on the verbalization: each variant's parts equal the full run's with the
    removed task's part replaced by the official empty string.
    """
    full_parts = verbalize_parts(perception, corrected=corrected)
    variants: list[tuple[str, Optional[str], PerceptionResult]] = [(ALL_EXPERTS, None, perception)]
    for task in tasks:
        reduced = perception.without(task)
        expected = full_parts.model_copy(update={task: ""})
        got: VerbalizationParts = verbalize_parts(reduced, corrected=corrected)
        if got != expected:  # the four parts are independent; a difference here is a bug, not bad input
            raise MoAIError(f"removing {task} changed other verbalization parts: {got!r} vs {expected!r}")
        variants.append((f"without {task}", task, reduced))
    return variants


def ablate(
    pipe: Any,
    image: Any,
    prompt: str,
    *,
    experts: Any = None,
    return_gates: bool | str = False,
    perception: Optional[PerceptionResult] = None,
    **options: Any,
) -> AblationTable:
    """Answer ``prompt`` about ``image`` with every expert and without each of ``experts`` (default: every
    expert whose output the perception holds), all variants as one batch of ``pipe``.

    The experts run once (``pipe.perceive``, through the pipeline's cache) unless ``perception`` is given.
    ``return_gates`` (``True`` or ``"tokens"``) records the mixer gate weights of each variant. ``options`` are
    the generation options of a pipeline call (greedy decoding makes the comparison exact; when sampling, the
    variants draw from one generator, so their differences mix the ablation with sampling noise).
    """
    if not isinstance(prompt, str):
        raise InputError(f"ablate answers one prompt (a str); got {type(prompt).__name__}")
    if perception is None:
        perception = pipe.perceive(image)
    elif not isinstance(perception, PerceptionResult):
        raise InputError(f"perception must be a PerceptionResult; got {type(perception).__name__}")
    tasks = ablation_tasks(perception, experts, getattr(pipe, "experts", None))
    corrected = bool(getattr(pipe, "corrected_verbalization", False))
    variants = ablation_perceptions(perception, tasks, corrected=corrected)
    n = len(variants)
    results: list[MoAIResult] = pipe(
        [image] * n, [prompt] * n, perception=[v[2] for v in variants], return_gates=return_gates, **options
    )
    full = results[0].text
    rows = [
        AblationRow(
            variant=name,
            removed=task,
            text=res.text,
            changed=res.text != full,
            aux_text=res.aux_text,
            token_counts=dict(res.token_counts),
            gates=res.mixer,
        )
        for (name, task, _), res in zip(variants, results)
    ]
    logger.info("ablation of %s: %d of %d variants changed the answer", tasks, sum(r.changed for r in rows), n - 1)
    return AblationTable(prompt=prompt, rows=rows)


__all__ = [
    "ALL_EXPERTS",
    "AblationRow",
    "AblationTable",
    "LayerGates",
    "MixerGates",
    "ablate",
    "ablation_perceptions",
    "ablation_tasks",
    "batch_gates",
    "mixer_gates",
    "recording_gates",
]
