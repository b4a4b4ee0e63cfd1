from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import pytest

from chatd.domain.chat_status import ChatStatus
from chatd.store.chats import (
    AddNotification,
    AppendMessage,
    ChatWrite,
    ClearQueue,
    CreateChat,
    Dequeue,
    Enqueue,
    MoveQueued,
    SoftDeleteMessagesAfter,
    UpdateChat,
    commit,
    get_chat,
    list_chats,
    list_messages,
    list_queue,
    list_resumable_chats_in,
    rename_chat,
)
from chatd.store.database import Database
from chatd.store.errors import Conflict, NotFound
from chatd.store.inbox import list_notifications
from chatd.store.leases import Fence
from chatd.store.providers import create_model_config, create_provider
from chatd.store.records import Chat, PageCursor
from tests.store.helpers import append, lease, make_chat, make_user, text

DEADLINE = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
TOOLS = [
    {"name": "run_tests", "description": "Run the suite ✓", "input_schema": {"type": "object"}}
]


async def test_create_chat_round_trip(db: Database) -> None:
    user = await make_user(db)
    provider = await create_provider(db, name="p", kind="openai")
    config = await create_model_config(
        db, provider_id=provider.id, name="m", model="gpt-x", context_limit=1000
    )
    fence = await lease(db, 3)
    create = CreateChat(
        id=uuid4(),
        owner_id=user.id,
        shard=3,
        title="Fix the build",
        system_prompt="You are terse.",
        model_config_id=config.id,
        dynamic_tools=TOOLS,
    )
    committed = await commit(db, fence, None, [create])
    chat = committed.chat
    assert (chat.id, chat.owner_id, chat.shard, chat.title, chat.system_prompt) == (
        create.id,
        user.id,
        3,
        "Fix the build",
        "You are terse.",
    )
    assert chat.model_config_id == config.id
    assert chat.dynamic_tools == TOOLS
    assert (chat.status, chat.archived, chat.history_version, chat.generation_attempt) == (
        ChatStatus.WAITING,
        False,
        0,
        0,
    )
    assert (chat.retry_count, chat.retry_at, chat.last_error, chat.action_deadline) == (
        0,
        None,
        None,
        None,
    )
    assert chat.last_message_seq == 0
    assert committed.appended == ()
    assert committed.queue is None
    assert await get_chat(db, chat.id) == chat
    assert await get_chat(db, chat.id, owner_id=user.id) == chat


async def test_another_users_chat_reads_as_missing(db: Database) -> None:
    alice, bob = await make_user(db, "alice"), await make_user(db, "bob")
    chat = await make_chat(db, await lease(db), alice.id)
    assert await get_chat(db, chat.id, owner_id=bob.id) is None
    assert await get_chat(db, uuid4()) is None
    assert await get_chat(db, uuid4(), owner_id=alice.id) is None


async def test_update_chat_changes_only_the_given_fields(db: Database) -> None:
    user = await make_user(db)
    fence = await lease(db)
    chat = await make_chat(db, fence, user.id, title="t")

    running = await commit(
        db,
        fence,
        chat.id,
        [
            UpdateChat(
                status=ChatStatus.RUNNING,
                history_version=4,
                generation_attempt=2,
                retry_count=1,
                retry_at=DEADLINE,
            )
        ],
    )
    assert running.chat.status is ChatStatus.RUNNING
    assert (running.chat.history_version, running.chat.generation_attempt) == (4, 2)
    assert (running.chat.retry_count, running.chat.retry_at) == (1, DEADLINE)
    assert running.chat.title == "t"
    assert running.chat.updated_at >= chat.updated_at

    error = {"kind": "rate_limit", "provider": "openai", "status": 429, "retryable": True}
    failed = await commit(
        db,
        fence,
        chat.id,
        [UpdateChat(status=ChatStatus.ERROR, retry_at=None, last_error=error, title="t2")],
    )
    assert failed.chat.status is ChatStatus.ERROR
    assert (failed.chat.retry_at, failed.chat.last_error, failed.chat.title) == (None, error, "t2")
    assert (failed.chat.history_version, failed.chat.generation_attempt) == (4, 2)

    waiting = await commit(
        db,
        fence,
        chat.id,
        [UpdateChat(status=ChatStatus.REQUIRES_ACTION, last_error=None, action_deadline=DEADLINE)],
    )
    assert (waiting.chat.status, waiting.chat.action_deadline) == (
        ChatStatus.REQUIRES_ACTION,
        DEADLINE,
    )
    assert waiting.chat.last_error is None

    archived = await commit(db, fence, chat.id, [UpdateChat(archived=True)])
    assert archived.chat.archived
    assert archived.chat.status is ChatStatus.REQUIRES_ACTION
    assert await get_chat(db, chat.id) == archived.chat


