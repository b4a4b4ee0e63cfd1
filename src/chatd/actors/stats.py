"""The Supervisor's counters, kept apart so that its parts (shard keeper, actor supervision,
passivation) count into one record without importing each other."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class SupervisorStats:
    """Counters since start (for metrics and benchmarks); gauges are on the Supervisor."""

    activations: int = 0  # incarnations started for a message or a resume (not restarts)
    resumed: int = 0  # of which started by the resume of a gained shard
    passivations: int = 0
    crashes: int = 0
    restarts: int = 0
    parked: int = 0  # chats handed to the park hook, counted once the hook returned
    outages: int = 0  # incarnations ended by a database outage (not crashes)
    outage_restarts: int = 0  # of which restarted after their backoff
    park_retries: int = 0  # park hook calls retried because the database was unavailable
    sweeps: int = 0  # resume sweeps of the held shards that completed
    stopped: int = 0  # actors stopped because their shard was lost, or at shutdown
    lease_renewals: int = 0  # successful lease checks
    lease_failures: int = 0
    shards_gained: int = 0
    shards_lost: int = 0  # taken over, lapsed, or dropped in an outage (not handed over)
    shards_handed_over: int = 0  # given away gracefully to even out the placement
    handover_timeouts: int = 0  # handovers whose turns in progress did not end in time
