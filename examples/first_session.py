"""A first session with chatd's Python client (``chatd.client``), against ``make run``.

    export CHATD=http://127.0.0.1:8080 TOKEN=chatd_...   # from make run's output
    .venv/bin/python examples/first_session.py

It creates a chat, prints the answer token by token as it streams, sends a second message on the
same stream, then declares a tool that this script runs (a dynamic tool) and answers the model's
call to it. The README's "A first session" walks through it; tests/e2e/test_first_session.py runs
it against a real server, twice in a row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from chatd.client import (
    Client,
    MessageEvent,
    MessagePartEvent,
    StatusEvent,
    StreamEvent,
    TextPart,
    ToolCall,
)

# The demo model calls a tool when a message asks it to with this marker; a real model decides
# by itself from the tool's description.
CALL_THE_TOOL = (
    '[[fake-llm {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}]] '
)
GET_WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def follow_turn(events: Iterator[StreamEvent]) -> str:
    """Print the answer as it streams until the chat stops running; the status it stopped in."""
    streamed = False
    for event in events:
        if isinstance(event, MessagePartEvent) and isinstance(event.part, TextPart):
            print(event.part.text, end="", flush=True)
            streamed = True
        elif isinstance(event, MessageEvent) and event.role == "assistant":
            if not streamed:  # committed before the stream opened: it comes whole
                print(event.text, end="")
            print(f"\n[assistant message {event.seq} committed]")
            streamed = False
        elif isinstance(event, StatusEvent) and event.status not in ("running", "interrupting"):
            print(f"[chat is {event.status}]")
            return event.status
    raise RuntimeError("the stream ended")  # it does not: the client reconnects by itself


def get_weather(call: ToolCall) -> dict[str, object]:
    """The tool this client runs for the model: any JSON value is its result."""
    city = json.loads(call.arguments)["city"]
    return {"city": city, "temperature_c": 21}


def main() -> None:
    with Client(os.environ["CHATD"], os.environ["TOKEN"]) as chatd:
        chat = chatd.create_chat("Hello! Who are you?")
        print(f"chat {chat.id}, answered by model config {chat.effective_model_config_id}")
        # One stream for the whole chat: it reconnects and resumes by itself after a drop,
        # handing every event over once.
        with chatd.stream(chat.id) as events:
            follow_turn(events)
            chatd.send_message(chat.id, "Tell me more")
            follow_turn(events)

        chat = chatd.create_chat(CALL_THE_TOOL + "Weather in Paris?", dynamic_tools=[GET_WEATHER])
        status = chatd.answer_tools(chat.id, get_weather)
        print(f"[tool answered, chat is {status}] {chatd.history(chat.id)[-1].text}")


if __name__ == "__main__":
    main()