async def test_an_empty_update_changes_nothing_but_updated_at(db: Database) -> None:
    user = await make_user(db)
    fence = await lease(db)
    chat = await make_chat(db, fence, user.id, title="t")
    after = (await commit(db, fence, chat.id, [UpdateChat()])).chat
    assert {**_fields(after), "updated_at": None} == {**_fields(chat), "updated_at": None}


def _fields(chat: Chat) -> dict[str, object]:
    return {name: getattr(chat, name) for name in Chat.__slots__}


async def test_a_commit_is_all_or_nothing(db: Database) -> None:
    user = await make_user(db)
    fence = await lease(db)
    chat = await make_chat(db, fence, user.id)
    writes: list[ChatWrite] = [
        AppendMessage(id=uuid4(), seq=1, role="user", content=text("hi"), history_version=1),
        Enqueue(id=uuid4(), position=1, content=text("later")),
        UpdateChat(history_version=1, status=ChatStatus.ERROR),  # error without last_error
    ]
    with pytest.raises(asyncpg.CheckViolationError):
        await commit(db, fence, chat.id, writes)
    assert await get_chat(db, chat.id) == chat
    assert await list_messages(db, chat.id) == []
    assert await list_queue(db, chat.id) == []


async def test_append_message_round_trip(db: Database) -> None:
    user = await make_user(db)
    fence = await lease(db)
    chat = await make_chat(db, fence, user.id)
    content: list[dict[str, Any]] = [
        {"type": "text", "text": 'Héllo ✓ "quoted" \\ \n'},
        {"type": "tool_call", "id": "c1", "name": "run", "input": {"n": 1.5, "flags": [True]}},
    ]
    usage = {"input_tokens": 12, "output_tokens": 3}
    first = AppendMessage(id=uuid4(), seq=1, role="user", content=text("hi"), history_version=1)
    second = AppendMessage(
        id=uuid4(), seq=2, role="assistant", content=content, usage=usage, history_version=1
    )
    committed = await commit(db, fence, chat.id, [first, second, UpdateChat(history_version=1)])

    assert committed.chat.last_message_seq == 2
    assert committed.chat.history_version == 1
    assert [m.id for m in committed.appended] == [first.id, second.id]
    stored = await list_messages(db, chat.id)
    assert stored == list(committed.appended)
    assistant = stored[1]
    assert (assistant.chat_id, assistant.seq, assistant.role) == (chat.id, 2, "assistant")
    assert (assistant.content, assistant.usage, assistant.history_version) == (content, usage, 1)
    assert assistant.deleted_at is None
    assert stored[0].usage is None


@pytest.mark.parametrize("seq", [0, 1, 2])
async def test_a_seq_not_above_the_last_is_refused(db: Database, seq: int) -> None:
    user = await make_user(db)
    fence = await lease(db)
    chat = await make_chat(db, fence, user.id)
    chat = (await append(db, fence, chat, 2, "two")).chat
    with pytest.raises(ValueError, match="not above"):
        await append(db, fence, chat, seq, "again")
    assert await get_chat(db, chat.id) == chat
    assert [m.seq for m in await list_messages(db, chat.id)] == [2]


