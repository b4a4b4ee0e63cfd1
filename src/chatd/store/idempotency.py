"""Idempotency keys: a mutating request retried with the same ``Idempotency-Key`` is done once.

The protocol (the edge's side is ``chatd.web.idempotency``)
-----------------------------------------------------------

A key belongs to a user; ``(user_id, key)`` is the primary key of ``idempotency_keys``.

1. **Claim** before the command: one ``INSERT ... ON CONFLICT DO NOTHING`` writes a *pending*
   row (the request's fingerprint, a fresh random ``seed`` and ``attempt``, ``expires_at = now
   + ttl`` and ``locked_until = now + pending timeout``). When the key is already there, one
   transaction reads it ``FOR UPDATE`` and decides:

   - expired: it is replaced, as if it had never been there (a fresh claim, a new seed);
   - another fingerprint (another body, route or method): ``Mismatch``, nothing is done;
   - a recorded result: ``Replay`` of that status and body, nothing is done;
   - pending, claimed by *this* worker: the attempt is over (the caller holds the key's turn
     in its process, so no live request of this worker has it): the worker died (kill -9) and
     was restarted under its stable identity (``chatd.identity``), or its request ended
     without writing how: this request **takes over** the claim at once;
   - pending, claimed by another worker and ``locked_until`` still ahead: ``InProgress``;
   - pending and ``locked_until`` passed: the first attempt died (a worker that did not come
     back, a lost database) or gave up without an answer: this request **takes over**.

   A take-over keeps the seed, gives the key a new ``attempt``, and tells the request whether
   the previous attempt's command **committed** (below).

2. The command runs. A command that goes through a chat's actor (create a chat, send, edit,
   interrupt, tool results, delete or promote a queued message) carries the key's mark
   (``chatd.domain.mailbox.Keyed``): the actor adds one statement to the very transaction
   that commits the command (``mark_committed``, first after the chat's lock): ``committed =
   true`` on the key, **only while the mark's attempt still holds it**; otherwise the whole
   commit is refused (``AttemptSuperseded``) and nothing of it is written. A command that
   changes nothing (an interrupt of a waiting chat) commits the mark alone.

3. **Record** the result (2xx only) on the pending row, or on a refusal (4xx: nothing was
   done, by the edge's rule) **release** the key so that a corrected retry may use it; on any
   other failure (5xx, a timeout, the client gone) the row is **abandoned** (``locked_until =
   now``): the next retry takes over. Record, release and abandon act only while their attempt
   holds the key. When the database cannot be told (it is down), the edge keeps the ending in
   memory and writes it before the next request with the key.

What now holds
--------------

For the commands that go through a chat's actor, the key is part of the command's own
transaction, so a crash, a kill -9 or a database outage between the command's commit and the
record of its answer leaves no doubt:

- a take-over that finds ``committed`` knows the command was done: the edge answers with the
  route's success rebuilt from what is stored (``ApiRoutes.http(recover=...)``: a created
  chat's current detail; a sent or edited-in message as it stands now, ``queued`` as it is now
  or, if its queued entry was dropped since, ``queued: true``; 204 for the commands without a
  body) and does **not** run the command again. The answer shows the present where the stored
  rows changed since; the command itself is done once;
- a take-over that finds it not committed knows the previous attempt's transaction never
  committed, and since that attempt no longer holds the key, it never will (its commit, if
  still on its way, is refused): the command runs now, once;
- the key's row lock serialises the two: a take-over that reads the row while the command's
  transaction holds it waits for that commit and then sees ``committed``.

The rows a command creates still take ids derived from the claim's ``seed`` (``derived_id``):
the answer of a committed create, send or edit is rebuilt from them.

What does not hold: the routes whose write goes to the store directly (rename, diff status,
read marks, prompts, API tokens, the admin routes; ``PATCH /chats/{id}``, which may both
archive through the actor and rename in the store) do not mark the key in their write. A
take-over of one of them runs it again; each is idempotent by its own rules (a value set to
the same value again, a duplicate name refused with 409), so nothing is done twice, but the
retry's answer may then differ from the first (a 409 or 404 instead of the 2xx; ``PATCH
/chats/{id}`` answers 200 again, with the chat as it is now).

The cost: with the header, the claim and the record (one statement each, outside the command's
transaction) and the mark (one statement inside the command's commit); a command that changes
nothing (an interrupt of a waiting chat, say) commits its mark in a transaction of its own.
Without the header, nothing.

Another worker's pending key is taken over only once its ``locked_until`` has passed: the
pending timeout must exceed the longest a live request can take (``ask_timeout_s``), so a slow
first attempt is not taken over while it still runs (and should its command outlast that, a
stalled commit say, the command is refused at its commit, as any superseded attempt's). A
worker id is held by one live process at a time (the identity's lock), which is what makes the
same-worker take-over safe.

Expiry uses the database's clock (``now()``) unless a test passes ``now``. Expired keys are
deleted on write: every fresh claim also deletes a bounded number of expired keys of any user
(``PURGE_BATCH``), oldest first, skipping rows another session holds; a deployment that writes
keys deletes them at least as fast as they expire. ``purge_expired`` does the same on demand.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Final
from uuid import UUID

from chatd.domain.mailbox import AttemptSuperseded, IdempotencyMark
from chatd.store.database import Connection, Database

# Expired keys deleted by each fresh claim: more than one, so cleanup outpaces creation.
PURGE_BATCH: Final = 16


@dataclass(frozen=True, slots=True)
class Claimed:
    """This request holds the key as ``attempt``. ``took_over``: a dead attempt's claim (same
    seed); ``committed``: that attempt's command is done (its commit marked the key), so this
    one answers from what is stored instead of doing it."""

    seed: UUID
    attempt: UUID
    took_over: bool = False
    committed: bool = False


@dataclass(frozen=True, slots=True)
class Replay:
    """The key's recorded result: answer with it, do nothing."""

    status: int
    content_type: str | None
    body: bytes


