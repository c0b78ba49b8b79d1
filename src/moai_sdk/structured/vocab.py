"""Token bytes of a sentencepiece vocabulary, as grammar engines need them.

A grammar engine matches bytes, not piece strings: ``"▁the"`` is the bytes ``b" the"``, the byte-fallback piece
``"<0x7B>"`` is ``b"{"``, and control pieces (``<s>``, ``</s>``, ``<unk>``) and InternLM2's user-defined chat
markers (``[UNUSED_TOKEN_*]``) produce no text: they are special and a grammar never allows them (EOS is allowed
where the grammar may end).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
SPIECE_UNDERLINE = "\u2581"


@dataclass(frozen=True)
class VocabBytes:
    """``tokens[i]``: the bytes piece ``i`` writes (``b""`` for special pieces); ``special``: ids of the pieces that
    write no text; ``eos_token_id``: the end of an answer."""

    tokens: tuple[bytes, ...]
    special: frozenset[int]
    eos_token_id: int
    bos_token_id: int | None = None

    @property
    def size(self) -> int:
        return len(self.tokens)


def piece_bytes(piece: str) -> bytes:
    """The bytes a normal or byte-fallback sentencepiece piece writes."""
    m = _BYTE_PIECE.match(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    return piece.replace(SPIECE_UNDERLINE, " ").encode("utf-8")


def vocab_from_pieces(
    pieces: Sequence[str], special: Sequence[int], eos_token_id: int, bos_token_id: int | None = None
) -> VocabBytes:
    """:class:`VocabBytes` from piece strings and the ids of the special pieces."""
    special_set = frozenset(int(i) for i in special)
    tokens = tuple(b"" if i in special_set else piece_bytes(p) for i, p in enumerate(pieces))
    return VocabBytes(tokens, special_set, int(eos_token_id), bos_token_id)


def vocab_from_sentencepiece(sp: Any, *, eos_token_id: int | None = None) -> VocabBytes:
    """:class:`VocabBytes` of a ``sentencepiece.SentencePieceProcessor``: control, unknown, unused and
    user-defined pieces are special."""
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    special = [
        i
        for i in range(n)
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or (pieces[i].startswith("[UNUSED_TOKEN_"))
    ]
    eos = sp.eos_id() if eos_token_id is None else eos_token_id
    bos = sp.bos_id() if sp.bos_id() >= 0 else None
    return vocab_from_pieces(pieces, special, eos, bos)
