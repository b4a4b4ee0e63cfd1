"""The ``Idempotency-Key`` header of the mutating routes: a retry is answered, not redone.

Every POST, PUT, PATCH and DELETE under ``/api/v1`` accepts the header (``ApiRoutes.http``
routes the request here when it is present; without it nothing here runs, and no query is
added). The key is kept per user in PostgreSQL for ``idempotency_key_ttl_s``; the protocol and
its crash window are described in ``chatd.store.idempotency``. What a client sees:

- the first request with a key is done and its 2xx answer recorded; a retry with the same key
  and the same request (method, path, query and body, compared after decoding, so the order
  of a body's fields does not matter) gets the recorded status and body again, with the
  header ``Idempotent-Replayed: true``, and nothing is done again;
- the same key with another request: 422 ``idempotency_key_reused``, naming the header;
- a key that is empty, longer than ``idempotency_key_max_chars`` or outside
  ``[A-Za-z0-9._:~+/=-]``: 400 naming the header;
- a refused first request (4xx) records nothing: the key is free again for a corrected retry;
- **concurrent duplicates**: exactly one does the work. A duplicate that arrives while the
  first runs *in this process* waits for its answer (at most ``idempotency_wait_s``) and then
  answers as a retry does; a duplicate on another process, or one that waited its bound out,
  gets 409 ``idempotency_key_in_progress`` with ``Retry-After: 1``;
- after a crash (kill -9) or a database outage between the command's commit and the record of
  its answer, the key stays pending. The same worker restarted on its home (its stable
  identity) takes it over at the next retry; any other worker once
  ``idempotency_pending_timeout_s`` has passed. When the database was down instead, this
  process remembers how the claim ended and writes it before the next request with the key.
  The commands that go through a chat's actor (``ApiRoutes.http(commits_key=True)``) mark the
  key in their own commit, so a take-over knows whether the command was done: done, the
  answer is rebuilt from what is stored (``recover``; 204 for the routes without a body) and
  the command is not run again; not done, it runs now. The other routes run again, and their
  own rules keep them from being done twice (see ``chatd.store.idempotency``);
- a request whose key another request took over meanwhile (its command refused at its
  commit, ``AttemptSuperseded``): 409 ``idempotency_key_in_progress``; it did nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, Literal
from uuid import UUID

import trio
from quart import Quart, Response
from werkzeug.datastructures import Headers

from chatd.domain.mailbox import AttemptSuperseded
from chatd.store import idempotency as store
from chatd.store.idempotency import Claimed, InProgress, Mismatch, Replay
from chatd.web.context import Services
from chatd.web.errors import ApiError, api_error_for

log = logging.getLogger(__name__)

HEADER: Final = "Idempotency-Key"
REPLAYED_HEADER: Final = "Idempotent-Replayed"
KEY_CHARSET: Final = "A-Za-z0-9._:~+/=-"
_KEY = re.compile(f"[{KEY_CHARSET}]+")
_EXTENSION_KEY: Final = "chatd.idempotency"
# Releasing or abandoning a claim after a failure is one statement: bounded, and shielded so
# that a client who went away does not leave the key held for the whole pending timeout.
_CLEANUP_TIMEOUT_S: Final = 5.0
# Claims whose ending could not be written (the database was down) are remembered in memory
# so that the next request with the key writes it first; the oldest are forgotten past this
# many (their keys then wait out the pending timeout, as after a crash).
_MAX_UNSETTLED: Final = 10_000


@dataclass(frozen=True, slots=True)
class Answer:
    """A success as the endpoint sends it, and as the key records it."""

    status: int
    content_type: str | None
    body: bytes

    def response(self, *, replayed: bool = False) -> Response:
        headers = {REPLAYED_HEADER: "true"} if replayed else {}
        if self.content_type is None:
            return Response(self.body, status=self.status, headers=headers)
        return Response(
            self.body, status=self.status, content_type=self.content_type, headers=headers
        )


def key_from(headers: Headers, *, max_chars: int) -> str | None:
    """The request's key, ``None`` without the header; 400 naming the header when invalid."""
    key = headers.get(HEADER)
    if key is None:
        return None
    if not key:
        raise ApiError.invalid(HEADER, "must not be empty")
    if len(key) > max_chars:
        raise ApiError.invalid(HEADER, f"at most {max_chars} characters")
    if _KEY.fullmatch(key) is None:
        raise ApiError.invalid(HEADER, f"only the characters {KEY_CHARSET}")
    return key


