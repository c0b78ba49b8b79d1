"""`MoAITokenizer`: the InternLM2 sentencepiece tokenizer as the official MoAI code uses it.

The official code wraps ``tokenizer.model`` in a Hugging Face slow tokenizer, loads it with left padding and
adds ``<image>`` as a special token. This module reproduces the ids that setup produces, with sentencepiece
alone (no remote code):

* a BOS id is prepended, no EOS is appended (both follow ``tokenizer_config.json`` when it says otherwise);
* batches are padded on the left with the pad token ``</s>`` (id 2), attention mask 0 there;
* ``<image>`` gets the first id after the sentencepiece pieces (``len(pieces)``);
* special-token strings (``<image>``, ``<s>``, ``</s>``, ``<unk>``) written in the text are split out first
  and every stretch of plain text between them is encoded by sentencepiece on its own, so each stretch gets
  its own dummy-prefix space -- this is why ``"image. <image> USER:"`` ends in a lone ``▁`` before the image
  and starts with ``▁ ▁USER`` after it;
* the InternLM2 chat markers ``[UNUSED_TOKEN_145]`` / ``[UNUSED_TOKEN_146]`` are user-defined pieces of the
  sentencepiece model and therefore always single tokens.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError, ConfigError, DependencyError, InputError
from .hub import HubOptions, read_json_object, resolve_file
from .prompts import IMAGE_TOKEN

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

#: Label value of positions that carry no token (dropped by :meth:`MoAITokenizer.decode`).
IGNORE_INDEX = -100

_CHAT_MARKER = re.compile(r"^\[UNUSED_TOKEN_\d+\]$")


# ----------------------------------------------------------------------------------------------------------
# locating files: a local folder or a Hugging Face Hub repository
# ----------------------------------------------------------------------------------------------------------


def resolve_model_file(path_or_repo_id: str | os.PathLike, filename: str, **kwargs: Any) -> Path | None:
    """Path of ``filename`` in a local model folder or a Hub repository (see :func:`moai_sdk.hub.resolve_file`)."""
    return resolve_file(path_or_repo_id, filename, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# the tokenizer
# ----------------------------------------------------------------------------------------------------------


def _token_content(value: Any, default: str) -> str:
    """A special-token entry of ``tokenizer_config.json``: a string or an ``{"content": ...}`` dict."""
    if value is None:
        return default
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ConfigError(f"cannot read special token {value!r} from {TOKENIZER_CONFIG_FILE}")


def _check_text(text: Any) -> None:
    """Refuse what is not a ``str`` of valid Unicode (lone surrogates cannot be encoded as UTF-8)."""
    if not isinstance(text, str):
        raise InputError(f"the tokenizer takes str; got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start : exc.end]
        raise InputError(
            f"the text is not valid Unicode: {bad!r} at position {exc.start} (a lone surrogate); "
            "decode your input with errors='replace' or remove it"
        ) from exc


class MoAITokenizer:
    """InternLM2 sentencepiece tokenizer with MoAI's ``<image>`` token, producing the official ids.

    Build it with :meth:`from_pretrained` (a model folder or Hub repo) or directly from a ``tokenizer.model``
    path. Calling it on a list of strings returns left-padded ``input_ids`` / ``attention_mask`` tensors.
    """

    def __init__(
        self,
        model_file: str | os.PathLike,
        *,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        unk_token: str = "<unk>",
        pad_token: str = "</s>",
        image_token: str = IMAGE_TOKEN,
        image_token_id: int | None = None,
    ) -> None:
        try:
            import sentencepiece as spm
        except ImportError as exc:  # pragma: no cover - sentencepiece is a core dependency
            raise DependencyError("the MoAI tokenizer needs sentencepiece: pip install sentencepiece") from exc

        path = Path(model_file)
        if not path.is_file():
            raise CheckpointError(f"tokenizer model file not found: {str(path)!r}")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"{str(path)!r} is not a sentencepiece model: {exc}") from exc
        self.model_file = path
        self.add_bos_token = bool(add_bos_token)
        self.add_eos_token = bool(add_eos_token)

        n = self._sp.get_piece_size()
        self._bos_id = self._sp.bos_id()
        self._eos_id = self._sp.eos_id()
        self._unk_id = self._sp.unk_id()
        if self.add_bos_token and self._bos_id < 0:
            raise ConfigError(f"{str(path)!r} defines no BOS piece but add_bos_token is set")
        if self.add_eos_token and self._eos_id < 0:
            raise ConfigError(f"{str(path)!r} defines no EOS piece but add_eos_token is set")
        self._pad_id = self._piece_id_strict(pad_token, "pad_token")

        # <image>: an existing piece keeps its id (as Hugging Face's add_tokens does), else it is appended.
        existing = self._sp.piece_to_id(image_token)
        in_vocab = existing != self._unk_id or image_token == self._sp.id_to_piece(self._unk_id)
        if image_token_id is None:
            image_token_id = existing if in_vocab else n
        image_token_id = int(image_token_id)
        if in_vocab and image_token_id != existing:
            raise ConfigError(
                f"{image_token!r} is piece {existing} of the sentencepiece model but id {image_token_id} was given"
            )
        if not in_vocab and image_token_id != n:
            raise ConfigError(
                f"{image_token!r} must get id {n} (the number of sentencepiece pieces); got {image_token_id}"
            )
        self.image_token = image_token
        self._image_id = image_token_id
        self._extra_pieces = 0 if in_vocab else 1

        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        # Special strings split out of the text before sentencepiece sees it, longest first.
        self._split_tokens: dict[str, int] = {image_token: image_token_id}
        for content, tid in ((bos_token, self._bos_id), (eos_token, self._eos_id), (unk_token, self._unk_id)):
            if tid >= 0 and content:
                self._split_tokens.setdefault(content, tid)
        alternatives = sorted(self._split_tokens, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")

        # Strings that would become control ids if written in text: our split tokens and the model's
        # user-defined pieces (the chat markers). In untrusted text they stay plain (see encode_parts).
        pieces = self._model_proto().pieces
        self._user_defined = {pieces[i].piece: i for i in range(n) if pieces[i].type == pieces[i].USER_DEFINED}
        self._control_strings = tuple(sorted(set(self._split_tokens) | set(self._user_defined), key=len, reverse=True))
        self._marker_re = (
            re.compile("(" + "|".join(re.escape(t) for t in sorted(self._user_defined, key=len, reverse=True)) + ")")
            if self._user_defined
            else None
        )
        self._plain: tuple[Any, Any] | None = None  # processors with the user-defined pieces unused (lazy)
        self._plain_lock = threading.Lock()

        self._chat_marker_ids = frozenset(i for i in range(n) if _CHAT_MARKER.match(self._sp.id_to_piece(i)))
        self._skip_ids = (
            frozenset({self._bos_id, self._eos_id, self._pad_id, self._unk_id, self._image_id} - {-1})
            | self._chat_marker_ids
        )

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        hub: HubOptions | None = None,
        image_token_id: int | None = None,
        **hub_keywords: Any,
    ) -> MoAITokenizer:
        """Load ``tokenizer.model`` (and ``tokenizer_config.json`` if present) from a folder or a Hub repo.

        ``hub`` (:class:`~moai_sdk.hub.HubOptions`) says where the files come from; the keywords ``revision``,
        ``cache_dir``, ``token`` and ``local_files_only`` still work and win over it. ``image_token_id`` pins the
        id of ``<image>`` (it must still be the one the official code would give).
        """
        hub = HubOptions.from_any(hub, **hub_keywords)
        model_file = resolve_model_file(path_or_repo_id, TOKENIZER_FILE, required=True, hub=hub)
        config_file = resolve_model_file(path_or_repo_id, TOKENIZER_CONFIG_FILE, required=False, hub=hub)
        kwargs = cls._read_config(config_file) if config_file is not None else {}
        if image_token_id is not None:
            kwargs["image_token_id"] = image_token_id
        tok = cls(model_file, **kwargs)
        logger.debug(
            "loaded MoAI tokenizer from %s: %d pieces, <image> = %d", model_file, tok.vocab_size, tok.image_token_id
        )
        return tok

    @staticmethod
    def _read_config(path: Path) -> dict[str, Any]:
        cfg = read_json_object(path)
        cls_name = cfg.get("tokenizer_class")
        if cls_name not in (None, "MoAITokenizer", "InternLM2Tokenizer", "InternLMTokenizer"):
            logger.warning("tokenizer_config.json names %r; reading it as the InternLM2/MoAI tokenizer", cls_name)
        side = cfg.get("padding_side", "left")
        if side != "left":
            logger.info("tokenizer_config.json asks for %s padding; MoAI always pads on the left", side)
        kwargs: dict[str, Any] = {
            "add_bos_token": bool(cfg.get("add_bos_token", True)),
            "add_eos_token": bool(cfg.get("add_eos_token", False)),
            "bos_token": _token_content(cfg.get("bos_token"), "<s>"),
            "eos_token": _token_content(cfg.get("eos_token"), "</s>"),
            "unk_token": _token_content(cfg.get("unk_token"), "<unk>"),
            "pad_token": _token_content(cfg.get("pad_token"), "</s>"),
        }
        # A tokenizer saved after add_tokens("<image>") records its id in added_tokens_decoder.
        added = cfg.get("added_tokens_decoder") or {}
        if isinstance(added, dict):
            for key, entry in added.items():
                if isinstance(entry, dict) and entry.get("content") == IMAGE_TOKEN:
                    try:
                        kwargs["image_token_id"] = int(key)
                    except ValueError as exc:
                        raise ConfigError(f"bad added token id {key!r} in {str(path)!r}") from exc
        return kwargs

    def _piece_id_strict(self, piece: str, what: str) -> int:
        tid = self._sp.piece_to_id(piece)
        if tid == self._unk_id and piece != self._sp.id_to_piece(self._unk_id):
            raise ConfigError(f"{what} {piece!r} is not a piece of the sentencepiece model")
        return tid

    def _model_proto(self) -> Any:
        proto = getattr(self, "_proto", None)
        if proto is None:
            from sentencepiece import sentencepiece_model_pb2

            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(self._sp.serialized_model_proto())
            self._proto = proto
        return proto

    def _plain_processors(self) -> tuple[Any, Any]:
        """Two copies of the sentencepiece model whose user-defined pieces are marked unused, so that text such as
        ``[UNUSED_TOKEN_145]`` is segmented like any other text: one with the model's dummy-prefix setting (for
        text that starts a sentencepiece call), one without (for text that follows a control piece)."""
        with self._plain_lock:
            if self._plain is None:
                import sentencepiece as spm
                from sentencepiece import sentencepiece_model_pb2

                proto = sentencepiece_model_pb2.ModelProto()
                proto.CopyFrom(self._model_proto())
                for piece in proto.pieces:
                    if piece.type == piece.USER_DEFINED:
                        piece.type = piece.UNUSED
                first = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
                proto.normalizer_spec.add_dummy_prefix = False
                following = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
                self._plain = (first, following)
            return self._plain

    # ------------------------------------------------------------------ ids and sizes
    @property
    def bos_token_id(self) -> int:
        return self._bos_id

    @property
    def eos_token_id(self) -> int:
        return self._eos_id

    @property
    def pad_token_id(self) -> int:
        return self._pad_id

    @property
    def unk_token_id(self) -> int:
        return self._unk_id

    @property
    def image_token_id(self) -> int:
        return self._image_id

    @property
    def vocab_size(self) -> int:
        """Number of sentencepiece pieces (the LM head's rows; ``<image>`` has no logit)."""
        return self._sp.get_piece_size()

    def __len__(self) -> int:
        """Number of ids the tokenizer can produce, ``<image>`` included (the embedding table's rows)."""
        return self.vocab_size + self._extra_pieces

    @property
    def chat_marker_ids(self) -> frozenset[int]:
        """Ids of the ``[UNUSED_TOKEN_*]`` pieces (InternLM2 chat markers)."""
        return self._chat_marker_ids

    def __repr__(self) -> str:
        return (
            f"MoAITokenizer(model_file={str(self.model_file)!r}, pieces={self.vocab_size}, "
            f"image_token_id={self.image_token_id}, add_bos_token={self.add_bos_token})"
        )

    # ------------------------------------------------------------------ encoding
    def _segments(self, text: str) -> list[tuple[bool, str]]:
        """Split ``text`` into (is_special, chunk) parts; empty plain chunks are dropped."""
        _check_text(text)
        out: list[tuple[bool, str]] = []
        for i, chunk in enumerate(self._split_re.split(text)):
            if i % 2:
                out.append((True, chunk))
            elif chunk:
                out.append((False, chunk))
        return out

    def tokenize(self, text: str) -> list[str]:
        """The pieces of ``text`` (no BOS), special tokens kept as their strings."""
        pieces: list[str] = []
        for special, chunk in self._segments(text):
            if special:
                pieces.append(chunk)
            else:
                pieces.extend(self._sp.encode(chunk, out_type=str))
        return pieces

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Ids of one string: BOS (unless ``add_bos=False``) + text ids (+ EOS only if the config asks)."""
        ids: list[int] = []
        if self.add_bos_token if add_bos is None else add_bos:
            if self._bos_id < 0:
                raise ConfigError("this sentencepiece model has no BOS piece; call with add_bos=False")
            ids.append(self._bos_id)
        for special, chunk in self._segments(text):
            if special:
                ids.append(self._split_tokens[chunk])
            else:
                ids.extend(self._sp.encode(chunk))
        if self.add_eos_token:
            ids.append(self._eos_id)
        return ids

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of ``text`` written after a prompt (an answer, a continuation to score): no BOS, no dummy-prefix
        space, control strings as plain text -- as sentencepiece segments text that follows a control piece."""
        _check_text(text)
        return list(self._plain_processors()[1].encode(text)) if text else []

    def contains_control_strings(self, text: str) -> bool:
        """Whether ``text`` holds a string that would become a control id (``<s>``, ``</s>``, ``<unk>``,
        ``<image>``, ``[UNUSED_TOKEN_*]`` or any other user-defined piece)."""
        return any(c in text for c in self._control_strings)

    def encode_parts(self, parts: Sequence[tuple[str, bool]], *, add_bos: bool | None = None) -> list[int]:
        """Ids of the concatenated ``(text, trusted)`` parts, where only trusted parts can produce control ids.

        Control strings inside an untrusted part (a user's prompt) are tokenized as ordinary text, so a prompt
        cannot close its turn and write the assistant's. When no untrusted part holds a control string -- every
        ordinary prompt -- the ids are exactly :meth:`encode` of the joined text (the official ids).
        """
        for text, _trusted in parts:
            _check_text(text)
        if not any(not trusted and self.contains_control_strings(text) for text, trusted in parts):
            return self.encode("".join(text for text, _ in parts), add_bos=add_bos)
        ids: list[int] = []
        if self.add_bos_token if add_bos is None else add_bos:
            if self._bos_id < 0:
                raise ConfigError("this sentencepiece model has no BOS piece; call with add_bos=False")
            ids.append(self._bos_id)
        for stretch in self._stretches(parts):
            ids.extend(self._encode_stretch(stretch))
        if self.add_eos_token:
            ids.append(self._eos_id)
        return ids

    def _stretches(self, parts: Sequence[tuple[str, bool]]) -> list[int | list[tuple[str, bool]]]:
        """Split at the split tokens of trusted parts: ids (split tokens) and stretches of (text, trusted) parts,
        each stretch being what one sentencepiece call would see in :meth:`encode`."""
        out: list[int | list[tuple[str, bool]]] = []
        current: list[tuple[str, bool]] = []
        for text, trusted in parts:
            chunks = self._split_re.split(text) if trusted else [text]
            for i, chunk in enumerate(chunks):
                if i % 2:
                    if current:
                        out.append(current)
                    out.append(self._split_tokens[chunk])
                    current = []
                elif chunk:
                    current.append((chunk, trusted))
        if current:
            out.append(current)
        return out

    def _encode_stretch(self, stretch: int | list[tuple[str, bool]]) -> list[int]:
        """One sentencepiece call of :meth:`encode`, with user-defined pieces matched only in trusted text.

        sentencepiece treats a user-defined piece as an atom: text before it and after it is segmented on its own
        and only the start of the call gets the dummy-prefix space. This is reproduced with the plain processors
        (user-defined pieces unused), which is exact -- tested against :meth:`encode` on text without untrusted
        control strings.
        """
        if isinstance(stretch, int):
            return [stretch]
        first, following = self._plain_processors()
        atoms: list[int | str] = []  # marker ids and runs of plain text
        run = ""
        for text, trusted in stretch:
            chunks = self._marker_re.split(text) if trusted and self._marker_re is not None else [text]
            for i, chunk in enumerate(chunks):
                if i % 2:
                    atoms.extend([run, self._user_defined[chunk]])
                    run = ""
                else:
                    run += chunk
        atoms.append(run)
        ids: list[int] = []
        for index, atom in enumerate(atoms):
            if isinstance(atom, int):
                ids.append(atom)
            elif index == 0:
                if atom:
                    ids.extend(first.encode(atom))
                elif len(atoms) > 1 and self._model_proto().normalizer_spec.add_dummy_prefix:
                    ids.append(self._sp.piece_to_id("\u2581"))  # the dummy prefix before a leading marker
            elif atom:
                ids.extend(following.encode(atom))
        return ids

    def pad(self, sequences: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Left-pad id lists with the pad id: ``input_ids`` and ``attention_mask``, both int64 [B, T]."""
        if len(sequences) == 0:
            raise InputError("nothing to pad: the batch is empty")
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            if len(seq):
                input_ids[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
                attention_mask[row, width - len(seq) :] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def __call__(
        self, texts: str | Sequence[str], add_bos: bool | None = None, padding: bool = True
    ) -> dict[str, torch.Tensor]:
        """Tokenize a string or a batch of strings into left-padded int64 tensors.

        Returns ``{"input_ids": [B, T], "attention_mask": [B, T]}``. With ``padding=False`` all rows must
        have the same length.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
            raise InputError("the tokenizer takes a str or a list of str")
        seqs = [self.encode(t, add_bos=add_bos) for t in texts]
        if not padding and len({len(s) for s in seqs}) > 1:
            lengths = sorted({len(s) for s in seqs})
            raise InputError(f"rows have different lengths {lengths}; call with padding=True")
        return self.pad(seqs)

    # ------------------------------------------------------------------ ids <-> pieces
    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        """Piece strings of ids (``<image>`` included)."""
        if isinstance(ids, (int, np.integer)):
            return self._id_to_piece(int(ids))
        return [self._id_to_piece(i) for i in self._as_id_list(ids)]

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        """Ids of piece strings; unknown pieces map to the unk id."""
        if isinstance(tokens, str):
            return self._piece_to_id(tokens)
        return [self._piece_to_id(t) for t in tokens]

    def _id_to_piece(self, tid: int) -> str:
        if tid == self._image_id:
            return self.image_token
        if not 0 <= tid < self.vocab_size:
            raise InputError(f"token id {tid} is outside the vocabulary (0..{len(self) - 1})")
        return self._sp.id_to_piece(tid)

    def _piece_to_id(self, piece: str) -> int:
        if piece == self.image_token:
            return self._image_id
        return self._sp.piece_to_id(piece)

    @staticmethod
    def _as_id_list(ids: Any) -> list[int]:
        if isinstance(ids, torch.Tensor):
            if ids.ndim > 1:
                raise InputError(f"expected a 1-D sequence of ids; got a tensor of shape {tuple(ids.shape)}")
            return [int(i) for i in ids.tolist()]
        if isinstance(ids, np.ndarray):
            if ids.ndim > 1:
                raise InputError(f"expected a 1-D sequence of ids; got an array of shape {ids.shape}")
            return [int(i) for i in ids.tolist()]
        if isinstance(ids, (int, np.integer)):
            return [int(ids)]
        try:
            return [int(i) for i in ids]
        except (TypeError, ValueError) as exc:
            raise InputError(f"expected a sequence of integer token ids; got {type(ids).__name__}") from exc

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: Any, skip_special_tokens: bool = True, *, keep_chat_markers: bool = False) -> str:
        """Text of a sequence of ids.

        ``-100`` (the official generation's pad value) is always dropped. With ``skip_special_tokens`` the
        BOS/EOS/pad/unk ids, ``<image>`` and the ``[UNUSED_TOKEN_*]`` chat markers are dropped and the rest is
        decoded as one piece of text, exactly as the official tokenizer does -- except that the official one
        prints the chat markers; ``keep_chat_markers=True`` keeps them for identical text. Without
        ``skip_special_tokens``, special tokens are written as their strings, so
        ``decode(encode(text), skip_special_tokens=False) == "<s>" + text`` for any text sentencepiece can
        represent (the official slow tokenizer adds stray spaces around special tokens there).
        """
        id_list = [i for i in self._as_id_list(ids) if i != IGNORE_INDEX]
        for tid in id_list:
            if tid != self._image_id and not 0 <= tid < self.vocab_size:
                raise InputError(f"token id {tid} is outside the vocabulary (0..{len(self) - 1})")
        if skip_special_tokens:
            skip = self._skip_ids - self._chat_marker_ids if keep_chat_markers else self._skip_ids
            return self._sp.decode([i for i in id_list if i not in skip])
        literal = {self._bos_id, self._eos_id, self._pad_id, self._unk_id, self._image_id}
        parts: list[str] = []
        run: list[int] = []
        for tid in id_list:
            if tid in literal:
                if run:
                    parts.append(self._sp.decode(run))
                    run = []
                parts.append(self._id_to_piece(tid))
            else:
                run.append(tid)
        if run:
            parts.append(self._sp.decode(run))
        return "".join(parts)

    def batch_decode(
        self, sequences: Any, skip_special_tokens: bool = True, *, keep_chat_markers: bool = False
    ) -> list[str]:
        """:meth:`decode` for each row of a 2-D tensor/array or a list of id lists."""
        if isinstance(sequences, (torch.Tensor, np.ndarray)):
            if sequences.ndim != 2:
                raise InputError(f"batch_decode expects a 2-D batch of ids; got shape {tuple(sequences.shape)}")
            sequences = sequences.tolist()
        return [
            self.decode(row, skip_special_tokens=skip_special_tokens, keep_chat_markers=keep_chat_markers)
            for row in sequences
        ]


__all__ = ["MoAITokenizer", "resolve_model_file", "IGNORE_INDEX", "TOKENIZER_FILE", "TOKENIZER_CONFIG_FILE"]
