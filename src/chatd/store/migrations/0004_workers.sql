-- Several workers on one database (chatd.store.cluster).

-- The live workers. Each worker's lease loop renews its row with its shard leases, with the
-- same expiry by database time: placement counts the live rows (every live worker aims at
-- ceil(shards / live workers)), and forwarding finds a shard owner's internal link here.
CREATE TABLE workers (
    worker_id  text PRIMARY KEY CHECK (length(worker_id) BETWEEN 1 AND 200),
    -- Where peers reach the worker's internal link (http://host:port); '' until it listens.
    link_url   text NOT NULL DEFAULT '' CHECK (length(link_url) <= 500),
    started_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);

CREATE INDEX workers_live ON workers (expires_at);

-- The secret every internal link request carries (workers read it at start); one row, made
-- here once with the server's strong random source (gen_random_uuid: 122 random bits each).
CREATE TABLE cluster_secret (
    id     boolean PRIMARY KEY DEFAULT true CHECK (id),
    secret text NOT NULL CHECK (length(secret) >= 32)
);

INSERT INTO cluster_secret (secret)
VALUES (replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''));
