"""A fake LLM provider: a real HTTP server speaking OpenAI's and Anthropic's wire formats.

``POST /v1/chat/completions`` (OpenAI; SDK ``base_url=server.url + "/v1"``) and
``POST /v1/messages`` (Anthropic; ``base_url=server.url``), streaming or not, byte-compatible
enough that the official SDKs parse it as the real thing. Used by the tests, the demo and the
load test (``chatd fake-llm --port N``). ``demo_scenario()`` is the demo's reply: a few
sentences at reading speed, served as the defaults of the fake model of ``chatd serve --demo``.

Knobs come from the server's defaults, then a ``[[fake-llm {...json...}]]`` marker in the last
user message that has text, then an ``x-fake-llm: {...json...}`` request header; later sources
win knob by knob. A bad knob is a 400 in the provider's error shape naming it.

===================== ======= ==========================================================
knob                  default meaning
===================== ======= ==========================================================
chunks                8       text chunks in the reply: "w1 ", "w2 ", ...
reply                 null    the reply text instead, split into ``chunks`` pieces
first_chunk_delay_ms  0       after the headers, before the first content chunk
chunk_interval_ms     0       between content chunks
tool_calls            []      ``[{"name": ..., "arguments": {...}}]``: call these tools
                              (several = parallel calls), unless the last message is a
                              tool result: that gets the text reply, so tool loops end
steps                 []      a scripted turn, see below; when non-empty, ``tool_calls``
                              is not used
argument_chunks       3       pieces each tool call's arguments JSON is streamed in
text_before_tools     false   a tool step also streams the text reply first
reasoning_chunks      0       Anthropic: a thinking block ("r1 ", ...) and a signature;
                              OpenAI: ``reasoning_content`` deltas (DeepSeek/vLLM style)
finish                "stop"  "length": finish_reason length / stop_reason max_tokens
input_tokens          null    reported prompt tokens (default: ceil(characters of the
                              messages' strings / 4))
output_tokens         null    reported completion tokens (default: content chunks)
fault                 null    a failure to inject, see below
fault_after_chunks    2       content chunks sent before a stream fault strikes (past the
                              reply's last chunk: after it)
fault_times           null    inject the fault only into the first N requests with the
                              same ``fault_key`` (counted per server), then succeed
fault_key             null    default: the request's own knobs as canonical JSON
retry_after_s         null    ``retry-after`` in seconds (rate_limit: 1 unless set; other
                              errors carry it only when a retry-after knob is set)
retry_after_ms        null    also send ``retry-after-ms`` (``retry-after``: rounded up)
retry_after_http_date false   ``retry-after`` as an HTTP date (wall clock + seconds)
context_window        null    the limit ``context_length`` quotes (128000 / 200000)
===================== ======= ==========================================================

A request's ``max_tokens`` (``max_completion_tokens``) below the chunk count truncates the
text and finishes with length / max_tokens. Output tokens count one per content chunk.

Scripted turns: ``steps`` is a list of model steps, each ``{"tool_calls": [{"name": ...,
"arguments": {...}}, ...]}`` (a non-empty list), ``{"reply": "text"}`` (split into ``chunks``
pieces), or both (the text goes first when the step's ``"text_before_tools": true``, or,
without that key, when the ``text_before_tools`` knob is on). A request plays step N, where N
is the number of assistant messages after the last user message that has text (the one with
the marker; Anthropic's user messages holding only ``tool_result`` blocks do not count as one,
OpenAI's ``tool`` messages are not user messages); past the last step it gets the text reply
(``reply`` or "w1 w2 ..."). So feeding each step's tool results back plays the next step, for
example ``[{"tool_calls": [write]}, {"tool_calls": [edit]}, {"tool_calls": [read, execute]},
{"reply": "done"}]``. A step's call ids (``call_`` / ``toolu_`` + id) are a hash of the
request's messages (and Anthropic's system), the step index and the call index: unique within
a turn, and the same when the same request comes again (a retry). ``tool_calls`` keeps its own
ids (per request, not repeatable).

chatd's own calls: a request whose system text is ``chatd.domain.agent_prompts.SUMMARY_SYSTEM``
or ``TITLE_SYSTEM`` exactly (OpenAI: the first system or developer message's content;
Anthropic: ``system``, a string or its text blocks joined) is a summary or title call. Markers
in its messages are ignored (the conversation it carries holds users' markers), but the
header's knobs and the server's defaults still apply, so faults, ``fault_times``, timing and
usage knobs work; ``chunks``, ``reply``, ``tool_calls`` and ``steps`` do not. With ``text`` the
text of the last user message that has text, its markers removed and its whitespace collapsed
to single spaces, the reply is

- summary: ``"Summary: " + text[:200]`` (trailing whitespace stripped);
- title: the first 6 words of ``text`` without trailing punctuation, or ``"Untitled"``.

Both stream (or not) like any reply, one chunk per word, so their output tokens (unless the
``output_tokens`` knob is set) are their word counts; input tokens as for any request.

Timing: a stream's headers go out at once with its opening event (OpenAI's role chunk;
Anthropic's ``message_start`` and a ``ping``); ``first_chunk_delay_ms`` then holds back the
first content chunk (text, reasoning or tool-call arguments). A non-streaming reply comes after
the time its stream would take. Error statuses answer at once.

Faults (OpenAI status / Anthropic status and ``error.type``):

- ``rate_limit``: 429 ``rate_limit_exceeded`` / 429 ``rate_limit_error``, with ``retry-after``
- ``server_error``: 500 ``server_error`` / 500 ``api_error``
- ``unavailable``: 503 ``server_error`` / 503 ``api_error``
- ``overloaded``: 503 with "currently overloaded" in the message (OpenAI has no 529) /
  529 ``overloaded_error``
- ``auth``: 401 ``invalid_api_key`` (the key masked in the message, as OpenAI does) /
  401 ``authentication_error``; also what a wrong key gets when ``expected_api_key`` is set
- ``context_length``: 400 ``context_length_exceeded`` / 400 "prompt is too long: N tokens >
  M maximum"
- ``bad_request``: 400 ``invalid_request_error``; ``not_found``: 404 model not found
- ``cut``: stream ``fault_after_chunks`` chunks, then close the TCP connection mid-body
- ``truncated``: end the HTTP response cleanly without the finish chunk / ``[DONE]`` or
  ``message_delta`` / ``message_stop``
- ``silent``: headers and ``fault_after_chunks`` chunks, then nothing until the client leaves
  (or an hour passes: then the connection is closed)
- ``midstream_error``: after ``fault_after_chunks`` chunks, an in-stream error (OpenAI a
  ``data: {"error": {... "server_error"}}`` line; Anthropic ``event: error`` with
  ``overloaded_error``), then a clean end of the response

For non-streaming requests: ``cut`` sends half the body and closes; ``truncated`` sends half
the JSON with a matching content-length; ``silent`` sends the headers only;
``midstream_error`` becomes ``server_error``.

For tests: ``server.requests`` (``RecordedRequest``: headers, ``body`` (the parsed JSON),
``provider``, ``purpose`` (``Purpose.CHAT``, ``SUMMARY`` or ``TITLE``), knobs, fault, status,
``completed``, ``client_disconnected``, ``finished``, connection number; ``system_text()``, the
system prompt as one string (OpenAI's system/developer messages joined by a blank line), and
``messages()``, the rest of the conversation as ``(role, text)`` pairs shaped the same for
both formats: ``user`` / ``assistant`` / ``tool``, each Anthropic ``tool_result`` block a
``tool`` pair, tool calls without text) and waits with no polling, to bound with
``trio.fail_after``: ``wait_for_requests(n)``, ``wait_for_disconnect(index=None)``,
``wait_for_finished(index)``, ``wait_until(predicate)``.
Pauses are trio timers, so a test on ``trio.testing.MockClock`` skips them.
"""

from chatd.providers.fake.demo import DEMO_REPLY, demo_scenario
from chatd.providers.fake.scenario import (
    KNOB_HEADER,
    KNOBS,
    Fault,
    KnobError,
    Purpose,
    Scenario,
    StepSpec,
    ToolCallSpec,
    knobs_header,
    knobs_marker,
)
from chatd.providers.fake.server import FakeLLM, RecordedRequest, open_fake_llm, serve_fake_llm

__all__ = [
    "DEMO_REPLY",
    "KNOBS",
    "KNOB_HEADER",
    "FakeLLM",
    "Fault",
    "KnobError",
    "Purpose",
    "RecordedRequest",
    "Scenario",
    "StepSpec",
    "ToolCallSpec",
    "demo_scenario",
    "knobs_header",
    "knobs_marker",
    "open_fake_llm",
    "serve_fake_llm",
]
