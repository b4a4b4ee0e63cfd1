"""Which commits a PostgreSQL snapshot saw, from its text form (``pg_current_snapshot()``)."""

from __future__ import annotations

import pytest

from chatd.store.visibility import ReadSnapshot


def test_a_snapshot_sees_what_committed_before_it_and_nothing_in_progress_or_later() -> None:
    seen = ReadSnapshot.parse("100:105:101,103")
    assert seen == ReadSnapshot(100, 105, frozenset({101, 103}))
    assert [xid for xid in range(95, 110) if seen.sees(xid)] == [95, 96, 97, 98, 99, 100, 102, 104]


def test_a_snapshot_with_nothing_in_progress() -> None:
    seen = ReadSnapshot.parse("7:7:")
    assert (seen.sees(6), seen.sees(7), seen.sees(8)) == (True, False, False)


@pytest.mark.parametrize("text", ["", "1:2", "a:b:", "1:2:x", "1:2:3:4"])
def test_anything_else_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a PostgreSQL snapshot"):
        ReadSnapshot.parse(text)
