"""``chatd serve --workers N``: a parent process that runs N worker processes on one port.

The parent does what must happen once, then supervises:

- it starts the embedded PostgreSQL when no database URL is configured (``cli`` wraps this in
  ``runtime.database_url``), migrates, makes the admin token file, and with ``--demo`` sets up
  the demo's model (the fake provider is served here, in the parent, for every worker: one
  provider row pointing at one live server, whichever worker dies);
- it binds the listening socket itself (so port 0 works and the port is printed once), and
  each worker inherits it (``CHATD_LISTEN_FD``): the kernel hands every connection to one of
  the workers accepting on it;
- it starts N ``chatd serve`` processes with ``CHATD_WORKERS=1``; each claims its own identity
  slot in the shared home (``chatd.identity``), so a restarted worker gets the slot its dead
  predecessor freed, and that worker's leases back at once. The parent claims no identity.

Supervision uses pykka: one ``WorkerProcess`` actor (a thread) per worker owns its
``subprocess.Popen``, its restart budget (``worker_restart_limit`` restarts within
``worker_restart_window_s``, then the whole fleet stops with one line naming the worker and its
last exit status), its readiness (no ``ready`` report within ``worker_ready_timeout_s``: counts
as a crash) and its stop (SIGTERM, then SIGKILL after ``worker_stop_timeout_s``). It fits: each
actor handles one message at a time, so a worker's state (which process, which generation, how
many restarts) has one owner and no locks; the blocking parts (``Popen.wait``, reading the
readiness line) run in a watcher thread per process that only tells the actor what happened.
The parent's main thread runs trio (signals, the demo's fake model) and hears from the actors
through a memory channel.

Each worker gets its own end of a socket pair with the parent (``CHATD_PARENT_FD``). It writes
``ready <worker id>`` there once it serves, and it watches the socket for its end: when the
parent dies, however it dies (kill -9 included), the kernel closes the parent's end and the
worker stops by itself, cleanly (leases released), within ``worker_stop_timeout_s``. That is
what ``prctl(PR_SET_PDEATHSIG)`` would give, without a ``preexec_fn`` (unsafe in a process
with threads, as the parent is); and it needs no polling of ``getppid``. Workers run in their
own process group, so a Ctrl-C at a terminal reaches only the parent, which stops them once.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pykka
import trio

from chatd.config import Settings
from chatd.demo import DemoModel, open_demo_model
from chatd.runtime import Ready, ensure_admin_token, model_warnings, open_database, socket_url
from chatd.store.migrate import migrate

log = logging.getLogger(__name__)

# The exit code of a parent whose worker crashed past its restart budget.
EXIT_WORKERS_FAILED = 1
_READY_PREFIX = "ready "
_MAX_READY_LINE_BYTES = 4096
# How often a stop in progress looks whether it was asked to hurry (a second signal).
_STOP_POLL_S = 0.1
# A worker's stop is bounded by worker_stop_timeout_s (then SIGKILL); this is only a wall
# around the actors themselves.
_STOP_MARGIN_S = 10.0


class FleetError(RuntimeError):
    """The workers cannot be started as configured; the message says what to change."""


class WorkersFailed(RuntimeError):
    """A worker crashed more often than its restart budget allows; every worker was stopped."""


def check_settings(settings: Settings) -> None:
    """Refuse what cannot work with several workers, before anything starts."""
    count = settings.worker_count()
    if settings.worker_id:
        raise FleetError(
            f"worker_id (CHATD_WORKER_ID) names one process, and --workers {count} starts "
            "several: unset it (each worker keeps its own identity in CHATD_HOME)"
        )
    if settings.listen_fd >= 0 or settings.parent_fd >= 0:
        raise FleetError(
            "listen_fd and parent_fd (CHATD_LISTEN_FD, CHATD_PARENT_FD) are set by chatd for "
            "its own workers: unset them"
        )


# -- the parent ------------------------------------------------------------------------------


async def serve_workers(
    settings: Settings,
    url: str,
    listener: socket.socket,
    *,
    on_ready: Callable[[Ready], None],
    admin_token_file: Path | None,
    demo: bool,
) -> None:
    """Prepare the database once, then run ``settings.worker_count()`` workers on ``listener``
    until SIGINT/SIGTERM (then stop them all and return) or until one crashed past its
    budget (then stop them all and raise ``WorkersFailed``)."""
    # The parent uses the database only here, at startup: two connections are plenty.
    parent = settings.replace(db_pool_min_size=1, db_pool_max_size=2)
    async with contextlib.AsyncExitStack() as demo_stack:
        async with open_database(parent, url) as db:
            applied = await migrate(db)
            if applied:
                log.info("applied migrations: %s", ", ".join(f"{m.version:04d}" for m in applied))
            token = None
            if admin_token_file is not None:
                token = await ensure_admin_token(db, admin_token_file)
            model: DemoModel | None = None
            if demo:
                # Its fake model is served until the workers have stopped; it used the
                # database only to set up its rows, so the pool may close now.
                model = await demo_stack.enter_async_context(open_demo_model(db, os.environ))
            warnings = await model_warnings(db)
        for warning in warnings:
            log.warning("%s", warning)
        ready = Ready(
            urls=[socket_url(listener)], admin_token=token, demo_model=model, warnings=warnings
        )
        spec = WorkerSpec(
            argv=[sys.executable, "-m", "chatd", "serve"],
            env={
                **os.environ,
                "CHATD_DATABASE_URL": url,
                "CHATD_HOME": str(settings.home.absolute()),
                "CHATD_WORKERS": "1",
                "CHATD_LISTEN_FD": str(listener.fileno()),
            },
            listen_fd=listener.fileno(),
        )
        await supervise(
            spec,
            RestartPolicy.from_settings(settings),
            settings.worker_count(),
            on_ready=lambda: on_ready(ready),
        )


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """How to start a worker: its command, environment and the inherited listening socket."""

    argv: list[str]
    env: dict[str, str]
    listen_fd: int


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    limit: int
    window_s: float
    ready_timeout_s: float
    stop_timeout_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> RestartPolicy:
        return cls(
            limit=settings.worker_restart_limit,
            window_s=settings.worker_restart_window_s,
            ready_timeout_s=settings.worker_ready_timeout_s,
            stop_timeout_s=settings.worker_stop_timeout_s,
        )


# What the actors tell the parent.
@dataclass(frozen=True, slots=True)
class WorkerReady:
    number: int
    pid: int
    worker_id: str


@dataclass(frozen=True, slots=True)
class WorkerFailed:
    number: int
    message: str  # one line: which worker, what happened, the budget


@dataclass(frozen=True, slots=True)
class StopRequested:
    signal_name: str


FleetEvent = WorkerReady | WorkerFailed | StopRequested


async def supervise(
    spec: WorkerSpec, policy: RestartPolicy, count: int, *, on_ready: Callable[[], None]
) -> None:
    """Run ``count`` workers until a signal (stop them all, return) or a worker past its
    budget (stop them all, raise ``WorkersFailed``); ``on_ready`` once all were ready."""
    send, receive = trio.open_memory_channel[FleetEvent](math.inf)
    token = trio.lowlevel.current_trio_token()

    def report(event: FleetEvent) -> None:
        """Thread-safe: hand an event to the trio side (dropped once it stopped listening)."""

        def deliver() -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                send.send_nowait(event)

        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(deliver)

    closing = threading.Event()  # the fleet is stopping: no more restarts
    hurry = threading.Event()  # asked twice: kill rather than wait
    failure: str | None = None
    # Signals are ours before the first worker starts: none can end the parent half-way.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_on_signals, signals, report, hurry)
            actors = [
                WorkerProcess.start(
                    number, spec, policy=policy, report=report, closing=closing, hurry=hurry
                )
                for number in range(1, count + 1)
            ]
            try:
                for actor in actors:
                    actor.tell(_Start())
                failure = await _until_stop(receive, count, on_ready)
            finally:
                closing.set()
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(_stop_all, actors, policy)
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise WorkersFailed(failure)
    log.info("all %d workers stopped", count)


async def _on_signals(
    signals: AsyncIterator[int],
    report: Callable[[FleetEvent], None],
    hurry: threading.Event,
) -> None:
    """The first SIGINT/SIGTERM stops the workers gracefully; a second one kills them."""
    asked = False
    async for signum in signals:
        name = signal.Signals(signum).name
        if not asked:
            asked = True
            report(StopRequested(name))
        else:
            log.warning("%s received again: killing the workers now", name)
            hurry.set()


async def _until_stop(
    events: trio.MemoryReceiveChannel[FleetEvent], count: int, on_ready: Callable[[], None]
) -> str | None:
    """Follow the workers until a stop is asked (None) or one gave up (its message)."""
    ready: set[int] = set()
    async for event in events:
        if isinstance(event, WorkerReady):
            log.info(
                "worker %d ready: pid %d, worker id %s", event.number, event.pid, event.worker_id
            )
            if len(ready) < count:
                ready.add(event.number)
                if len(ready) == count:
                    log.info("all %d workers are serving", count)
                    on_ready()
        elif isinstance(event, WorkerFailed):
            return event.message
        else:
            log.info("%s received: stopping the workers (again to kill them)", event.signal_name)
            return None
    raise AssertionError("the event channel closed while the fleet ran")


def _stop_all(actors: list[pykka.ActorRef[WorkerProcess]], policy: RestartPolicy) -> None:
    """Stop every worker at once (each in its actor's thread), then the actors."""
    replies = []
    for actor in actors:
        with contextlib.suppress(pykka.ActorDeadError):
            replies.append(actor.ask(_Stop(), block=False))
    for reply in replies:
        try:
            reply.get(timeout=policy.stop_timeout_s + _STOP_MARGIN_S)
        except Exception as exc:  # noqa: BLE001 - the others must still be stopped
            log.warning("a worker's stop failed: %s: %s", type(exc).__name__, exc)
    for actor in actors:
        actor.stop(block=True, timeout=_STOP_MARGIN_S)


# -- one worker process: its actor -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Start:
    pass


@dataclass(frozen=True, slots=True)
class _Stop:
    pass


@dataclass(frozen=True, slots=True)
class _Ready:
    generation: int
    worker_id: str


@dataclass(frozen=True, slots=True)
class _NotReady:
    generation: int


@dataclass(frozen=True, slots=True)
class _Exited:
    generation: int
    returncode: int


class WorkerProcess(pykka.ThreadingActor):
    """Worker number ``number``: its current process, restarts and stop.

    Every change of state happens in this actor's thread, one message at a time; a watcher
    thread per process (``_watch``) does the blocking waits and reports with messages tagged
    by the process's generation, so news of an older process is told apart and ignored.
    """

    # A parent that fails before stopping its actors must still exit (its workers then stop
    # by themselves, seeing their control sockets end).
    use_daemon_thread = True

    def __init__(
        self,
        number: int,
        spec: WorkerSpec,
        *,
        policy: RestartPolicy,
        report: Callable[[FleetEvent], None],
        closing: threading.Event,
        hurry: threading.Event,
    ) -> None:
        super().__init__()
        self.number = number
        self.spec = spec
        self.policy = policy
        self.report = report
        self.closing = closing
        self.hurry = hurry
        self.generation = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.worker_id = ""
        self.not_ready = False
        self.restarts: collections.deque[float] = collections.deque()
        self.done = False  # stopped, or gave up: no more processes

    def on_receive(self, message: object) -> None:
        current = getattr(message, "generation", self.generation) == self.generation
        if isinstance(message, _Start):
            self._spawn()
        elif isinstance(message, _Stop):
            self._stop()
        elif not current or self.done:
            return  # about a process already replaced, or the fleet is done with this worker
        elif isinstance(message, _Ready):
            self.worker_id = message.worker_id
            assert self.process is not None
            self.report(WorkerReady(self.number, self.process.pid, message.worker_id))
        elif isinstance(message, _NotReady):
            log.warning(
                "%s was not ready within %g s: killing it",
                self._name(),
                self.policy.ready_timeout_s,
            )
            self.not_ready = True
            assert self.process is not None
            self.process.kill()
        elif isinstance(message, _Exited):
            self._exited(message.returncode)

    def on_failure(self, *_exc_info: object) -> None:
        # A bug here must not leave a worker unsupervised: stop it, and the fleet with it.
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        self.report(WorkerFailed(self.number, f"worker {self.number}'s supervisor failed"))

    def _name(self) -> str:
        pid = self.process.pid if self.process is not None else 0
        who = f"pid {pid}, worker id {self.worker_id}" if self.worker_id else f"pid {pid}"
        return f"worker {self.number} ({who})"

    def _spawn(self) -> None:
        self.generation += 1
        self.worker_id = ""
        self.not_ready = False
        parent_end, child_end = socket.socketpair()
        try:
            self.process = subprocess.Popen(
                self.spec.argv,
                env={**self.spec.env, "CHATD_PARENT_FD": str(child_end.fileno())},
                pass_fds=(self.spec.listen_fd, child_end.fileno()),
                stdin=subprocess.DEVNULL,
                # Its own process group: a terminal's Ctrl-C reaches the parent only, which
                # then stops each worker once (a second signal would make it hurry).
                process_group=0,
            )
        except OSError as exc:
            parent_end.close()
            self.done = True
            self.report(WorkerFailed(self.number, f"worker {self.number} cannot start: {exc}"))
            return
        finally:
            child_end.close()  # the worker's copy is the only one: its end is the worker's life
        log.info("worker %d started: pid %d", self.number, self.process.pid)
        watcher = threading.Thread(
            target=_watch,
            args=(self.actor_ref, self.generation, self.process, parent_end, self.policy),
            name=f"chatd-worker-{self.number}-watch",
            daemon=True,
        )
        watcher.start()

    def _exited(self, returncode: int) -> None:
        if self.closing.is_set():
            return  # the fleet is stopping: this worker's stop reports it
        if self.not_ready:
            what = (
                f"was not ready within {self.policy.ready_timeout_s:g} s "
                "(CHATD_WORKER_READY_TIMEOUT_S)"
            )
        else:
            what = f"exited unexpectedly ({describe_exit(returncode)})"
        now = time.monotonic()
        while self.restarts and self.restarts[0] <= now - self.policy.window_s:
            self.restarts.popleft()
        if len(self.restarts) >= self.policy.limit:
            self.done = True
            n = len(self.restarts)
            self.report(
                WorkerFailed(
                    self.number,
                    f"{self._name()} {what} after {n} restart{'' if n == 1 else 's'} within "
                    f"{self.policy.window_s:g} s (CHATD_WORKER_RESTART_LIMIT="
                    f"{self.policy.limit}): all workers stopped",
                )
            )
            return
        self.restarts.append(now)
        log.warning(
            "%s %s: restarting it (restart %d of %d within %g s)",
            self._name(),
            what,
            len(self.restarts),
            self.policy.limit,
            self.policy.window_s,
        )
        self._spawn()

    def _stop(self) -> None:
        """SIGTERM, then SIGKILL after ``stop_timeout_s`` (or at once when told to hurry)."""
        self.done = True
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.policy.stop_timeout_s
        while process.poll() is None and not self.hurry.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning(
                    "%s did not stop within %g s (CHATD_WORKER_STOP_TIMEOUT_S): killing it",
                    self._name(),
                    self.policy.stop_timeout_s,
                )
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=min(remaining, _STOP_POLL_S))
        if process.poll() is None:
            process.kill()
        returncode = process.wait()
        log.info("%s stopped (%s)", self._name(), describe_exit(returncode))


