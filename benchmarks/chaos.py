"""The long chaos run: ``python -m benchmarks.chaos [--duration-s N] [--clients N] ...``.

Random clients send, edit, interrupt, answer tools and reconnect their streams while the
nemesis pauses, cuts and slows PostgreSQL (through a proxy) and kills chatd with SIGKILL;
afterwards an independent checker reads every chat through the API and every client's log
(``tests/faults/chaos.py``). It runs its own throwaway PostgreSQL and a ``chatd serve``
subprocess, all on 127.0.0.1.

Prints the figures (operations acknowledged, lost, duplicated, reordered, phantom, stranded;
faults by kind; recovery seconds after each fault, p50 and max) and exits 1 if any of lost,
duplicated, reordered, phantom, stranded or unrecovered is not zero.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import trio
from tests.faults.chaos import FAULT_KINDS, ChaosConfig, ChaosResult, run_chaos
from tests.faults.world import open_fault_world, scratch_postgres

FAILING = ("lost", "duplicated", "reordered", "phantom", "stranded", "unrecovered")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__)
    parser.add_argument("--duration-s", type=float, default=120.0, help="workload length")
    parser.add_argument("--clients", type=int, default=6, help="concurrent clients")
    parser.add_argument("--chats-per-client", type=int, default=3)
    parser.add_argument(
        "--fault-rate", type=float, default=0.3, help="mean faults per second of quiet time"
    )
    parser.add_argument(
        "--fault-kinds",
        default=",".join(FAULT_KINDS),
        help=f"comma-separated subset of {', '.join(FAULT_KINDS)}",
    )
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: random)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    kinds = tuple(k for k in args.fault_kinds.split(",") if k)
    unknown = set(kinds) - set(FAULT_KINDS)
    if unknown or not kinds:
        _parser().error(f"--fault-kinds: pick from {', '.join(FAULT_KINDS)}")
    config = ChaosConfig(
        duration_s=args.duration_s,
        clients=args.clients,
        chats_per_client=args.chats_per_client,
        fault_rate_per_s=args.fault_rate,
        fault_kinds=kinds,
        seed=random.randrange(2**32) if args.seed is None else args.seed,
    )
    with scratch_postgres() as url:
        result = trio.run(_run, url, config)
    figures = result.figures()
    print(result.summary())
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    bad = {k: figures[k] for k in FAILING if figures[k]}
    if bad:
        print(f"FAILED: {bad}", file=sys.stderr)
        return 1
    return 0


async def _run(url: str, config: ChaosConfig) -> ChaosResult:
    async with open_fault_world(url) as world:
        return await run_chaos(world, config)


if __name__ == "__main__":
    sys.exit(main())