@dataclass(frozen=True, slots=True)
class Mismatch:
    """The key was used for another request."""


@dataclass(frozen=True, slots=True)
class InProgress:
    """The key's first attempt is running; it is presumed alive for ``retry_after_s`` more."""

    retry_after_s: float


ClaimOutcome = Claimed | Replay | Mismatch | InProgress


def derived_id(seed: UUID, purpose: str) -> UUID:
    """The id of the row a command creates for ``purpose`` ("chat", "message"): the same for
    every attempt of one claim, different for every claim."""
    return uuid.uuid5(seed, purpose)


_CLAIM = """
WITH clock AS (SELECT coalesce($6::timestamptz, now()) AS now),
purge AS (
    DELETE FROM idempotency_keys
    WHERE (user_id, key) IN (
        SELECT user_id, key FROM idempotency_keys
        WHERE expires_at <= (SELECT now FROM clock) AND NOT (user_id = $1 AND key = $2)
        ORDER BY expires_at
        LIMIT $7
        FOR UPDATE SKIP LOCKED
    )
)
INSERT INTO idempotency_keys
    (user_id, key, fingerprint, seed, expires_at, locked_until, claimed_by, attempt)
SELECT $1, $2, $3, $4,
       now + make_interval(secs => $5),
       now + make_interval(secs => $8),
       $9, $10
FROM clock
ON CONFLICT (user_id, key) DO NOTHING
RETURNING seed
"""


async def claim(
    db: Database,
    *,
    user_id: UUID,
    key: str,
    fingerprint: bytes,
    ttl_s: float,
    pending_timeout_s: float,
    worker_id: str,
    now: datetime | None = None,
) -> ClaimOutcome:
    """Claim ``key`` for the request of ``fingerprint`` on ``worker_id``, which must not run
    another request with this key meanwhile (see the module's protocol)."""
    seed, attempt = uuid.uuid4(), uuid.uuid4()
    inserted = await db.fetchval(
        _CLAIM,
        user_id,
        key,
        fingerprint,
        seed,
        ttl_s,
        now,
        PURGE_BATCH,
        pending_timeout_s,
        worker_id,
        attempt,
    )
    if inserted is not None:
        return Claimed(seed, attempt)
    return await db.transaction(
        partial(
            _claim_existing,
            user_id=user_id,
            key=key,
            fingerprint=fingerprint,
            seed=seed,
            attempt=attempt,
            ttl_s=ttl_s,
            pending_timeout_s=pending_timeout_s,
            worker_id=worker_id,
            now=now,
        )
    )


