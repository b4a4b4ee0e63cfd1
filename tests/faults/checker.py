"""The independent checker: every chat's history as the API tells it, against every client's log.

It knows the API's promises, not chatd's code:

- **lost**: an acknowledged write (a chat created, a message sent or edited in, tool results
  submitted) is in neither the chat's history nor its queue, and no edit could have removed
  it; a stream skipped a message or a part it owed (a gap at a resume, a message missing from
  a stream that caught up, a history reset it never got);
- **duplicated**: a write is there twice (each op's text is unique), a tool call is answered
  twice, an answer is committed twice in a row, a message or a part is delivered twice on a
  client's stream (across its reconnections);
- **reordered**: history not in seq order, acknowledged writes in another order than they were
  acknowledged, a stream delivering out of order;
- **phantom**: a write that was refused for good (a 4xx on its only attempt) is there anyway;
- **stranded**: a chat left ``running`` (or ``interrupting``) after the faults ended and the
  settling bound passed.

An edit truncates the history after the edited message and clears the queue, so an
acknowledged message is excused when an edit that may have been applied after it was issued
exists (acknowledged or ambiguous, issued after it; or ambiguous at all).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tests.faults.client import SETTLED, ApiClient, ChatStream, Op, text_of

KINDS = ("lost", "duplicated", "reordered", "phantom", "stranded")


@dataclass(frozen=True)
class Finding:
    kind: str
    chat_id: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: chat {self.chat_id}: {self.detail}"


@dataclass
class ChatRecord:
    """A chat as the API shows it after the run."""

    chat_id: str
    status: str
    last_message_seq: int
    history: list[dict[str, Any]]
    queue: list[dict[str, Any]]


@dataclass
class Report:
    acknowledged: int = 0
    ops: int = 0
    findings: list[Finding] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for f in self.findings if f.kind == kind)

    @property
    def ok(self) -> bool:
        return not self.findings

    def figures(self) -> dict[str, int]:
        return {
            "operations": self.ops,
            "acknowledged": self.acknowledged,
            **{kind: self.count(kind) for kind in KINDS},
        }

    def summary(self, limit: int = 40) -> str:
        lines = [", ".join(f"{k} {v}" for k, v in self.figures().items())]
        lines.extend(str(f) for f in self.findings[:limit])
        if len(self.findings) > limit:
            lines.append(f"... and {len(self.findings) - limit} more")
        return "\n".join(lines)


def check(
    ops: Iterable[Op],
    chats: dict[str, ChatRecord],
    streams: Iterable[ChatStream] = (),
    *,
    complete: Iterable[ChatStream] = (),
) -> Report:
    """Check the final ``chats`` against the clients' ``ops`` and their ``streams``; each stream
    in ``complete`` has caught up with the end, so it must hold exactly the final history."""
    ops = list(ops)
    report = Report(acknowledged=sum(1 for op in ops if op.acked), ops=len(ops))
    by_chat: dict[str, list[Op]] = {}
    for op in ops:
        if op.kind == "create" and not op.acked:
            # An unacknowledged create has no chat id to look under; it must not have made a
            # chat carrying its text (checked below against every chat).
            continue
        assert op.chat_id is not None
        by_chat.setdefault(op.chat_id, []).append(op)
    for op in ops:
        if op.kind == "create" and op.acked and op.chat_id not in chats:
            report.findings.append(Finding("lost", str(op.chat_id), "acknowledged chat missing"))
    orphan_creates = [op for op in ops if op.kind == "create" and not op.acked]
    for record in chats.values():
        _check_history(record, by_chat.get(record.chat_id, []), report.findings)
        for op in orphan_creates:
            if op.text is not None and op.text in _user_texts(record) and not op.ambiguous:
                report.findings.append(
                    Finding("phantom", record.chat_id, f"refused create made a chat: {op.text}")
                )
    complete_ids = {id(s) for s in complete}
    for stream in streams:
        final = chats.get(stream.chat_id)
        _check_stream(stream, final if id(stream) in complete_ids else None, report.findings)
    return report


# -- histories -------------------------------------------------------------------------------


def _user_texts(record: ChatRecord) -> list[str]:
    texts = [text_of(m["content"]) for m in record.history if m["role"] == "user"]
    return texts + [str(q["text"]) for q in record.queue]


def _check_history(record: ChatRecord, ops: list[Op], findings: list[Finding]) -> None:
    chat = record.chat_id
    history = record.history

    def finding(kind: str, detail: str) -> None:
        findings.append(Finding(kind, chat, detail))

    if record.status not in SETTLED:
        finding("stranded", f"left {record.status!r}")

    seqs = [m["seq"] for m in history]
    if seqs != sorted(set(seqs)):
        finding("reordered", f"history seqs not increasing: {seqs}")
    for message_id, n in Counter(m["id"] for m in history).items():
        if n > 1:
            finding("duplicated", f"message {message_id} listed {n} times")

    # Where each user text is: (position, id); history by seq, then the queue in its order.
    places: dict[str, list[tuple[float, str]]] = {}
    for m in history:
        if m["role"] == "user":
            places.setdefault(text_of(m["content"]), []).append((m["seq"], str(m["id"])))
    for index, q in enumerate(record.queue):
        places.setdefault(str(q["text"]), []).append((1e18 + index, str(q["id"])))

    _check_tool_steps(history, finding)
    _check_answers(history, finding)

    outputs = _tool_outputs(history)
    present_at: dict[int, float] = {}  # id(op) -> position, for the order check
    for op in ops:
        if op.kind == "interrupt":
            continue
        if op.kind == "tool_results":
            found = [outputs.get(call_id) for call_id in op.call_ids]
            mine = [o for o in found if o is not None and op.key in o]
            present = len(mine) == len(op.call_ids)
            if op.acked and not present and not _excused(op, ops):
                finding("lost", f"acknowledged tool results missing: {op.describe()}")
            if mine and not op.acked and not op.ambiguous:
                finding("phantom", f"refused tool results applied: {op.describe()}")
            continue
        assert op.text is not None
        where = places.get(op.text, [])
        if len(where) > 1:
            finding("duplicated", f"{len(where)} copies of {op.describe()}")
        if not where:
            if op.acked and not _excused(op, ops):
                finding("lost", f"acknowledged {op.describe()}")
            continue
        if not op.acked and not op.ambiguous:
            finding("phantom", f"refused but present: {op.describe()}")
        position, message_id = where[0]
        if op.acked and op.message_id is not None and message_id != op.message_id:
            finding(
                "duplicated",
                f"acknowledged as {op.message_id}, stored as {message_id}: {op.describe()}",
            )
        if op.acked:
            present_at[id(op)] = position

    acked_present = [op for op in ops if id(op) in present_at]
    for earlier, later in itertools.pairwise(acked_present):
        assert earlier.done_at is not None
        if earlier.done_at <= later.issued_at and present_at[id(earlier)] > present_at[id(later)]:
            finding("reordered", f"{later.describe()} before {earlier.describe()}")


def _excused(op: Op, ops: list[Op]) -> bool:
    """Could an edit have removed what ``op`` wrote (or queued)?"""
    return any(
        other.kind == "edit"
        and other is not op
        and (other.ambiguous or (other.acked and other.issued_at > op.issued_at))
        for other in ops
    )


def _tool_outputs(history: list[dict[str, Any]]) -> dict[str, str]:
    outputs: dict[str, str] = {}
    for m in history:
        for part in m["content"]:
            if part.get("type") == "tool_result":
                outputs.setdefault(part["call_id"], part["output"])
    return outputs


def _check_tool_steps(history: list[dict[str, Any]], finding: Any) -> None:
    """Each tool call is answered once, by a tool message right after the calls' step."""
    answered: Counter[str] = Counter()
    for index, m in enumerate(history):
        results = [p["call_id"] for p in m["content"] if p.get("type") == "tool_result"]
        answered.update(results)
        if not results:
            continue
        previous = history[index - 1] if index else None
        calls = (
            {p["id"] for p in previous["content"] if p.get("type") == "tool_call"}
            if previous is not None and previous["role"] == "assistant"
            else set()
        )
        if not set(results) <= calls:
            finding("reordered", f"tool results {results} at seq {m['seq']} follow no such calls")
    for call_id, n in answered.items():
        if n > 1:
            finding("duplicated", f"tool call {call_id} answered {n} times")


