"""The wire form of the internal link between workers: forwarded commands, their outcomes, and
the frames of a relayed stream.

A command forwarded to the chat's owner must come back as exactly what the owner's
``supervisor.ask`` gave (a reply, a ``Refusal``, an actor error), so that the edge that got the
request builds the same HTTP answer on any worker. Everything is msgspec JSON: the domain types
are dataclasses msgspec encodes as they are, and each value travels with its class name, looked
up in a registry on the other side (``COMMANDS``, ``REPLIES``, ``REFUSALS``, ``ACTOR_ERRORS``).
A refusal is rebuilt by calling its class with its fields, so that it is a real exception
(``args`` set, ``__str__`` as written); tests/unit/test_link_codec.py walks every ``Refusal``
subclass in chatd, so a new one that is not registered here fails the suite.

A relayed stream is a WebSocket of JSON messages, one ``LinkFrame`` per hub batch: the frame exactly
as the owner would send it to a WebSocket client (``chatd.web.frames``, carried as raw JSON and
passed on untouched) and the client's cursor after it. The owner's stream ends with one
``LinkEnd`` saying why (a stream that ends without one: the owner is gone).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal
from uuid import UUID

import msgspec

from chatd.actors.chat_actor import ChatCreatedReply, CommandNotCommitted, CreateChatRequest
from chatd.actors.errors import ActorDead, ActorError, AskTimeout, MailboxFull, NotOwner
from chatd.actors.stream_cursor import StreamCursor
from chatd.domain.effects import (
    Done,
    InvalidCommand,
    MessageAccepted,
    QueueFull,
    Refusal,
    RunningChatsLimit,
    TransitionNotAllowed,
    UnknownTarget,
)
from chatd.domain.events import Episode
from chatd.domain.mailbox import (
    AttemptSuperseded,
    Compact,
    DeleteChat,
    DeleteQueued,
    EditMessage,
    IdempotencyMark,
    Interrupt,
    Keyed,
    PromoteQueued,
    SendMessage,
    SetArchived,
    SubmitToolResults,
)
from chatd.store.database import DatabaseUnavailable


class LinkCodecError(ValueError):
    """Bytes from the link that are not what this codec writes (a version skew or a bug)."""


class RemoteFailure(RuntimeError):
    """The owner failed to handle a forwarded command with an unexpected error (its 500): the
    edge answers 500 too; the owner logged the traceback."""


def _registry(*classes: type) -> dict[str, type]:
    return {cls.__name__: cls for cls in classes}


COMMANDS: Final = _registry(
    SendMessage,
    EditMessage,
    Interrupt,
    SubmitToolResults,
    PromoteQueued,
    DeleteQueued,
    SetArchived,
    Compact,
    DeleteChat,
    CreateChatRequest,
)
REPLIES: Final = _registry(MessageAccepted, ChatCreatedReply, Done)
REFUSALS: Final[dict[str, type[Refusal]]] = {
    cls.__name__: cls
    for cls in (
        TransitionNotAllowed,
        InvalidCommand,
        QueueFull,
        RunningChatsLimit,
        UnknownTarget,
        AttemptSuperseded,
        CommandNotCommitted,
    )
}

# -- commands --------------------------------------------------------------------------------


class _CommandWire(msgspec.Struct, gc=False):
    type: str
    body: msgspec.Raw
    mark: IdempotencyMark | None = None


_encoder = msgspec.json.Encoder()
_command_decoder = msgspec.json.Decoder(_CommandWire)


def encode_command(command: object) -> bytes:
    """A command for the chat's actor (``Keyed`` or not) as the link carries it."""
    mark = None
    if isinstance(command, Keyed):
        mark, command = command.mark, command.command
    name = type(command).__name__
    if COMMANDS.get(name) is not type(command):
        raise LinkCodecError(f"{name} is not a command the link forwards")
    return _encoder.encode(_CommandWire(name, msgspec.Raw(_encoder.encode(command)), mark))


