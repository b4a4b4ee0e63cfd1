"""``chatd scaletest``: load a running chatd through its public API, as real clients would.

``chatd scaletest chat`` creates chats over HTTP as a user of its own, follows each one's
stream WebSocket (all through ``chatd.client``), runs turns in a closed loop (every chat at
once, or ramped) or open loop (``--rate``), and reports per-phase latency, errors by stage, and
the server's own figures read from ``/metrics``.
"""
