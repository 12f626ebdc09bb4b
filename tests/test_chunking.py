import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.chunking import (
    OFFLINE_ENCODING,
    chunk_document,
    chunk_id,
    chunk_index,
    chunk_spans,
    count_tokens,
    encoding,
)

ROOT = Path(__file__).resolve().parents[1]

PASSWORD = (
    "To reset your password, open Settings and choose Security. "
    "Click 'Forgot password' and follow the link we email you. "
    "The link expires after one hour."
)
REVENUE = (
    "Quarterly revenue grew twelve percent year over year. "
    "Enterprise subscriptions drove most of the growth. "
    "Churn fell to its lowest level since the company was founded."
)


def test_encoding_is_the_offline_cl100k_and_cached():
    assert encoding().name == OFFLINE_ENCODING
    assert encoding() is encoding()
    assert count_tokens("hello world") == 2


def test_special_token_markers_count_as_text():
    assert count_tokens("<|endoftext|>") > 1


def test_encoding_loads_with_the_network_blocked():
    script = textwrap.dedent(
        """
        import socket
        def refuse(*args, **kwargs):
            raise AssertionError("network access attempted")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        from connectors.chunking import count_tokens
        print(count_tokens("offline tokens"))
        """
    )
    # An empty cache dir disables tiktoken's cache, so the bundled file itself is read.
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": "", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2"


@pytest.mark.parametrize("text", ["", "   ", "\n\n \t\n"])
def test_blank_text_gives_no_chunks(text):
    assert chunk_document("d1", text) == []


def test_short_text_is_one_chunk_with_a_stable_id():
    assert chunk_document("d1", "  Hello there.  ") == [("d1#0", 0, "Hello there.")]


def test_ids_are_stable_and_indexes_consecutive():
    text = "\n\n".join([PASSWORD, REVENUE] * 4)
    first = chunk_document("doc-7", text, max_tokens=40, overlap=0)
    assert first == chunk_document("doc-7", text, max_tokens=40, overlap=0)
    assert [(cid, i) for cid, i, _ in first] == [(f"doc-7#{i}", i) for i in range(len(first))]


def test_paragraphs_that_fit_stay_whole():
    text = f"{PASSWORD}\n\n{REVENUE}"
    budget = max(count_tokens(PASSWORD), count_tokens(REVENUE))
    texts = [t for _, _, t in chunk_document("d", text, max_tokens=budget, overlap=0)]
    assert texts == [PASSWORD, REVENUE]


def test_long_paragraphs_split_at_sentence_ends():
    chunks = chunk_document("d", f"{PASSWORD} {REVENUE}", max_tokens=30, overlap=0)
    assert len(chunks) > 1
    assert all(t.endswith(".") and count_tokens(t) <= 30 for _, _, t in chunks)


def test_overlap_repeats_the_last_sentence():
    sentences = [f"Sentence number {i} is here." for i in range(12)]
    chunks = chunk_document("d", " ".join(sentences), max_tokens=30, overlap=8)
    texts = [t for _, _, t in chunks]
    for previous, current in itertools.pairwise(texts):
        assert current.startswith(previous.split(". ")[-1])


def test_an_overlong_sentence_falls_back_to_overlapping_token_windows():
    text = " ".join(f"word{i}" for i in range(400))
    spans = chunk_spans(text, max_tokens=50, overlap=10)
    assert len(spans) > 5
    assert all(count_tokens(text[a:b]) <= 50 for a, b in spans)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert count_tokens(text[start:end]) == 10


@pytest.mark.parametrize(("max_tokens", "overlap"), [(0, 0), (10, 10), (10, -1)])
def test_invalid_budgets_are_refused(max_tokens, overlap):
    with pytest.raises(ValueError, match="max_tokens"):
        chunk_document("d", "text", max_tokens=max_tokens, overlap=overlap)


def test_chunk_index_inverts_chunk_id():
    assert chunk_id("d1", 3) == "d1#3"
    assert chunk_index("d1#3", "d1") == 3
    assert chunk_index("d1#x", "d1") is None
    assert chunk_index("d2#3", "d1") is None
    assert chunk_index("d1#-1", "d1") is None
    assert chunk_index("d1#\u0663", "d1") is None  # an Arabic-Indic digit is not an index


texts = st.text(
    alphabet=st.sampled_from(list("ab c.!?\n\t\"')é😀语")) | st.characters(),
    max_size=600,
)


@settings(max_examples=60, deadline=None)
@given(text=texts, max_tokens=st.integers(8, 64), overlap_share=st.floats(0, 0.5))
def test_chunks_are_slices_within_budget_that_cover_the_text(text, max_tokens, overlap_share):
    overlap = int(max_tokens * overlap_share)
    spans = chunk_spans(text, max_tokens=max_tokens, overlap=overlap)
    assert spans == sorted(spans)
    covered = [False] * len(text)
    for start, end in spans:
        assert 0 <= start < end <= len(text)
        assert count_tokens(text[start:end]) <= max_tokens
        covered[start:end] = [True] * (end - start)
    assert all(covered[i] for i, ch in enumerate(text) if not ch.isspace())
    chunks = chunk_document("d", text, max_tokens=max_tokens, overlap=overlap)
    assert [t for _, _, t in chunks] == [text[a:b] for a, b in spans]
