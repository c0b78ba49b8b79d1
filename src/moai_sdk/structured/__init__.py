"""Structured answers: a ``response_format`` compiled into a per-row token constraint (llguidance).

``response_format`` takes:

=====================================  =====================================================  ===================
form                                   constrains the answer to                                ``result.parsed``
=====================================  =====================================================  ===================
a Pydantic model class                 JSON valid against the model's JSON schema              the model instance
a JSON-schema dict                     JSON valid against the schema                           the parsed JSON
``{"type": "json_object"}``            any JSON object                                         the parsed JSON
``{"type": "json_schema", ...}``       OpenAI's form: ``{"json_schema": {"schema": ...}}``      the parsed JSON
``{"choice": ["yes", "no"]}``          exactly one of the strings                              the string
``{"regex": "[0-9]{3}"}``              a full match of the regular expression                  the string
``{"grammar": "<lark grammar>"}``      a sentence of the Lark (or GBNF) grammar                the string
=====================================  =====================================================  ===================

The grammar engine is llguidance (``benchmarks/structured.py`` compares it with xgrammar: compiling costs it
~1 ms where xgrammar takes 30-80 ms on a 92k vocabulary, and its mask per token is a few microseconds more).
:class:`StructuredOutputs` holds one engine tokenizer per vocabulary and a cache of compiled grammars keyed by
the canonical form of the ``response_format``; :meth:`StructuredOutputs.constraint` gives each row its own
:class:`GrammarConstraint` (a copy of the cached matcher), which implements the decoding core's
``TokenConstraint`` protocol: a bool mask of the allowed next tokens, ``accept(token)``, ``is_terminated()``.

An invalid ``response_format`` -- an unknown form, a schema the engine cannot compile, a bad regular expression
-- is an :class:`~moai_sdk.errors.InputError` naming the problem, raised before any compute.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..errors import GenerationError, InputError, import_optional
from .vocab import VocabBytes, piece_bytes, vocab_from_pieces, vocab_from_sentencepiece

logger = logging.getLogger(__name__)

#: Compiled grammars kept per :class:`StructuredOutputs` (least recently used dropped first).
GRAMMAR_CACHE_SIZE = 256

#: How JSON answers are laid out unless a schema says otherwise (llguidance's ``x-guidance`` options): the
#: compact form ``{"a":1,"b":[2,3]}`` -- no whitespace between tokens (a schema's own ``x-guidance`` wins).
JSON_LAYOUT: dict[str, Any] = {"whitespace_flexible": False}

_NEED = "structured answers (response_format) need llguidance and jsonschema: pip install 'moai-sdk[structured]'"
_KINDS = ("json", "choice", "regex", "grammar")


def _llguidance() -> Any:
    return import_optional("llguidance", _NEED)


@dataclass(frozen=True)
class ResponseFormat:
    """A normalised ``response_format``: ``kind`` (``"json"``, ``"choice"``, ``"regex"``, ``"grammar"``), the
    engine grammar ``spec`` (a JSON schema dict, a list of strings, a pattern, a grammar text), the Pydantic
    ``model`` class to validate JSON answers with (or None) and the canonical ``key`` the compiled grammar is
    cached under."""

    kind: str
    spec: Any
    key: str
    model: Any = None

    def parse(self, text: str) -> Any:
        """The answer as a value: the validated Pydantic instance, the parsed JSON, or the text itself.

        Raises :class:`~moai_sdk.errors.GenerationError` when a JSON answer does not parse or validate (an
        answer cut by ``max_new_tokens`` or a stop string before the grammar completed)."""
        if self.kind != "json":
            return text
        try:
            if self.model is not None:
                return self.model.model_validate_json(text)
            return json.loads(text)
        except ValueError as exc:  # json.JSONDecodeError and pydantic.ValidationError are ValueErrors
            raise GenerationError(
                f"the answer is not valid JSON for the response_format ({exc}); it was probably cut by "
                "max_new_tokens or a stop string -- raise max_new_tokens"
            ) from exc


def _is_pydantic_model(value: Any) -> bool:
    return isinstance(value, type) and hasattr(value, "model_json_schema") and hasattr(value, "model_validate_json")


def _check_schema(schema: Any, where: str) -> dict[str, Any]:
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise InputError(f"{where} must be a JSON schema (a dict); got {type(schema).__name__}")
    try:
        json.dumps(schema)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where} is not JSON-serialisable: {exc}") from exc
    # the engine skips keywords that do not apply to a type ({"type": "number", "maxItems": []}); the
    # meta-schema of the schema's draft does not
    jsonschema = import_optional("jsonschema", _NEED)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        at = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise InputError(f"{where} is not a valid JSON schema at {at}: {exc.message}") from exc
    return schema


def _canonical(kind: str, spec: Any) -> str:
    return kind + ":" + json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _from_schema(schema: dict[str, Any], model: Any = None) -> ResponseFormat:
    return ResponseFormat("json", schema, _canonical("json", schema), model)


def normalize_response_format(response_format: Any) -> Optional[ResponseFormat]:
    """``response_format`` (see the module docstring) as a :class:`ResponseFormat`; ``None`` and
    ``{"type": "text"}`` mean no constraint. Raises :class:`~moai_sdk.errors.InputError` for anything else."""
    if response_format is None or isinstance(response_format, ResponseFormat):
        return response_format
    if _is_pydantic_model(response_format):
        try:
            schema = response_format.model_json_schema()
        except Exception as exc:  # pydantic raises several error types for models it cannot describe
            raise InputError(f"cannot build a JSON schema of {response_format.__name__}: {exc}") from exc
        return _from_schema(schema, response_format)
    if not isinstance(response_format, dict):
        raise InputError(
            "response_format must be a Pydantic model class, a JSON-schema dict, {'type': 'json_object'}, "
            f"{{'choice': [...]}}, {{'regex': ...}} or {{'grammar': ...}}; got {type(response_format).__name__}"
        )
    forms = [k for k in ("choice", "regex", "grammar", "json") if k in response_format]
    kind = response_format.get("type")
    if forms and kind is None:
        if len(response_format) != 1:
            raise InputError(
                f"response_format takes one of choice / regex / grammar / json; got {sorted(response_format)}"
            )
        return _special_form(forms[0], response_format[forms[0]])
    if kind == "text":
        return None
    if kind == "json_object":
        return _from_schema({"type": "object"})
    if kind == "json_schema":  # OpenAI's shape: {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
        inner = response_format.get("json_schema")
        if not isinstance(inner, dict) or "schema" not in inner:
            raise InputError("response_format type 'json_schema' needs json_schema: {'name': ..., 'schema': {...}}")
        return _from_schema(_check_schema(inner["schema"], "response_format json_schema.schema"))
    return _from_schema(_check_schema(response_format, "response_format"))  # a plain JSON schema


def _special_form(kind: str, value: Any) -> ResponseFormat:
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise InputError(f"response_format json: not a JSON schema ({exc})") from exc
        return _from_schema(_check_schema(value, "response_format json"))
    if kind == "choice":
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(c, str) and c for c in value):
            raise InputError(f"response_format choice must be a non-empty list of non-empty strings; got {value!r}")
        return ResponseFormat("choice", list(value), _canonical("choice", list(value)))
    if not isinstance(value, str) or not value:
        raise InputError(f"response_format {kind} must be a non-empty string; got {value!r}")
    return ResponseFormat(kind, value, _canonical(kind, value))


def _grammar_text(llg: Any, fmt: ResponseFormat) -> str:
    """The engine's grammar for ``fmt`` (llguidance's JSON grammar form)."""
    if fmt.kind == "json":
        schema = fmt.spec
        if isinstance(schema, dict) and "x-guidance" not in schema:
            schema = {**schema, "x-guidance": JSON_LAYOUT}
        return llg.LLMatcher.grammar_from_json_schema(schema)
    if fmt.kind == "choice":
        pattern = "|".join("(" + re.escape(c) + ")" for c in fmt.spec)
        return llg.LLMatcher.grammar_from_regex(pattern)
    if fmt.kind == "regex":
        return llg.LLMatcher.grammar_from_regex(fmt.spec)
    return llg.grammar_from("gbnf" if "::=" in fmt.spec else "lark", fmt.spec)


class GrammarConstraint:
    """One row's constraint (the decoding core's ``TokenConstraint``): which tokens may come next, advanced
    with every chosen token; terminated once the grammar is complete and the row has ended it (EOS) or nothing
    can follow."""

    def __init__(self, matcher: Any, vocab: VocabBytes, fmt: ResponseFormat):
        self._matcher = matcher
        self._vocab = vocab
        self.format = fmt
        self.tokens: list[int] = []
        self._bitmask = torch.zeros(1, (vocab.size + 31) // 32, dtype=torch.int32)
        self._fill = import_optional("llguidance.torch", _NEED).fill_next_token_bitmask

    def allowed_tokens(self, vocab_size: int, device: Any = None) -> Optional[torch.Tensor]:
        """bool [vocab_size]: True where the token may come next (ids beyond the tokenizer's are never allowed)."""
        if self._matcher.is_stopped():
            allowed = np.zeros(vocab_size, dtype=bool)
            if self._vocab.eos_token_id < vocab_size:
                allowed[self._vocab.eos_token_id] = True
            return torch.from_numpy(allowed).to(device)
        self._fill(self._matcher, self._bitmask)
        self._check()
        bits = np.unpackbits(self._bitmask.numpy().view(np.uint8), bitorder="little")
        allowed = np.zeros(vocab_size, dtype=bool)
        n = min(vocab_size, self._vocab.size)
        allowed[:n] = bits[:n]
        return torch.from_numpy(allowed).to(device)

    def accept(self, token_id: int) -> None:
        token_id = int(token_id)
        self.tokens.append(token_id)
        if self._matcher.is_stopped() and token_id == self._vocab.eos_token_id:
            return
        self._matcher.consume_token(token_id)
        self._check()

    def is_terminated(self) -> bool:
        """The row wrote EOS where the grammar may end, or the grammar is complete and nothing can follow."""
        return (bool(self.tokens) and self.tokens[-1] == self._vocab.eos_token_id) or bool(self._matcher.is_stopped())

    def _check(self) -> None:
        if self._matcher.is_error():
            raise GenerationError(f"the grammar engine failed: {self._matcher.get_error()}")

    @property
    def text(self) -> str:
        """The text the accepted tokens write (special tokens write none)."""
        data = b"".join(self._vocab.tokens[t] for t in self.tokens if 0 <= t < self._vocab.size)
        return data.decode("utf-8", errors="replace")


def _encoder_without_dummy_prefix(sp: Any) -> Callable[[str], list[int]]:
    """Text -> ids as sentencepiece segments it in the middle of an answer: without the leading ``▁`` its
    dummy prefix adds (the grammar engine tokenizes forced text with it)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    proto.normalizer_spec.add_dummy_prefix = False
    plain = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    return lambda text: list(plain.encode(text))


class StructuredOutputs:
    """Compiles ``response_format`` values against one vocabulary and caches the compiled grammars."""

    def __init__(self, vocab: VocabBytes, encode: Callable[[str], list[int]], cache_size: int = GRAMMAR_CACHE_SIZE):
        llg = _llguidance()
        self.vocab = vocab
        special = vocab.special

        class _Wrapped:
            eos_token_id = vocab.eos_token_id
            bos_token_id = vocab.bos_token_id
            special_token_ids = sorted(special)
            tokens = [b"\xff" + f"<special_{i}>".encode() if i in special else t for i, t in enumerate(vocab.tokens)]

            def __call__(self, text: Any) -> list[int]:
                return encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)

        self._llg = llg
        self._tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(_Wrapped()), n_vocab=vocab.size)
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._cache_size = int(cache_size)
        self._lock = threading.Lock()
        self.compiled = 0  # grammars compiled (cache misses), for tests and metrics

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> StructuredOutputs:
        """For a :class:`~moai_sdk.tokenization.MoAITokenizer` (or a ``sentencepiece`` processor)."""
        sp = getattr(tokenizer, "_sp", tokenizer)
        vocab = vocab_from_sentencepiece(sp, eos_token_id=getattr(tokenizer, "eos_token_id", None))
        return cls(vocab, _encoder_without_dummy_prefix(sp))

    def compile(self, response_format: Any) -> Optional[ResponseFormat]:
        """Normalise and compile ``response_format`` (cached); ``None`` when it constrains nothing."""
        fmt = normalize_response_format(response_format)
        if fmt is not None:
            self._matcher(fmt)
        return fmt

    def _matcher(self, fmt: ResponseFormat) -> Any:
        with self._lock:
            cached = self._cache.get(fmt.key)
            if cached is not None:
                self._cache.move_to_end(fmt.key)
                return cached
        try:
            grammar = _grammar_text(self._llg, fmt)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise InputError(f"response_format {fmt.kind}: {exc}") from exc
        error = self._llg.LLMatcher.validate_grammar(grammar, self._tokenizer)
        if error and not error.startswith("WARNING"):
            raise InputError(f"response_format {fmt.kind} cannot be compiled: {error}")
        matcher = self._llg.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InputError(f"response_format {fmt.kind} cannot be compiled: {matcher.get_error()}")
        with self._lock:
            self.compiled += 1
            self._cache[fmt.key] = matcher
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return matcher

    def constraint(self, response_format: Any) -> Optional[GrammarConstraint]:
        """A fresh per-row constraint for ``response_format`` (None: unconstrained)."""
        fmt = normalize_response_format(response_format)
        if fmt is None:
            return None
        return GrammarConstraint(self._matcher(fmt).deep_copy(), self.vocab, fmt)


__all__ = [
    "ResponseFormat",
    "GrammarConstraint",
    "StructuredOutputs",
    "normalize_response_format",
    "VocabBytes",
    "vocab_from_pieces",
    "vocab_from_sentencepiece",
    "piece_bytes",
    "GRAMMAR_CACHE_SIZE",
    "JSON_LAYOUT",
]
