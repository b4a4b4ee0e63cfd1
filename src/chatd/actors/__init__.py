"""Actor runtime: ChatActor, Supervisor, Router and shard leases."""
