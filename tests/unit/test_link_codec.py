"""The internal link's wire form: every command, reply, refusal and actor error crosses it
unchanged, and a relayed stream's cursor is the one its client holds."""

from __future__ import annotations

import importlib
import pkgutil
import typing
from datetime import UTC, datetime
from uuid import UUID, uuid4

import msgspec
import pytest

import chatd
from chatd.actors.chat_actor import ChatCreatedReply, CommandNotCommitted, CreateChatRequest
from chatd.actors.errors import ActorDead, ActorError, AskTimeout, MailboxFull, NotOwner
from chatd.actors.stream_cursor import StreamCursor
from chatd.domain.chat_status import ChatStatus
from chatd.domain.conversation import TextPart, ToolSpec
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
from chatd.domain.events import (
    CommittedMessage,
    Episode,
    HistoryReset,
    MessagePart,
    PreviewReset,
    QueueUpdated,
    StatusChanged,
)
from chatd.domain.mailbox import (
    AttemptSuperseded,
    Command,
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
    ToolResult,
)
from chatd.domain.stream_parts import TextDelta
from chatd.store.database import DatabaseUnavailable
from chatd.store.records import Chat
from chatd.web import link_codec
from chatd.web.link_codec import (
    CursorWire,
    LinkCodecError,
    LinkEnd,
    LinkFrame,
    RemoteFailure,
    decode_command,
    decode_outcome,
    decode_stream_item,
    encode_command,
    encode_error,
    encode_reply,
    encode_stream_item,
)

CHAT = UUID("12345678-1234-5678-1234-567812345678")

# One instance of every Refusal in chatd; a new Refusal must be added here and to the codec.
REFUSAL_SAMPLES: list[Refusal] = [
    TransitionNotAllowed("running", "EditMessage"),
    InvalidCommand("text", "must not be empty"),
    QueueFull(10),
    RunningChatsLimit(3),
    UnknownTarget("message", uuid4()),
    UnknownTarget("chat"),
    AttemptSuperseded("the key was taken over"),
    CommandNotCommitted("the database went away"),
]


def every_refusal_class() -> set[type[Refusal]]:
    for module in pkgutil.walk_packages(chatd.__path__, "chatd."):
        if not module.name.endswith("__main__"):  # that one runs the command line
            importlib.import_module(module.name)
    found: set[type[Refusal]] = set()
    todo: list[type[Refusal]] = [Refusal]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                todo.append(sub)
    return found


def test_every_refusal_in_chatd_is_registered_and_has_a_sample() -> None:
    classes = every_refusal_class()
    assert classes == set(link_codec.REFUSALS.values())
    assert {type(r) for r in REFUSAL_SAMPLES} == classes


@pytest.mark.parametrize("refusal", REFUSAL_SAMPLES, ids=lambda r: type(r).__name__)
def test_a_refusal_round_trips_as_a_whole_exception(refusal: Refusal) -> None:
    with pytest.raises(type(refusal)) as caught:
        decode_outcome(encode_error(refusal))
    got = caught.value
    assert type(got) is type(refusal)
    assert str(got) == str(refusal)
    assert vars(got) == vars(refusal)
    assert got.args  # built by its constructor, as a raise site builds it


def test_a_refusal_the_codec_does_not_know_is_refused_when_encoded() -> None:
    class Unheard(Refusal):
        pass

    with pytest.raises(LinkCodecError, match="Unheard is a Refusal the link codec does not know"):
        encode_error(Unheard("x"))


@pytest.mark.parametrize(
    "error",
    [
        ActorDead(CHAT, "crashed"),
        MailboxFull(CHAT, 256),
        NotOwner(CHAT, 17),
        AskTimeout(CHAT, 2.5),
    ],
    ids=lambda e: type(e).__name__,
)
def test_an_actor_error_round_trips(error: ActorError) -> None:
    with pytest.raises(type(error)) as caught:
        decode_outcome(encode_error(error))
    assert str(caught.value) == str(error)
    assert vars(caught.value) == vars(error)


def test_an_outage_stays_an_outage_and_anything_else_is_a_remote_failure() -> None:
    with pytest.raises(DatabaseUnavailable, match="the server is gone"):
        decode_outcome(encode_error(DatabaseUnavailable("the server is gone")))
    with pytest.raises(RemoteFailure, match="the chat's owner failed with KeyError"):
        decode_outcome(encode_error(KeyError("secret detail")))


def a_chat() -> Chat:
    now = datetime(2026, 12, 4, 18, 0, 0, 123456, tzinfo=UTC)
    return Chat(
        id=CHAT,
        owner_id=uuid4(),
        shard=7,
        title="t",
        status=ChatStatus.RUNNING,
        archived=False,
        history_version=2,
        generation_attempt=3,
        retry_count=1,
        retry_at=now,
        last_error={"kind": "timeout", "nested": [1, {"a": None}]},
        action_deadline=None,
        dynamic_tools=[{"name": "x", "input_schema": {"type": "object"}}],
        model_config_id=uuid4(),
        system_prompt="be brief",
        last_message_seq=4,
        created_at=now,
        updated_at=now,
        tools=("calculate", "read_file"),
        input_tokens=1200,
        output_tokens=34,
        compacting=True,
    )


