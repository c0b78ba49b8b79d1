"""Grammar engines for structured answers: xgrammar against llguidance, on MoAI's vocabularies.

Usage::

    python -m benchmarks.structured                      # tiny vocabulary (1000 pieces) + synthetic 92k
    python -m benchmarks.structured --repeats 5 --out benchmarks/results/structured.json

For each vocabulary and each schema the script measures, per engine:

* ``tokenizer`` -- building the engine's tokenizer object (once per model, not per request);
* ``compile`` -- compiling the schema into the engine's grammar object, the cache off (xgrammar:
  ``GrammarCompiler.compile_json_schema`` with ``cache_enabled=False``; llguidance: building an ``LLMatcher``
  from the schema) -- the median of ``--repeats``;
* ``first mask`` -- the first token mask of a fresh matcher (llguidance builds its lexer lazily here);
* ``mask p50 / p90 / max`` -- every later mask (``fill_next_token_bitmask``) while the matcher follows a valid
  answer token by token (the answer tokenized by the vocabulary's own sentencepiece model), accepting each token.

Vocabularies: the moai-tiny fixture's sentencepiece model (1000 pieces, byte fallback) and a synthetic
sentencepiece model of 92,544 pieces -- InternLM2's size -- built here: the control pieces, the 256
byte-fallback pieces, and generated word pieces (with and without the ``▁`` word mark), digit runs, punctuation
runs (JSON's ``{"``, ``":``, ``",`` among them) and CJK characters and words, the mix of a multilingual
tokenizer. Both engines get the same token bytes (:func:`moai_sdk.structured.vocab.vocab_from_sentencepiece`).
Both engines run on the CPU; xgrammar's compiler gets ``--threads`` threads.

``--overhead`` measures, on the tiny MoAI (CPU, float32, no experts), the per-token cost of constrained decoding as
the pipeline runs it: the same prompt answered greedily with and without a JSON schema (``response_format``),
the two modes interleaved for ``--repeats`` rounds, and per mode the median time between consecutive tokens
(the ``on_token`` callback: one decoding step, mask and grammar update included).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2

from moai_sdk.structured.vocab import VocabBytes, vocab_from_sentencepiece

TINY_TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "moai-tiny" / "tokenizer.model"
INTERNLM2_VOCAB = 92544

#: name -> (JSON schema, a valid answer)
SCHEMAS: dict[str, tuple[dict[str, Any], str]] = {
    "flat": (
        {
            "type": "object",
            "properties": {"label": {"type": "string"}, "count": {"type": "integer"}, "outdoor": {"type": "boolean"}},
            "required": ["label", "count", "outdoor"],
        },
        '{"label": "two cats on a sofa", "count": 2, "outdoor": false}',
    ),
    "receipt": (
        {
            "type": "object",
            "properties": {
                "store": {"type": "string"},
                "currency": {"enum": ["EUR", "USD", "KRW"]},
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string"},
                            "quantity": {"type": "integer", "minimum": 1},
                            "price": {"type": "number"},
                        },
                        "required": ["name", "quantity", "price"],
                    },
                },
                "total": {"type": "number"},
            },
            "required": ["store", "currency", "items", "total"],
        },
        '{"store": "Corner Market", "currency": "EUR", "items": [{"name": "apples", "quantity": 3, "price": 1.25}, '
        '{"name": "bread", "quantity": 1, "price": 2.4}], "total": 6.15}',
    ),
    "scene": (
        {
            "type": "object",
            "properties": {
                "objects": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string"},
                            "box": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4},
                            "relations": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "properties": {
                                        "predicate": {"enum": ["on", "beside", "holding", "under"]},
                                        "target": {"type": "integer"},
                                    },
                                    "required": ["predicate", "target"],
                                },
                            },
                        },
                        "required": ["name", "box"],
                    },
                },
                "caption": {"type": "string", "maxLength": 80},
            },
            "required": ["objects", "caption"],
        },
        '{"objects": [{"name": "person", "box": [12.5, 30, 200, 410], "relations": [{"predicate": "holding", '
        '"target": 1}]}, {"name": "umbrella", "box": [0, 0, 180.75, 120]}], "caption": "a person with an umbrella"}',
    ),
    "json_object": ({"type": "object"}, '{"answer": "yes", "confidence": 0.9, "tags": ["street", "night"]}'),
}


# ---------------------------------------------------------------------------------------------- vocabularies
def synthetic_sentencepiece(size: int = INTERNLM2_VOCAB, seed: int = 0) -> spm.SentencePieceProcessor:
    """A unigram sentencepiece model of ``size`` pieces with byte fallback (see the module docstring)."""
    rng = random.Random(seed)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.trainer_spec.model_type = sentencepiece_model_pb2.TrainerSpec.UNIGRAM
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.vocab_size = size
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    Piece = sentencepiece_model_pb2.ModelProto.SentencePiece
    seen: set[str] = set()

    def add(piece: str, kind: int = Piece.NORMAL, score: float = 0.0) -> None:
        if piece not in seen and len(proto.pieces) < size:
            seen.add(piece)
            proto.pieces.add(piece=piece, score=score, type=kind)

    add("<unk>", Piece.UNKNOWN)
    add("<s>", Piece.CONTROL)
    add("</s>", Piece.CONTROL)
    for i in range(141, 147):
        add(f"[UNUSED_TOKEN_{i}]", Piece.USER_DEFINED)
    for b in range(256):
        add(f"<0x{b:02X}>", Piece.BYTE)
    for ch in string.printable.strip() + "▁":
        add(ch, score=-1.0)
    for punct in ('{"', '":', '",', '"}', '"]', '["', "},", "}]", "],", ": ", ", ", '": "', '", "', "▁{", "▁[", "▁}"):
        add(punct, score=-2.0)
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiouy"
    cjk = [chr(c) for c in range(0x4E00, 0x4E00 + 14000)]
    while len(proto.pieces) < size:
        r = rng.random()
        if r < 0.55:  # word pieces
            word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(1, 5)))
            word = word[: rng.randint(2, len(word))] if rng.random() < 0.4 else word
            if rng.random() < 0.2:
                word = word.capitalize()
            add(("▁" if rng.random() < 0.6 else "") + word, score=-3.0 - len(word) * 0.1)
        elif r < 0.62:
            add(("▁" if rng.random() < 0.3 else "") + str(rng.randint(0, 99999)), score=-4.0)
        elif r < 0.68:
            add("".join(rng.choice("{}[]():;,.!?\"'-_/\\*&#@+=<>|") for _ in range(rng.randint(2, 4))), score=-5.0)
        elif r < 0.85:
            add(rng.choice(cjk), score=-4.0)
        else:
            add("".join(rng.choice(cjk) for _ in range(rng.randint(2, 3))), score=-6.0)
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def tiny_sentencepiece() -> spm.SentencePieceProcessor:
    """The moai-tiny tokenizer, without the dummy prefix (answers are encoded as they are written)."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spm.SentencePieceProcessor(model_file=str(TINY_TOKENIZER)).serialized_model_proto())
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