def _watch(
    actor: pykka.ActorRef[WorkerProcess],
    generation: int,
    process: subprocess.Popen[bytes],
    control: socket.socket,
    policy: RestartPolicy,
) -> None:
    """A worker process's blocking waits: its readiness line, then its exit; told to its
    actor. Holds the parent's end of the control socket until the process exited."""

    def tell(message: object) -> None:
        with contextlib.suppress(pykka.ActorDeadError):
            actor.tell(message)

    with control:
        deadline = time.monotonic() + policy.ready_timeout_s
        try:
            worker_id = _read_ready(control, deadline)
        except TimeoutError:
            tell(_NotReady(generation))
        else:
            if worker_id is not None:
                tell(_Ready(generation, worker_id))
            else:
                # Its end closed without a ready line: it is exiting (a startup error, said
                # on its stderr); one that does not is not ready either.
                try:
                    process.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    tell(_NotReady(generation))
        returncode = process.wait()
    tell(_Exited(generation, returncode))


def _read_ready(control: socket.socket, deadline: float) -> str | None:
    """The worker id of a ``ready <id>`` line; None when the socket ended (or said anything
    else) first; TimeoutError past the deadline."""
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        control.settimeout(remaining)
        chunk = control.recv(_MAX_READY_LINE_BYTES)
        if not chunk or len(data) + len(chunk) > _MAX_READY_LINE_BYTES:
            return None
        data += chunk
    line = data.split(b"\n", 1)[0].decode(errors="replace")
    return line.removeprefix(_READY_PREFIX).strip() if line.startswith(_READY_PREFIX) else None


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


