"""Two "machines" on this one: chatd workers in two network namespaces sharing one PostgreSQL.

    sudo .venv/bin/python -m benchmarks.two_hosts            # needs root and `ip netns`

What it sets up (and removes at the end, whatever happens):

- a bridge ``chatd-br`` (10.77.0.1/24) in the root namespace, and two namespaces ``chatd-h1``
  and ``chatd-h2``, each with a veth into the bridge (10.77.0.11 and 10.77.0.12): two hosts
  with their own addresses that reach each other and the root namespace only over that link;
- PostgreSQL (chatd's embedded server, fsync off, in a temporary directory) reachable by the
  hosts at 10.77.0.1:5432 (a TCP relay to its Unix socket), and the fake model server at
  10.77.0.1;
- one ``chatd serve`` per host, listening on its host's address for clients and for its
  peers' internal link (``CHATD_LINK_HOST``), with a short lease (3 s).

What it checks, from the root namespace as a client, and prints as it goes:

1. the 64 shards split 32/32 between the hosts;
2. a chat created through host 1 and streamed through host 2 (forwarding and relay across
   hosts) gets its whole answer;
3. kill -9 of the host that owns a chat in the middle of a slow answer: the survivor takes its
   shards after the lease, the stream (on the survivor) gets ``preview_reset`` and the
   regenerated answer, and the chat's history holds the user message once and one answer.

Exit status 0 when every check held, 1 otherwise (the failed check is printed).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit
from uuid import UUID

import httpx2
import trio
import trio_websocket

from chatd.store.database import Database
from chatd.store.embedded import EmbeddedPostgres

BRIDGE = "chatd-br"
ROOT_ADDRESS = "10.77.0.1"
HOSTS = {"chatd-h1": "10.77.0.11", "chatd-h2": "10.77.0.12"}
PG_PORT = 5432
LLM_PORT = 8090
CHATD_PORT = 8080
LEASE_TTL_S = 3.0
STEP_TIMEOUT_S = 60.0


class CheckFailed(Exception):
    pass


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@contextlib.contextmanager
def two_hosts() -> Iterator[None]:
    """The bridge and the two namespaces; removed on exit."""
    teardown()
    try:
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{ROOT_ADDRESS}/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for n, (ns, address) in enumerate(HOSTS.items(), start=1):
            outer, inner = f"chatd-v{n}", f"chatd-v{n}p"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            sh("ip", "link", "set", inner, "netns", ns)
            sh("ip", "link", "set", outer, "master", BRIDGE, "up")
            sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", inner)
            sh("ip", "-n", ns, "link", "set", inner, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield
    finally:
        teardown()


def teardown() -> None:
    for ns in HOSTS:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True, check=False)


async def relay_tcp_to_unix(socket_path: str, *, task_status: trio.TaskStatus[None]) -> None:
    """PostgreSQL for the hosts: ROOT_ADDRESS:PG_PORT relayed to the embedded server's socket."""

    async def pipe(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            while data := await source.receive_some(65536):
                await sink.send_all(data)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await sink.aclose()

    async def handle(client: trio.SocketStream) -> None:
        try:
            server = await trio.open_unix_socket(socket_path)
        except OSError:
            await client.aclose()
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pipe, client, server)
            nursery.start_soon(pipe, server, client)

    listeners = await trio.open_tcp_listeners(PG_PORT, host=ROOT_ADDRESS)
    async with trio.open_nursery() as nursery:
        task_status.started()
        await trio.serve_listeners(handle, listeners, handler_nursery=nursery)


def chatd(*args: str) -> list[str]:
    return [sys.executable, "-m", "chatd", *args]


