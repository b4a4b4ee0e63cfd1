"""A bounded fuzz run of the whole HTTP API against a real ``chatd serve``.

schemathesis generates requests from the server's own OpenAPI document, valid ones and
invalid ones (wrong types, missing fields, odd strings in paths, queries and headers), sent as
a user and as an admin. No answer may be a 5xx, and the server must still be healthy after.
No request valid by the document may be refused for its shape (a 400 or 422): the document
declares every limit the server checks. Only refusals that depend on stored data, which no
schema can know, are let through: a reference to a row that does not exist, a cursor this
server did not make, an Idempotency-Key already used for another request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx2
import hypothesis
import requests
import schemathesis
import trio
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

from chatd.store import users
from chatd.store.database import Database
from tests.e2e.chatd_process import chatd_server

# Well under the suite's minute: the run stops sending once this is spent.
BUDGET_S = 25.0
MAX_EXAMPLES = 400


# Request bodies past what schemathesis generates: nesting deeper than any parser's recursion,
# invalid UTF-8 inside otherwise valid JSON, and arbitrary bytes.
HOSTILE_BODIES = st.one_of(
    st.integers(min_value=1, max_value=5_000).map(
        lambda depth: b'{"text": ' + b"[" * depth + b"]" * depth + b"}"
    ),
    st.binary(min_size=1, max_size=8).map(lambda junk: b'{"text": "' + junk + b'"}'),
    st.binary(max_size=256),
)


@dataclass
class FuzzReport:
    sent: int = 0
    hostile_bodies: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    server_errors: list[str] = field(default_factory=list)
    positive: int = 0
    rejected_valid: list[str] = field(default_factory=list)


# Refusals of a valid request that depend on what is stored (see the module's docstring).
STATEFUL_RULES = ("must name an existing", "must be a cursor this API returned")
STATEFUL_CODES = ("idempotency_key_reused",)


def _stateful(response: requests.Response) -> bool:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    rule = error.get("rule") or ""
    return error.get("code") in STATEFUL_CODES or any(r in rule for r in STATEFUL_RULES)


async def _token(db: Database, name: str, *, is_admin: bool = False) -> str:
    user = await users.create_user(db, name, is_admin=is_admin)
    _, secret = await users.create_api_token(db, user.id)
    return secret


def _fuzz(base_url: str, document: dict[str, Any], tokens: tuple[str, str]) -> FuzzReport:
    """Send generated requests until the budget is spent (runs in a thread: blocking I/O)."""
    schema = schemathesis.openapi.from_dict(document)
    operations = [
        result.ok()
        for result in schema.get_all_operations()
        if isinstance(result, Ok) and not result.ok().definition.raw.get("x-websocket")
    ]
    strategy = st.one_of(
        [
            operation.as_strategy(generation_mode=mode)
            for operation in operations
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        ]
    )
    with_body = {
        operation.label for operation in operations if "requestBody" in operation.definition.raw
    }
    report = FuzzReport()
    session = requests.Session()
    deadline = time.monotonic() + BUDGET_S

    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        phases=[hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(case=strategy, as_admin=st.booleans(), raw=st.none() | HOSTILE_BODIES)
    def send(case: Any, as_admin: bool, raw: bytes | None) -> None:
        if time.monotonic() > deadline:
            return
        token = tokens[1] if as_admin else tokens[0]
        auth = {"Authorization": f"Bearer {token}"}
        try:
            if raw is not None and case.operation.label in with_body:
                # Bytes no JSON library would write, where the route expects a JSON body.
                report.hostile_bodies += 1
                response = session.request(
                    case.method,
                    base_url + case.formatted_path,
                    params=case.query,
                    data=raw,
                    headers={**auth, "Content-Type": "application/json"},
                    timeout=10,
                )
            else:
                response = case.call(base_url=base_url, session=session, headers=auth, timeout=10)
        except (requests.exceptions.InvalidHeader, UnicodeEncodeError, ValueError):
            return  # the client library would not send this request at all
        report.sent += 1
        report.statuses[response.status_code] = report.statuses.get(response.status_code, 0) + 1
        positive = case.meta is not None and case.meta.generation.mode.is_positive
        if positive and raw is None:
            report.positive += 1
            if response.status_code in (400, 422) and not _stateful(response):
                request = response.request
                body = request.body if isinstance(request.body, bytes | None) else b""
                report.rejected_valid.append(
                    f"{request.method} {request.url} {body!r:.300} -> "
                    f"{response.status_code} {response.text[:300]}"
                )
        if response.status_code >= 500:
            request = response.request
            report.server_errors.append(
                f"{request.method} {request.url} -> {response.status_code} {response.text[:200]}"
            )

    send()
    return report


async def test_fuzzing_the_api_never_gets_a_server_error(database_url: str, db: Database) -> None:
    tokens = (await _token(db, "alice"), await _token(db, "root", is_admin=True))
    async with chatd_server(["--database-url", database_url, "--port", "0"]) as server:
        async with httpx2.AsyncClient(base_url=server.url, timeout=10) as http:
            document = (await http.get("/api/v1/openapi.json")).json()
        with trio.fail_after(BUDGET_S + 30):
            report = await trio.to_thread.run_sync(partial(_fuzz, server.url, document, tokens))
        async with httpx2.AsyncClient(base_url=server.url, timeout=10) as http:
            health = await http.get("/healthz")
    print(
        f"fuzz: {report.sent} requests ({report.hostile_bodies} with hostile bodies), "
        f"statuses {sorted(report.statuses.items())}"
    )
    assert report.sent >= 100, report
    assert report.hostile_bodies >= 10, report
    assert report.server_errors == []
    assert report.positive >= 50, report
    assert report.rejected_valid == [], "\n".join(report.rejected_valid)
    assert health.status_code == 200
    assert server.process.returncode == 0
    assert not any("Traceback" in line for line in server.output), "\n".join(server.output)
