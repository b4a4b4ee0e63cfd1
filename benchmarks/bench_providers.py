"""Chunks/s and client CPU per chunk of each adapter, SDK parsing against the fast path.

The fake provider runs in its own process (``chatd fake-llm``), so the CPU measured here
(``time.process_time`` of this process) is the adapter's alone: HTTP client, SSE parsing,
normalisation and the silence guard.

    .venv/bin/python -m benchmarks.bench_providers [--streams 50] [--chunks 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx2
import trio

from chatd.domain.conversation import Message, ModelRequest, TextPart
from chatd.domain.stream_parts import TextDelta
from chatd.providers.base import ProviderConfig, StreamParser, Timeouts
from chatd.providers.factory import build_provider


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def fake_llm_process() -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatd", "fake-llm", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the fake provider did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


async def run_case(
    url: str, kind: str, parser: StreamParser, streams: int, chunks: int
) -> dict[str, float]:
    base = f"{url}/v1" if kind == "openai" else url
    provider = build_provider(
        ProviderConfig(
            name=kind,
            kind="openai" if kind == "openai" else "anthropic",
            api_key="k",
            base_url=base,
        ),
        timeouts=Timeouts(),
        parser=parser,
    )
    knobs = json.dumps({"chunks": chunks})
    request = ModelRequest(
        model="fake", messages=(Message("user", (TextPart(f"[[fake-llm {knobs}]] hi"),)),)
    )
    received = 0

    async def one() -> None:
        nonlocal received
        async with provider.stream(request) as parts:
            async for part in parts:
                if isinstance(part, TextDelta):
                    received += 1

    # One warm-up stream opens connections and imports lazily loaded SDK modules.
    await one()
    received = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(streams):
            nursery.start_soon(one)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    await provider.aclose()
    assert received == streams * chunks, (received, streams * chunks)
    return {"chunks_per_s": received / wall, "cpu_us_per_chunk": cpu / received * 1e6}


async def main(streams: int, chunks: int, rounds: int) -> None:
    print("machine")
    print(f"  nproc:  {os.cpu_count()}")
    print(f"  cpu:    {_cpu_model()}")
    print(f"  python: {platform.python_version()}, httpx2 {httpx2.__version__}")
    print(f"\n{streams} concurrent streams x {chunks} text chunks, no delay, best of {rounds}")
    print(f"  {'adapter':<10} {'parser':<6} {'chunks/s':>10} {'CPU us/chunk':>13}")
    with fake_llm_process() as url:
        for kind in ("openai", "anthropic"):
            for parser in ("sdk", "fast"):
                results = [
                    await run_case(url, kind, parser, streams, chunks) for _ in range(rounds)
                ]
                best = min(results, key=lambda r: r["cpu_us_per_chunk"])
                print(
                    f"  {kind:<10} {parser:<6} {best['chunks_per_s']:>10.0f} "
                    f"{best['cpu_us_per_chunk']:>13.1f}"
                )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:  # noqa: PTH123 - read once at start-up
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trio.run(main, args.streams, args.chunks, args.rounds)