def _check_answers(history: list[dict[str, Any]], finding: Any) -> None:
    """An answer committed twice shows as two equal assistant messages in a row."""
    for previous, m in itertools.pairwise(history):
        if previous["role"] == m["role"] == "assistant" and previous["content"] == m["content"]:
            finding("duplicated", f"answer at seq {previous['seq']} repeated at seq {m['seq']}")


# -- streams ---------------------------------------------------------------------------------

Episode = tuple[int, int]


@dataclass
class _Preview:
    """What a client holds of one episode's parts."""

    contiguous: int = 0  # parts 1..contiguous all received
    text: str = ""
    finished: bool = False
    compared: bool = False


def _check_stream(stream: ChatStream, final: ChatRecord | None, findings: list[Finding]) -> None:
    chat = stream.chat_id

    def finding(kind: str, detail: str) -> None:
        findings.append(Finding(kind, chat, f"stream of {stream.name}: {detail}"))

    held: dict[int, str] = {}
    parts_seen: set[tuple[int, int, int]] = set()
    previews: dict[Episode, _Preview] = {}
    latest: Episode | None = None
    for number, connection in enumerate(stream.connections, 1):
        where = f"connection {number}"
        cursor = connection.cursor
        cursor_episode = (
            (cursor.history_version, cursor.generation_attempt)
            if cursor.history_version is not None and cursor.generation_attempt is not None
            else None
        )
        last_in_connection: dict[Episode, int] = {}
        for event in connection.events:
            kind = event.get("type")
            if kind == "message":
                seq, message_id = event["seq"], str(event["id"])
                if seq in held:
                    same = held[seq] == message_id
                    finding(
                        "duplicated" if same else "reordered",
                        f"{where}: message seq {seq} delivered again",
                    )
                elif held and seq < max(held):
                    finding("reordered", f"{where}: message seq {seq} after {max(held)}")
                held[seq] = message_id
                if event["role"] == "assistant" and latest is not None:
                    preview = previews[latest]
                    if (
                        latest[0] == event["history_version"]
                        and preview.finished
                        and not preview.compared
                    ):
                        preview.compared = True
                        committed = text_of(event["content"])
                        if preview.text != committed:
                            finding(
                                "lost",
                                f"{where}: parts of episode {latest} read {preview.text!r},"
                                f" the committed answer {committed!r}",
                            )
            elif kind == "history_reset":
                for seq in [s for s in held if s > event["after_seq"]]:
                    del held[seq]
            elif kind == "message_part":
                episode = (event["history_version"], event["generation_attempt"])
                seq = event["seq"]
                key = (*episode, seq)
                if key in parts_seen:
                    finding("duplicated", f"{where}: part {key} delivered again")
                    continue
                previous = last_in_connection.get(episode)
                if previous is None:
                    allowed = {1}
                    if cursor_episode == episode:
                        allowed.add(cursor.part_seq + 1)
                    if seq not in allowed:
                        finding("lost", f"{where}: episode {episode} resumed at part {seq}")
                elif seq != previous + 1:
                    finding(
                        "lost" if seq > previous + 1 else "reordered",
                        f"{where}: part {seq} of episode {episode} after part {previous}",
                    )
                parts_seen.add(key)
                last_in_connection[episode] = seq
                preview = previews.setdefault(episode, _Preview())
                if seq == preview.contiguous + 1:
                    preview.contiguous = seq
                    part = event["part"]
                    if part.get("type") == "text":
                        preview.text += part["text"]
                    elif part.get("type") == "finish":
                        preview.finished = True
                latest = episode
    if final is not None:
        expected = {m["seq"]: str(m["id"]) for m in final.history}
        for seq, message_id in sorted(expected.items()):
            if held.get(seq) != message_id:
                finding("lost", f"message seq {seq} ({message_id}) never delivered")
        for seq in sorted(set(held) - set(expected)):
            finding("lost", f"holds message seq {seq}, deleted without a history reset")


async def read_chats(api: ApiClient, chat_ids: Iterable[str]) -> dict[str, ChatRecord]:
    """Each chat as the API shows it now: status, queue and whole history."""
    records: dict[str, ChatRecord] = {}
    for chat_id in chat_ids:
        chat = await api.chat(chat_id)
        records[chat_id] = ChatRecord(
            chat_id,
            chat["status"],
            chat["last_message_seq"],
            await api.history(chat_id),
            chat["queue"],
        )
    return records
