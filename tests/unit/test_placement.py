"""The placement plan: quotas that add up to the shard count, deterministic gives and takes,
and convergence of several workers applying it in turns to an even split with every shard
held."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd.domain.placement import Plan, plan_shards, quota


def test_quotas_differ_by_at_most_one_and_add_up_to_the_shard_count() -> None:
    workers = ["w-c", "w-a", "w-b"]
    quotas = [quota(64, workers, w) for w in sorted(workers)]
    assert quotas == [22, 21, 21]  # ranked by id: the first 64 % 3 get the ceiling
    assert quota(64, [], "alone") == 64  # a worker counts itself in
    assert quota(4, ["a", "b", "c", "d", "e"], "e") == 0  # more workers than shards
    with pytest.raises(ValueError, match="shard count"):
        quota(0, ["a"], "a")


def test_a_worker_above_its_quota_gives_its_highest_shards_first() -> None:
    plan = plan_shards(
        shard_count=8, live_workers=["a", "b"], worker_id="a", held=range(8), free=()
    )
    assert plan == Plan(give=(7, 6, 5, 4))


def test_a_worker_below_its_quota_takes_the_lowest_free_shards_it_may_hold() -> None:
    plan = plan_shards(
        shard_count=8, live_workers=["a", "b"], worker_id="b", held=[0], free=[7, 5, 3, 2, 1]
    )
    assert plan == Plan(take=(1, 2, 3))
    plan = plan_shards(
        shard_count=8,
        live_workers=["b"],
        worker_id="b",
        held=[],
        free=range(8),
        eligible=[6, 7],
    )
    assert plan == Plan(take=(6, 7))


def test_a_worker_at_its_quota_does_nothing() -> None:
    plan = plan_shards(
        shard_count=8, live_workers=["a", "b"], worker_id="a", held=[0, 1, 2, 3], free=[4]
    )
    assert plan == Plan()


def _run_in_turns(
    shard_count: int, workers: list[str], start: dict[str, set[int]], order: list[int]
) -> dict[str, set[int]]:
    """Apply each worker's plan in the given turn order, then round-robin until a whole round
    changes nothing; a give releases at once, a take gets what is still free."""
    held = {w: set(start.get(w, ())) for w in workers}

    def turn(w: str) -> bool:
        taken = set().union(*held.values())
        plan = plan_shards(
            shard_count=shard_count,
            live_workers=workers,
            worker_id=w,
            held=held[w],
            free=set(range(shard_count)) - taken,
        )
        held[w] -= set(plan.give)
        held[w] |= set(plan.take)
        return plan != Plan()

    for i in order:
        turn(workers[i])
    for _round in range(len(workers) + 2):
        changed = [turn(w) for w in workers]  # every worker gets its turn
        if not any(changed):
            return held
    raise AssertionError(f"no convergence: {held}")


@settings(max_examples=200, deadline=None)
@given(
    shard_count=st.integers(1, 96),
    worker_count=st.integers(1, 7),
    data=st.data(),
)
def test_workers_applying_the_plan_in_any_order_converge_to_an_even_full_split(
    shard_count: int, worker_count: int, data: st.DataObject
) -> None:
    workers = [f"worker-{i}" for i in range(worker_count)]
    # Any starting state with each shard held by at most one worker (a previous membership).
    owner = data.draw(
        st.lists(st.none() | st.sampled_from(workers), min_size=shard_count, max_size=shard_count)
    )
    start = {w: {s for s, o in enumerate(owner) if o == w} for w in workers}
    order = data.draw(st.lists(st.integers(0, worker_count - 1), max_size=50))
    held = _run_in_turns(shard_count, workers, start, order)

    counts = [len(shards) for shards in held.values()]
    assert sum(counts) == shard_count  # every shard held...
    assert len(set().union(*held.values())) == shard_count  # ...by exactly one worker
    assert max(counts) <= math.ceil(shard_count / worker_count)
    assert min(counts) >= shard_count // worker_count


def test_a_joining_worker_gets_its_share_from_the_others_highest_shards() -> None:
    start = {"a": set(range(32)), "b": set(range(32, 64))}
    held = _run_in_turns(64, ["a", "b", "c"], start, [0, 1, 2])
    assert sorted(len(s) for s in held.values()) == [21, 21, 22]
    assert set(range(22)) <= held["a"]  # the lowest shards never moved
    assert held["c"].isdisjoint(range(21))
