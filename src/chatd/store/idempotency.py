"""Idempotency keys: a mutating request retried with the same ``Idempotency-Key`` is done once.

The protocol (the edge's side is ``chatd.web.idempotency``)
-----------------------------------------------------------

A key belongs to a user; ``(user_id, key)`` is the primary key of ``idempotency_keys``.

1. **Claim** before the command: one ``INSERT ... ON CONFLICT DO NOTHING`` writes a *pending*
   row (the request's fingerprint, a fresh random ``seed``, ``expires_at = now + ttl`` and
   ``locked_until = now + pending timeout``). When the key is already there, one transaction
   reads it ``FOR UPDATE`` and decides:

   - expired: it is replaced, as if it had never been there (a fresh claim, a new seed);
   - another fingerprint (another body, route or method): ``Mismatch``, nothing is done;
   - a recorded result: ``Replay`` of that status and body, nothing is done;
   - pending, claimed by *this* worker: the attempt is over (the caller holds the key's turn
     in its process, so no live request of this worker has it): the worker died (kill -9) and
     was restarted under its stable identity (``chatd.identity``), or its request ended
     without writing how: this request **takes over** the claim (same seed) at once;
   - pending, claimed by another worker and ``locked_until`` still ahead: ``InProgress``;
   - pending and ``locked_until`` passed: the first attempt died (a worker that did not come
     back, a lost database) or gave up without an answer: this request **takes over**.

2. The command runs (through the chat's actor, which commits it in its own transaction, or in
   the store directly).

3. **Record** the result (2xx only) on the pending row, or on a refusal (4xx: nothing was
   done, by the edge's rule) **release** the key so that a corrected retry may use it; on any
   other failure (5xx, a timeout, the client gone) the row is **abandoned** (``locked_until =
   now``): whether the command was done is unknown, so the next retry takes over. When the
   database cannot be told (it is down), the edge keeps the ending in memory and writes it
   before the next request with the key.

The window, and why a take-over is safe
---------------------------------------

The command's transaction and the record of its result are two commits, so a crash between
them leaves a pending row whose command *was* done. Binding the key into the command's own
transaction would mean threading it through the actor's decision and commit (``decide``,
``persist``, ``store.chats.commit``); instead, every row a command creates has an id derived
from the claim's ``seed`` (``derived_id``: a new chat, a sent message or its queued entry, an
edited message's replacement), and a take-over first looks for those rows (``effect_exists``).
Found: the command was done, and the edge answers from what is stored without doing it again.
Not found: the command was not done (its transaction never committed), and it runs now.

What remains of the window, precisely: only a take-over (a crash or an outage between the
command's commit and the record) can differ from a replay, and then

- create, send and edit are done once; their answer is rebuilt from the stored rows, so it
  shows the present (a chat's current detail; ``queued`` as the message stands now);
- the commands that create no row run again. Most are idempotent by their own rules or are
  refused by the state the first run left, so nothing is done twice: tool results after the
  chat moved on (409) or for other calls (400), a queued entry deleted twice (404), a promote,
  archive, rename, prompt, diff status or read mark set to the same value again, an admin
  create refused by its unique name (409). The answer then differs from the first (a 409 or
  404 instead of the 2xx). One is not: an interrupt run again stops whatever the chat runs
  *now*, which after the crash may be its next queued message;
- another worker's key is taken over only after the pending timeout, which exceeds the ask
  timeout, so the first attempt's command has been answered or abandoned by then; a commit
  still in flight past both (a database stalled for longer) is the one case where a re-run
  could race the first run (a send then collides on its derived id: the second commit fails,
  the actor restarts from the database, and the message is stored once).

Another worker's pending key is taken over only once its ``locked_until`` has passed: the
pending timeout must exceed the longest a live request can take (``ask_timeout_s``), so a slow
first attempt is never taken over while it still runs. A worker id is held by one live process
at a time (the identity's lock), which is what makes the same-worker take-over safe.

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

from chatd.store.database import Connection, Database

# Expired keys deleted by each fresh claim: more than one, so cleanup outpaces creation.
PURGE_BATCH: Final = 16


@dataclass(frozen=True, slots=True)
class Claimed:
    """This request does the command; ``took_over``: a dead attempt's claim (same seed)."""

    seed: UUID
    took_over: bool = False


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
    (user_id, key, fingerprint, seed, expires_at, locked_until, claimed_by)