def fingerprint(method: str, path: str, query: bytes, body: bytes) -> bytes:
    """What makes two requests "the same" for one key: SHA-256 of each part, length-framed."""
    digest = hashlib.sha256()
    for part in (method.encode(), path.encode(), query, body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()


@dataclass
class _Slot:
    lock: trio.Lock = field(default_factory=trio.Lock)
    users: int = 0


# How a claim of this process ended, when the database could not be told at the time: its
# answer (to record), "release" (refused: nothing done) or "abandon" (outcome unknown).
_Ending = Answer | Literal["release", "abandon"]


@dataclass
class _InFlight:
    """The keys this process is working on. Requests of one key take turns here before they
    claim it in the database, so a duplicate waits for the first one's answer in this
    process; only a duplicate on another process can find the key pending (409)."""

    slots: dict[tuple[UUID, str], _Slot] = field(default_factory=dict)
    unsettled: dict[tuple[UUID, str], tuple[UUID, _Ending]] = field(default_factory=dict)

    def remember(self, slot: tuple[UUID, str], attempt: UUID, ending: _Ending) -> None:
        self.unsettled[slot] = (attempt, ending)
        while len(self.unsettled) > _MAX_UNSETTLED:
            del self.unsettled[next(iter(self.unsettled))]

    @contextlib.asynccontextmanager
    async def turn(self, slot: tuple[UUID, str], *, deadline: float) -> AsyncIterator[bool]:
        """Hold the key's turn (True), or give up at ``deadline`` (False)."""
        entry = self.slots.setdefault(slot, _Slot())
        entry.users += 1
        try:
            # The deadline bounds the wait for the turn only, never the command itself.
            acquired = False
            with trio.move_on_at(deadline):
                await entry.lock.acquire()
                acquired = True
            if not acquired:
                yield False
                return
            try:
                yield True
            finally:
                entry.lock.release()
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self.slots[slot]


def _in_flight(app: Quart) -> _InFlight:
    found = app.extensions.get(_EXTENSION_KEY)
    if found is None:
        found = app.extensions[_EXTENSION_KEY] = _InFlight()
    assert isinstance(found, _InFlight)
    return found


def _in_progress() -> ApiError:
    return ApiError(
        409,
        "idempotency_key_in_progress",
        f"{HEADER}: a request with this key is in progress; retry shortly",
        field=HEADER,
        rule="one request at a time per key",
        headers={"Retry-After": "1"},
    )


async def run_once(
    app: Quart,
    svc: Services,
    *,
    user_id: UUID,
    key: str,
    request_fingerprint: bytes,
    attempt: Callable[[Claimed], Awaitable[Answer]],
) -> Response:
    """Answer a request carrying ``key``: replay its recorded answer, refuse it, or claim the
    key and run ``attempt`` (at most one at a time per key, across processes)."""
    settings = svc.settings
    in_flight = _in_flight(app)
    deadline = trio.current_time() + settings.idempotency_wait_s
    async with in_flight.turn((user_id, key), deadline=deadline) as ours:
        if not ours:
            raise _in_progress()
        await _settle_earlier(svc, in_flight, user_id=user_id, key=key)
        outcome = await store.claim(
            svc.db,
            user_id=user_id,
            key=key,
            fingerprint=request_fingerprint,
            ttl_s=settings.idempotency_key_ttl_s,
            pending_timeout_s=settings.idempotency_pending_timeout_s,
            worker_id=svc.engine.supervisor.worker_id,
        )
        match outcome:
            case Replay(status=status, content_type=content_type, body=body):
                return Answer(status, content_type, body).response(replayed=True)
            case Mismatch():
                raise ApiError(
                    422,
                    "idempotency_key_reused",
                    f"{HEADER}: this key was used for another request (method, path or body);"
                    " use a new key for a new request",
                    field=HEADER,
                    rule="one key, one request",
                )
            case InProgress():
                raise _in_progress()  # another process works on it
            case Claimed():
                return await _do(
                    svc,
                    in_flight,
                    user_id=user_id,
                    key=key,
                    claimed=outcome,
                    attempt=attempt,
                )


async def _settle_earlier(svc: Services, in_flight: _InFlight, *, user_id: UUID, key: str) -> None:
    """Write how this process's earlier claim of the key ended, if the database could not be
    told then: a retry after an outage is answered at once instead of waiting out the pending
    timeout. Raises (and keeps it in memory) while the database is still down."""
    slot = (user_id, key)
    unsettled = in_flight.unsettled.pop(slot, None)
    if unsettled is None:
        return
    attempt, ending = unsettled
    try:
        await _write_ending(svc, user_id=user_id, key=key, attempt=attempt, ending=ending)
    except BaseException:
        in_flight.unsettled.setdefault(slot, unsettled)
        raise


async def _write_ending(
    svc: Services, *, user_id: UUID, key: str, attempt: UUID, ending: _Ending
) -> None:
    if ending == "release":
        await store.release(svc.db, user_id=user_id, key=key, attempt=attempt)
    elif ending == "abandon":
        await store.abandon(svc.db, user_id=user_id, key=key, attempt=attempt)
    else:
        assert isinstance(ending, Answer)
        await store.record(
            svc.db,
            user_id=user_id,
            key=key,
            attempt=attempt,
            status=ending.status,
            content_type=ending.content_type,
            body=ending.body,
        )


async def _do(
    svc: Services,
    in_flight: _InFlight,
    *,
    user_id: UUID,
    key: str,
    claimed: Claimed,
    attempt: Callable[[Claimed], Awaitable[Answer]],
) -> Response:
    try:
        answer = await attempt(claimed)
    except AttemptSuperseded as exc:
        # Another request took the key over while this one's command was on its way: that
        # request does (or did) it; this one wrote nothing and must not touch the key.
        raise _in_progress() from exc
    except BaseException as exc:
        await _after_failure(svc, in_flight, user_id=user_id, key=key, claimed=claimed, exc=exc)
        raise
    try:
        await _write_ending(svc, user_id=user_id, key=key, attempt=claimed.attempt, ending=answer)
    except Exception:
        # The command is done and durable: its answer stands, and is recorded by the next
        # request with the key (or, on another process, recovered after the pending timeout).
        log.warning("the answer for an idempotency key was not recorded", exc_info=True)
        in_flight.remember((user_id, key), claimed.attempt, answer)
    return answer.response()


async def _after_failure(
    svc: Services,
    in_flight: _InFlight,
    *,
    user_id: UUID,
    key: str,
    claimed: Claimed,
    exc: BaseException,
) -> None:
    """A refusal (4xx) did nothing: free the key. Anything else (5xx, a timeout, the request
    cancelled) may or may not have done the command: let the next retry take over at once.
    A key whose command is known done (``claimed.committed``) is never freed: its answer
    failed, not its command."""
    error = api_error_for(exc) if isinstance(exc, Exception) else None
    refused = error is not None and 400 <= error.status < 500 and not claimed.committed
    ending: _Ending = "release" if refused else "abandon"
    attempt = claimed.attempt
    written = False
    with trio.move_on_after(_CLEANUP_TIMEOUT_S, shield=True):
        try:
            await _write_ending(svc, user_id=user_id, key=key, attempt=attempt, ending=ending)
            written = True
        except Exception:
            log.warning("an idempotency key could not be freed after a failure", exc_info=True)
    if not written:
        in_flight.remember((user_id, key), attempt, ending)
