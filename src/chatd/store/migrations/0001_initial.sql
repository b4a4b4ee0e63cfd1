-- chatd's first schema. Constraints here make bad states unrepresentable; the state machine
-- in chatd.domain is the only writer of a chat's execution state, fenced by shard leases.

CREATE FUNCTION chatd_forbid_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    col text;
    old_row jsonb := to_jsonb(OLD);
    new_row jsonb := to_jsonb(NEW);
BEGIN
    FOREACH col IN ARRAY TG_ARGV LOOP
        IF old_row -> col IS DISTINCT FROM new_row -> col THEN
            RAISE EXCEPTION '%.% cannot be changed', TG_TABLE_NAME, col
                USING ERRCODE = 'integrity_constraint_violation';
        END IF;
    END LOOP;
    RETURN NEW;
END
$$;

CREATE FUNCTION chatd_forbid_decrease() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    col text;
BEGIN
    FOREACH col IN ARRAY TG_ARGV LOOP
        IF (to_jsonb(NEW) ->> col)::numeric < (to_jsonb(OLD) ->> col)::numeric THEN
            RAISE EXCEPTION '%.% cannot decrease', TG_TABLE_NAME, col
                USING ERRCODE = 'integrity_constraint_violation';
        END IF;
    END LOOP;
    RETURN NEW;
END
$$;

CREATE FUNCTION chatd_touch_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

-- Users and API tokens --------------------------------------------------------------------

CREATE TABLE users (
    id         uuid PRIMARY KEY,
    name       text NOT NULL UNIQUE
               CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$'),
    is_admin   boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TRIGGER users_immutable BEFORE UPDATE ON users
    FOR EACH ROW EXECUTE FUNCTION chatd_forbid_change('id', 'created_at');

CREATE TABLE api_tokens (
    id           uuid PRIMARY KEY,
    user_id      uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- SHA-256 of the secret; the secret itself is shown once and never stored.
    token_hash   bytea NOT NULL UNIQUE CHECK (octet_length(token_hash) = 32),
    label        text NOT NULL DEFAULT '' CHECK (length(label) <= 200),
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz,
    CHECK (revoked_at IS NULL OR revoked_at >= created_at)
);
CREATE INDEX api_tokens_user ON api_tokens (user_id);
CREATE TRIGGER api_tokens_immutable BEFORE UPDATE ON api_tokens
    FOR EACH ROW EXECUTE FUNCTION chatd_forbid_change('id', 'user_id', 'token_hash', 'created_at');

-- Providers and model configuration -------------------------------------------------------

CREATE TABLE providers (
    id         uuid PRIMARY KEY,
    name       text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 100),
    kind       text NOT NULL CHECK (kind IN ('openai', 'anthropic', 'openai-compatible')),
    base_url   text CHECK (base_url ~ '^https?://[^[:space:]]+$'),
    api_key    text CHECK (length(api_key) <= 4096),
    enabled    boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    -- An OpenAI-compatible server has no well-known address.
    CHECK (kind <> 'openai-compatible' OR base_url IS NOT NULL)
);
CREATE TRIGGER providers_touch BEFORE UPDATE ON providers
    FOR EACH ROW EXECUTE FUNCTION chatd_touch_updated_at();

CREATE TABLE model_configs (
    id                    uuid PRIMARY KEY,
    provider_id           uuid NOT NULL REFERENCES providers (id) ON DELETE RESTRICT,
    name                  text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 100),
    model                 text NOT NULL CHECK (length(model) BETWEEN 1 AND 200),
    context_limit         integer NOT NULL CHECK (context_limit > 0),
    -- Fraction of context_limit at which history gets compressed.
    compression_threshold double precision NOT NULL DEFAULT 0.8
                          CHECK (compression_threshold > 0 AND compression_threshold <= 1),
    options               jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(options) = 'object'),
    is_default            boolean NOT NULL DEFAULT false,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);
