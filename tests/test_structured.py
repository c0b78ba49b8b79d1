"""Structured answers: response_format forms compiled with llguidance against the tiny vocabulary, per-row
constraints followed token by token, the compiled-grammar cache, typed errors -- and hypothesis over generated
JSON schemas: a valid answer or an InputError, never a crash."""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from conftest import TINY
from moai_sdk.errors import GenerationError, InputError
from moai_sdk.structured import StructuredOutputs, normalize_response_format, piece_bytes
from moai_sdk.tokenization import MoAITokenizer


@pytest.fixture(scope="module")
def tokenizer() -> MoAITokenizer:
    return MoAITokenizer(TINY / "tokenizer.model")


@pytest.fixture(scope="module")
def outputs(tokenizer) -> StructuredOutputs:
    return StructuredOutputs.from_tokenizer(tokenizer)


def _decode(outputs: StructuredOutputs, response_format, seed: int, steps: int = 400, structural_bias: float = 4.0):
    """Follow the constraint with random logits (structural bytes favoured so that answers end) until it is
    terminated or ``steps`` tokens; returns the constraint."""
    gen = torch.Generator().manual_seed(seed)
    vocab = outputs.vocab
    bias = torch.tensor([structural_bias * any(c in t for c in b'"]},') for t in vocab.tokens])
    bias[vocab.eos_token_id] = structural_bias
    c = outputs.constraint(response_format)
    for _ in range(steps):
        allowed = c.allowed_tokens(vocab.size, "cpu")
        assert allowed.dtype == torch.bool and allowed.shape == (vocab.size,) and allowed.any()
        logits = torch.randn(vocab.size, generator=gen) + bias
        token = int(torch.multinomial(logits.masked_fill(~allowed, float("-inf")).softmax(-1), 1, generator=gen))
        c.accept(token)
        if c.is_terminated():
            break
    return c


def test_piece_bytes():
    assert piece_bytes("\u2581the") == b" the"
    assert piece_bytes("<0x7B>") == b"{"
    assert piece_bytes("\uc548") == "\uc548".encode()


def test_vocab_bytes_of_the_tiny_tokenizer(outputs, tokenizer):
    v = outputs.vocab
    assert v.size == tokenizer.vocab_size
    assert {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id} <= v.special
    assert all(v.tokens[i] == b"" for i in v.special)
    assert set(tokenizer.chat_marker_ids) <= v.special  # chat markers never appear inside an answer
    # every non-special piece writes the bytes sentencepiece decodes it to (mid-text, after a letter)
    for i in range(0, v.size, 7):
        if i not in v.special:
            assert ("a" + v.tokens[i].decode("utf-8", "replace")).encode() == (
                "a" + tokenizer._sp.decode([tokenizer._sp.piece_to_id("a"), i])[1:]
            ).encode() or tokenizer._sp.is_byte(i)


@pytest.mark.parametrize("seed", range(5))
def test_choice_answers_are_one_of_the_choices(outputs, seed):
    choices = ["yes", "no", "a red car", "maybe"]
    c = _decode(outputs, {"choice": choices}, seed)
    assert c.is_terminated() and c.text in choices


@pytest.mark.parametrize("pattern", [r"[0-9]{3}-[a-z]{2,5}", r"(cat|dog)s? [0-9]+", r"\d+\.\d\d"])
def test_regex_answers_fullmatch(outputs, pattern):
    for seed in range(3):
        c = _decode(outputs, {"regex": pattern}, seed)
        if c.is_terminated():
            assert re.fullmatch(pattern, c.text), c.text


class Item(BaseModel):
    name: str
    quantity: int
    price: float


class Receipt(BaseModel):
    currency: Literal["EUR", "USD"]
    items: list[Item]
    paid: bool


def test_pydantic_model_answers_validate(outputs):
    fmt = normalize_response_format(Receipt)
    assert fmt.kind == "json" and fmt.model is Receipt
    done = 0
    for seed in range(6):
        c = _decode(outputs, Receipt, seed)
        if c.is_terminated():
            done += 1
            parsed = fmt.parse(c.text)
            assert isinstance(parsed, Receipt)
    assert done >= 3


def test_json_object_and_openai_json_schema_forms(outputs):
    c = _decode(outputs, {"type": "json_object"}, 0)
    assert c.is_terminated() and isinstance(json.loads(c.text), dict)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    fmt = normalize_response_format(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    )
    assert fmt.spec == schema
    assert normalize_response_format({"json": json.dumps(schema)}).spec == schema
    assert normalize_response_format({"type": "text"}) is None and normalize_response_format(None) is None


