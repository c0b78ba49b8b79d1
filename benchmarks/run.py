"""Stage-by-stage benchmark of the MoAI pipeline, our optimized default against an official-style reference.

Usage (see benchmarks/README.md)::

    python -m benchmarks.run --config tiny-cpu                      # the moai-tiny fixture on CPU
    python -m benchmarks.run --config 7b-cuda --out results/        # MoAI-7B shapes, random weights, CUDA

For every setup (model x quantization) and batch size, both modes run the same images and prompts:

* ``default`` -- what moai-sdk does: batched MoAI-Mixer, SDPA attention, OWLv2 query embeddings computed once,
  the runner's ``concurrent="auto"`` schedule (experts on the GPU one after another, CPU experts such as
  OCR in a background thread at the same time);
* ``reference`` -- the same function computed the straightforward way the official code does it: the mixer
  loops over samples with masked indexing, eager matmul-softmax attention, OWLv2 re-tokenizes and re-encodes
  its 1847 queries for every image, experts run one after another.

Before timing, the two modes' outputs are compared (expert results, prefill logits, greedy tokens); a
disagreement is recorded and makes the run exit with status 1 after all numbers are written. Each mode then
runs ``--warmup`` untimed and ``--repeats`` timed passes, interleaved (default, reference, default, ...) so
that drifting machine load hits both alike. Reported per stage: median, min, max over the repeats, and the
ratio reference / default of the medians.

Stages (seconds unless noted): ``experts`` (all experts, wall) and ``expert:<name>`` (each expert's own batch
time), ``verbalize``, ``processor`` (templates, tokenization, image normalisation), ``generate`` (the model
call from processed inputs: vision tower, compression, prefill and all new tokens), ``ttft`` (raw images to
the first new token), ``decode_tok_s`` (new tokens per second per sequence after the first), ``e2e`` (raw
images to answer strings), and separately timed model stages on the same inputs: ``vision`` (image through
CLIP + projector), ``aux_embed`` (verbalization embeddings + panoptic map through CLIP + projector),
``compression`` (the MoAI-Compressor) and ``prefill`` (the decoder over the merged prompt, KV cache filled).
``peak_mem_bytes``: process RSS peak on CPU (sampled), ``torch.cuda.max_memory_allocated`` on CUDA (models
included).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

logger = logging.getLogger("benchmarks.run")

REPO = Path(__file__).resolve().parent.parent
TINY_DIR = REPO / "tests" / "fixtures" / "moai-tiny"
IMAGE_FILES = ("a_demo_full.image0.png", "c_raw640x480_empty.raw_image0.png", "b_eval_template.image0.png")
PROMPTS = (
    "Describe this image in detail.",
    "How many cars are there?\nAnswer the question using a single word or phrase.",
    "What is written on the sign?",
    "What is the person on the left holding, and what colour is it?",
)
MODES = ("default", "reference")
STAGE_ORDER = (
    "experts",
    "verbalize",
    "processor",
    "vision",
    "aux_embed",
    "compression",
    "prefill",
    "generate",
    "ttft",
    "decode_tok_s",
    "e2e",
    "peak_mem_bytes",
)


# ----------------------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Wall-clock seconds per named stage; the device is synchronized at both ends of a stage."""

    def __init__(self, device: torch.device):
        self.device = device
        self.values: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        synchronize(self.device)
        t0 = time.perf_counter()
        out = fn()
        synchronize(self.device)
        self.values[name] = time.perf_counter() - t0
        return out


