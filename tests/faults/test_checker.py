"""The history checker on hand-made logs: it finds each kind of anomaly, and excuses what an
edit legitimately removed (so a zero from the chaos run means something)."""

from __future__ import annotations

from typing import Any

from tests.faults.checker import ChatRecord, check
from tests.faults.client import Attempt, ChatStream, Cursor, Op, StreamConnection

CHAT = "chat-1"


def user(seq: int, text: str, message_id: str | None = None) -> dict[str, Any]:
    return {
        "id": message_id or f"id-{text}",
        "seq": seq,
        "role": "user",
        "content": [{"type": "text", "text": text}],
        "history_version": 1,
    }


def assistant(seq: int, text: str, version: int = 1) -> dict[str, Any]:
    return {
        "id": f"id-a{seq}",
        "seq": seq,
        "role": "assistant",
        "content": [{"type": "text", "text": text}],
        "history_version": version,
    }


def op(kind: str, text: str | None, at: float, *, status: int = 202, **fields: Any) -> Op:
    reply = {"message_id": f"id-{text}", "queued": False} if kind in ("send", "edit") else None
    result = Op("c", kind, CHAT, text=text, issued_at=at, done_at=at + 0.5, status=status)
    result.reply = reply
    result.attempts = [Attempt(at + 0.5, status)]
    for name, value in fields.items():
        setattr(result, name, value)
    return result


def record(*history: dict[str, Any], status: str = "waiting", queue: Any = ()) -> ChatRecord:
    last = max((m["seq"] for m in history), default=0)
    return ChatRecord(CHAT, status, last, list(history), list(queue))


def kinds(report: Any) -> list[str]:
    return [f.kind for f in report.findings]


def test_a_clean_history_passes() -> None:
    ops = [op("send", "a", 0), op("send", "b", 1)]
    chat = record(user(1, "a"), assistant(2, "x"), user(3, "b"), assistant(4, "y"))
    report = check(ops, {CHAT: chat})
    assert report.ok, report.summary()
    assert report.acknowledged == 2


def test_an_acknowledged_message_missing_is_lost() -> None:
    ops = [op("send", "a", 0), op("send", "b", 1)]
    report = check(ops, {CHAT: record(user(1, "a"), assistant(2, "x"))})
    assert kinds(report) == ["lost"]
    assert "b" in report.findings[0].detail


def test_an_unacknowledged_message_may_be_missing_or_present() -> None:
    failed = op("send", "b", 1, status=503)
    failed.status = None
    failed.attempts = [Attempt(1.5, 503), Attempt(2.0, None, "ConnectError")]
    assert check([failed], {CHAT: record()}).ok
    assert check([failed], {CHAT: record(user(1, "b"))}).ok


def test_a_refused_message_present_is_a_phantom() -> None:
    refused = op("send", "b", 1, status=409)
    assert kinds(check([refused], {CHAT: record(user(1, "b"))})) == ["phantom"]


def test_a_message_stored_twice_is_duplicated() -> None:
    ops = [op("send", "a", 0)]
    chat = record(user(1, "a"), assistant(2, "x"), user(3, "a", "id-other"), assistant(4, "y"))
    assert "duplicated" in kinds(check(ops, {CHAT: chat}))


def test_an_answer_committed_twice_is_duplicated() -> None:
    chat = record(user(1, "a"), assistant(2, "x"), assistant(3, "x"))
    assert kinds(check([op("send", "a", 0)], {CHAT: chat})) == ["duplicated"]


def test_a_tool_call_answered_twice_is_duplicated() -> None:
    call = {"type": "tool_call", "id": "k1", "name": "lookup", "arguments": "{}"}
    result = {"type": "tool_result", "call_id": "k1", "output": "{}", "is_error": False}
    calls = {**assistant(2, ""), "content": [call]}
    answer = {"id": "t", "seq": 3, "role": "tool", "content": [result], "history_version": 1}
    again = {**answer, "id": "t2", "seq": 4}
    chat = record(user(1, "a"), calls, answer, again)
    assert "duplicated" in kinds(check([op("send", "a", 0)], {CHAT: chat}))