def in_host(ns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


async def wait_for(what: str, probe: object, timeout_s: float = STEP_TIMEOUT_S) -> None:
    """Poll ``probe`` (an async callable returning bool) until it holds, within the bound."""
    assert callable(probe)
    with trio.move_on_after(timeout_s) as scope:
        # Polled: the conditions are other processes' (HTTP answers, rows), not our events.
        while not await probe():  # noqa: ASYNC110
            await trio.sleep(0.1)
    if scope.cancelled_caught:
        raise CheckFailed(f"{what}: not within {timeout_s:g} s")


@contextlib.asynccontextmanager
async def process(
    nursery: trio.Nursery, argv: list[str], env: dict[str, str], log: Path
) -> AsyncIterator[trio.Process]:
    with log.open("wb") as out:
        run = functools.partial(
            trio.run_process, argv, env=env, stdout=out, stderr=subprocess.STDOUT, check=False
        )
        proc: trio.Process = await nursery.start(run)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(20):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()


async def main_async(work: Path) -> None:
    pg = EmbeddedPostgres(work / "pg", durable=False)
    pg.start()
    try:
        # The embedded server listens on a Unix socket only (port 5432 names its file).
        socket_path = str(pg.run_dir / f".s.PGSQL.{PG_PORT}")
        parts = urlsplit(pg.url)
        user_password = parts.netloc.split("@", 1)[0]
        host_url = f"postgresql://{user_password}@{ROOT_ADDRESS}:{PG_PORT}{parts.path}"
        await _run(work, pg.url, socket_path, host_url)
    finally:
        pg.stop()


async def _run(work: Path, local_url: str, socket_path: str, host_url: str) -> None:
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("CHATD_")}
    async with trio.open_nursery() as nursery:
        await nursery.start(relay_tcp_to_unix, socket_path)
        env = {**base_env, "CHATD_DATABASE_URL": local_url}
        await trio.run_process(chatd("migrate"), env=env, capture_stdout=True)
        made = await trio.run_process(
            chatd("token", "create", "--user", "admin", "--admin"), env=env, capture_stdout=True
        )
        token = made.stdout.decode().strip()
        llm_url = f"http://{ROOT_ADDRESS}:{LLM_PORT}"
        llm_argv = chatd(
            "fake-llm",
            "--host",
            ROOT_ADDRESS,
            "--port",
            str(LLM_PORT),
            "--chunks",
            "60",
            "--chunk-interval-ms",
            "100",
        )
        async with process(nursery, llm_argv, base_env, work / "llm.log"):
            servers: dict[str, trio.Process] = {}
            async with contextlib.AsyncExitStack() as stack:
                for ns, address in HOSTS.items():
                    host_env = {
                        **base_env,
                        "CHATD_DATABASE_URL": host_url,
                        "CHATD_HOME": str(work / ns),
                        "CHATD_LINK_HOST": address,
                        "CHATD_LEASE_TTL_S": str(LEASE_TTL_S),
                        "CHATD_MAX_RUNNING_CHATS_PER_USER": "0",
                    }
                    argv = in_host(ns, chatd("serve", "--host", address, "--port", str(CHATD_PORT)))
                    servers[ns] = await stack.enter_async_context(
                        process(nursery, argv, host_env, work / f"{ns}.log")
                    )
                await _checks(local_url, token, llm_url, servers, work)
            nursery.cancel_scope.cancel()


def url_of(ns: str) -> str:
    return f"http://{HOSTS[ns]}:{CHATD_PORT}"