class PeakMemory:
    """Peak memory over a block: CUDA ``max_memory_allocated``, or the process RSS sampled every 2 ms on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm", encoding="ascii") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            import resource

            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB; a lifetime peak

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = self.rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak = max(self.peak, self.rss())


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    values = [float(v) for v in samples]
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "spread": (max(values) - min(values)) / 2,
        "samples": values,
    }


# ----------------------------------------------------------------------------------------------------------
# setups
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """One model (and its experts) to benchmark."""

    name: str
    device: torch.device
    model: Any
    processor: Any
    perception: Any  # moai_sdk.Perception or None (model-only setup)
    new_tokens: int
    logits_tol: float
    exact_tokens: bool
    info: dict[str, Any] = field(default_factory=dict)
    #: Expert results by batch size: filled while the experts run, read by setups that do not run them.
    perception_store: dict[int, list[Any]] = field(default_factory=dict)
    #: Decode the default mode with fixed-shape steps replayed as a CUDA graph (``--cuda-graphs``).
    cuda_graphs: bool = False
    mode: str = "default"

    def generate_options(self) -> dict[str, Any]:
        """Generation options of the current mode (the reference mode never uses CUDA graphs)."""
        return {"cuda_graphs": self.cuda_graphs and self.mode == "default"}

    def set_mode(self, mode: str) -> None:
        """Switch model and experts between ``default`` and ``reference``."""
        if mode not in MODES:
            raise ValueError(mode)
        self.mode = mode
        self.model.set_mixer_mode("batched" if mode == "default" else "reference")
        for layer in self.model.model.layers:
            layer.attention.attn_implementation = "sdpa" if mode == "default" else "eager"
        if self.perception is not None:
            self.perception.concurrent = "auto" if mode == "default" else False
            for expert in self.perception.experts:
                if "reencode_queries" in expert.settings:
                    expert.settings["reencode_queries"] = mode == "reference"


def load_images(batch: int) -> list[np.ndarray]:
    """``batch`` RGB images cycling through the fixture pictures (490 x 490 and a raw 640 x 480)."""
    from PIL import Image

    pictures = [np.array(Image.open(TINY_DIR / name).convert("RGB")) for name in IMAGE_FILES]
    return [pictures[i % len(pictures)] for i in range(batch)]


def prompts_for(batch: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(batch)]


def _tiny_experts(workdir: Path, names: Sequence[str], device: torch.device) -> list[Any]:
    """The tiny random Mask2Former / OWLv2 (calibrated like the full-size ones) and the real RapidOCR."""
    from moai_sdk.experts import create_expert
    from moai_sdk.testing import build_tiny_mask2former, build_tiny_owlv2

    from .shapes import calibrate_mask2former, calibrate_owlv2

    experts = []
    for name in names:
        if name == "mask2former":
            expert = create_expert("mask2former", model_id=str(build_tiny_mask2former(workdir / "m2f")), device=device)
            expert.load()
            st = expert.settings
            calibrate_mask2former(
                expert.model,
                expert.processor,
                st["threshold"],
                st["mask_threshold"],
                st["overlap_mask_area_threshold"],
                target=3,
            )
        elif name == "owlv2":
            expert = create_expert("owlv2", model_id=str(build_tiny_owlv2(workdir / "owl")), device=device)
            expert.load()
            calibrate_owlv2(
                expert.model, expert.processor, expert.queries, expert.settings["threshold"], target=5, strong=2
            )
        elif name == "ocr":
            expert = create_expert("rapidocr")
        else:
            raise SystemExit(f"unknown expert {name!r} for tiny-cpu (choose from mask2former, owlv2, ocr)")
        experts.append(expert)
    return experts


def tiny_cpu_setups(args: argparse.Namespace, workdir: Path) -> Iterator[Setup]:
    from moai_sdk import MoAIProcessor, Perception
    from moai_sdk.modeling import MoAIForCausalLM

    device = torch.device("cpu")
    model = MoAIForCausalLM.from_pretrained(TINY_DIR, device="cpu", dtype="float32")
    processor = MoAIProcessor.from_pretrained(TINY_DIR)
    names = list(args.experts) if args.experts is not None else ["mask2former", "owlv2"]
    names += ["ocr"] if args.ocr and "ocr" not in names else []
    if args.no_experts:
        names = []
    experts = _tiny_experts(workdir, names, device)
    perception = Perception(experts, keep_image=False) if experts else None
    yield Setup(
        name="tiny-cpu",
        device=device,
        model=model,
        processor=processor,
        perception=perception,
        new_tokens=args.new_tokens or 32,
        # The two modes add in different orders (batched mixer + SDPA vs the official loop + eager attention), and
        # the released numerics round the mixer's gate softmax to float16: fp32 noise of ~1e-5 in a gate logit can
        # move a gate weight by one float16 step (<= 4.9e-4), which shows as ~1e-4 relative logit error on this
        # random tiny model. Greedy tokens must still be identical (exact_tokens).
        logits_tol=5e-4,
        exact_tokens=True,
        cuda_graphs=args.cuda_graphs,
        info={
            "model": "moai-tiny fixture",
            "dtype": "float32",
            "experts": [e.name for e in experts],
            "threads": torch.get_num_threads(),
            "cuda_graphs": args.cuda_graphs,
        },
    )


def _cuda_experts(args: argparse.Namespace, workdir: Path, device: torch.device, notes: list[str]) -> list[Any]:
    """Full-size random experts on CUDA (+ RapidOCR on CPU threads when installed), each skipped with a note
    when it cannot be built offline."""
    import importlib.util

    from moai_sdk.experts import create_expert

    from .shapes import RandomMask2FormerExpert, RandomOwlv2Expert, synthetic_psgtr_file

    dtype = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.expert_dtype]
    names = list(args.experts) if args.experts is not None else ["mask2former", "owlv2", "ocr"]
    names += ["psgtr"] if args.psgtr and "psgtr" not in names else []
    backend = "pil"
    if importlib.util.find_spec("scipy") is None:
        backend = "torchvision"
        notes.append(
            "scipy missing: OWLv2 and Mask2Former use the torchvision image processors instead of the "
            "reference (PIL) ones"
        )
    experts = []
    for name in names:
        try:
            if name == "mask2former":
                expert = RandomMask2FormerExpert(device=device, dtype=dtype, image_backend=backend)
            elif name == "owlv2":
                expert = RandomOwlv2Expert(device=device, dtype=dtype, image_backend=backend)
            elif name == "ocr":
                if importlib.util.find_spec("rapidocr_onnxruntime") is None:
                    notes.append("OCR skipped: rapidocr-onnxruntime is not installed (pip install 'moai-sdk[ocr]')")
                    continue
                expert = create_expert("rapidocr")
            elif name == "psgtr":
                expert = create_expert(
                    "psgtr", model_id=str(synthetic_psgtr_file(workdir)), device=device, dtype=torch.float32
                )
            else:
                raise SystemExit(f"unknown expert {name!r} (choose from mask2former, owlv2, ocr, psgtr)")
            t0 = time.perf_counter()
            expert.load()
            logger.info("built expert %s in %.1fs", name, time.perf_counter() - t0)
            experts.append(expert)
        except (ImportError, OSError) as exc:
            notes.append(f"{name} skipped: {type(exc).__name__}: {exc}")
    return experts


def cuda_7b_setups(args: argparse.Namespace, workdir: Path, deadline: float = float("inf")) -> Iterator[Setup]:
    """MoAI-7B shapes with random weights for each ``--quantization``; the experts are built once and run in
    the first setup; later setups reuse those perception results and time the model stages only."""
    from moai_sdk import MoAIProcessor, Perception

    from .shapes import build_random_moai, moai_7b_config

    device = torch.device(args.device or "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--config 7b-cuda needs a CUDA GPU (or --device cpu for a slow dry run)")
    processor = MoAIProcessor.from_pretrained(TINY_DIR)
    notes: list[str] = [
        (
            "tokenizer: the moai-tiny sentencepiece model (the InternLM2 tokenizer cannot be downloaded here), so "
            "prompts and verbalizations take more tokens than with the real one; see counts"
        ),
    ]
    experts = _cuda_experts(args, workdir, device, notes) if not args.no_experts else []
    perception = Perception(experts, keep_image=False) if experts else None
    store: dict[int, list[Any]] = {}
    for i, quant in enumerate(args.quantization):
        if time.perf_counter() > deadline:
            logger.warning("time budget exhausted: %s not built", quant)
            notes.append(f"7b-{quant} skipped: time budget exhausted")
            continue
        q = None if quant == "float16" else quant
        config = moai_7b_config(image_token_index=processor.image_token_index)
        if args.layers:  # a shallower decoder for dry runs; keep one mixer layer (the last)
            config.num_hidden_layers = args.layers
            config.structure.mixer_layers = [args.layers - 1]
        t0 = time.perf_counter()
        model = build_random_moai(config, device=device, dtype=args.llm_dtype, quantization=q, seed=0)
        build_s = time.perf_counter() - t0
        run_experts = i == 0 or not args.experts_once
        yield Setup(
            name=f"7b-{quant}",
            device=device,
            model=model,
            processor=processor,
            perception=perception if run_experts else None,
            new_tokens=args.new_tokens or 64,
            logits_tol=3e-2,
            exact_tokens=False,
            cuda_graphs=args.cuda_graphs,
            info={
                "model": "MoAI-7B shapes, random weights",
                "dtype": args.llm_dtype,
                "quantization": q,
                "layers": config.num_hidden_layers,
                "parameter_bytes": model.parameter_bytes(),
                "build_s": build_s,
                "experts": [e.name for e in experts],
                "expert_dtype": args.expert_dtype,
                "experts_run": run_experts and bool(experts),
                "notes": notes,
                "cuda_graphs": args.cuda_graphs,
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            },
            perception_store=store,
        )
        del model
        gc.collect()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------
# one pass
# ----------------------------------------------------------------------------------------------------------


def perceive(setup: Setup, images: list[np.ndarray], timer: StageTimer | None) -> list[Any]:
    """Expert results for ``images`` (timed as ``experts`` + ``expert:<name>``), or the stored ones."""
    if setup.perception is None:
        return setup.perception_store.get(len(images), [None] * len(images))
    run = lambda: setup.perception(images)  # noqa: E731
    results = timer("experts", run) if timer is not None else run()
    if timer is not None:
        for expert in setup.perception.experts:
            per_image = results[0].timings.get(expert.name)
            if per_image is not None:
                timer.values[f"expert:{expert.name}"] = per_image * len(images)
    setup.perception_store[len(images)] = results
    return results


def build_inputs(setup: Setup, images, prompts, perceptions, timer: StageTimer | None):
    from moai_sdk.verbalization import verbalize

    def verbal() -> list[str | None]:
        return [verbalize(p) if p is not None else None for p in perceptions]

    aux = timer("verbalize", verbal) if timer is not None else verbal()
    maps = [p if p is not None else None for p in perceptions]

    def process():
        return setup.processor(images, prompts, aux, maps).to(setup.device)

    inputs = timer("processor", process) if timer is not None else process()
    return inputs, aux


def run_once(setup: Setup, images, prompts) -> tuple[dict[str, float], dict[str, Any]]:
    """One timed pass of the whole pipeline plus the separately timed model stages."""
    from moai_sdk.modeling import KVCache

    device, model = setup.device, setup.model
    timer = StageTimer(device)
    first_token: list[float] = []

    def streamer(_ids: torch.Tensor) -> None:
        if not first_token:
            synchronize(device)
            first_token.append(time.perf_counter())

    with PeakMemory(device) as mem, torch.inference_mode():
        synchronize(device)
        t0 = time.perf_counter()
        perceptions = perceive(setup, images, timer)
        inputs, aux = build_inputs(setup, images, prompts, perceptions, timer)
        t_gen = time.perf_counter()
        out = model.generate(
            **inputs,
            max_new_tokens=setup.new_tokens,
            eos_token_id=[],
            return_dict=True,
            streamer=streamer,
            **setup.generate_options(),
        )
        synchronize(device)
        t_end = time.perf_counter()
        # 7B shapes + the tiny tokenizer: fold ids beyond its vocabulary into it (only the decode cost matters)
        vocab = setup.processor.tokenizer.vocab_size
        answers = setup.processor.batch_decode([[t % vocab for t in row] for row in out.new_tokens])
        e2e = time.perf_counter() - t0

        # model stages on the same inputs
        feats = timer("vision", lambda: model.encode_images(inputs["pixel_values"]))
        aux_embeds, aux_mask = timer(
            "aux_embed",
            lambda: model.build_aux_embeds(
                inputs["aux_input_ids"], inputs["panoptic_pixel_values"], inputs["aux_attention_mask"]
            ),
        )
        compressed = timer("compression", lambda: model.compress(aux_embeds, aux_mask))

        def prefill():
            cap = inputs["input_ids"].shape[1] - 1 + feats.shape[1] + 1
            cache = KVCache.allocate(model.config, feats.shape[0], cap, model.dtype, device)
            return model(**inputs, image_features=feats, compressed_aux=compressed, cache=cache, last_logits_only=True)

        timer("prefill", prefill)
    values = dict(timer.values)
    values["generate"] = t_end - t_gen
    values["ttft"] = first_token[0] - t0
    steps = setup.new_tokens - 1
    values["decode_tok_s"] = steps / (t_end - first_token[0]) if steps > 0 else float("nan")
    if setup.perception is not None:
        values["e2e"] = e2e
    values["peak_mem_bytes"] = float(mem.peak)
    counts = {
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "merged_tokens": int(inputs["input_ids"].shape[1]) - 1 + int(feats.shape[1]),
        "aux_tokens": int(inputs["aux_input_ids"].shape[1]),
        "aux_chars": [len(a) if a else 0 for a in aux],
        "new_tokens": [len(r) for r in out.new_tokens],
        "answer_chars": [len(a) for a in answers],
    }
    if setup.perception is not None:
        counts["segments"] = [len(p.segments) for p in perceptions]
        counts["detections"] = [len(p.detections) for p in perceptions]
        counts["text_lines"] = [len(p.text_lines) for p in perceptions]
    return values, counts


# ----------------------------------------------------------------------------------------------------------
# agreement between the modes
# ----------------------------------------------------------------------------------------------------------


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare_perceptions(default: list[Any], reference: list[Any], score_tol: float) -> dict[str, Any]:
    """Same segments and text lines; same detections with scores within ``score_tol``."""
    problems: list[str] = []
    max_score_diff = 0.0
    for i, (d, r) in enumerate(zip(default, reference)):
        if [s.label for s in d.segments] != [s.label for s in r.segments]:
            problems.append(f"image {i}: segments differ")
        if [t.text for t in d.text_lines] != [t.text for t in r.text_lines]:
            problems.append(f"image {i}: OCR lines differ")
        if [x.label for x in d.detections] != [x.label for x in r.detections]:
            problems.append(f"image {i}: detection labels differ ({len(d.detections)} vs {len(r.detections)})")
            continue
        for x, y in zip(d.detections, r.detections):
            max_score_diff = max(max_score_diff, abs(x.score - y.score))
    if max_score_diff > score_tol:
        problems.append(f"detection scores differ by {max_score_diff:.3g} > {score_tol}")
    return {"ok": not problems, "problems": problems, "max_detection_score_diff": max_score_diff}


def check_agreement(setup: Setup, images, prompts) -> dict[str, Any]:
    """Run both modes on the same inputs and compare expert results, prefill logits and greedy tokens."""
    report: dict[str, Any] = {}
    perceptions: dict[str, list[Any]] = {}
    with torch.inference_mode():
        for mode in MODES:
            setup.set_mode(mode)
            perceptions[mode] = perceive(setup, images, None)
        if setup.perception is not None:
            score_tol = 1e-4 if setup.exact_tokens else 2e-2
            report["experts"] = compare_perceptions(perceptions["default"], perceptions["reference"], score_tol)
        inputs, _ = build_inputs(setup, images, prompts, perceptions["default"], None)
        logits, tokens = {}, {}
        for mode in MODES:
            setup.set_mode(mode)
            logits[mode] = setup.model(**inputs, last_logits_only=True).logits[:, -1].float()
            tokens[mode] = setup.model.generate(
                **inputs, max_new_tokens=setup.new_tokens, eos_token_id=[], return_dict=True, **setup.generate_options()
            ).new_tokens
    setup.set_mode("default")
    err = _rel_err(logits["default"], logits["reference"])
    same = [a == b for a, b in zip(tokens["default"], tokens["reference"])]
    agree_steps = []
    for a, b in zip(tokens["default"], tokens["reference"]):
        n = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        agree_steps.append(n)
    report["model"] = {
        "logits_rel_err": err,
        "logits_tol": setup.logits_tol,
        "tokens_identical": same,
        "tokens_agree_until": agree_steps,
        "ok": err < setup.logits_tol and (all(same) or not setup.exact_tokens),
    }
    report["ok"] = report["model"]["ok"] and report.get("experts", {"ok": True})["ok"]
    return report


# ----------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------


def bench_setup(setup: Setup, args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    result: dict[str, Any] = {"name": setup.name, "info": setup.info, "batches": []}
    for batch in args.batch_sizes:
        if time.perf_counter() > deadline:
            result["batches"].append({"batch_size": batch, "skipped": "time budget exhausted"})
            continue
        images, prompts = load_images(batch), prompts_for(batch)
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"batch_size": batch}
        try:
            entry["agreement"] = check_agreement(setup, images, prompts)
            samples: dict[str, dict[str, list[float]]] = {m: {} for m in args.modes}
            counts: dict[str, Any] = {}
            for rep in range(args.warmup + args.repeats):
                for mode in args.modes:
                    setup.set_mode(mode)
                    values, counts[mode] = run_once(setup, images, prompts)
                    if rep >= args.warmup:
                        for key, value in values.items():
                            samples[mode].setdefault(key, []).append(value)
            setup.set_mode("default")
            entry["modes"] = {
                mode: {"stages": {k: summarize(v) for k, v in samples[mode].items()}, "counts": counts[mode]}
                for mode in args.modes
            }
            if set(MODES) <= set(args.modes):
                entry["ratio"] = ratios(entry["modes"]["default"]["stages"], entry["modes"]["reference"]["stages"])
        except Exception as exc:  # recorded (with the traceback) and turned into exit status 1 by main()
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc()
            logger.error("%s batch %d failed:\n%s", setup.name, batch, entry["traceback"])
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        entry["wall_s"] = time.perf_counter() - t0
        logger.info("%s batch %d done in %.1fs", setup.name, batch, entry["wall_s"])
        result["batches"].append(entry)
    return result


def ratios(default: dict[str, Any], reference: dict[str, Any]) -> dict[str, float]:
    """reference / default of the medians (speed-up of the default); for rates (tokens/s) the inverse."""
    out = {}
    for key in default:
        if key not in reference or key == "peak_mem_bytes":
            continue
        d, r = default[key]["median"], reference[key]["median"]
        if not (d > 0 and r > 0):
            continue
        out[key] = d / r if key == "decode_tok_s" else r / d
    if "peak_mem_bytes" in default and "peak_mem_bytes" in reference:
        out["peak_mem_reference_over_default"] = (
            reference["peak_mem_bytes"]["median"] / default["peak_mem_bytes"]["median"]
        )
    return out


#: Decoder layers of MoAI-7B (InternLM2-7B); the 7B targets are judged only on runs at this depth.
FULL_DEPTH = 32


def evaluate_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, checked against whatever was measured."""
    checks = []

    def batch_entry(setup_name: str, batch: int) -> dict[str, Any] | None:
        for setup in results:
            info = setup.get("info", {})
            if setup_name.startswith("7b") and (not info.get("gpu") or info.get("layers") != FULL_DEPTH):
                continue  # a CPU or shallow dry run of the 7B code path is not the 7B target
            if setup["name"] == setup_name:
                for entry in setup["batches"]:
                    if entry.get("batch_size") == batch and "modes" in entry:
                        return entry
        return None

    for batch, wanted in ((8, 2.0), (1, 1.3)):
        entry = batch_entry("tiny-cpu", batch)
        if entry and "ratio" in entry and "generate" in entry["ratio"]:
            got = entry["ratio"]["generate"]
            checks.append(
                {
                    "target": f"tiny-cpu batch {batch}: default >= {wanted}x faster than reference "
                    "(prefill + greedy tokens)",
                    "value": got,
                    "ok": got >= wanted,
                }
            )
    # the issue names nf4; nf4-lora is the same target with the adapters in 4 bit; int4 (torchao's tinygemm
    # kernel) is the faster 4-bit path, with its own decode target
    for quant, min_tok_s in (("nf4", 30), ("nf4-lora", 30), ("int4", INT4_MIN_TOK_S)):
        entry = batch_entry(f"7b-{quant}", 1)
        if not entry:
            continue
        stages = entry["modes"]["default"]["stages"]
        tok_s = stages["decode_tok_s"]["median"]
        checks.append(
            {"target": f"7b {quant} batch 1: decode >= {min_tok_s} tokens/s", "value": tok_s, "ok": tok_s >= min_tok_s}
        )
        if "e2e" in stages:  # the experts ran: the memory and end-to-end targets are about the whole pipeline
            mem = stages["peak_mem_bytes"]["median"]
            checks.append(
                {
                    "target": f"7b {quant}: peak GPU memory of the pipeline <= 8 GB (8e9 bytes)",
                    "value": mem,
                    "ok": mem <= 8e9,
                }
            )
            e2e = stages["e2e"]["median"]
            checks.append(
                {
                    "target": f"7b {quant} batch 1: end-to-end (experts + new tokens) <= 1.5 s",
                    "value": e2e,
                    "ok": e2e <= 1.5,
                }
            )
    checks.extend(_int4_against_nf4(batch_entry("7b-int4", 1), batch_entry("7b-nf4", 1)))
    return checks