def test_acknowledged_messages_in_another_order_are_reordered() -> None:
    ops = [op("send", "a", 0), op("send", "b", 1)]
    chat = record(user(1, "b"), assistant(2, "x"), user(3, "a"), assistant(4, "y"))
    assert kinds(check(ops, {CHAT: chat})) == ["reordered"]


def test_a_later_edit_excuses_the_messages_it_truncated() -> None:
    ops = [
        op("send", "a", 0),
        op("send", "b", 1),
        op("edit", "a2", 2, target="id-a"),
    ]
    chat = record(user(5, "a2"), assistant(6, "z"))
    report = check(ops, {CHAT: chat})
    assert report.ok, report.summary()


def test_an_edit_finished_before_a_send_does_not_excuse_it() -> None:
    ops = [op("edit", "a2", 0, target="id-a"), op("send", "b", 1)]
    assert kinds(check(ops, {CHAT: record(user(5, "a2"), assistant(6, "z"))})) == ["lost"]


def test_a_queued_message_counts_as_present() -> None:
    ops = [op("send", "a", 0), op("send", "b", 1)]
    chat = record(user(1, "a"), status="running", queue=[{"id": "id-b", "text": "b"}])
    assert kinds(check(ops, {CHAT: chat})) == ["stranded"]


# -- streams -----------------------------------------------------------------------------------


def stream_of(*connections: tuple[Cursor, list[dict[str, Any]]]) -> ChatStream:
    stream = ChatStream("c", "http://127.0.0.1:1", "token", CHAT)
    for cursor, events in connections:
        stream.connections.append(StreamConnection(cursor, 0.0, events))
    return stream


def message(m: dict[str, Any]) -> dict[str, Any]:
    return {"type": "message", **m}


def part(seq: int, text: str | None = None, attempt: int = 1) -> dict[str, Any]:
    body = {"type": "text", "text": text} if text is not None else {"type": "finish"}
    return {
        "type": "message_part",
        "history_version": 1,
        "generation_attempt": attempt,
        "seq": seq,
        "part": body,
    }


HISTORY = (user(1, "a"), assistant(2, "w1 w2 "))


def test_a_stream_resumed_exactly_once_passes() -> None:
    stream = stream_of(
        (Cursor(), [message(HISTORY[0]), part(1, "w1 ")]),
        (Cursor(1, 1, 1, 1), [part(2, "w2 "), part(3), message(HISTORY[1])]),
    )
    report = check([], {CHAT: record(*HISTORY)}, [stream], complete=[stream])
    assert report.ok, report.summary()


def test_a_part_delivered_again_after_a_resume_is_duplicated() -> None:
    stream = stream_of(
        (Cursor(), [message(HISTORY[0]), part(1, "w1 ")]),
        (Cursor(1, 1, 1, 1), [part(1, "w1 "), part(2, "w2 "), part(3), message(HISTORY[1])]),
    )
    report = check([], {CHAT: record(*HISTORY)}, [stream], complete=[stream])
    assert kinds(report) == ["duplicated"]


def test_a_gap_at_a_resume_is_lost() -> None:
    stream = stream_of(
        (Cursor(), [message(HISTORY[0]), part(1, "w1 ")]),
        (Cursor(1, 1, 1, 1), [part(3), message(HISTORY[1])]),
    )
    report = check([], {CHAT: record(*HISTORY)}, [stream], complete=[stream])
    assert kinds(report) == ["lost"]


def test_a_message_delivered_twice_or_never_is_found() -> None:
    twice = stream_of(
        (Cursor(), [message(HISTORY[0])]),
        (Cursor(0), [message(HISTORY[0]), message(HISTORY[1])]),
    )
    never = stream_of((Cursor(), [message(HISTORY[0])]))
    chats = {CHAT: record(*HISTORY)}
    assert kinds(check([], chats, [twice], complete=[twice])) == ["duplicated"]
    assert kinds(check([], chats, [never], complete=[never])) == ["lost"]


def test_parts_that_disagree_with_the_committed_answer_are_lost() -> None:
    stream = stream_of(
        (Cursor(), [message(HISTORY[0]), part(1, "w1 "), part(2, "w9 "), part(3)]),
        (Cursor(1, 1, 1, 3), [message(HISTORY[1])]),
    )
    report = check([], {CHAT: record(*HISTORY)}, [stream], complete=[stream])
    assert kinds(report) == ["lost"]