async def test_soft_delete_hides_messages_and_seqs_are_never_reused(db: Database) -> None:
    user = await make_user(db)
    fence = await lease(db)
    chat = await make_chat(db, fence, user.id)
    for seq in range(1, 5):
        chat = (await append(db, fence, chat, seq, f"m{seq}")).chat

    chat = (await commit(db, fence, chat.id, [SoftDeleteMessagesAfter(seq=2)])).chat
    assert [m.seq for m in await list_messages(db, chat.id)] == [1, 2]
    hidden = await db.fetch(
        "SELECT seq FROM chat_messages WHERE chat_id = $1 AND deleted_at IS NOT NULL", chat.id
    )
    assert sorted(r["seq"] for r in hidden) == [3, 4]  # kept, only hidden
    assert chat.last_message_seq == 4

    with pytest.raises(ValueError, match="not above"):
        await append(db, fence, chat, 3, "reuse")
    chat = (await append(db, fence, chat, 5, "m5")).chat
    live = await list_messages(db, chat.id)
    assert [(m.seq, m.content) for m in live] == [(1, text("m1")), (2, text("m2")), (5, text("m5"))]

    # Deleting again leaves earlier deletions' times alone.
    before = await db.fetch("SELECT seq, deleted_at FROM chat_messages ORDER BY seq")
    await commit(db, fence, chat.id, [SoftDeleteMessagesAfter(seq=4)])
    after = await db.fetch("SELECT seq, deleted_at FROM chat_messages ORDER BY seq")
    assert [tuple(r) for r in after[:4]] == [tuple(r) for r in before[:4]]
    assert after[4]["deleted_at"] is not None


async def test_list_messages_pages_by_seq_over_live_messages(db: Database) -> None:
    user = await make_user(db)
    fence = await lease(db)
    chat = await make_chat(db, fence, user.id)
    for seq in range(1, 8):
        chat = (await append(db, fence, chat, seq, f"m{seq}")).chat
    await commit(db, fence, chat.id, [SoftDeleteMessagesAfter(seq=5)])
    chat = (await append(db, fence, chat, 8, "m8")).chat
    chat = (await append(db, fence, chat, 9, "m9")).chat

    pages: list[list[int]] = []
    after = 0
    while page := await list_messages(db, chat.id, after_seq=after, limit=3):
        pages.append([m.seq for m in page])
        after = page[-1].seq
    assert pages == [[1, 2, 3], [4, 5, 8], [9]]
    assert [m.seq for m in await list_messages(db, chat.id, after_seq=4, limit=10)] == [5, 8, 9]
    with pytest.raises(ValueError, match="limit"):
        await list_messages(db, chat.id, limit=0)


async def test_queue_round_trip_and_operations(db: Database) -> None:
    user = await make_user(db)
    fence = await lease(db)
    chat = await make_chat(db, fence, user.id)
    a, b, c = uuid4(), uuid4(), uuid4()
    committed = await commit(
        db,
        fence,
        chat.id,
        [
            Enqueue(id=a, position=1, content=text("a")),
            Enqueue(id=b, position=2, content=text("b")),
            Enqueue(id=c, position=3, content=text("c")),
        ],
    )
    assert committed.queue is not None
    assert [(q.id, q.position, q.content) for q in committed.queue] == [
        (a, 1, text("a")),
        (b, 2, text("b")),
        (c, 3, text("c")),
    ]
    assert await list_queue(db, chat.id) == list(committed.queue)

    promoted = await commit(db, fence, chat.id, [MoveQueued(id=c, position=0)])
    assert promoted.queue is not None
    assert [q.id for q in promoted.queue] == [c, a, b]

    dequeued = await commit(db, fence, chat.id, [Dequeue(id=c)])
    assert dequeued.queue is not None
    assert [q.id for q in dequeued.queue] == [a, b]

    cleared = await commit(db, fence, chat.id, [ClearQueue()])
    assert cleared.queue == ()
    assert await list_queue(db, chat.id) == []


@pytest.mark.parametrize("write", [Dequeue(id=uuid4()), MoveQueued(id=uuid4(), position=5)])
async def test_a_missing_queued_message_is_not_found_and_writes_nothing(
    db: Database, write: ChatWrite
) -> None:
    user = await make_user(db)
    fence = await lease(db)
    chat = await make_chat(db, fence, user.id)
    queued = Enqueue(id=uuid4(), position=1, content=text("q"))
    with pytest.raises(NotFound):
        await commit(db, fence, chat.id, [queued, write])
    assert await list_queue(db, chat.id) == []