def decode_command(data: bytes) -> object:
    try:
        wire = _command_decoder.decode(data)
        cls = COMMANDS.get(wire.type)
        if cls is None:
            raise LinkCodecError(f"unknown command type {wire.type!r}")
        command: object = msgspec.json.decode(wire.body, type=cls)
    except msgspec.ValidationError as exc:
        raise LinkCodecError(f"malformed command: {exc}") from exc
    return command if wire.mark is None else Keyed(command, wire.mark)


# -- outcomes: a reply, or what the ask raised -----------------------------------------------

OutcomeKind = Literal["reply", "refusal", "actor_error", "unavailable", "failure"]


class _OutcomeWire(msgspec.Struct, gc=False):
    kind: OutcomeKind
    type: str = ""
    body: msgspec.Raw = msgspec.Raw(b"null")


_outcome_decoder = msgspec.json.Decoder(_OutcomeWire)


class _ActorErrorWire(msgspec.Struct, gc=False):
    chat_id: UUID
    detail: str = ""  # ActorDead.reason
    number: float = 0  # MailboxFull.capacity, NotOwner.shard, AskTimeout.timeout_s


def _actor_error_wire(exc: ActorError) -> _ActorErrorWire:
    match exc:
        case ActorDead(reason=reason):
            return _ActorErrorWire(exc.chat_id, detail=reason)
        case MailboxFull(capacity=capacity):
            return _ActorErrorWire(exc.chat_id, number=capacity)
        case NotOwner(shard=shard):
            return _ActorErrorWire(exc.chat_id, number=shard)
        case AskTimeout(timeout_s=timeout_s):
            return _ActorErrorWire(exc.chat_id, number=timeout_s)
    raise LinkCodecError(f"{type(exc).__name__} is not an actor error the link carries")


ACTOR_ERRORS: Final[dict[str, Callable[[_ActorErrorWire], ActorError]]] = {
    "ActorDead": lambda w: ActorDead(w.chat_id, w.detail),
    "MailboxFull": lambda w: MailboxFull(w.chat_id, int(w.number)),
    "NotOwner": lambda w: NotOwner(w.chat_id, int(w.number)),
    "AskTimeout": lambda w: AskTimeout(w.chat_id, w.number),
}


def encode_reply(reply: object) -> bytes:
    if reply is None:
        return _encoder.encode(_OutcomeWire("reply"))
    name = type(reply).__name__
    if REPLIES.get(name) is not type(reply):
        raise LinkCodecError(f"{name} is not a reply the link carries")
    return _encoder.encode(_OutcomeWire("reply", name, msgspec.Raw(_encoder.encode(reply))))


def encode_error(exc: BaseException) -> bytes:
    """What the owner's ask raised. Anything but a refusal, an actor error or an outage is a
    ``failure`` (only its class name travels: the owner logs it)."""
    name = type(exc).__name__
    if isinstance(exc, Refusal):
        if REFUSALS.get(name) is not type(exc):
            raise LinkCodecError(f"{name} is a Refusal the link codec does not know")
        body = _refusal_fields(exc)
        return _encoder.encode(_OutcomeWire("refusal", name, msgspec.Raw(_encoder.encode(body))))
    if isinstance(exc, ActorError) and name in ACTOR_ERRORS:
        body_bytes = _encoder.encode(_actor_error_wire(exc))
        return _encoder.encode(_OutcomeWire("actor_error", name, msgspec.Raw(body_bytes)))
    if isinstance(exc, DatabaseUnavailable):
        return _encoder.encode(
            _OutcomeWire("unavailable", name, msgspec.Raw(_encoder.encode(str(exc))))
        )
    return _encoder.encode(_OutcomeWire("failure", name))


def decode_outcome(data: bytes) -> object:
    """The reply the owner gave; raises what the owner's ask raised (``RemoteFailure`` for an
    unexpected failure) or ``LinkCodecError``."""
    try:
        wire = _outcome_decoder.decode(data)
        match wire.kind:
            case "reply":
                return _decode_reply(wire)
            case "refusal":
                raise _decode_refusal(wire)
            case "actor_error":
                factory = ACTOR_ERRORS.get(wire.type)
                if factory is None:
                    raise LinkCodecError(f"unknown actor error {wire.type!r}")
                raise factory(msgspec.json.decode(wire.body, type=_ActorErrorWire))
            case "unavailable":
                raise DatabaseUnavailable(msgspec.json.decode(wire.body, type=str))
            case "failure":
                raise RemoteFailure(f"the chat's owner failed with {wire.type}")
    except msgspec.ValidationError as exc:
        raise LinkCodecError(f"malformed outcome: {exc}") from exc
    typing.assert_never(wire.kind)


