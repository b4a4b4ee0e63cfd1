"""Even shard placement: which shards one worker takes and which it gives away.

Every live worker runs the same pure plan on what its lease check read, with no coordinator:
the live workers, sorted by id, split the shards into quotas that differ by at most one (the
first ``shard_count % live`` workers get ``ceil(shard_count / live)``, the rest the floor), so
the quotas add up to the shard count exactly: once every worker holds its quota, every shard is
held and no worker holds more than the ceiling.

A worker above its quota gives away its highest-numbered shards; one below takes the
lowest-numbered free ones. Being deterministic, two workers never fight over a shard: a giver
and a taker agree on the direction, and two takers racing for the same free shard are settled
by the lease row (one of them gets it, the other takes the next one at its next check). While
workers disagree on who is live (a join or a death not seen by all yet), shards may move once
more than needed; they settle as soon as every worker read the same membership.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Plan:
    """What a worker does at this check: shards to take (free now) and to give away."""

    take: tuple[int, ...] = ()
    give: tuple[int, ...] = ()


def quota(shard_count: int, live_workers: Collection[str], worker_id: str) -> int:
    """How many shards ``worker_id`` aims at among ``live_workers`` (it counts itself in)."""
    if shard_count < 1:
        raise ValueError(f"shard count must be at least 1, got {shard_count}")
    ranked = sorted(set(live_workers) | {worker_id})
    floor, extra = divmod(shard_count, len(ranked))
    return floor + (1 if ranked.index(worker_id) < extra else 0)


def plan_shards(
    *,
    shard_count: int,
    live_workers: Collection[str],
    worker_id: str,
    held: Collection[int],
    free: Collection[int],
    eligible: Collection[int] | None = None,
) -> Plan:
    """The plan of ``worker_id``, which holds ``held`` (shards it serves, not counting those
    it is handing over already) while ``free`` have no live lease.

    ``eligible`` limits the shards it may take (default: all of them).
    """
    aim = quota(shard_count, live_workers, worker_id)
    mine = sorted(set(held))
    if len(mine) > aim:
        return Plan(give=tuple(mine[aim:][::-1]))
    allowed = set(free) - set(mine)
    if eligible is not None:
        allowed &= set(eligible)
    wanted = aim - len(mine)
    return Plan(take=tuple(sorted(allowed)[:wanted]))