# -- a worker's side -------------------------------------------------------------------------


def parent_control(settings: Settings) -> socket.socket | None:
    """This worker's control socket to its parent (None when it has no parent)."""
    if settings.parent_fd < 0:
        return None
    try:
        control = socket.socket(fileno=settings.parent_fd)
        control.set_inheritable(False)  # ours alone: a process we start must not keep it
    except OSError as exc:
        raise FleetError(
            f"parent_fd (CHATD_PARENT_FD) {settings.parent_fd} is not an open socket ({exc}): "
            "it is set by `chatd serve --workers` for its workers, not by hand"
        ) from None
    return control


def report_ready(control: socket.socket, worker_id: str) -> None:
    """Tell the parent this worker serves, and as whom."""
    with contextlib.suppress(OSError):  # the parent is gone: stop_with_parent sees it
        control.send(f"{_READY_PREFIX}{worker_id}\n".encode())


async def stop_with_parent(
    control: socket.socket,
    shutdown: trio.Event,
    everything: trio.CancelScope,
    stop_timeout_s: float,
) -> None:
    """When the parent's end of the control socket ends (the parent died, however it died),
    stop gracefully; past ``stop_timeout_s``, cancel everything."""
    sock = trio.socket.from_stdlib_socket(control)
    while True:
        try:
            data = await sock.recv(64)
        except OSError:
            data = b""
        if not data:
            break  # the parent sends nothing: only its end (or a broken socket) gets here
    log.warning("the parent process is gone: stopping")
    shutdown.set()
    await trio.sleep(stop_timeout_s)  # a bound on our own stop, not a wait for a condition
    log.warning(
        "not stopped within %g s (CHATD_WORKER_STOP_TIMEOUT_S): stopping now", stop_timeout_s
    )
    everything.cancel()
