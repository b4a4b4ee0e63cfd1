"""Where a client's view of a chat stream ends: the cursor it reconnects with."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from chatd.domain.events import (
    ChatEvent,
    CommittedMessage,
    Episode,
    HistoryReset,
    MessagePart,
    PreviewReset,
)


class CursorError(ValueError):
    """A stream cursor parameter is malformed; ``field`` names it (for a 400 naming the field)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True, slots=True)
class StreamCursor:
    """Where a client's view of a chat stream ends.

    ``message_seq``: the highest seq of the committed messages the client holds (0: none).
    ``episode`` and ``part_seq``: the episode of the client's preview and the seq of the last
    part of it the client holds (0: none yet); ``None`` when the client has no preview.
    """

    message_seq: int = 0
    episode: Episode | None = None
    part_seq: int = 0

    def __post_init__(self) -> None:
        if self.message_seq < 0:
            raise CursorError("message_seq", "must not be negative")
        if self.part_seq < 0:
            raise CursorError("part_seq", "must not be negative")
        if self.part_seq and self.episode is None:
            raise CursorError("part_seq", "needs history_version and generation_attempt")

    @classmethod
    def from_query(cls, params: Mapping[str, str]) -> StreamCursor:
        """The cursor from query parameters ``message_seq``, ``history_version``,
        ``generation_attempt`` and ``part_seq`` (all optional; the episode needs both of its
        numbers). Raises ``CursorError`` naming the first bad parameter."""
        numbers: dict[str, int | None] = {}
        for name in ("message_seq", "history_version", "generation_attempt", "part_seq"):
            text = params.get(name)
            if text is None or text == "":
                numbers[name] = None
                continue
            if not text.isascii() or not text.isdigit() or len(text) > 18:
                raise CursorError(name, "must be a non-negative integer")
            numbers[name] = int(text)
        version, attempt = numbers["history_version"], numbers["generation_attempt"]
        if (version is None) != (attempt is None):
            missing = "generation_attempt" if attempt is None else "history_version"
            raise CursorError(missing, "history_version and generation_attempt go together")
        episode = None if version is None or attempt is None else Episode(version, attempt)
        return cls(numbers["message_seq"] or 0, episode, numbers["part_seq"] or 0)

    def after(self, events: Iterable[ChatEvent]) -> StreamCursor:
        """The cursor of a client that held this one and was then sent ``events``, as a client
        keeps it (README, "Streams"): a message raises ``message_seq``, a history reset lowers
        it to what is left, a part moves the preview to its episode and seq, a preview reset to
        its episode with no part yet. A relay resumes its client from it when the owner moves.
        """
        seq, episode, part = self.message_seq, self.episode, self.part_seq
        for event in events:
            match event:
                case MessagePart():
                    episode, part = event.episode, event.seq
                case CommittedMessage():
                    seq = max(seq, event.seq)
                case HistoryReset(after_seq=after):
                    seq = min(seq, after)
                case PreviewReset():
                    episode, part = event.episode, 0
                case _:
                    pass
        if (seq, episode, part) == (self.message_seq, self.episode, self.part_seq):
            return self
        return StreamCursor(seq, episode, part)