@pytest.mark.parametrize(
    "reply",
    [
        None,
        Done(),
        MessageAccepted(uuid4(), queued=True),
        ChatCreatedReply(uuid4(), False, a_chat()),
    ],
    ids=lambda r: type(r).__name__,
)
def test_a_reply_round_trips(reply: object) -> None:
    got = decode_outcome(encode_reply(reply))
    assert got == reply
    assert type(got) is type(reply)


COMMANDS: list[object] = [
    SendMessage(uuid4(), "hello", "interrupt"),
    EditMessage(uuid4(), uuid4(), "again"),
    Interrupt(),
    SubmitToolResults((ToolResult("c1", '{"ok": 1}'), ToolResult("c2", "[]"))),
    PromoteQueued(uuid4()),
    DeleteQueued(uuid4()),
    SetArchived(archived=True),
    Compact(),
    DeleteChat(),
    CreateChatRequest(
        owner_id=uuid4(),
        message_id=uuid4(),
        text="hi",
        title="t",
        system_prompt="s",
        model_config_id=uuid4(),
        dynamic_tools=(ToolSpec("run", "runs", {"type": "object", "properties": {}}),),
        tools=("current_time",),
    ),
]


def test_every_command_type_has_a_sample() -> None:
    assert {type(c) for c in COMMANDS} == set(link_codec.COMMANDS.values())


def test_every_command_of_the_mailbox_crosses_the_link() -> None:
    assert set(typing.get_args(Command)) <= set(link_codec.COMMANDS.values())


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: type(c).__name__)
def test_a_command_round_trips_with_and_without_its_idempotency_mark(command: object) -> None:
    assert decode_command(encode_command(command)) == command
    keyed = Keyed(command, IdempotencyMark(uuid4(), "key-1", uuid4()))
    assert decode_command(encode_command(keyed)) == keyed


def test_what_is_not_a_command_is_refused_both_ways() -> None:
    with pytest.raises(LinkCodecError, match="str is not a command the link forwards"):
        encode_command("hello")
    with pytest.raises(LinkCodecError, match="unknown command type 'Explode'"):
        decode_command(b'{"type": "Explode", "body": {}}')
    with pytest.raises(LinkCodecError, match="malformed command"):
        decode_command(b'{"type": "SendMessage", "body": {"text": 1}}')
    with pytest.raises(LinkCodecError, match="malformed outcome"):
        decode_outcome(b'{"kind": "nonsense"}')


def test_stream_items_round_trip_with_the_frame_untouched() -> None:
    frame = b'{"type":"status","status":"running"}'
    cursor = StreamCursor(5, Episode(2, 1), 9)
    item = decode_stream_item(
        encode_stream_item(LinkFrame(CursorWire.of(cursor), msgspec.Raw(frame)))
    )
    assert isinstance(item, LinkFrame)
    assert bytes(item.frame) == frame
    assert item.cursor.cursor() == cursor
    assert CursorWire.of(StreamCursor()).cursor() == StreamCursor()
    end = decode_stream_item(encode_stream_item(LinkEnd("slow_consumer", "fell behind")))
    assert end == LinkEnd("slow_consumer", "fell behind")
    with pytest.raises(LinkCodecError, match="malformed stream line"):
        decode_stream_item(b'{"type": "what"}')


# -- the cursor a client holds after what it was sent ----------------------------------------


def part(version: int, attempt: int, seq: int) -> MessagePart:
    return MessagePart(Episode(version, attempt), seq, TextDelta("x"))


def message(seq: int, version: int = 1) -> CommittedMessage:
    return CommittedMessage(uuid4(), seq, "assistant", (TextPart("x"),), version)


def test_the_cursor_follows_messages_parts_and_resets() -> None:
    start = StreamCursor()
    assert start.after([]) is start
    status = StatusChanged(ChatStatus.RUNNING, False, 1, 1)
    assert start.after([status, QueueUpdated(())]) is start

    streaming = start.after([message(1), PreviewReset(Episode(1, 1)), part(1, 1, 1), part(1, 1, 2)])
    assert streaming == StreamCursor(1, Episode(1, 1), 2)
    # A retry's new episode: the preview starts over, messages stay.
    assert streaming.after([PreviewReset(Episode(1, 2))]) == StreamCursor(1, Episode(1, 2), 0)
    # The answer committed: the message counts, the preview is the episode's last part.
    done = streaming.after([part(1, 1, 3), message(2)])
    assert done == StreamCursor(2, Episode(1, 1), 3)
    # An edit dropped messages after 1; an older seq never lowers the cursor otherwise.
    assert done.after([HistoryReset(2, 1)]) == StreamCursor(1, Episode(1, 1), 3)
    assert done.after([message(1)]) == done
    assert done.after([HistoryReset(3, 5)]) == done


def test_the_cursor_is_what_the_query_of_a_reconnect_would_give() -> None:
    cursor = StreamCursor().after([message(4), part(3, 2, 7)])
    query = {"message_seq": "4", "history_version": "3", "generation_attempt": "2", "part_seq": "7"}
    assert StreamCursor.from_query(query) == cursor
