"""The texts of chatd's own model calls (summaries and titles), and how their answers are read.

Pure. The fake provider recognises these calls by their system text (``SUMMARY_SYSTEM``,
``TITLE_SYSTEM``) and answers them deterministically, so tests can check what came back.
"""

from __future__ import annotations

SUMMARY_SYSTEM = (
    "You compress a conversation between a user and an AI assistant so that the assistant can "
    "continue it without the original messages. Write a concise summary in plain prose: the "
    "user's goals and requests, decisions made, facts and names established, files and "
    "commands involved with their outcomes, and what remains to be done. Do not address the "
    "user; do not add anything that was not said."
)

TITLE_SYSTEM = (
    "You name conversations. Reply with a title of at most six words for the conversation "
    "below: no quotes, no trailing punctuation, nothing else."
)
