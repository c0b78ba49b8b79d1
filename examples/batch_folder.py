"""Batch: answer one question about every image in a folder, writing one JSON line per image.

    python examples/batch_folder.py photos/ --prompt "How many people are there?" --out answers.jsonl

Images go through the pipeline ``--batch-size`` at a time (one left-padded generate call per batch) with a
progress bar. Each line is ``{"image": <path>, "result": <MoAIResult JSON>}``. ``--tiny DIR`` runs offline on a
tiny random MoAI (random answers).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

from tqdm.auto import tqdm

from moai_sdk import InputError, MoAIPipeline

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise InputError(f"not a folder: {str(folder)!r}")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def main(argv: Optional[Sequence[str]] = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--prompt", default="Describe this image in detail.")
    parser.add_argument("--out", type=Path, default=Path("answers.jsonl"))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--model", default="BK-Lee/MoAI-7B")
    parser.add_argument("--tiny", metavar="DIR", help="use a tiny random MoAI built in DIR (offline, random answers)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")

    images = list_images(args.folder)
    if not images:
        raise InputError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {str(args.folder)!r}")
    if args.tiny:
        from moai_sdk.testing import tiny_pipeline

        pipe = tiny_pipeline(args.tiny)
    else:
        pipe = MoAIPipeline.from_pretrained(args.model)

    with open(args.out, "w", encoding="utf-8") as out, tqdm(total=len(images), unit="image") as bar:
        for start in range(0, len(images), args.batch_size):
            chunk = images[start : start + args.batch_size]
            results = pipe([str(p) for p in chunk], args.prompt, max_new_tokens=args.max_new_tokens)
            for path, result in zip(chunk, results, strict=True):
                line = {"image": str(path), "result": json.loads(result.to_json())}
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
            out.flush()
            bar.update(len(chunk))
    print(f"wrote {len(images)} answers to {args.out}")
    return args.out


if __name__ == "__main__":
    main()
