"""The chaos run, short: random clients under random faults, then the history checker.

A few clients send, edit, interrupt, answer tools and reconnect their streams at random for a
few seconds while the nemesis pauses, cuts and slows the database, breaks it at the commit of
a chat write, and kills chatd (``tests/faults/chaos.py``); afterwards the checker reads every
chat through the API and every client's log. Zero lost, duplicated, reordered or stranded is
the only pass. The long run is
``python -m benchmarks.chaos``. The seed is random per run and printed on failure; set
``CHAOS_SEED`` to replay one.
"""

from __future__ import annotations

import os
import random

import pytest

from tests.faults.chaos import ChaosConfig, run_chaos
from tests.faults.world import open_fault_world

pytestmark = pytest.mark.slow


async def test_random_clients_under_random_faults_lose_duplicate_and_reorder_nothing(
    database_url: str,
) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or random.randrange(2**32))
    config = ChaosConfig(
        duration_s=12.0,
        clients=3,
        chats_per_client=2,
        fault_rate_per_s=0.5,
        fault_length_s=(0.5, 2.0),
        seed=seed,
    )
    async with open_fault_world(database_url) as world:
        result = await run_chaos(world, config)
    assert result.faults, "the nemesis injected no fault"
    assert result.report.acknowledged > 0, "no request was acknowledged"
    assert result.ok, f"{result.summary()}\n{world.output()[-4000:]}"