async def test_queued_messages_of_another_chat_are_out_of_reach(db: Database) -> None:
    user = await make_user(db)
    fence = await lease(db)
    chat, other = await make_chat(db, fence, user.id), await make_chat(db, fence, user.id)
    queued = uuid4()
    await commit(db, fence, other.id, [Enqueue(id=queued, position=1, content=text("q"))])
    with pytest.raises(NotFound):
        await commit(db, fence, chat.id, [Dequeue(id=queued)])
    assert len(await list_queue(db, other.id)) == 1


async def test_a_taken_queue_position_is_a_conflict(db: Database) -> None:
    user = await make_user(db)
    fence = await lease(db)
    chat = await make_chat(db, fence, user.id)
    await commit(db, fence, chat.id, [Enqueue(id=uuid4(), position=1, content=text("a"))])
    with pytest.raises(Conflict) as caught:
        await commit(db, fence, chat.id, [Enqueue(id=uuid4(), position=1, content=text("b"))])
    assert caught.value.constraint == "queued_messages_chat_id_position_key"
    assert len(await list_queue(db, chat.id)) == 1


async def test_create_chat_conflicts_and_missing_references(db: Database) -> None:
    user = await make_user(db)
    fence = await lease(db)
    chat = await make_chat(db, fence, user.id)
    with pytest.raises(Conflict):
        await commit(db, fence, None, [CreateChat(id=chat.id, owner_id=user.id, shard=0)])
    with pytest.raises(NotFound) as missing_owner:
        await commit(db, fence, None, [CreateChat(id=uuid4(), owner_id=uuid4(), shard=0)])
    assert missing_owner.value.kind == "user"
    with pytest.raises(NotFound) as missing_config:
        await commit(
            db,
            fence,
            None,
            [CreateChat(id=uuid4(), owner_id=user.id, shard=0, model_config_id=uuid4())],
        )
    assert missing_config.value.kind == "model config"
    with pytest.raises(NotFound):
        await commit(db, fence, uuid4(), [UpdateChat(title="x")])
    assert await db.fetchval("SELECT count(*) FROM chats") == 1


async def test_malformed_commits_are_programming_errors(db: Database) -> None:
    user = await make_user(db)
    fence0 = await lease(db, 0)
    fence1 = await lease(db, 1)
    chat = await make_chat(db, fence0, user.id)
    cases: list[tuple[Fence, UUID | None, list[ChatWrite], str]] = [
        (fence1, chat.id, [UpdateChat(title="x")], "shard 0, not 1"),
        (fence1, None, [CreateChat(id=uuid4(), owner_id=user.id, shard=0)], "shard 0, not 1"),
        (fence0, None, [UpdateChat(title="x")], "must start with CreateChat"),
        (fence0, uuid4(), [CreateChat(id=uuid4(), owner_id=user.id, shard=0)], "CreateChat is"),
        (
            fence0,
            chat.id,
            [UpdateChat(title="x"), CreateChat(id=uuid4(), owner_id=user.id, shard=0)],
            "first write",
        ),
    ]
    for fence, chat_id, writes, message in cases:
        with pytest.raises(ValueError, match=message):
            await commit(db, fence, chat_id, writes)
    assert await db.fetchval("SELECT count(*) FROM chats") == 1
    assert await get_chat(db, chat.id) == chat


async def test_create_and_first_writes_in_one_commit(db: Database) -> None:
    user = await make_user(db)
    fence = await lease(db)
    chat_id = uuid4()
    committed = await commit(
        db,
        fence,
        chat_id,
        [
            CreateChat(id=chat_id, owner_id=user.id, shard=0),
            AppendMessage(id=uuid4(), seq=1, role="user", content=text("hi"), history_version=1),
            UpdateChat(status=ChatStatus.RUNNING, history_version=1, generation_attempt=1),
        ],
    )
    assert committed.chat.id == chat_id
    assert committed.chat.status is ChatStatus.RUNNING
    assert committed.chat.last_message_seq == 1
    assert [m.seq for m in committed.appended] == [1]


