"""Word-start markers, token pieces and the text they spell.

Token pieces (``convert_ids_to_tokens``) carry a word-start marker that the alignment cost strips:

* ``"Ġ"`` (U+0120) -- byte-level BPE (GPT-2, GPT-NeoX, Llama-3, Qwen, SmolLM2, the demo zoo): every
  byte is spelled by one printable character (GPT-2's ``bytes_to_unicode``), "Ġ" is the space byte,
  "Ċ" the newline, "Ã©" the two bytes of "é";
* ``"▁"`` (U+2581) -- SentencePiece (Llama-2, Mistral, Gemma, Unigram/Metaspace tokenizers): "▁" is a
  space, other characters are themselves, and byte-fallback pieces ``<0x0A>`` are single bytes.

Any other marker is a :class:`~fusion_jax.errors.ConfigError`. :func:`detect_marker` reads a
transformers fast tokenizer's pipeline (pre-tokenizer, normalizer, decoder) to tell which one it uses;
:func:`tokenize` gives a text's pieces, ids and character offsets; :func:`piece_bytes` and
:func:`check_same_text` decode pieces back to the text they spell, to refuse two tokenizations of
different texts.
"""
from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from fusion_jax.errors import ConfigError, DataError

BYTE_LEVEL = "\u0120"  # Ġ
SENTENCEPIECE = "\u2581"  # ▁
MARKERS = {BYTE_LEVEL: "byte-level BPE", SENTENCEPIECE: "SentencePiece"}

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def check_marker(marker: str, what: str = "marker") -> str:
    """``marker`` if it is one of :data:`MARKERS`, else a ``ConfigError`` naming ``what``."""
    if marker not in MARKERS:
        known = ", ".join(f"{m!r} ({n})" for m, n in MARKERS.items())
        raise ConfigError(f"{what}={marker!r}: unknown word-start marker; expected one of {known}")
    return marker


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: printable character -> byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def piece_bytes(piece: str, marker: str) -> bytes:
    """The bytes of text a piece spells (its marker as a space). Byte-level pieces map character by
    character through GPT-2's table (a character outside it, e.g. a special token, is kept as UTF-8);
    SentencePiece pieces are UTF-8 with ``<0xNN>`` byte-fallback pieces as one byte."""
    check_marker(marker)
    if marker == BYTE_LEVEL:
        dec = _byte_decoder()
        if all(ch in dec for ch in piece):
            return bytes(dec[ch] for ch in piece)
        return piece.encode("utf-8")
    m = _BYTE_PIECE.fullmatch(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    return piece.replace(SENTENCEPIECE, " ").encode("utf-8")


def spelled_text(pieces: Sequence[str], marker: str) -> str:
    """The text a piece sequence spells (invalid UTF-8 replaced by U+FFFD)."""
    return b"".join(piece_bytes(p, marker) for p in pieces).decode("utf-8", errors="replace")


def _canonical(text: str) -> str:
    # Tokenizers may normalize (NFC in Qwen) and add or merge a leading space (SentencePiece's
    # prefix "▁"); the markers stand for spaces, so the comparison is of the text without them.
    return unicodedata.normalize("NFC", text).replace(" ", "")


def check_same_text(base_pieces: Sequence[str], teacher_pieces: Sequence[str], base_marker: str,
                    teacher_marker: str) -> None:
    """A ``DataError`` unless both piece sequences spell the same text once the markers (spaces) are
    stripped (and Unicode is NFC-normalized); the message shows where they part."""
    a = _canonical(spelled_text(base_pieces, base_marker))
    b = _canonical(spelled_text(teacher_pieces, teacher_marker))
    if a == b:
        return
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    raise DataError("the base and teacher tokenizations spell different texts (spaces ignored): they "
                    f"part at character {k}: base ...{a[max(0, k - 20):k + 20]!r}... vs teacher "
                    f"...{b[max(0, k - 20):k + 20]!r}... (lengths {len(a)} and {len(b)})")


def _components(obj) -> list[dict]:
    """Flatten a tokenizers pipeline component (Sequence of ...) into its parts."""
    if not isinstance(obj, dict):
        return []
    parts = [obj]
    for key in ("pretokenizers", "normalizers", "decoders", "processors"):
        for sub in obj.get(key) or []:
            parts.extend(_components(sub))
    return parts


def detect_marker(tokenizer) -> str:
    """The word-start marker of a transformers fast tokenizer (``PreTrainedTokenizerFast``) or a
    ``tokenizers.Tokenizer``: "Ġ" if its pipeline is byte-level, "▁" (or Metaspace's replacement
    character) if it is SentencePiece-style. A ``ConfigError`` if neither can be told."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    try:
        spec = json.loads(backend.to_str())
    except AttributeError as e:
        raise ConfigError(f"{type(tokenizer).__name__}: not a fast (tokenizers-backed) tokenizer; "
                          "cannot detect its word-start marker") from e
    parts = [p for key in ("pre_tokenizer", "normalizer", "decoder") for p in _components(spec.get(key))]
    types = {p.get("type") for p in parts}
    if "ByteLevel" in types:
        return BYTE_LEVEL
    for p in parts:
        if p.get("type") == "Metaspace":
            return check_marker(p.get("replacement", SENTENCEPIECE), "Metaspace replacement")
    for p in parts:  # Llama-2 / Gemma style: Replace(" " -> "▁") normalizer, Replace("▁" -> " ") decoder
        if p.get("type") == "Replace":
            pattern = (p.get("pattern") or {}).get("String")
            if pattern == " " and p.get("content") in MARKERS:
                return p["content"]
            if p.get("content") == " " and pattern in MARKERS:
                return pattern
    raise ConfigError(f"{type(tokenizer).__name__}: cannot tell its word-start marker (no ByteLevel, "
                      "Metaspace or space-replacing step in its pipeline); pass the marker explicitly "
                      f"as one of {', '.join(map(repr, MARKERS))}")


@dataclass(frozen=True, eq=False)
class TokenizedText:
    """A text as one tokenizer sees it: ``ids`` ``int32 [n]``, ``pieces`` (the tokens as strings),
    ``offsets`` ``int32 [n, 2]`` (start, end) character offsets into ``text``, and the ``marker``."""

    text: str
    ids: np.ndarray
    pieces: tuple[str, ...]
    offsets: np.ndarray
    marker: str

    def __len__(self) -> int:
        return len(self.pieces)


def tokenize(tokenizer, text: str, marker: str | None = None) -> TokenizedText:
    """``text``'s pieces in ``tokenizer`` (a ``PreTrainedTokenizerFast``), without special tokens;
    ``marker`` defaults to :func:`detect_marker`."""
    marker = check_marker(marker) if marker is not None else detect_marker(tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int32).reshape(-1, 2)
    pieces = tuple(tokenizer.convert_ids_to_tokens(ids.tolist()))
    return TokenizedText(text, ids, pieces, offsets, marker)
