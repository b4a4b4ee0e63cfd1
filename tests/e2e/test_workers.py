"""Several workers on one database, as real processes: placement, forwarding, relay, failover.

N separate ``chatd serve`` processes (``tests/e2e/workers_world.py``) share one PostgreSQL;
the lease ttl is 3 s. Clients talk to any worker; a careful client retries a 503 after its
``Retry-After`` with the same ``Idempotency-Key``. What each test holds the cluster to:

- two and three workers split the 64 shards evenly (floor or ceil of 64 / N each) within one
  lease period of the last start, and every route works through every worker, whichever
  worker owns the chat: create, send, queue (and promote, delete), interrupt, edit, dynamic
  tool results, the chat's stream, the watch and inbox feeds, and an admin change of the model
  config seen by the next turn on every worker;
- a worker killed (SIGKILL) mid-answer: its chats go on elsewhere within ttl + 2 s, no
  acknowledged message is lost or doubled, and a stream that resumes on another worker with its
  cursor gets exactly the rest;
- a worker frozen (SIGSTOP) past its leases, then continued (SIGCONT): its writes are fenced
  (nothing it had in flight lands after the takeover) and it lets the shards go;
- a worker joining under a steady load: shards move to it and no turn fails.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any
from uuid import uuid4

import pytest
import trio

from chatd.providers.fake import knobs_marker
from tests.e2e.workers_world import (
    DEADLINE_S,
    LEASE_TTL_S,
    SHARD_COUNT,
    NodeClient,
    Worker,
    WorkersWorld,
    duplicates,
    eventually,
    open_feed,
    open_workers_world,
    retarget,
    roles,
    user_texts,
)
from tests.faults.checker import check, read_chats
from tests.faults.client import ChatStream, Op, settle, streaming, text_of

pytestmark = pytest.mark.slow

# A dead worker's chats go on elsewhere within this long after the kill (the promise).
FAILOVER_S = LEASE_TTL_S + 2.0
# How long a woken worker's lease check is held up (well under the other workers' lease ttl).
STALE_WINDOW_S = 1.0
LOOKUP = {
    "name": "lookup",
    "description": "Look a word up",
    "input_schema": {"type": "object", "properties": {"word": {"type": "string"}}},
}
INBOX = "/api/v1/notifications/inbox"


def turn(label: str, **knobs: Any) -> str:
    """A message text unique to one turn (its label, then a random tag), with model knobs."""
    return f"{label}-{uuid4().hex[:12]} {knobs_marker(**knobs)}"


def tag_of(text: str) -> str:
    """The unique part of a ``turn`` text, to find its model requests."""
    return text.split(" ", 1)[0]


def acked(op: Op, status: int) -> Op:
    assert op.status == status, op.describe()
    return op


async def parts_after(stream: ChatStream, start: int, count: int) -> None:
    """Until the stream delivered ``count`` message parts past its first ``start`` events."""

    def enough() -> bool:
        events = stream.all_events()[start:]
        return sum(1 for e in events if e.get("type") == "message_part") >= count

    with trio.fail_after(DEADLINE_S):
        await stream.changes.wait_until(enough)


async def create_waiting_chats(world: WorkersWorld, through: list[Worker], count: int) -> list[str]:
    """``count`` chats created through ``through`` in turn, each answered (waiting)."""
    chat_ids = []
    for n in range(count):
        worker = through[n % len(through)]
        created = acked(await world.client(worker).create_chat(turn("setup", chunks=2)), 201)
        assert created.chat_id is not None
        chat_ids.append(created.chat_id)
    for chat_id in chat_ids:
        await world.wait_for_status(chat_id, "waiting")
    return chat_ids


async def chats_by_owner(world: WorkersWorld, chat_ids: list[str]) -> dict[str, list[str]]:
    owners: dict[str, list[str]] = {}
    for chat_id in chat_ids:
        owner = await world.owner_of(chat_id)
        assert owner is not None, f"chat {chat_id}'s shard has no live owner"
        owners.setdefault(owner, []).append(chat_id)
    return owners


async def answered(world: WorkersWorld, chat_id: str, message_id: str) -> bool:
    """Is the user message ``message_id`` stored, followed by an assistant message, and the
    chat waiting again?"""
    row = await world.chat_row(chat_id)
    if row["status"] != "waiting":
        return False
    messages = await world.stored_messages(chat_id)
    ids = [m["id"] for m in messages]
    if message_id not in ids:
        return False
    at = ids.index(message_id)
    return at + 1 < len(messages) and messages[at + 1]["role"] == "assistant"


# -- 1. placement and every route through every worker ----------------------------------------


@pytest.mark.parametrize("count", [2, 3])
async def test_shards_split_evenly_and_every_route_works_through_every_worker(
    database_url: str, count: int
) -> None:
    async with open_workers_world(database_url, workers=count) as world:
        last_start = max(w.ready_at for w in world.workers)
        split = await world.wait_for_even_split(
            world.workers, within_s=max(0.1, last_start + LEASE_TTL_S - trio.current_time())
        )
        print(f"{count} workers: split {split}, {trio.current_time() - last_start:.2f} s")
        try:
            for n, entry in enumerate(world.workers):
                # Created through one worker, driven through the next: most chats are owned
                # by neither the creator nor the entry, or by exactly one of them.
                creator = world.workers[(n + 1) % count]
                await every_route_through(world, entry=entry, creator=creator)
            await admin_change_reaches_every_worker(world)
        except AssertionError as failure:
            raise AssertionError(f"{failure}\n{world.output()}") from None


async def every_route_through(world: WorkersWorld, *, entry: Worker, creator: Worker) -> None:
    """Create a chat through ``creator``, then drive it through ``entry`` only: stream, send
    while busy (queued), promote and delete queued messages, interrupt, edit; a tool chat's
    results; the watch and inbox feeds of ``entry`` see it all."""
    api, maker = world.client(entry), world.client(creator)
    where = f"entry {entry.worker_id}, creator {creator.worker_id}"
    async with (
        open_feed(entry, world.token, "/api/v1/chats/watch") as watch,
        open_feed(entry, world.token, f"{INBOX}/watch") as inbox,
    ):
        # A long answer (20 s unless stopped), streamed to the entry's subscriber.
        first = turn("first", chunks=400, chunk_interval_ms=50)
        chat_id = await create_owned_elsewhere(world, maker, entry, first)
        owner = await world.owner_of(chat_id)
        print(f"{where}: chat {chat_id} owned by {owner}")
        # The watch on one worker sees a chat created on another.
        await watch.until(lambda e: e.get("kind") == "created" and e["chat_id"] == chat_id)
        stream = world.stream(entry, chat_id)
        async with streaming(stream):
            await parts_after(stream, 0, 3)

            # Sent while busy: queued; the queue managed through the entry.
            q1, q2 = f"q1-{uuid4().hex[:12]}", turn("q2", chunks=3)
            sent1 = acked(await api.send(chat_id, q1), 202)
            sent2 = acked(await api.send(chat_id, q2), 202)
            assert (sent1.reply["queued"], sent2.reply["queued"]) == (True, True), where
            assert sent1.message_id is not None
            assert sent2.message_id is not None
            acked(await api.promote(chat_id, sent2.message_id), 204)
            acked(await api.delete_queued(chat_id, sent1.message_id), 204)
            assert [q["text"] for q in (await api.chat(chat_id))["queue"]] == [q2], where

            # Interrupted: the partial answer is kept, then the queued message runs.
            acked(await api.interrupt(chat_id), 204)
            await settle(api, stream, deadline_s=DEADLINE_S)
            history = await api.history(chat_id)
            assert roles(history) == ["user", "assistant", "user", "assistant"], where
            assert user_texts(history) == [first, q2], where
            assert text_of(history[1]["content"]), f"{where}: the partial answer was not kept"

            # Edited: the history after it is dropped and the answer regenerated.
            edited = turn("edited", chunks=2)
            acked(await api.edit(chat_id, str(history[0]["id"]), edited), 202)
            chat = await settle(api, stream, deadline_s=DEADLINE_S)
            assert chat["status"] == "waiting", where
            history = await api.history(chat_id)
            assert roles(history) == ["user", "assistant"], where
            assert user_texts(history) == [edited], where
            assert text_of(history[1]["content"]) == "w1 w2 ", where

            # What the entry's stream delivered is exactly the history: nothing lost, repeated
            # or out of order, across the relay.
            records = await read_chats(api, [chat_id])
            report = check([], records, [stream], complete=[stream])
            assert report.ok, f"{where}: {report.summary()}"

        # The inbox of the entry saw the chat's finished turn, and lists it.
        await inbox.until(lambda e: e.get("chat_id") == chat_id and e["kind"] == "turn_finished")
        listed = await api.get_json(f"{INBOX}?limit=200")
        assert chat_id in {n["chat_id"] for n in listed["notifications"]}, where

        # Dynamic tools: the call made on the owner, answered through the entry.
        tool_text = turn("tool", tool_calls=[{"name": "lookup", "arguments": {"word": "kiwi"}}])
        tool_id = await create_owned_elsewhere(
            world, maker, entry, tool_text, dynamic_tools=[LOOKUP]
        )
        required = await watch.until(
            lambda e: e.get("kind") == "action_required" and e["chat_id"] == tool_id
        )
        [call] = required["calls"]
        assert call["name"] == "lookup", where
        pending = await eventually(
            lambda: _pending_calls(api, str(tool_id)),
            within_s=DEADLINE_S,
            what=f"{where}: the tool call pending",
        )
        assert [c["id"] for c in pending] == [call["id"]], where
        acked(await api.tool_results(tool_id, [call["id"]]), 204)
        await watch.until(
            lambda e: (
                e.get("kind") == "status_change"
                and e["chat_id"] == tool_id
                and e["status"] == "waiting"
            )
        )
        tool_history = await api.history(tool_id)
        assert roles(tool_history) == ["user", "assistant", "tool", "assistant"], where


async def create_owned_elsewhere(
    world: WorkersWorld, maker: NodeClient, entry: Worker, text: str, **fields: Any
) -> str:
    """A chat created through ``maker`` whose shard ``entry`` does not own, so that driving
    it through ``entry`` takes forwarding and relay (a chat created on ``entry``'s own shard
    instead is stopped and left aside; with a create that picks a local shard, the first one
    does). A create with an Idempotency-Key lands on its key's shard, wherever that is: with
    two workers half of them land on ``entry``, so 40 tries all miss once in 10^12 runs."""
    for _attempt in range(40):
        created = acked(await maker.create_chat(text, **fields), 201)
        assert created.chat_id is not None
        if await world.owner_of(created.chat_id) != entry.worker_id:
            return created.chat_id
        acked(await maker.interrupt(created.chat_id), 204)
    raise AssertionError(f"every chat created through {maker.name} was owned by {entry.worker_id}")


async def _pending_calls(api: NodeClient, chat_id: str) -> list[dict[str, Any]]:
    chat = await api.chat(chat_id)
    calls: list[dict[str, Any]] = chat["pending_tool_calls"]
    return calls if chat["status"] == "requires_action" else []


async def admin_change_reaches_every_worker(world: WorkersWorld) -> None:
    """A model config changed through one worker is used by the very next turn of a chat
    owned by each worker (config caches hold entries for 600 s here: only the invalidation
    the change sends to every worker can explain it)."""
    owned: dict[str, str] = {}  # worker id -> a waiting chat it owns, its cache warm
    for worker in world.workers:
        # A create with an Idempotency-Key lands on the key's shard, whoever serves it: one in
        # three lands here with three workers, so 64 tries all miss once in 10^11 runs.
        for _attempt in range(64):
            [chat_id] = await create_waiting_chats(world, [worker], 1)
            owner = await world.owner_of(chat_id)
            assert owner is not None
            owned.setdefault(owner, chat_id)
            if worker.worker_id in owned:
                break
    assert set(owned) == {w.worker_id for w in world.workers}, owned
    # Each owner ran a turn with the config as it was: its cache holds it now.
    assert {r.body["model"] for r in world.llm.requests} == {"fake-model"}

    admin = world.client(world.workers[0], admin=True)
    configs = (await admin.get_json("/api/v1/model-configs"))["model_configs"]
    [default] = [c for c in configs if c["is_default"]]
    changed = await admin.command(
        "PATCH", f"/api/v1/model-configs/{default['id']}", {"model": "fake-model-2"}
    )
    acked(changed, 200)
    for owner_id, chat_id in owned.items():
        text = turn("after-admin", chunks=1)
        acked(await world.client(world.worker(owner_id)).send(chat_id, text), 202)
        request = await world.wait_for_request(tag_of(text))
        assert request.body["model"] == "fake-model-2", f"the next turn on {owner_id}"


# -- 2. kill -9 of a worker mid-stream ----------------------------------------------------------


async def test_a_worker_killed_mid_answer_loses_nothing_and_its_chats_go_on_elsewhere(
    database_url: str,
) -> None:
    async with open_workers_world(database_url, workers=2) as world:
        try:
            await killed_mid_answer(world)
        except AssertionError as failure:
            raise AssertionError(f"{failure}\n{world.output()}") from None


async def killed_mid_answer(world: WorkersWorld) -> None:
    await world.wait_for_all_shards_held(within_s=DEADLINE_S)
    holdings = await world.holdings()
    # The victim: the worker holding the most shards (with placement, either).
    victim = max(world.workers, key=lambda w: (len(holdings.get(w.worker_id, ())), w.worker_id))
    [survivor] = [w for w in world.workers if w is not victim]
    via_victim, via_survivor = world.client(victim), world.client(survivor)

    # Chats of both owners, created through both workers, until the victim owns three.
    chat_ids: list[str] = []
    owners: dict[str, list[str]] = {}
    for _round in range(8):
        chat_ids += await create_waiting_chats(world, [victim, survivor], 2)
        owners = await chats_by_owner(world, chat_ids)
        if len(owners.get(victim.worker_id, [])) >= 3:
            break
    doomed = owners.get(victim.worker_id, [])
    assert len(doomed) >= 3, f"the victim owns too few chats: {owners}"
    main = doomed[0]

    # One client streams the main chat from its owner (and resumes on the survivor after the
    # kill); another from the survivor all along, relayed from the owner until it dies, then
    # served by the new owner.
    stream = world.stream(victim, main)
    relayed = world.stream(survivor, main)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.run)
        nursery.start_soon(relayed.run)
        await settle(via_survivor, stream, deadline_s=DEADLINE_S)
        await settle(via_survivor, relayed, deadline_s=DEADLINE_S)

        # Before the kill: messages acknowledged through both workers, to every chat.
        async def two_sends(chat_id: str) -> None:
            acked(await via_survivor.send(chat_id, turn("before-a", chunks=2)), 202)
            acked(await via_victim.send(chat_id, turn("before-b", chunks=2)), 202)

        async with trio.open_nursery() as sending:
            for chat_id in chat_ids:
                sending.start_soon(two_sends, chat_id)
        await settle(via_survivor, stream, deadline_s=DEADLINE_S)

        # The main chat mid-answer (3 s of parts), with a message queued behind it.
        slow = turn("slow", chunks=60, chunk_interval_ms=50)
        acked(await via_survivor.send(main, slow), 202)
        await world.wait_for_request(tag_of(slow))
        await parts_after(stream, len(stream.all_events()), 3)
        hv, ga = stream.cursor.history_version, stream.cursor.generation_attempt
        assert hv is not None
        assert ga is not None
        slow_episode = (hv, ga)
        with trio.fail_after(DEADLINE_S):  # the relayed stream is mid-answer too
            await relayed.changes.wait_until(lambda: relayed.parts_seen(hv, ga) >= 3)
        behind = turn("behind", chunks=2)
        queued = acked(await via_survivor.send(main, behind), 202)
        assert queued.reply["queued"] is True

        retarget(stream, survivor)  # the client's next reconnection goes to the survivor
        killed_at = await victim.kill()
        cursor_at_kill = stream.cursor.copy()

        # Its shards are taken, and the answer it was streaming is asked for again, in time.
        async def shards_taken() -> bool:
            held = await world.holdings()
            return set(held) == {survivor.worker_id} and len(held[survivor.worker_id]) == 64

        await eventually(shards_taken, within_s=FAILOVER_S, what="the survivor holds every shard")
        await world.wait_for_request(
            tag_of(slow), count=2, within_s=max(0.1, killed_at + FAILOVER_S - trio.current_time())
        )
        resumed_s = trio.current_time() - killed_at

        # Every chat the victim owned takes commands again through the survivor.
        after: dict[str, str] = {}

        async def one_more(chat_id: str) -> None:
            after[chat_id] = turn("after", chunks=2)
            acked(await via_survivor.send(chat_id, after[chat_id]), 202)

        async with trio.open_nursery() as sending:
            for chat_id in doomed:
                sending.start_soon(one_more, chat_id)
        commands_s = trio.current_time() - killed_at

        await settle(via_survivor, stream, deadline_s=DEADLINE_S)
        for chat_id in chat_ids:
            await world.wait_for_status(chat_id, "waiting", "requires_action", "error")
        await settle(via_survivor, relayed, deadline_s=DEADLINE_S)
        stream.stop()
        relayed.stop()

    print(
        f"kill -9 of {victim.worker_id}: regenerated answer asked for after {resumed_s:.2f} s,"
        f" every doomed chat took a command within {commands_s:.2f} s (ttl {LEASE_TTL_S:g} s)"
    )
    records = await read_chats(via_survivor, chat_ids)
    assert all(r.status == "waiting" for r in records.values()), {
        r.chat_id: r.status for r in records.values()
    }
    # Every acknowledged user message is stored exactly once.
    for chat_id, record in records.items():
        stored = user_texts(record.history)
        assert not duplicates(stored), f"chat {chat_id}: doubled {duplicates(stored)}"
        for op in world.ops:
            if op.chat_id == chat_id and op.acked and op.text is not None:
                assert stored.count(op.text) == 1, f"chat {chat_id}: lost {op.describe()}"
    # The main chat: one answer to the slow message (the regenerated one), then the queued one.
    history = records[main].history
    at = user_texts(history).index(slow)
    slow_seq = [m for m in history if m["role"] == "user"][at]["seq"]
    after_slow = [m for m in history if m["seq"] > slow_seq]
    expected = ["assistant", "user", "assistant", "user", "assistant"]
    assert roles(after_slow) == expected, roles(after_slow)
    assert user_texts(after_slow) == [behind, after[main]]

    # The stream resumed on the survivor, from the cursor it held mid-answer, and got exactly
    # the rest (a preview reset, then the regenerated answer, is allowed).
    assert cursor_at_kill.part_seq >= 3, cursor_at_kill
    later = [c for c in stream.connections if c.opened_at >= killed_at]
    assert later, "the stream never reconnected after the kill"
    assert later[0].cursor.part_seq >= 3, later[0].cursor
    assert relayed.parts_seen(*slow_episode) >= 3, "the relayed stream got no part of the answer"
    assert relayed.connections[0].opened_at < killed_at
    report = check(world.ops, records, [stream, relayed], complete=[stream, relayed])
    assert report.ok, report.summary()


# -- 3. SIGSTOP until the leases expire, then SIGCONT ----------------------------------------------


async def test_a_frozen_owner_is_fenced_when_it_wakes_after_its_shards_were_taken(
    database_url: str,
) -> None:
    async with open_workers_world(database_url, workers=2) as world:
        try:
            await frozen_owner(world)
        except AssertionError as failure:
            raise AssertionError(f"{failure}\n{world.output()}") from None


async def frozen_owner(world: WorkersWorld) -> None:
    await world.wait_for_all_shards_held(within_s=DEADLINE_S)
    # The chat's owner is the one to freeze. Forwarding is not this test's subject: the chat
    # is created through each worker in turn until one creates it itself (a worker owning
    # the new chat's shard, or any worker once a create picks a shard of its own).
    slow = turn("frozen", chunks=60, chunk_interval_ms=50)  # a 3 s answer
    chat_id = None
    for attempt in range(8):
        worker = world.workers[attempt % len(world.workers)]
        impatient = NodeClient("creator", worker.url, world.token, [], op_deadline_s=1.0)
        try:
            created = await impatient.create_chat(slow)
        finally:
            await impatient.aclose()
        if created.acked:
            chat_id = created.chat_id
            break
    assert chat_id is not None, "no worker created the chat"
    owner_id = await world.owner_of(chat_id)
    assert owner_id is not None
    victim = world.worker(owner_id)
    [other] = [w for w in world.workers if w is not victim]
    shard = await world.shard_of(chat_id)
    victim_before = await world.metrics(victim)
    other_before = await world.metrics(other)
    epoch_before = (await world.leases())[shard][1]

    # Frozen mid-answer: the model's request is under way, and its answer will reach the
    # frozen process's socket in full while it sleeps, ready to be committed the moment it
    # wakes.
    await world.wait_for_request(tag_of(slow))
    victim.pause()
    try:
        # The other worker takes the shard once its lease expires (database time) ...
        async def taken() -> tuple[str, int, bool] | None:
            lease = (await world.leases())[shard]
            return lease if lease[0] == other.worker_id and lease[2] else None

        lease = await eventually(
            taken, within_s=FAILOVER_S, what=f"{other.worker_id} taking shard {shard}"
        )
        assert lease[1] > epoch_before, "the shard changed hands without a new epoch"
        # ... and asks for the answer again. The frozen worker wakes while the new owner's
        # answer is still streaming: its own, older answer is complete in its socket, and the
        # seq it would take is still free. Only the fence can stop that write.
        await world.wait_for_request(tag_of(slow), count=2, within_s=DEADLINE_S)
        # And it wakes to a slow database for its lease check (every other shard's lease row
        # locked for a moment), so that it tries to commit that answer before it could learn
        # from its leases that they are gone: the interleaving fencing exists for, made
        # certain instead of left to the scheduler.
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(world.hold_lease_rows, except_shard=shard, hold_s=STALE_WINDOW_S)
            )
            woke = await world.stored_messages(chat_id, deleted=True)
            victim.resume()
    finally:
        if victim.paused:
            victim.resume()
    assert roles(woke) == ["user"], (
        "the new owner's answer was stored before the frozen worker woke: the race this"
        " test is about did not happen"
    )

    # Awake again, the old owner finds its leases gone and lets the shards go.
    lost_before = victim_before.get("chatd_shards_lost_total", 0.0)

    async def dropped() -> dict[str, float] | None:
        now = await world.metrics(victim)
        return now if now.get("chatd_shards_lost_total", 0.0) > lost_before else None

    await eventually(dropped, within_s=FAILOVER_S, what=f"{victim.worker_id} dropping its shards")
    told = victim.logged(r"(?i)fenced|lost shards|dropp|not renewed")
    assert told, f"{victim.worker_id} never said it lost its shards"

    # The answer is stored once; the new owner's commit met no stranger's message in its
    # place (its actor did not crash on one).
    await world.wait_for_status(chat_id, "waiting", within_s=DEADLINE_S)
    settled_row = await world.chat_row(chat_id)
    settled_rows = await world.stored_messages(chat_id, deleted=True)
    assert roles(settled_rows) == ["user", "assistant"], settled_rows
    other_after = await world.metrics(other)
    victim_after = await world.metrics(victim)
    turns = victim_after.get("chatd_turns_total", 0.0) - victim_before.get("chatd_turns_total", 0.0)
    if (await world.leases())[shard][:2] == lease[:2]:
        # The shard stayed with the new owner all along, so the answer is its own: the woken
        # worker's stale answer never landed, it ended no turn.
        assert turns == 0, f"{victim.worker_id} ended a turn after its shards were taken"
    else:
        # Handed back to the woken worker meanwhile (placement), which may then have ended
        # that turn itself, once.
        assert turns <= 1, f"{victim.worker_id} ended {turns:g} turns of one chat"
    assert other_after.get("chatd_actor_crashes_total") == other_before.get(
        "chatd_actor_crashes_total"
    ), f"an actor of {other.worker_id} crashed"

    # One more turn (through the chat's owner now: forwarding is not this test's subject);
    # the stored history stays whole and in order.
    owner_now = await world.owner_of(chat_id)
    assert owner_now is not None
    more = turn("after-thaw", chunks=2)
    sent = acked(await world.client(world.worker(owner_now)).send(chat_id, more), 202)
    assert sent.message_id is not None
    await eventually(
        partial(answered, world, chat_id, sent.message_id),
        within_s=DEADLINE_S,
        what="the turn after the thaw answered",
    )
    rows = await world.stored_messages(chat_id, deleted=True)
    assert rows[: len(settled_rows)] == settled_rows, "a stored message changed"
    assert roles(rows) == ["user", "assistant", "user", "assistant"], rows
    assert not any(r["deleted"] for r in rows)
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))
    row = await world.chat_row(chat_id)
    assert row["status"] == "waiting"
    assert row["last_message_seq"] == rows[-1]["seq"]
    assert row["history_version"] >= settled_row["history_version"]


# -- 4. a worker joins under load ----------------------------------------------------------------


async def test_a_worker_joining_under_load_takes_shards_with_zero_failed_turns(
    database_url: str,
) -> None:
    async with open_workers_world(database_url, workers=2) as world:
        try:
            await join_under_load(world)
        except AssertionError as failure:
            raise AssertionError(f"{failure}\n{world.output()}") from None


async def join_under_load(world: WorkersWorld) -> None:
    await world.wait_for_even_split(world.workers, within_s=DEADLINE_S)
    chat_ids = await create_waiting_chats(world, world.workers, 6)
    turns: dict[str, list[tuple[str, Op]]] = {c: [] for c in chat_ids}  # chat -> (worker, op)
    failures: list[str] = []
    stop = trio.Event()
    changed = trio.Event()

    def notify() -> None:
        nonlocal changed
        changed.set()
        changed = trio.Event()

    async def closed_loop(index: int, chat_id: str) -> None:
        try:
            await turns_of(index, chat_id)
        finally:
            notify()

    async def turns_of(index: int, chat_id: str) -> None:
        n = 0
        while not stop.is_set():
            workers = world.live
            entry = workers[(index + n) % len(workers)]
            text = turn(f"load-{n}", chunks=4, chunk_interval_ms=30)
            op = await world.client(entry).send(chat_id, text)
            turns[chat_id].append((entry.worker_id, op))
            if not op.acked or op.message_id is None:
                failures.append(op.describe())
                return
            message_id = op.message_id
            try:
                await eventually(
                    partial(answered, world, chat_id, message_id),
                    within_s=DEADLINE_S,
                    what=f"chat {chat_id}: turn {n} answered",
                )
            except AssertionError as failure:
                failures.append(str(failure))
                return
            n += 1
            notify()

    def done_per_chat() -> dict[str, int]:
        return {c: sum(1 for _, op in ops if op.acked) for c, ops in turns.items()}

    async def until(predicate: Callable[[], bool], what: str) -> None:
        with trio.fail_after(DEADLINE_S):
            while not predicate():
                if failures:
                    raise AssertionError(f"{what}: a turn failed: {failures}")
                await changed.wait()

    async with trio.open_nursery() as nursery:
        for index, chat_id in enumerate(chat_ids):
            nursery.start_soon(closed_loop, index, chat_id)
        await until(lambda: min(done_per_chat().values()) >= 2, "the load running")

        joined_at = trio.current_time()
        newcomer = await world.add_worker()
        split = await world.wait_for_even_split(world.live, within_s=DEADLINE_S)
        split_s = trio.current_time() - newcomer.ready_at
        at_split = done_per_chat()
        await until(
            lambda: all(done_per_chat()[c] >= at_split[c] + 3 for c in chat_ids),
            "three more turns per chat after the split",
        )
        stop.set()

    all_turns = [op for ops in turns.values() for _, op in ops]
    through_newcomer = sum(1 for ops in turns.values() for w, _ in ops if w == newcomer.worker_id)
    print(
        f"{newcomer.worker_id} joined (serving {newcomer.ready_at - joined_at:.2f} s after its"
        f" start): split {split} {split_s:.2f} s after it served;"
        f" {len(all_turns)} turns, {through_newcomer} through it,"
        f" {sum(len(op.attempts) - 1 for op in all_turns)} retried attempts"
    )
    assert not failures, failures
    assert all(op.acked for op in all_turns), [op.describe() for op in all_turns if not op.acked]
    assert through_newcomer > 0
    moved = (await world.holdings()).get(newcomer.worker_id, set())
    assert len(moved) >= SHARD_COUNT // 3

    api = world.client(world.workers[0])
    records = await read_chats(api, chat_ids)
    for chat_id, record in records.items():
        assert record.status == "waiting", f"chat {chat_id} is {record.status}"
        history = record.history
        for _worker, op in turns[chat_id]:
            ids = [str(m["id"]) for m in history]
            assert op.message_id in ids, f"chat {chat_id}: lost {op.describe()}"
            at = ids.index(op.message_id)
            assert history[at + 1]["role"] == "assistant", f"chat {chat_id}: {op.describe()}"
    report = check(world.ops, records)
    assert report.ok, report.summary()