-- At most one default model config.
CREATE UNIQUE INDEX model_configs_one_default ON model_configs ((true)) WHERE is_default;
CREATE INDEX model_configs_provider ON model_configs (provider_id);
CREATE TRIGGER model_configs_touch BEFORE UPDATE ON model_configs
    FOR EACH ROW EXECUTE FUNCTION chatd_touch_updated_at();

CREATE TABLE user_prompts (
    user_id    uuid PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    prompt     text NOT NULL CHECK (length(prompt) <= 100000),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TRIGGER user_prompts_touch BEFORE UPDATE ON user_prompts
    FOR EACH ROW EXECUTE FUNCTION chatd_touch_updated_at();

-- Shard leases ----------------------------------------------------------------------------

CREATE TABLE shard_leases (
    shard      integer PRIMARY KEY CHECK (shard >= 0),
    worker_id  text NOT NULL CHECK (length(worker_id) BETWEEN 1 AND 200),
    -- Increases every time the shard changes hands; chat writes are fenced by it.
    epoch      bigint NOT NULL CHECK (epoch >= 1),
    expires_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Chats -----------------------------------------------------------------------------------

CREATE TABLE chats (
    id                 uuid PRIMARY KEY,
    owner_id           uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    shard              integer NOT NULL CHECK (shard >= 0),
    title              text NOT NULL DEFAULT '' CHECK (length(title) <= 500),
    status             text NOT NULL DEFAULT 'waiting'
                       CHECK (status IN ('waiting', 'running', 'interrupting',
                                         'requires_action', 'error')),
    archived           boolean NOT NULL DEFAULT false,
    history_version    bigint NOT NULL DEFAULT 0 CHECK (history_version >= 0),
    generation_attempt bigint NOT NULL DEFAULT 0 CHECK (generation_attempt >= 0),
    -- Retries of the current step: a durable countdown that survives restarts and moves.
    retry_count        integer NOT NULL DEFAULT 0 CHECK (retry_count >= 0),
    retry_at           timestamptz,
    last_error         jsonb CHECK (last_error IS NULL OR jsonb_typeof(last_error) = 'object'),
    action_deadline    timestamptz,
    -- Dynamic tools declared by the client: [{name, description, input_schema}, ...].
    dynamic_tools      jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(dynamic_tools) = 'array'),
    model_config_id    uuid REFERENCES model_configs (id) ON DELETE SET NULL,
    system_prompt      text NOT NULL DEFAULT '' CHECK (length(system_prompt) <= 200000),
    -- Highest chat_messages.seq ever used in this chat (seqs are never reused).
    last_message_seq   bigint NOT NULL DEFAULT 0 CHECK (last_message_seq >= 0),
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CHECK (status <> 'error' OR last_error IS NOT NULL),
    CHECK ((status = 'requires_action') = (action_deadline IS NOT NULL)),
    CHECK (retry_at IS NULL OR status = 'running')
);
CREATE INDEX chats_owner_recent ON chats (owner_id, archived, updated_at DESC, id);
-- A new owner of a shard resumes the chats that still have work to do.
CREATE INDEX chats_runnable ON chats (shard)
    WHERE status IN ('running', 'interrupting', 'requires_action');
CREATE TRIGGER chats_immutable BEFORE UPDATE ON chats
    FOR EACH ROW EXECUTE FUNCTION chatd_forbid_change('id', 'owner_id', 'shard', 'created_at');
-- Versions and seqs only move forward: clients and relays drop stale parts by them.
CREATE TRIGGER chats_monotonic BEFORE UPDATE ON chats
    FOR EACH ROW EXECUTE FUNCTION
    chatd_forbid_decrease('history_version', 'generation_attempt', 'last_message_seq');
CREATE INDEX chats_model_config ON chats (model_config_id) WHERE model_config_id IS NOT NULL;
CREATE TRIGGER chats_touch BEFORE UPDATE ON chats
    FOR EACH ROW EXECUTE FUNCTION chatd_touch_updated_at();

CREATE TABLE chat_messages (
    id              uuid PRIMARY KEY,
    chat_id         uuid NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    -- Position in the chat, increasing, never reused: the stream resume cursor.
    seq             bigint NOT NULL CHECK (seq >= 1),
    role            text NOT NULL CHECK (role IN ('user', 'assistant', 'tool')),
    -- Typed parts: [{"type": "text", "text": ...}, {"type": "tool_call", ...}, ...].
    content         jsonb NOT NULL CHECK (jsonb_typeof(content) = 'array'),
    usage           jsonb CHECK (usage IS NULL OR jsonb_typeof(usage) = 'object'),
    history_version bigint NOT NULL CHECK (history_version >= 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    deleted_at      timestamptz,
    UNIQUE (chat_id, seq)
);
CREATE INDEX chat_messages_live ON chat_messages (chat_id, seq) WHERE deleted_at IS NULL;
CREATE TRIGGER chat_messages_immutable BEFORE UPDATE ON chat_messages
    FOR EACH ROW EXECUTE FUNCTION chatd_forbid_change('id', 'chat_id', 'seq', 'role', 'created_at');

CREATE TABLE queued_messages (
    id         uuid PRIMARY KEY,
    chat_id    uuid NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    -- Order in the queue; promotion moves a message to a position below the current head.
    position   bigint NOT NULL,
    content    jsonb NOT NULL CHECK (jsonb_typeof(content) = 'array'),
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (chat_id, position)
);
CREATE TRIGGER queued_messages_immutable BEFORE UPDATE ON queued_messages
    FOR EACH ROW EXECUTE FUNCTION chatd_forbid_change('id', 'chat_id', 'created_at');

-- Inbox notifications and diff status ---------------------------------------------------

CREATE TABLE inbox_notifications (
    id         uuid PRIMARY KEY,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    chat_id    uuid REFERENCES chats (id) ON DELETE CASCADE,
    kind       text NOT NULL CHECK (kind IN ('turn_finished', 'failed', 'action_required')),
    title      text NOT NULL CHECK (length(title) <= 500),
    body       text NOT NULL DEFAULT '' CHECK (length(body) <= 10000),
    read_at    timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK (read_at IS NULL OR read_at >= created_at)
);
CREATE INDEX inbox_by_user ON inbox_notifications (user_id, created_at DESC, id);
CREATE INDEX inbox_unread ON inbox_notifications (user_id) WHERE read_at IS NULL;
CREATE INDEX inbox_by_chat ON inbox_notifications (chat_id) WHERE chat_id IS NOT NULL;
CREATE TRIGGER inbox_immutable BEFORE UPDATE ON inbox_notifications
    FOR EACH ROW EXECUTE FUNCTION chatd_forbid_change('id', 'user_id', 'chat_id', 'kind', 'created_at');

CREATE TABLE chat_diff_statuses (
    chat_id            uuid PRIMARY KEY REFERENCES chats (id) ON DELETE CASCADE,
    branch             text CHECK (length(branch) <= 500),
    remote             text CHECK (length(remote) <= 2000),
    pull_request_url   text CHECK (pull_request_url ~ '^https?://[^[:space:]]+$'),
    pull_request_state text CHECK (pull_request_state IN ('open', 'draft', 'closed', 'merged')),
    additions          integer NOT NULL DEFAULT 0 CHECK (additions >= 0),
    deletions          integer NOT NULL DEFAULT 0 CHECK (deletions >= 0),
    changed_files      integer NOT NULL DEFAULT 0 CHECK (changed_files >= 0),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE TRIGGER chat_diff_statuses_touch BEFORE UPDATE ON chat_diff_statuses
    FOR EACH ROW EXECUTE FUNCTION chatd_touch_updated_at();
