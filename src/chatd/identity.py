"""A worker's stable identity, kept in its home and proved by a lock held for the process's life.

A shard lease names its owner by worker id. A worker that crashed and starts again under a new
id must wait for its old leases to expire (``lease_ttl_s``) before it can serve its own chats;
one that can prove it *is* the old owner takes them back at once. The proof is a lock:

- The home holds identity *slots*: ``workers/worker-N.id`` (a generated id, kept across runs)
  and ``workers/worker-N.lock``. A process claims the first slot whose lock it can take
  (``fcntl.flock``, exclusive, non-blocking) and holds it until it exits; so several workers can
  share one home (``chatd serve --workers N`` later), each with its own slot, and two live
  processes can never hold the same one.
- The kernel drops a flock when its holder dies, however it dies (kill -9 included): a slot
  whose lock is free belongs to no live process, so whoever takes it may take its leases too.
- The lock's descriptor is close-on-exec (Python's default), so a child such as the embedded
  PostgreSQL server never keeps it alive after chatd died.

An explicit ``CHATD_WORKER_ID`` overrides the slots; its lock (named after the id) still keeps
two processes on one home from running under the same id.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

WORKERS_DIR = "workers"
# Generous: a home serves one machine's workers, far fewer than this.
DEFAULT_MAX_SLOTS = 256
# The shard_leases.worker_id column holds at most 200 characters.
MAX_WORKER_ID_CHARS = 200
_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


class IdentityError(RuntimeError):
    """No identity can be claimed; the message says why and what to change."""


@dataclass(frozen=True, slots=True)
class WorkerIdentity:
    """The claimed identity: ``worker_id`` for the leases, ``slot`` (``None`` for an explicit
    id) and the lock file whose lock proves it."""

    worker_id: str
    slot: int | None
    lock_path: Path


@contextlib.contextmanager
def claim_identity(
    home: Path, *, explicit_id: str = "", max_slots: int = DEFAULT_MAX_SLOTS
) -> Iterator[WorkerIdentity]:
    """Claim a worker identity in ``home`` for the ``with`` block (the process's life).

    Without ``explicit_id``: the first free slot, its id made on first use and kept. With one:
    that id, refused when another live process on this home runs under it.
    """
    directory = home / WORKERS_DIR
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IdentityError(f"cannot create {directory} for the worker identity: {exc}") from exc
    if explicit_id:
        lock_path = directory / f"id-{hashlib.sha256(explicit_id.encode()).hexdigest()[:16]}.lock"
        with _locked(lock_path) as held:
            if not held:
                raise IdentityError(
                    f"worker id {explicit_id!r} (CHATD_WORKER_ID) is in use by another running "
                    f"process on home {home}: give each process its own id, or none"
                )
            yield WorkerIdentity(explicit_id, None, lock_path)
        return
    for slot in range(max_slots):
        lock_path = directory / f"worker-{slot}.lock"
        with _locked(lock_path) as held:
            if not held:
                continue
            yield WorkerIdentity(_slot_id(directory, slot), slot, lock_path)
            return
    raise IdentityError(
        f"all {max_slots} worker identities of home {home} are held by running processes"
    )


def _slot_id(directory: Path, slot: int) -> str:
    """The slot's id, made once (hostname, random part, slot) and kept; called with the
    slot's lock held, so no other process writes it meanwhile."""
    path = directory / f"worker-{slot}.id"
    try:
        kept = path.read_text("utf-8").strip()
    except FileNotFoundError:
        kept = ""
    if kept and len(kept) <= MAX_WORKER_ID_CHARS:
        return kept
    host = _ID_CHARS.sub("-", socket.gethostname())[:100] or "host"
    made = f"{host}-{secrets.token_hex(4)}-w{slot}"
    # Written whole, then renamed: a crash mid-write never leaves half an id behind.
    partial = path.with_suffix(".id.tmp")
    partial.write_text(made + "\n", "utf-8")
    partial.replace(path)
    return made


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[bool]:
    """Hold an exclusive flock on ``path`` for the block; yields False (holding nothing) when
    another open file description holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise IdentityError(f"cannot open the worker lock {path}: {exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise IdentityError(f"cannot lock the worker lock {path}: {exc}") from exc
            yield False
            return
        # Which process holds the slot, for an operator looking at the home (not the proof).
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield True
    finally:
        os.close(fd)  # closing the last descriptor drops the lock