#: The issue's decode target for the faster 4-bit path (batch 1, an H100-class card).
INT4_MIN_TOK_S = 100


def _int4_against_nf4(int4: dict[str, Any] | None, nf4: dict[str, Any] | None) -> list[dict[str, Any]]:
    """int4's decode speed over nf4's, both measured in this run (batch 1, default mode)."""
    if not int4 or not nf4:
        return []

    def tok_s(entry: dict[str, Any]) -> float:
        return entry["modes"]["default"]["stages"]["decode_tok_s"]["median"]

    ratio = tok_s(int4) / tok_s(nf4)
    return [{"target": "7b batch 1: int4 decodes faster than nf4 (ratio, same run)", "value": ratio, "ok": ratio > 1}]


# ----------------------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------------------


def _fmt(key: str, stat: dict[str, Any] | None) -> str:
    if stat is None:
        return "-"
    m, s = stat["median"], stat["spread"]
    if key == "peak_mem_bytes":
        return f"{m / 2**20:,.0f} MiB"
    if key == "decode_tok_s":
        return f"{m:.1f}±{s:.1f}"
    return f"{m * 1e3:.1f}±{s * 1e3:.1f}"


def format_table(result: dict[str, Any]) -> str:
    """One table per setup: stages as rows; per batch size the two modes (ms, median ± half range) and the
    speed-up reference / default."""
    entries = [e for e in result["batches"] if "modes" in e]
    if not entries:
        return f"== {result['name']}: no results\n"
    keys = []
    for e in entries:
        for mode in e["modes"].values():
            for k in mode["stages"]:
                if k not in keys:
                    keys.append(k)
    order = {k: float(i) for i, k in enumerate(STAGE_ORDER)}
    keys.sort(key=lambda k: (order.get(k, 0.5 if k.startswith("expert:") else len(order)), k))
    header = ["stage (ms; tok/s)"]
    for e in entries:
        b = e["batch_size"]
        header += [f"B{b} default", f"B{b} reference", f"B{b} speed-up"]
    rows = [header]
    for k in keys:
        row = [k]
        for e in entries:
            d = e["modes"].get("default", {}).get("stages", {}).get(k)
            r = e["modes"].get("reference", {}).get("stages", {}).get(k)
            ratio = e.get("ratio", {}).get(k)
            row += [_fmt(k, d), _fmt(k, r), f"{ratio:.2f}x" if ratio else "-"]
        rows.append(row)
    agree = []
    for e in entries:
        a = e.get("agreement", {})
        m = a.get("model", {})
        agree.append(
            f"B{e['batch_size']}: {'OK' if a.get('ok') else 'MISMATCH'} (logits rel err "
            f"{m.get('logits_rel_err', float('nan')):.2e}, tokens identical {sum(m.get('tokens_identical', []))}"
            f"/{len(m.get('tokens_identical', []))})"
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    lines = [f"== {result['name']}  {json.dumps({k: v for k, v in result['info'].items() if k != 'notes'})}"]
    for r in rows:
        lines.append("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    lines.append("agreement: " + "; ".join(agree))
    for note in result["info"].get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines) + "\n"


def environment() -> dict[str, Any]:
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "argv": sys.argv[1:],
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        env["git_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5, check=False
            ).stdout.strip()
            or None
        )
    except OSError:
        env["git_commit"] = None
    return env


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=("tiny-cpu", "7b-cuda"), default="tiny-cpu")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per answer (tiny 32, 7b 64)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument(
        "--experts",
        nargs="*",
        default=None,
        help="experts to run (tiny: mask2former owlv2 [ocr]; 7b: mask2former owlv2 ocr [psgtr]); "
        "an empty list runs none",
    )
    p.add_argument("--ocr", action="store_true", help="tiny-cpu: add the real RapidOCR (slow on 2 cores)")
    p.add_argument("--psgtr", action="store_true", help="7b: add PSGTR with synthetic weights")
    p.add_argument("--no-experts", action="store_true", help="7b: model stages only")
    p.add_argument(
        "--experts-once",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="7b: run the experts in the first quantization only and reuse their results",
    )
    p.add_argument(
        "--quantization",
        nargs="+",
        default=["nf4", "float16", "official"],
        choices=("float16", "nf4", "nf4-lora", "int8", "official", "int4"),
        help="7b: one setup per mode, in this order (int4 needs torchao and a GPU of compute capability >= 8.0)",
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="default mode: decode with fixed-shape steps replayed as a CUDA graph (generate(cuda_graphs=True))",
    )
    p.add_argument("--expert-dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    p.add_argument("--layers", type=int, default=None, help="7b: override the decoder depth (dry runs)")
    p.add_argument("--device", default=None, help="7b: device (default cuda; cpu = a slow dry run of the code path)")
    p.add_argument(
        "--llm-dtype",
        choices=("float16", "bfloat16", "float32"),
        default="float16",
        help="7b: the language model's dtype (compute dtype of the quantized modes)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument(
        "--time-budget",
        type=float,
        default=float("inf"),
        help="seconds; batch sizes not started by then are skipped (and reported as such)",
    )
    p.add_argument("--out", type=Path, default=None, help="JSON file, or a directory for <config>.json")
    p.add_argument("--workdir", type=Path, default=None, help="where tiny expert checkpoints are written")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.experts == []:
        args.no_experts = True
    start = time.perf_counter()
    deadline = start + args.time_budget
    workdir_ctx = tempfile.TemporaryDirectory(prefix="moai-bench-") if args.workdir is None else None
    workdir = Path(workdir_ctx.name) if workdir_ctx else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    setups = tiny_cpu_setups(args, workdir) if args.config == "tiny-cpu" else cuda_7b_setups(args, workdir, deadline)
    out = None
    if args.out is not None:
        out = args.out / f"{args.config}.json" if args.out.suffix != ".json" else args.out
        out.parent.mkdir(parents=True, exist_ok=True)

    def write(results: list[dict[str, Any]], targets: list[dict[str, Any]], complete: bool) -> None:
        if out is None:
            return
        report = {
            "environment": environment(),
            "config": args.config,
            "complete": complete,
            "setups": results,
            "targets": targets,
            "total_s": time.perf_counter() - start,
        }
        out.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")

    results: list[dict[str, Any]] = []
    try:
        for setup in setups:
            result = bench_setup(setup, args, deadline)
            results.append(result)
            print(format_table(result), flush=True)
            write(results, [], complete=False)  # partial results survive an outer time limit
            del setup  # free this model before the next one is built
            gc.collect()
    finally:
        if workdir_ctx is not None:
            workdir_ctx.cleanup()
    targets = evaluate_targets(results)
    for t in targets:
        print(f"target {'PASS' if t['ok'] else 'FAIL'}: {t['target']} (measured {t['value']:.4g})")
    write(results, targets, complete=True)
    if out is not None:
        print(f"wrote {out}")
    mismatches = [
        f"{r['name']} B{e['batch_size']}"
        for r in results
        for e in r["batches"]
        if "agreement" in e and not e["agreement"]["ok"]
    ]
    errors = [f"{r['name']} B{e['batch_size']}: {e['error']}" for r in results for e in r["batches"] if "error" in e]
    if mismatches:
        print("modes DISAGREE in: " + ", ".join(mismatches), file=sys.stderr)
    if errors:
        print("errors in: " + "; ".join(errors), file=sys.stderr)
    return 1 if mismatches or errors else 0


if __name__ == "__main__":
    sys.exit(main())