async def _claim_existing(
    conn: Connection,
    *,
    user_id: UUID,
    key: str,
    fingerprint: bytes,
    seed: UUID,
    attempt: UUID,
    ttl_s: float,
    pending_timeout_s: float,
    worker_id: str,
    now: datetime | None,
) -> ClaimOutcome:
    clock: datetime = await conn.fetchval("SELECT coalesce($1::timestamptz, now())", now)
    row = await conn.fetchrow(
        "SELECT fingerprint, seed, status, content_type, body, expires_at, locked_until,"
        " claimed_by, committed FROM idempotency_keys WHERE user_id = $1 AND key = $2"
        " FOR UPDATE",
        user_id,
        key,
    )
    ttl = timedelta(seconds=ttl_s)
    pending = timedelta(seconds=pending_timeout_s)
    if row is None or row["expires_at"] <= clock:
        # Gone since the insert, or expired: claimed afresh, as if never used.
        await conn.execute(
            """
            INSERT INTO idempotency_keys
                (user_id, key, fingerprint, seed, created_at, expires_at, locked_until,
                 claimed_by, attempt)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
            ON CONFLICT (user_id, key) DO UPDATE SET
                fingerprint = EXCLUDED.fingerprint, seed = EXCLUDED.seed, status = NULL,
                content_type = NULL, body = NULL, created_at = EXCLUDED.created_at,
                expires_at = EXCLUDED.expires_at, locked_until = EXCLUDED.locked_until,
                claimed_by = EXCLUDED.claimed_by, attempt = EXCLUDED.attempt,
                committed = false
            """,
            user_id,
            key,
            fingerprint,
            seed,
            clock,
            clock + ttl,
            clock + pending,
            worker_id,
            attempt,
        )
        return Claimed(seed, attempt)
    if bytes(row["fingerprint"]) != fingerprint:
        return Mismatch()
    if row["status"] is not None:
        return Replay(row["status"], row["content_type"], bytes(row["body"]))
    if row["locked_until"] > clock and row["claimed_by"] != worker_id:
        return InProgress((row["locked_until"] - clock).total_seconds())
    # A new attempt: from now on only this request's command may commit under the key.
    await conn.execute(
        "UPDATE idempotency_keys SET locked_until = $3, claimed_by = $4, attempt = $5"
        " WHERE user_id = $1 AND key = $2",
        user_id,
        key,
        clock + pending,
        worker_id,
        attempt,
    )
    return Claimed(row["seed"], attempt, took_over=True, committed=row["committed"])


async def record(
    db: Database,
    *,
    user_id: UUID,
    key: str,
    attempt: UUID,
    status: int,
    content_type: str | None,
    body: bytes,
) -> bool:
    """Record the attempt's successful result; False if the key is no longer this attempt's
    (another request took it over, or it expired and was claimed afresh meanwhile)."""
    done = await db.fetchval(
        "UPDATE idempotency_keys SET status = $4, content_type = $5, body = $6"
        " WHERE user_id = $1 AND key = $2 AND attempt = $3 AND status IS NULL RETURNING true",
        user_id,
        key,
        attempt,
        status,
        content_type,
        body,
    )
    return done is not None


async def release(db: Database, *, user_id: UUID, key: str, attempt: UUID) -> None:
    """Forget a pending claim whose command was refused (nothing was done)."""
    await db.execute(
        "DELETE FROM idempotency_keys"
        " WHERE user_id = $1 AND key = $2 AND attempt = $3 AND status IS NULL",
        user_id,
        key,
        attempt,
    )


async def abandon(db: Database, *, user_id: UUID, key: str, attempt: UUID) -> None:
    """End a pending claim whose outcome is unknown: the next retry takes over at once."""
    await db.execute(
        "UPDATE idempotency_keys SET locked_until = least(locked_until, now())"
        " WHERE user_id = $1 AND key = $2 AND attempt = $3 AND status IS NULL",
        user_id,
        key,
        attempt,
    )


async def mark_committed(conn: Connection, mark: IdempotencyMark) -> None:
    """Inside the transaction of the mark's command: the key's command is done when this
    transaction commits. Raises ``AttemptSuperseded`` (rolling the command back) when the
    attempt no longer holds the key. The key's row stays locked until the commit, so a
    take-over waits for it and then sees ``committed``."""
    held = await conn.fetchval(
        "UPDATE idempotency_keys SET committed = true"
        " WHERE user_id = $1 AND key = $2 AND attempt = $3 AND status IS NULL RETURNING true",
        mark.user_id,
        mark.key,
        mark.attempt,
    )
    if held is None:
        raise AttemptSuperseded(f"idempotency key {mark.key!r}: another request holds it now")


async def effect_exists(db: Database, *, owner_id: UUID, ids: list[UUID]) -> bool:
    """Whether a row a command creates under one of ``ids`` exists: a chat of ``owner_id``,
    a message (live or truncated since) or a queued entry of one of its chats."""
    found = await db.fetchval(
        """
        SELECT EXISTS (SELECT 1 FROM chats WHERE id = ANY ($2) AND owner_id = $1)
            OR EXISTS (SELECT 1 FROM chat_messages m JOIN chats c ON c.id = m.chat_id
                       WHERE m.id = ANY ($2) AND c.owner_id = $1)
            OR EXISTS (SELECT 1 FROM queued_messages q JOIN chats c ON c.id = q.chat_id
                       WHERE q.id = ANY ($2) AND c.owner_id = $1)
        """,
        owner_id,
        ids,
    )
    return bool(found)


async def purge_expired(db: Database, *, limit: int, now: datetime | None = None) -> int:
    """Delete up to ``limit`` expired keys, oldest first; returns how many."""
    deleted = await db.fetchval(
        """
        WITH gone AS (
            DELETE FROM idempotency_keys
            WHERE (user_id, key) IN (
                SELECT user_id, key FROM idempotency_keys
                WHERE expires_at <= coalesce($1::timestamptz, now())
                ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED
            )
            RETURNING 1
        )
        SELECT count(*) FROM gone
        """,
        now,
        limit,
    )
    return int(deleted)