# ---------------------------------------------------------------------------------------------- engines
class XGrammarEngine:
    name = "xgrammar"

    def __init__(self, vocab: VocabBytes, threads: int):
        import xgrammar as xgr

        self.xgr = xgr
        t0 = time.perf_counter()
        self.info = xgr.TokenizerInfo(list(vocab.tokens), stop_token_ids=[vocab.eos_token_id], vocab_size=vocab.size)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=threads, cache_enabled=False)
        self.tokenizer_s = time.perf_counter() - t0
        self.bitmask = xgr.allocate_token_bitmask(1, vocab.size)

    def compile(self, schema: dict) -> Any:
        return self.compiler.compile_json_schema(json.dumps(schema))

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def mask(self, matcher: Any) -> None:
        matcher.fill_next_token_bitmask(self.bitmask)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))


class LLGuidanceEngine:
    name = "llguidance"

    def __init__(self, vocab: VocabBytes, sp: spm.SentencePieceProcessor):
        import llguidance
        import llguidance.torch

        self.llg = llguidance
        tokens = [b"\xff" + sp.id_to_piece(i).encode() if i in vocab.special else t for i, t in enumerate(vocab.tokens)]

        class _Tok:
            eos_token_id = vocab.eos_token_id
            bos_token_id = vocab.bos_token_id
            special_token_ids = sorted(vocab.special)

            def __init__(self) -> None:
                self.tokens = tokens

            def __call__(self, text: Any) -> list[int]:
                return sp.encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)

        t0 = time.perf_counter()
        self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Tok()), n_vocab=vocab.size)
        self.tokenizer_s = time.perf_counter() - t0
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, vocab.size)
        self.fill = llguidance.torch.fill_next_token_bitmask

    def compile(self, schema: dict) -> Any:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema)
        matcher = self.llg.LLMatcher(self.tokenizer, grammar)
        if matcher.is_error():
            raise RuntimeError(matcher.get_error())
        return grammar

    def matcher(self, compiled: Any) -> Any:
        return self.llg.LLMatcher(self.tokenizer, compiled)

    def mask(self, matcher: Any) -> None:
        self.fill(matcher, self.bitmask)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.consume_token(token)) and not matcher.is_error()