async def test_notifications_are_written_with_the_commit(db: Database) -> None:
    user = await make_user(db)
    fence = await lease(db)
    chat = await make_chat(db, fence, user.id)
    assert (await commit(db, fence, chat.id, [UpdateChat()])).notifications == ()

    reply = AddNotification(id=uuid4(), user_id=user.id, kind="turn_finished", title="Reply ready")
    writes: list[ChatWrite] = [
        AppendMessage(id=uuid4(), seq=1, role="assistant", content=text("4"), history_version=1),
        reply,
        AddNotification(
            id=uuid4(), user_id=user.id, kind="failed", title="Chat failed", body="Oops ✓"
        ),
    ]
    committed = await commit(db, fence, chat.id, writes)
    first, second = committed.notifications
    assert (first.id, first.user_id, first.chat_id, first.kind) == (
        reply.id,
        user.id,
        chat.id,
        "turn_finished",
    )
    assert (first.title, first.body, first.read_at) == ("Reply ready", "", None)
    assert (second.kind, second.title, second.body) == ("failed", "Chat failed", "Oops ✓")
    # One transaction, one now(): the notifications are stamped like the message they report.
    [message] = committed.appended
    assert first.created_at == second.created_at == message.created_at
    page = await list_notifications(db, user.id)
    assert sorted(page.notifications, key=lambda n: n.id) == sorted(
        committed.notifications, key=lambda n: n.id
    )


async def test_a_failed_commit_writes_no_notification(db: Database) -> None:
    user = await make_user(db)
    fence = await lease(db)
    chat = await make_chat(db, fence, user.id)
    note = AddNotification(id=uuid4(), user_id=user.id, kind="failed", title="Chat failed")
    with pytest.raises(NotFound) as missing:
        await commit(db, fence, chat.id, [note, Dequeue(id=uuid4())])
    assert missing.value.kind == "queued message"
    with pytest.raises(NotFound) as no_user:
        await commit(
            db,
            fence,
            chat.id,
            [AddNotification(id=uuid4(), user_id=uuid4(), kind="failed", title="Chat failed")],
        )
    assert no_user.value.kind == "user"
    assert await db.fetchval("SELECT count(*) FROM inbox_notifications") == 0


async def test_rename_chat_changes_only_the_title(db: Database) -> None:
    alice, bob = await make_user(db, "alice"), await make_user(db, "bob")
    fence = await lease(db)
    chat = await make_chat(db, fence, alice.id, title="old")
    chat = (await commit(db, fence, chat.id, [UpdateChat(status=ChatStatus.RUNNING)])).chat

    renamed = await rename_chat(db, chat.id, alice.id, "new ✓")
    assert renamed is not None
    assert renamed.title == "new ✓"
    assert renamed.updated_at >= chat.updated_at
    assert {**_fields(renamed), "title": None, "updated_at": None} == {
        **_fields(chat),
        "title": None,
        "updated_at": None,
    }
    assert await get_chat(db, chat.id) == renamed

    # Someone else's chat and a missing one answer alike, and nothing changes.
    assert await rename_chat(db, chat.id, bob.id, "stolen") is None
    assert await rename_chat(db, uuid4(), alice.id, "nowhere") is None
    assert await get_chat(db, chat.id) == renamed

    # The actor's later commits keep the title: they set only what they change.
    after = await commit(db, fence, chat.id, [UpdateChat(status=ChatStatus.WAITING)])
    assert after.chat.title == "new ✓"


async def _touch_together(db: Database, chats: list[Chat]) -> None:
    """Give these chats the very same updated_at (one transaction, one now())."""
    await db.execute(
        "UPDATE chats SET title = title WHERE id = ANY($1::uuid[])", [c.id for c in chats]
    )


