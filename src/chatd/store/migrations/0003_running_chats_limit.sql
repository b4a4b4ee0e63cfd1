-- The per-user limit on running chats (max_running_chats_per_user): see chatd.store.chats,
-- ClaimRun. A run starts in the commit that sets its chat running, which calls
-- chatd_running_chats_of before it writes.

-- An owner's chats with a run in progress (a retry wait included: it is 'running' too), found
-- without visiting the owner's other chats. The predicate is the function's, literally.
CREATE INDEX chats_running_by_owner ON chats (owner_id)
    WHERE status IN ('running', 'interrupting');

-- How many other chats of p_owner run now, counted under a transaction-level lock of that
-- owner: two commits starting runs for one owner (on any worker) take turns, and the second
-- one's count, taken after the first committed (a VOLATILE function's every query reads a
-- fresh snapshot), sees its run. An exact limit, at the cost of serialising one owner's run
-- starts, never two owners'. Every owner counts, admins included; a server with the limit off
-- (0) never calls this.
CREATE FUNCTION chatd_running_chats_of(p_owner uuid, p_chat uuid) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    -- Two-key form: its own key space, apart from the one-key locks (the migrations lock).
    PERFORM pg_advisory_xact_lock(1667785076, hashtext(p_owner::text));
    RETURN (
        SELECT count(*) FROM chats
        WHERE owner_id = p_owner AND status IN ('running', 'interrupting') AND id <> p_chat
    );
END
$$;