SELECT $1, $2, $3, $4,
       now + make_interval(secs => $5),
       now + make_interval(secs => $8),
       $9
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
    seed = uuid.uuid4()
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
    )
    if inserted is not None:
        return Claimed(seed)
    return await db.transaction(
        partial(
            _claim_existing,
            user_id=user_id,
            key=key,
            fingerprint=fingerprint,
            seed=seed,
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
    ttl_s: float,
    pending_timeout_s: float,
    worker_id: str,
    now: datetime | None,
) -> ClaimOutcome:
    clock: datetime = await conn.fetchval("SELECT coalesce($1::timestamptz, now())", now)
    row = await conn.fetchrow(
        "SELECT fingerprint, seed, status, content_type, body, expires_at, locked_until,"
        " claimed_by FROM idempotency_keys WHERE user_id = $1 AND key = $2 FOR UPDATE",
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
                 claimed_by)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
            ON CONFLICT (user_id, key) DO UPDATE SET
                fingerprint = EXCLUDED.fingerprint, seed = EXCLUDED.seed, status = NULL,
                content_type = NULL, body = NULL, created_at = EXCLUDED.created_at,
                expires_at = EXCLUDED.expires_at, locked_until = EXCLUDED.locked_until,
                claimed_by = EXCLUDED.claimed_by
            """,
            user_id,
            key,
            fingerprint,
            seed,
            clock,
            clock + ttl,
            clock + pending,
            worker_id,
        )
        return Claimed(seed)
    if bytes(row["fingerprint"]) != fingerprint:
        return Mismatch()
    if row["status"] is not None:
        return Replay(row["status"], row["content_type"], bytes(row["body"]))
    if row["locked_until"] > clock and row["claimed_by"] != worker_id:
        return InProgress((row["locked_until"] - clock).total_seconds())
    await conn.execute(
        "UPDATE idempotency_keys SET locked_until = $3, claimed_by = $4"
        " WHERE user_id = $1 AND key = $2",
        user_id,
        key,
        clock + pending,
        worker_id,
    )
    return Claimed(row["seed"], took_over=True)


async def record(
    db: Database,
    *,
    user_id: UUID,
    key: str,
    seed: UUID,
    status: int,
    content_type: str | None,
    body: bytes,
) -> bool:
    """Record the claim's successful result; False if the claim is no longer this one's (it
    expired and was claimed afresh meanwhile)."""
    done = await db.fetchval(
        "UPDATE idempotency_keys SET status = $4, content_type = $5, body = $6"
        " WHERE user_id = $1 AND key = $2 AND seed = $3 AND status IS NULL RETURNING true",
        user_id,
        key,
        seed,
        status,
        content_type,
        body,
    )
    return done is not None


async def release(db: Database, *, user_id: UUID, key: str, seed: UUID) -> None:
    """Forget a pending claim whose command was refused (nothing was done)."""
    await db.execute(
        "DELETE FROM idempotency_keys"
        " WHERE user_id = $1 AND key = $2 AND seed = $3 AND status IS NULL",
        user_id,
        key,
        seed,
    )


async def abandon(db: Database, *, user_id: UUID, key: str, seed: UUID) -> None:
    """End a pending claim whose outcome is unknown: the next retry takes over at once."""
    await db.execute(
        "UPDATE idempotency_keys SET locked_until = least(locked_until, now())"
        " WHERE user_id = $1 AND key = $2 AND seed = $3 AND status IS NULL",
        user_id,
        key,
        seed,
    )


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
