"""Outputs keep their head and tail, cut on UTF-8 boundaries, and say how much was cut."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatd.tools.truncate import OutputBuffer, clip


def _cut_note(text: str) -> int:
    [cut] = re.findall(r"\[\.\.\. (\d+) bytes cut \.\.\.\]", text)
    return int(cut)


def test_short_output_is_whole() -> None:
    clipped = clip("héllo".encode(), 6)
    assert (clipped.text, clipped.cut_bytes) == ("héllo", 0)


def test_long_output_keeps_head_and_tail_and_says_what_was_cut() -> None:
    clipped = clip(b"a" * 100 + b"b" * 1000 + b"c" * 100, 200)
    assert clipped.text == "a" * 100 + "[... 1000 bytes cut ...]" + "c" * 100
    assert clipped.cut_bytes == 1000 == _cut_note(clipped.text)


@pytest.mark.parametrize("offset", [0, 1, 2, 3])
def test_multibyte_characters_at_the_cut_are_dropped_whole(offset: int) -> None:
    # Four-byte characters shifted so each cut falls on every position inside one.
    data = b"x" * offset + "😀".encode() * 50
    clipped = clip(data, 21)
    head, tail = clipped.text.split(f"[... {clipped.cut_bytes} bytes cut ...]")
    assert "\ufffd" not in clipped.text
    assert head.strip("x") == "😀" * head.count("😀")
    assert tail == "😀" * tail.count("😀")
    kept = len(head.encode()) + len(tail.encode())
    assert kept <= 21
    assert kept + clipped.cut_bytes == len(data)


@given(st.text(), st.integers(min_value=0, max_value=64))
def test_clip_never_splits_a_character(text: str, max_bytes: int) -> None:
    data = text.encode()
    clipped = clip(data, max_bytes)
    if len(data) <= max_bytes:
        assert clipped.text == text
        return
    head, tail = clipped.text.split(f"[... {clipped.cut_bytes} bytes cut ...]")
    assert text.startswith(head)
    assert text.endswith(tail)
    assert len(head.encode()) + len(tail.encode()) + clipped.cut_bytes == len(data)


@given(st.lists(st.binary(max_size=50), max_size=30), st.integers(min_value=1, max_value=40))
def test_buffer_keeps_what_clip_of_the_whole_keeps(chunks: list[bytes], max_bytes: int) -> None:
    buffer = OutputBuffer(max_bytes)
    for chunk in chunks:
        buffer.feed(chunk)
    whole = b"".join(chunks)
    assert buffer.total_bytes == len(whole)
    assert buffer.clipped() == clip(whole, max_bytes)


def test_buffer_of_a_huge_stream_returns_max_bytes() -> None:
    buffer = OutputBuffer(1000)
    for _ in range(1000):
        buffer.feed(b"z" * 10_000)
    clipped = buffer.clipped()
    assert clipped.cut_bytes == 10_000_000 - 1000
    assert len(clipped.text) < 1100