# ---------------------------------------------------------------------------------------------- measuring
def _measure(engine: Any, schema: dict, answer_ids: list[int], eos: int, repeats: int) -> dict[str, Any]:
    compile_s = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        compiled = engine.compile(schema)
        compile_s.append(time.perf_counter() - t0)
    matcher = engine.matcher(compiled)
    t0 = time.perf_counter()
    engine.mask(matcher)
    first = time.perf_counter() - t0
    masks: list[float] = []
    ok = engine.accept(matcher, answer_ids[0])
    for tok in answer_ids[1:] + [eos]:
        t0 = time.perf_counter()
        engine.mask(matcher)
        masks.append(time.perf_counter() - t0)
        ok = ok and engine.accept(matcher, tok)
    masks.sort()
    return {
        "compile_ms": 1e3 * statistics.median(compile_s),
        "first_mask_ms": 1e3 * first,
        "mask_p50_us": 1e6 * statistics.median(masks),
        "mask_p90_us": 1e6 * masks[int(0.9 * (len(masks) - 1))],
        "mask_max_us": 1e6 * masks[-1],
        "tokens": len(answer_ids),
        "accepted": ok,
    }


def run(repeats: int, threads: int, vocabularies: list[str]) -> dict[str, Any]:
    torch.set_num_threads(1)
    results: dict[str, Any] = {"machine": platform.processor() or platform.machine(), "rows": []}
    for vname in vocabularies:
        t0 = time.perf_counter()
        sp = tiny_sentencepiece() if vname == "tiny" else synthetic_sentencepiece()
        build = time.perf_counter() - t0
        vocab = vocab_from_sentencepiece(sp)
        engines = [XGrammarEngine(vocab, threads), LLGuidanceEngine(vocab, sp)]
        print(f"# vocabulary {vname}: {vocab.size:,} pieces (built in {build:.1f}s)", file=sys.stderr)
        for sname, (schema, answer) in SCHEMAS.items():
            ids = sp.encode(answer)
            assert sp.decode(ids) == answer, "the answer must round-trip through the vocabulary"
            for engine in engines:
                row = {"vocab": vname, "vocab_size": vocab.size, "schema": sname, "engine": engine.name}
                row["tokenizer_ms"] = 1e3 * engine.tokenizer_s
                row.update(_measure(engine, schema, ids, vocab.eos_token_id, repeats))
                results["rows"].append(row)
    return results


