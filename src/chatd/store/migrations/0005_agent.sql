-- The agent half: built-in tools chosen per model config or per chat, the effect journal of
-- side-effecting tool calls, summary boundaries (compaction), and token usage totals.

-- Which built-in tools the model may call. A model config names its allow-list; a chat may
-- name its own at creation (NULL: the model config's). Names are checked by the API against
-- chatd.tools.registry (a name this chatd does not know is ignored, so an older list stays
-- usable after a tool is renamed or removed).
ALTER TABLE model_configs
    ADD COLUMN tools text[] NOT NULL DEFAULT '{current_time,calculate}'
        CHECK (cardinality(tools) <= 64);
ALTER TABLE model_configs ALTER COLUMN compression_threshold SET DEFAULT 0.7;
ALTER TABLE chats
    ADD COLUMN tools text[] CHECK (tools IS NULL OR cardinality(tools) <= 64),
    -- Token usage of every model call made for the chat (answers, summaries, titles).
    ADD COLUMN input_tokens  bigint NOT NULL DEFAULT 0 CHECK (input_tokens >= 0),
    ADD COLUMN output_tokens bigint NOT NULL DEFAULT 0 CHECK (output_tokens >= 0),
    -- A summary asked for by hand (POST /chats/{id}/compact) is being made: the chat is
    -- 'running' for it, and a restart makes it again rather than answering.
    ADD COLUMN compacting boolean NOT NULL DEFAULT false,
    ADD CONSTRAINT chats_compacting_only_running CHECK (NOT compacting OR status = 'running');

-- A user's usage outlives the chats it was spent in (deleting a chat keeps the total).
CREATE TABLE user_usage (
    user_id       uuid PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    input_tokens  bigint NOT NULL DEFAULT 0 CHECK (input_tokens >= 0),
    output_tokens bigint NOT NULL DEFAULT 0 CHECK (output_tokens >= 0),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- A summary boundary: a message of role 'summary' whose one part holds the summary text and
-- the last seq it covers. Prompts start at the newest one.
ALTER TABLE chat_messages DROP CONSTRAINT chat_messages_role_check;
ALTER TABLE chat_messages
    ADD CONSTRAINT chat_messages_role_check CHECK (role IN ('user', 'assistant', 'tool', 'summary'));
CREATE INDEX chat_messages_summaries ON chat_messages (chat_id, seq)
    WHERE role = 'summary' AND deleted_at IS NULL;

-- The effect journal: before a built-in tool with side effects runs, its intent is committed
-- (fenced by the shard's epoch); after it, its result. A chat resumed elsewhere finds the
-- intent and never runs the call a second time. ``message_seq`` is the assistant message that
-- made the call (seqs are never reused in a chat, so a call is one row for ever).
CREATE TABLE tool_effects (
    chat_id     uuid NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    message_seq bigint NOT NULL CHECK (message_seq >= 1),
    call_id     text NOT NULL CHECK (length(call_id) BETWEEN 1 AND 200),
    tool        text NOT NULL CHECK (length(tool) BETWEEN 1 AND 64),
    started_at  timestamptz NOT NULL DEFAULT now(),
    -- JSON text, as it goes back to the model; NULL while the call runs (or after it died).
    result      text,
    finished_at timestamptz,
    PRIMARY KEY (chat_id, message_seq, call_id),
    CHECK ((result IS NULL) = (finished_at IS NULL))
);