@pytest.mark.parametrize("limit", [1, 2, 3, 6, 10])
async def test_list_chats_pages_by_recency_then_id(db: Database, limit: int) -> None:
    alice, bob = await make_user(db, "alice"), await make_user(db, "bob")
    fence = await lease(db)
    chats = [await make_chat(db, fence, alice.id, title=f"c{i}") for i in range(6)]
    await make_chat(db, fence, bob.id)
    await _touch_together(db, chats[1:4])  # ties, resolved by id
    stored = [c for c in [await get_chat(db, c.id) for c in chats] if c is not None]
    expected = sorted(stored, key=lambda c: c.id)
    expected.sort(key=lambda c: c.updated_at, reverse=True)  # stable: ids stay ascending in ties

    seen: list[Chat] = []
    sizes: list[int] = []
    cursor: PageCursor | None = None
    while True:
        page = await list_chats(db, alice.id, limit=limit, cursor=cursor)
        seen.extend(page.chats)
        sizes.append(len(page.chats))
        if page.next_cursor is None:
            break
        cursor = PageCursor.decode(page.next_cursor.encode())  # as a client would hand it back
    assert seen == expected
    assert sizes == [min(limit, 6 - i) for i in range(0, 6, limit)]


async def test_list_chats_filters_archived(db: Database) -> None:
    user = await make_user(db)
    fence = await lease(db)
    chats = [await make_chat(db, fence, user.id) for _ in range(4)]
    for chat in chats[:2]:
        await commit(db, fence, chat.id, [UpdateChat(archived=True)])
    archived = await list_chats(db, user.id, archived=True)
    active = await list_chats(db, user.id, archived=False)
    everything = await list_chats(db, user.id)
    assert {c.id for c in archived.chats} == {c.id for c in chats[:2]}
    assert {c.id for c in active.chats} == {c.id for c in chats[2:]}
    assert {c.id for c in everything.chats} == {c.id for c in chats}
    assert archived.next_cursor is active.next_cursor is everything.next_cursor is None
    with pytest.raises(ValueError, match="limit"):
        await list_chats(db, user.id, limit=0)


async def test_list_resumable_chats(db: Database) -> None:
    user = await make_user(db)
    fence0, fence1 = await lease(db, 0), await lease(db, 1)
    states: list[UpdateChat] = [
        UpdateChat(),
        UpdateChat(status=ChatStatus.RUNNING),
        UpdateChat(status=ChatStatus.INTERRUPTING),
        UpdateChat(status=ChatStatus.REQUIRES_ACTION, action_deadline=DEADLINE),
        UpdateChat(status=ChatStatus.ERROR, last_error={"kind": "auth"}),
    ]
    resumable = set()
    for i, update in enumerate(states):
        chat = await make_chat(db, fence0, user.id)
        await commit(db, fence0, chat.id, [update])
        if 1 <= i <= 3:
            resumable.add(chat.id)
    elsewhere = await make_chat(db, fence1, user.id)
    await commit(db, fence1, elsewhere.id, [UpdateChat(status=ChatStatus.RUNNING)])
    assert {chat_id for _, chat_id in await list_resumable_chats_in(db, [0])} == resumable
    assert await list_resumable_chats_in(db, [1]) == [(1, elsewhere.id)]
    assert await list_resumable_chats_in(db, [2]) == []


@pytest.mark.parametrize(
    "text_",
    [
        "",
        "!!",
        "bm90IGEgY3Vyc29y",
        # A fixed id: test ids must be the same in every collection (pytest-xdist).
        PageCursor(
            datetime(2030, 1, 1),  # noqa: DTZ001 - naive on purpose
            UUID("68fc3274-04c4-4371-b513-fdaa6e852376"),
        ).encode(),
    ],
)
def test_a_malformed_cursor_is_a_value_error(text_: str) -> None:
    with pytest.raises(ValueError, match="cursor"):
        PageCursor.decode(text_)


def test_cursor_round_trip() -> None:
    cursor = PageCursor(datetime(2030, 1, 1, 2, 3, 4, 567890, tzinfo=UTC), uuid4())
    assert PageCursor.decode(cursor.encode()) == cursor
