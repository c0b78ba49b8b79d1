"""Overhead of the explainability API: ``return_gates`` and ``ablate`` against a plain pipeline call.

Usage::

    python -m benchmarks.explain                          # tiny MoAI + tiny experts on CPU, 5 repeats
    python -m benchmarks.explain --repeats 9 --out benchmarks/results/explain-cpu.json
    python -m benchmarks.explain --plot docs/images       # also draw gates.png and ablation.png

Every mode answers the same image and prompt greedily with ``--max-new-tokens``; the experts' outputs are cached
after the warm-up, so the timings compare the model-side work. The modes run interleaved (one call of each per
round, ``--repeats`` rounds) so that load changes on the machine hit all of them alike. Reported per mode: the
median wall time and the median CPU time of this process (all threads; steadier than wall time on a shared
machine) and their ratios to the plain call; and, at the model level, the same for one prefill forward with
``output_gates`` off and on.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from moai_sdk.testing import demo_image, tiny_pipeline

PROMPT = "What is written in the image?"


def _interleaved(modes: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, float]]:
    """Median wall and process-CPU seconds per mode, the modes called round-robin ``repeats`` times."""
    wall: dict[str, list[float]] = {name: [] for name in modes}
    cpu: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(repeats):
        for name, fn in modes.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    return {name: {"wall": statistics.median(wall[name]), "cpu": statistics.median(cpu[name])} for name in modes}


def _ratios(seconds: dict[str, dict[str, float]], base: str) -> dict[str, dict[str, float]]:
    return {name: {k: v / seconds[base][k] for k, v in s.items()} for name, s in seconds.items()}


def measure(pipe: Any, image: Any, prompt: str = PROMPT, *, repeats: int = 5, max_new_tokens: int = 8) -> dict:
    """Median seconds per mode (after one warm-up call of each) and the ratio to the plain call."""
    opts = {"max_new_tokens": max_new_tokens}
    modes: dict[str, Callable[[], Any]] = {
        "plain": lambda: pipe(image, prompt, **opts),
        "return_gates": lambda: pipe(image, prompt, return_gates=True, **opts),
        "return_gates_tokens": lambda: pipe(image, prompt, return_gates="tokens", **opts),
        "ablate": lambda: pipe.ablate(image, prompt, **opts),
        "ablate_gates": lambda: pipe.ablate(image, prompt, return_gates=True, **opts),
    }
    for fn in modes.values():  # warm-up: loads the model, runs and caches the experts
        fn()
    seconds = _interleaved(modes, repeats)
    return {
        "seconds": seconds,
        "ratio_to_plain": _ratios(seconds, "plain"),
        "ablation_rows": len(pipe.ablate(image, prompt, **opts).rows),
        "forward": measure_forward(pipe, image, prompt, repeats=repeats),
    }


def measure_forward(pipe: Any, image: Any, prompt: str, *, repeats: int = 5) -> dict:
    """Median seconds of one prefill forward of the model alone, ``output_gates`` off and on (interleaved)."""
    perception = pipe.perceive(image)
    inputs = pipe.processor(
        image, prompt, pipe.verbalize(perception), perception.panoptic_color_map(), template=pipe.template
    ).to(pipe.model.device)
    modes = {
        "output_gates_off": lambda: pipe.model(**inputs, output_gates=False, last_logits_only=True),
        "output_gates_on": lambda: pipe.model(**inputs, output_gates=True, last_logits_only=True),
    }
    with torch.inference_mode():
        for fn in modes.values():
            fn()
        seconds = _interleaved(modes, repeats)
    return {"seconds": seconds, "ratio_to_off": _ratios(seconds, "output_gates_off")}


def draw(pipe: Any, image: Any, folder: Path, prompt: str = PROMPT, max_new_tokens: int = 8) -> list[Path]:
    """The README pictures: the gate weights of one answer and an ablation table with gates."""
    folder.mkdir(parents=True, exist_ok=True)
    result = pipe(image, prompt, return_gates=True, max_new_tokens=max_new_tokens)
    table = pipe.ablate(image, prompt, return_gates=True, max_new_tokens=max_new_tokens)
    return [
        result.mixer.save(folder / "gates.png", title=f"tiny MoAI, {prompt!r}"),
        table.save(folder / "ablation.png"),
    ]


def _print_rows(seconds: dict[str, dict[str, float]], ratios: dict[str, dict[str, float]]) -> None:
    for name, s in seconds.items():
        r = ratios[name]
        print(f"{name:<22} {s['wall']:>8.3f} {r['wall']:>8.2f} {s['cpu']:>8.3f} {r['cpu']:>8.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--workdir", default=None, help="where to build the tiny model (default: a temporary folder)")
    parser.add_argument("--plot", default=None, help="write gates.png and ablation.png into this folder")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="moai-explain-bench-") as tmp:
        pipe = tiny_pipeline(Path(args.workdir or tmp))
        image = demo_image("MOAI")
        report = measure(pipe, image, repeats=args.repeats, max_new_tokens=args.max_new_tokens)
        if args.plot:
            report["pictures"] = [
                str(p) for p in draw(pipe, image, Path(args.plot), max_new_tokens=args.max_new_tokens)
            ]
    report["setup"] = {
        "model": "tiny MoAI (moai_sdk.testing), float32, CPU, tiny experts (cached)",
        "repeats": args.repeats,
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
    }
    print(f"{'mode':<22} {'wall s':>8} {'x plain':>8} {'cpu s':>8} {'x plain':>8}")
    _print_rows(report["seconds"], report["ratio_to_plain"])
    print(f"prefill forward of the model ({report['ablation_rows']} ablation rows above):")
    _print_rows(report["forward"]["seconds"], report["forward"]["ratio_to_off"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