async def _checks(
    db_url: str, token: str, llm_url: str, servers: dict[str, trio.Process], work: Path
) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        Database.connect(db_url, min_size=1, max_size=2) as db,
        httpx2.AsyncClient(headers=headers, timeout=30) as http,
    ):

        async def healthy() -> bool:
            for ns in HOSTS:
                try:
                    if (await http.get(f"{url_of(ns)}/healthz")).status_code != 200:
                        return False
                except httpx2.HTTPError:
                    return False
            return True

        await wait_for("both hosts serve", healthy)
        print(f"hosts up: {', '.join(f'{ns} {a}' for ns, a in HOSTS.items())}")

        provider = await http.post(
            f"{url_of('chatd-h1')}/api/v1/providers",
            json={
                "name": "fake",
                "kind": "openai-compatible",
                "base_url": llm_url + "/v1",
                "api_key": "unused",
            },
        )
        provider.raise_for_status()
        config = await http.post(
            f"{url_of('chatd-h2')}/api/v1/model-configs",
            json={
                "provider_id": provider.json()["id"],
                "name": "fake",
                "model": "fake-model",
                "context_limit": 128000,
                "is_default": True,
            },
        )
        config.raise_for_status()

        async def split() -> bool:
            rows = await db.fetch(
                "SELECT worker_id, count(*) AS n FROM shard_leases WHERE expires_at > now()"
                " GROUP BY worker_id"
            )
            return sorted(r["n"] for r in rows) == [32, 32]

        started = time.monotonic()
        await wait_for("64 shards split 32/32", split)
        print(f"1. shards split 32/32 ({time.monotonic() - started:.1f} s after both were up)")

        # 2. Created through host 1, streamed through host 2.
        created = await http.post(f"{url_of('chatd-h1')}/api/v1/chats", json={"text": "hello"})
        created.raise_for_status()
        chat_id = created.json()["id"]
        events = await _stream_until_answer(url_of("chatd-h2"), chat_id, token)
        print(f"2. chat {chat_id} made on h1, streamed on h2: {len(events)} events, answer whole")

        # 3. kill -9 of the owner mid-answer.
        created = await http.post(f"{url_of('chatd-h1')}/api/v1/chats", json={"text": "again"})
        created.raise_for_status()
        chat_id = created.json()["id"]
        owner = await db.fetchval(
            "SELECT l.worker_id FROM chats c JOIN shard_leases l ON l.shard = c.shard"
            " WHERE c.id = $1",
            UUID(chat_id),
        )
        owner_ns = _namespace_of(owner, work)
        survivor = next(ns for ns in HOSTS if ns != owner_ns)
        killed_at: list[float] = []

        async def kill_when_streaming(first_part: trio.Event) -> None:
            await first_part.wait()
            servers[owner_ns].send_signal(signal.SIGKILL)
            killed_at.append(time.monotonic())

        first_part = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill_when_streaming, first_part)
            events = await _stream_until_answer(
                url_of(survivor), chat_id, token, on_part=first_part.set
            )
        answered_s = time.monotonic() - killed_at[0]
        kinds = [e["type"] for e in events]
        if "preview_reset" not in kinds:
            raise CheckFailed(f"3. no preview_reset after the owner died: {kinds[:20]}")
        rows = await db.fetch(
            "SELECT role FROM chat_messages WHERE chat_id = $1 ORDER BY seq",
            UUID(chat_id),
        )
        roles = [r["role"] for r in rows]
        if roles != ["user", "assistant"]:
            raise CheckFailed(f"3. history after the failover is {roles}, not user + assistant")
        reset = next(e for e in events if e["type"] == "preview_reset")
        resumed = next(e for e in events[events.index(reset) :] if e["type"] == "message_part")
        since_kill = {
            name: float(str(event["_at"])) - killed_at[0]
            for name, event in (("reset", reset), ("resumed", resumed))
        }
        print(
            f"3. killed {owner_ns} (owner) mid-answer (lease {LEASE_TTL_S:g} s): the stream on"
            f" {survivor} got preview_reset {since_kill['reset']:.1f} s after the kill, the"
            f" regenerated answer's first part at {since_kill['resumed']:.1f} s, its end at"
            f" {answered_s:.1f} s; history: user, assistant"
        )


def _namespace_of(worker_id: str, work: Path) -> str:
    """The namespace whose server runs as ``worker_id`` (each host has its own home)."""
    for ns in HOSTS:
        for path in (work / ns / "workers").glob("worker-*.id"):
            if path.read_text().strip() == worker_id:
                return ns
    raise CheckFailed(f"no host runs worker {worker_id}")


async def _stream_until_answer(
    base: str, chat_id: str, token: str, on_part: object = None
) -> list[dict[str, object]]:
    """The chat's events from the start until its assistant message is committed, each with
    ``_at``, the monotonic time it arrived."""
    url = base.replace("http://", "ws://") + f"/api/v1/chats/{chat_id}/stream"
    events: list[dict[str, object]] = []
    with trio.fail_after(STEP_TIMEOUT_S):
        async with trio_websocket.open_websocket_url(
            url, extra_headers=[(b"Authorization", f"Bearer {token}".encode())]
        ) as ws:
            while True:
                frame = json.loads(await ws.get_message())
                batch = frame if isinstance(frame, list) else [frame]
                for event in batch:
                    event["_at"] = time.monotonic()
                    events.append(event)
                    if event["type"] == "message_part" and callable(on_part):
                        on_part()
                    if event["type"] == "message" and event["role"] == "assistant":
                        return events


def main() -> int:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        print("two_hosts: needs root and iproute2 (ip netns)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="chatd-two-hosts-") as tmp, two_hosts():
        work = Path(tmp)
        os.chmod(work, 0o755)  # noqa: PTH101 - the embedded server's user reads its home here
        failed: BaseException | None = None
        try:
            trio.run(main_async, work)
        except* CheckFailed as group:
            failed = group.exceptions[0]
        if failed is not None:
            print(f"FAILED: {failed}", file=sys.stderr)
            for log in sorted(work.glob("*.log")):
                print(f"--- {log.name} (tail)", file=sys.stderr)
                print(
                    "\n".join(log.read_text(errors="replace").splitlines()[-15:]), file=sys.stderr
                )
            return 1
    print("two hosts: every check held")
    return 0


if __name__ == "__main__":
    sys.exit(main())
