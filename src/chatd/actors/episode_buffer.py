"""The parts of a chat's current episode, kept so that a subscriber who joins (or rejoins)
mid-answer gets them in order from the first it lacks.

Pure bookkeeping, no I/O and no clock: the hub feeds it every event it publishes for the chat.
"""

from __future__ import annotations

from chatd.domain.events import (
    ChatEvent,
    CommittedMessage,
    Episode,
    MessagePart,
    PreviewReset,
    StatusChanged,
)


def order(episode: Episode) -> tuple[int, int]:
    """Episodes are ordered: both numbers only grow (history first, then attempt)."""
    return episode.history_version, episode.generation_attempt


def episode_of(status: StatusChanged) -> Episode:
    return Episode(status.history_version, status.generation_attempt)


class EpisodeBuffer:
    """The parts of the newest episode seen, contiguous from ``first_seq`` to ``last_seq``.

    At most ``max_parts`` parts: the oldest half goes beyond that (a subscriber that joins
    later gets none of that answer's parts, which could not follow without a gap). ``closed``:
    the episode's message was committed, so its parts are superseded.
    """

    __slots__ = ("closed", "episode", "first_seq", "max_parts", "parts")

    def __init__(self, max_parts: int) -> None:
        self.max_parts = max_parts
        self.episode: Episode | None = None
        self.parts: list[MessagePart] = []  # seqs first_seq, first_seq + 1, ...
        self.first_seq = 1
        self.closed = False

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.parts) - 1

    def record(self, event: ChatEvent) -> bool:
        """Update the buffer with ``event``; ``False`` when subscribers need not see it (a
        stale or repeated part)."""
        match event:
            case MessagePart(episode=episode, seq=seq):
                current = self.episode
                if current is None or order(episode) > order(current):
                    self._start(episode, first_seq=seq)
                elif episode != current or self.closed or seq <= self.last_seq:
                    return False
                elif seq > self.last_seq + 1:
                    self._start(episode, first_seq=seq)  # a gap: what came before is lost
                self.parts.append(event)
                if len(self.parts) > self.max_parts:
                    drop = len(self.parts) // 2
                    del self.parts[:drop]
                    self.first_seq += drop
            case PreviewReset(episode=episode):
                self._enter(episode)
            case StatusChanged():
                self._enter(episode_of(event))
            case CommittedMessage(history_version=version):
                if self.episode is not None and version > self.episode.history_version:
                    self.first_seq = self.last_seq + 1
                    self.parts = []
                    self.closed = True
            case _:
                pass
        return True

    def parts_between(self, episode: Episode, first: int, last: int) -> list[MessagePart]:
        """The buffered parts of ``episode`` with seqs ``first`` to ``last`` (fewer when the
        buffer ends sooner); none when the buffer no longer holds ``first``."""
        if episode != self.episode or self.closed or first < self.first_seq:
            return []
        end = min(last, self.last_seq)
        if end < first:
            return []
        return self.parts[first - self.first_seq : end - self.first_seq + 1]

    def _enter(self, episode: Episode) -> None:
        if self.episode is None or order(episode) > order(self.episode):
            self._start(episode, first_seq=1)

    def _start(self, episode: Episode, *, first_seq: int) -> None:
        self.episode = episode
        self.parts = []
        self.first_seq = first_seq
        self.closed = False
