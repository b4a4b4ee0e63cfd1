-- Idempotency keys: the first result of a mutating request, kept per user for a named time
-- (idempotency_key_ttl_s) so that a retry with the same Idempotency-Key is answered with it
-- instead of being done again. See chatd/store/idempotency.py for the protocol.
CREATE TABLE idempotency_keys (
    user_id      uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key          text NOT NULL CHECK (length(key) BETWEEN 1 AND 1024),
    -- SHA-256 of the request (method, path, query, canonical body): same key, other request
    -- is refused instead of answered with a result that is not its own.
    fingerprint  bytea NOT NULL CHECK (octet_length(fingerprint) = 32),
    -- The ids of the rows the command creates derive from it, so that the answer of a command
    -- done before a crash is rebuilt from its own rows. New at every fresh claim.
    seed         uuid NOT NULL,
    -- NULL while the first attempt runs (pending); the recorded answer once it succeeded.
    status       integer CHECK (status BETWEEN 200 AND 299),
    content_type text,
    body         bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    -- A pending key's attempt is presumed alive until then; after it, a retry takes over.
    locked_until timestamptz NOT NULL,
    -- The worker (shard lease owner id) whose request holds the pending key: the same worker,
    -- restarted after a crash, knows the attempt is dead and takes over at once.
    claimed_by   text NOT NULL CHECK (length(claimed_by) BETWEEN 1 AND 200),
    -- The attempt that holds the key: new at every claim and every take-over. A command
    -- commits only while its attempt still holds the key, so a superseded attempt whose
    -- command is still on its way cannot do it a second time.
    attempt      uuid NOT NULL,
    -- Set by the command's own transaction (the chat actor's commit): true once the command
    -- of the key is done, whatever became of its answer. A take-over of a committed key
    -- answers from what is stored; of an uncommitted one, runs the command.
    committed    boolean NOT NULL DEFAULT false,
    PRIMARY KEY (user_id, key),
    CHECK ((status IS NULL) = (body IS NULL))
);

-- The bounded cleanup deletes the oldest expired keys first.
CREATE INDEX idempotency_keys_expires_at ON idempotency_keys (expires_at);