def _decode_reply(wire: _OutcomeWire) -> object:
    if not wire.type:
        return None
    cls = REPLIES.get(wire.type)
    if cls is None:
        raise LinkCodecError(f"unknown reply type {wire.type!r}")
    return msgspec.json.decode(wire.body, type=cls)


def _is_dataclass(cls: type) -> bool:
    return dataclasses.is_dataclass(cls)  # as a plain bool: no narrowing of a Refusal


def _refusal_fields(exc: Refusal) -> object:
    if _is_dataclass(type(exc)):
        fields: tuple[dataclasses.Field[Any], ...] = dataclasses.fields(type(exc))  # type: ignore[arg-type]
        return {f.name: getattr(exc, f.name) for f in fields}
    return [str(arg) for arg in exc.args]


def _decode_refusal(wire: _OutcomeWire) -> Refusal:
    cls = REFUSALS.get(wire.type)
    if cls is None:
        raise LinkCodecError(f"unknown refusal {wire.type!r}")
    if _is_dataclass(cls):
        fields = msgspec.json.decode(wire.body, type=dict[str, Any])
        hints = _hints(cls)
        # The class's own constructor, with the fields in order, as a raise site calls it:
        # the exception is whole (``args`` come from the positional arguments, ``__str__``).
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        if set(fields) != set(names):
            raise LinkCodecError(f"{wire.type} needs the fields {names}, got {sorted(fields)}")
        return cls(*(msgspec.convert(fields[name], hints[name]) for name in names))
    return cls(*msgspec.json.decode(wire.body, type=list[str]))


_HINTS: dict[type, Mapping[str, Any]] = {}


def _hints(cls: type) -> Mapping[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


# -- relayed streams -------------------------------------------------------------------------


class CursorWire(msgspec.Struct, array_like=True, gc=False):
    message_seq: int
    history_version: int | None
    generation_attempt: int | None
    part_seq: int

    @classmethod
    def of(cls, cursor: StreamCursor) -> CursorWire:
        episode = cursor.episode
        if episode is None:
            return cls(cursor.message_seq, None, None, cursor.part_seq)
        return cls(
            cursor.message_seq, episode.history_version, episode.generation_attempt, cursor.part_seq
        )

    def cursor(self) -> StreamCursor:
        version, attempt = self.history_version, self.generation_attempt
        episode = None if version is None or attempt is None else Episode(version, attempt)
        return StreamCursor(self.message_seq, episode, self.part_seq)


class LinkFrame(msgspec.Struct, tag="batch", gc=False):
    """One hub batch: the client's frame as the owner encoded it, and the cursor after it."""

    cursor: CursorWire
    frame: msgspec.Raw


EndReason = Literal["owner_moved", "slow_consumer", "shutting_down"]


class LinkEnd(msgspec.Struct, tag="end", gc=False):
    """The owner ended the stream: ``owner_moved`` (the shard left it: look up the new owner
    and resume), ``slow_consumer`` (close the client with 4008, ``detail`` the reason)."""

    reason: EndReason
    detail: str = ""


LinkStreamItem = LinkFrame | LinkEnd

_stream_decoder: msgspec.json.Decoder[LinkFrame | LinkEnd] = msgspec.json.Decoder(LinkStreamItem)


def encode_stream_item(item: LinkStreamItem) -> bytes:
    return _encoder.encode(item)


def decode_stream_item(line: bytes) -> LinkStreamItem:
    try:
        return _stream_decoder.decode(line)
    except msgspec.ValidationError as exc:
        raise LinkCodecError(f"malformed stream line: {exc}") from exc