OVERHEAD_SCHEMA = {
    "type": "object",
    "properties": {
        "caption": {"type": "string", "maxLength": 200},
        "objects": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 8},
    },
    "required": ["caption", "objects"],
}


def overhead(repeats: int, max_new_tokens: int = 64) -> dict[str, Any]:
    """Median decoding-step seconds with and without a JSON schema on the tiny pipeline (same run)."""
    import logging

    from moai_sdk.testing import demo_image, tiny_pipeline

    logging.getLogger("moai_sdk.pipeline").setLevel(logging.ERROR)  # answers cut by max_new_tokens are expected

    with tempfile.TemporaryDirectory() as tmp:
        pipe = tiny_pipeline(tmp, experts=None)
        image = demo_image()
        steps: dict[str, list[float]] = {"free": [], "json_schema": []}
        tokens: dict[str, list[int]] = {"free": [], "json_schema": []}

        def run(mode: str) -> None:
            stamps: list[float] = []
            fmt = OVERHEAD_SCHEMA if mode == "json_schema" else None
            result = pipe(
                image,
                "Describe the picture.",
                response_format=fmt,
                max_new_tokens=max_new_tokens,
                eos_token_id=[],  # the free answer runs its full length (the schema's ends when the grammar does)
                on_token=lambda ids: stamps.append(time.perf_counter()),
            )
            steps[mode].extend(b - a for a, b in zip(stamps, stamps[1:]))
            tokens[mode].append(len(result.new_token_ids))

        run("free"), run("json_schema")  # warm-up (and the grammar compiled once, then cached)
        steps = {"free": [], "json_schema": []}
        tokens = {"free": [], "json_schema": []}
        for _ in range(repeats):
            run("free")
            run("json_schema")
    free, constrained = statistics.median(steps["free"]), statistics.median(steps["json_schema"])
    return {
        "free_step_ms": 1e3 * free,
        "json_schema_step_ms": 1e3 * constrained,
        "overhead_ms": 1e3 * (constrained - free),
        "overhead_ratio": constrained / free,
        "steps": {k: len(v) for k, v in steps.items()},
        "tokens_per_answer": tokens,
    }


def table(results: dict[str, Any]) -> str:
    head = (
        f"| vocab | schema | engine | tokenizer ms | compile ms | first mask ms | mask p50 us | mask p90 us "
        f"| mask max us | tokens | valid answer accepted |\n|{'---|' * 11}"
    )
    lines = [head]
    for r in results["rows"]:
        lines.append(
            f"| {r['vocab']} ({r['vocab_size']:,}) | {r['schema']} | {r['engine']} | {r['tokenizer_ms']:.0f} "
            f"| {r['compile_ms']:.2f} | {r['first_mask_ms']:.2f} | {r['mask_p50_us']:.0f} | {r['mask_p90_us']:.0f} "
            f"| {r['mask_max_us']:.0f} | {r['tokens']} | {r['accepted']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="compilations per schema (median)")
    parser.add_argument("--threads", type=int, default=2, help="xgrammar compiler threads")
    parser.add_argument("--vocab", nargs="+", default=["tiny", "synthetic92k"], choices=["tiny", "synthetic92k"])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--overhead", action="store_true", help="also time decoding steps with / without a schema")
    args = parser.parse_args(argv)
    results = run(args.repeats, args.threads, args.vocab)
    print(table(results))
    if args.overhead:
        results["overhead"] = o = overhead(max(args.repeats, 1))
        print(
            f"\ntiny MoAI decoding step (median, {o['steps']['free']} / {o['steps']['json_schema']} steps): "
            f"free {o['free_step_ms']:.2f} ms, with a JSON schema {o['json_schema_step_ms']:.2f} ms "
            f"(+{o['overhead_ms']:.2f} ms, x{o['overhead_ratio']:.3f})"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
