"""The fake provider's demo reply: a few sentences streamed at a human pace.

``chatd serve --demo`` (``make run``) serves the fake provider with these defaults, so a first
chat answers out of the box; a request's own knobs (marker or header) still win.
"""

from __future__ import annotations

import math

from chatd.providers.fake.scenario import Scenario

DEMO_REPLY = (
    "Hello! I am chatd's fake model. I run inside the chatd process, so this answer needs no "
    "API key and no network. I stream a few characters at a time, the way a real model's "
    "tokens arrive, so you can watch the chat's stream fill in. For a real model, set "
    "OPENAI_API_KEY or ANTHROPIC_API_KEY and start chatd again."
)
# About a token's worth of text per chunk, 25 chunks a second after a short think.
DEMO_CHARS_PER_CHUNK = 5
DEMO_FIRST_CHUNK_DELAY_MS = 400.0
DEMO_CHUNK_INTERVAL_MS = 40.0


def demo_scenario(reply: str = DEMO_REPLY) -> Scenario:
    """Server defaults that stream ``reply`` in token-sized pieces at reading speed."""
    return Scenario(
        reply=reply,
        chunks=math.ceil(len(reply) / DEMO_CHARS_PER_CHUNK),
        first_chunk_delay_ms=DEMO_FIRST_CHUNK_DELAY_MS,
        chunk_interval_ms=DEMO_CHUNK_INTERVAL_MS,
    )