def test_lark_grammar(outputs):
    c = _decode(outputs, {"grammar": 'start: "ab" | "cd" NUMBER\n%import common.NUMBER'}, 1)
    assert c.is_terminated() and re.fullmatch(r"ab|cd[0-9.eE+-]+", c.text)


def test_compiled_grammars_are_cached_per_schema(tokenizer):
    outputs = StructuredOutputs.from_tokenizer(tokenizer)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}
    reordered = {"properties": {"b": {"type": "string"}, "a": {"type": "integer"}}, "type": "object"}
    first, second = outputs.constraint(schema), outputs.constraint(reordered)
    assert outputs.compiled == 1
    first.accept(outputs.vocab.tokens.index(b"{"))  # rows advance independently
    assert not torch.equal(first.allowed_tokens(1000), second.allowed_tokens(1000))
    outputs.constraint({"choice": ["x"]})
    assert outputs.compiled == 2


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ({"type": "strnig"}, "strnig"),
        ({"type": "integer", "minimum": "a"}, "minimum"),
        ({"type": "string", "pattern": "("}, "pattern"),
        ({"$ref": "#/nope"}, "/nope"),
        ({"type": "array", "minItems": 5, "maxItems": 2}, "maxItems"),
        ({"regex": "("}, "regex"),
        ({"grammar": "start: foo"}, "foo"),
        ({"choice": []}, "choice"),
        ({"choice": ["a"], "regex": "b"}, "one of"),
        ({"type": "json_schema"}, "json_schema"),
        (42, "Pydantic model"),
        ({"x": {1, 2}}, "JSON-serialisable"),
    ],
)
def test_invalid_response_formats_are_input_errors(outputs, bad, words):
    with pytest.raises(InputError, match=re.escape(words)):
        outputs.constraint(bad)


def test_parse_of_a_cut_answer_is_a_generation_error():
    fmt = normalize_response_format(Receipt)
    with pytest.raises(GenerationError, match="max_new_tokens"):
        fmt.parse('{"currency": "EUR", "items": [')


# ------------------------------------------------------------------------------------------ property tests
_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=6)
_leaves = st.one_of(
    st.builds(lambda m: {"type": "string", "maxLength": m}, st.integers(0, 8)),
    st.builds(
        lambda lo, w: {"type": "integer", "minimum": lo, "maximum": lo + w}, st.integers(-50, 50), st.integers(0, 100)
    ),
    st.just({"type": "number"}),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.builds(
        lambda xs: {"enum": xs},
        st.lists(st.one_of(_names, st.integers(-9, 9), st.booleans()), min_size=1, max_size=4, unique=True),
    ),
)
_schemas = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.builds(
            lambda props, data: {
                "type": "object",
                "properties": props,
                "required": sorted(data.draw(st.sets(st.sampled_from(sorted(props)))) if props else []),
                "additionalProperties": False,
            },
            st.dictionaries(_names, inner, max_size=3),
            st.data(),
        ),
        st.builds(
            lambda items, lo, w: {"type": "array", "items": items, "minItems": lo, "maxItems": lo + w},
            inner,
            st.integers(0, 2),
            st.integers(0, 2),
        ),
        st.builds(lambda a, b: {"anyOf": [a, b]}, inner, inner),
    ),
    max_leaves=6,
)
_broken = st.one_of(
    _schemas,
    st.builds(
        lambda s, k, v: {**s, k: v},
        _schemas,
        st.sampled_from(["type", "minimum", "maxItems", "enum", "$ref", "required", "pattern"]),
        st.one_of(st.integers(-3, 3), _names, st.just([]), st.just(None)),
    ),
)


@given(schema=_broken, seed=st.integers(0, 2**16))
def test_generated_schemas_give_a_valid_answer_or_a_typed_error(outputs, schema, seed):
    try:
        c = _decode(outputs, schema, seed, steps=300)
    except InputError:
        return  # an invalid or unsatisfiable schema, named
    if c.is_terminated():
        jsonschema.validate(json.loads(c.text), schema)


def test_grammar_engine_benchmark_runs_on_the_tiny_vocabulary(capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import structured as bench

    results = bench.main(["--vocab", "tiny", "--repeats", "1"])
    engines = {(r["schema"], r["engine"]) for r in results["rows"]}
    assert engines == {(s, e) for s in bench.SCHEMAS for e in ("xgrammar", "llguidance")}
    assert all(r["accepted"] for r in results["rows"])  # both engines accept every valid answer
    assert "| tiny (1,000) | receipt | llguidance |" in capsys.readouterr().out
