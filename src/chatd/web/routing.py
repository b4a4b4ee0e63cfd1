"""Declaring a route once: its registration, its auth, its input and output, its docs.

Every API route is declared through ``ApiRoutes.http`` or ``ApiRoutes.websocket``, so none can
skip authentication, and the OpenAPI document is built from the same declarations.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar
from uuid import UUID, uuid4

import msgspec
import trio
from quart import Blueprint, Response, current_app, request, websocket

from chatd.domain.mailbox import IdempotencyMark, Keyed
from chatd.store.idempotency import Claimed, derived_id
from chatd.store.records import User
from chatd.web import idempotency
from chatd.web.auth import ACCESS_TOKEN_PARAM, authenticate, bearer_token, check_origin
from chatd.web.auth import require_admin as _require_admin
from chatd.web.context import Services, services
from chatd.web.decode import Query, decode_body

API_PREFIX = "/api/v1"
JSON_MEDIA_TYPE = "application/json"

B = TypeVar("B")

HttpMethod = Literal["GET", "POST", "PUT", "PATCH", "DELETE"]
ParamType = Literal["string", "integer", "boolean"]


@dataclass(frozen=True, slots=True)
class QueryParam:
    name: str
    type: ParamType
    description: str


@dataclass(frozen=True, slots=True)
class RouteSpec:
    method: HttpMethod | Literal["WEBSOCKET"]
    path: str  # Quart's rule syntax, without the prefix: /chats/<chat_id>
    summary: str
    tag: str
    body: type[Any] | None = None
    response: Any = None  # a msgspec type (Struct, list[Struct]); None: no body
    status: int = 200
    admin: bool = False
    query: tuple[QueryParam, ...] = ()
    errors: tuple[int, ...] = ()
    # The success body's content type. JSON: the view's result encoded by msgspec; anything
    # else (a text format such as Prometheus exposition): the view returns the body as ``str``.
    media_type: str = JSON_MEDIA_TYPE
    # Mutating routes only. ``commits_key``: the view's command commits the Idempotency-Key
    # in its own transaction (it sends ``Call.keyed(command)`` to the chat's actor), so a
    # retry that takes over a key whose first attempt died without an answer knows whether
    # the command was done: done, it answers with ``recover(call, **params)`` (the answer
    # rebuilt from what is stored; no body without ``recover``) and does not run the view;
    # not done, it runs the view. Without ``commits_key`` a take-over runs the view again.
    commits_key: bool = False
    recover: View | None = None

    @property
    def idempotent(self) -> bool:
        """Whether the route accepts an ``Idempotency-Key`` (every mutating one does)."""
        return self.method in ("POST", "PUT", "PATCH", "DELETE")

    @property
    def openapi_path(self) -> str:
        return API_PREFIX + re.sub(r"<(?:[a-z]+:)?([A-Za-z_]+)>", r"{\1}", self.path)


@dataclass(frozen=True, slots=True)
class Call(Generic[B]):
    """What a view gets: the authenticated caller, the decoded body and the process's parts."""

    user: User
    body: B
    query: Query
    services: Services
    # The claimed Idempotency-Key's seed (None without the header): see ``new_id``.
    idempotency_seed: UUID | None = None
    # The claimed Idempotency-Key's attempt (None without the header): see ``keyed``.
    idempotency_mark: IdempotencyMark | None = None

    def keyed(self, command: object) -> object:
        """``command`` as the chat's actor must get it: with the request's Idempotency-Key
        mark, which the actor commits in the command's own transaction."""
        if self.idempotency_mark is None:
            return command
        return Keyed(command, self.idempotency_mark)

    def new_id(self, purpose: str) -> UUID:
        """The id of a row the command creates: random, or with an Idempotency-Key the same
        for every attempt of the key, so that a retry after a crash finds the row instead of
        creating it twice (``purpose`` tells the rows of one command apart)."""
        if self.idempotency_seed is None:
            return uuid4()
        return derived_id(self.idempotency_seed, purpose)


View = Callable[..., Awaitable[Any]]


class ApiRoutes:
    """The routes of one area (chats, admin, inbox, ...) on their own blueprint."""

    def __init__(self, name: str, *, tag: str) -> None:
        self.blueprint = Blueprint(name, __name__, url_prefix=API_PREFIX)
        self.specs: list[RouteSpec] = []
        self._tag = tag

    def http(
        self,
        method: HttpMethod,
        path: str,
        *,
        summary: str,
        body: type[Any] | None = None,
        response: Any = None,
        status: int = 200,
        admin: bool = False,
        query: Sequence[QueryParam] = (),
        errors: Sequence[int] = (),
        media_type: str = JSON_MEDIA_TYPE,
        commits_key: bool = False,
        recover: View | None = None,
    ) -> Callable[[View], View]:
        """Declare an HTTP route. With a ``media_type`` other than JSON, the view returns its
        body as ``str`` (declare ``response=str`` so that the document describes it).

        A mutating route accepts an ``Idempotency-Key`` (``chatd.web.idempotency``); without
        the header the request costs nothing more."""
        spec = RouteSpec(
            method,
            path,
            summary,
            self._tag,
            body,
            response,
            status,
            admin,
            tuple(query),
            tuple(errors),
            media_type,
            commits_key,
            recover,
        )
        if recover is not None and not commits_key:
            raise ValueError(f"{method} {path}: recover needs commits_key")
        self.specs.append(spec)

        def register(view: View) -> View:
            @functools.wraps(view)
            async def endpoint(**params: str) -> Response:
                svc = services(current_app)
                user = await authenticate(svc.tokens, bearer_token(request.headers))
                if spec.admin:
                    _require_admin(user)
                key = None
                if spec.idempotent:
                    max_chars = svc.settings.idempotency_key_max_chars
                    key = idempotency.key_from(request.headers, max_chars=max_chars)
                query_args = Query(request.args, (q.name for q in spec.query))
                decoded: Any = None
                if spec.body is not None:
                    raw = await request.get_data(cache=False, as_text=False, parse_form_data=False)
                    assert isinstance(raw, bytes)
                    decoded = decode_body(raw, spec.body, max_depth=svc.settings.max_json_depth)
                if key is None:
                    result = await view(Call(user, decoded, query_args, svc), **params)
                    return _answer(spec, result).response()

                async def attempt(claimed: Claimed) -> idempotency.Answer:
                    assert key is not None
                    mark = IdempotencyMark(user.id, key, claimed.attempt)
                    call = Call(user, decoded, query_args, svc, claimed.seed, mark)
                    if spec.commits_key and claimed.committed:
                        # The first attempt's command committed; only its answer was lost.
                        done = None if spec.recover is None else await spec.recover(call, **params)
                        return _answer(spec, done)
                    return _answer(spec, await view(call, **params))

                # Compared as decoded (fields sorted), so that a retry that serialises the
                # same body differently is the same request.
                canonical = b"" if decoded is None else msgspec.json.encode(decoded, order="sorted")
                return await idempotency.run_once(
                    current_app,
                    svc,
                    user_id=user.id,
                    key=key,
                    request_fingerprint=idempotency.fingerprint(
                        method, request.path, request.query_string, canonical
                    ),
                    attempt=attempt,
                )

            self.blueprint.add_url_rule(path, view_func=endpoint, methods=[method])
            return view

        return register

    def websocket(
        self,
        path: str,
        *,
        summary: str,
        query: Sequence[QueryParam] = (),
        errors: Sequence[int] = (),
    ) -> Callable[[View], View]:
        """The view authorises the caller's access, then accepts: a refusal before the accept
        is an HTTP answer to the handshake, not an upgraded socket that closes at once."""
        # Every WebSocket may be refused with 429 (max_websockets_per_user).
        codes = tuple(sorted({*errors, 429}))
        spec = RouteSpec("WEBSOCKET", path, summary, self._tag, query=tuple(query), errors=codes)
        self.specs.append(spec)

        def register(view: View) -> View:
            @functools.wraps(view)
            async def endpoint(**params: str) -> None:
                svc = services(current_app)
                check_origin(websocket.headers, svc.settings.ws_allowed_origins)
                token = bearer_token(websocket.headers, websocket.args.get(ACCESS_TOKEN_PARAM))
                user = await authenticate(svc.tokens, token)
                names = [*(q.name for q in spec.query), ACCESS_TOKEN_PARAM]
                call = Call(user, None, Query(websocket.args, names), svc)
                # Counted from before the accept to the end of the view: past the limit, the
                # handshake gets the 429 instead of an upgraded socket.
                with svc.websockets.open(user):
                    await _until_shutdown(svc, view(call, **params))

            self.blueprint.add_websocket(path, view_func=endpoint)
            return view

        return register


def _answer(spec: RouteSpec, result: Any) -> idempotency.Answer:
    """A view's result as the HTTP answer its route declares."""
    if result is None:
        return idempotency.Answer(204 if spec.status == 200 else spec.status, None, b"")
    if spec.media_type == JSON_MEDIA_TYPE:
        encoded = msgspec.json.encode(result)
    elif isinstance(result, str):
        encoded = result.encode()
    else:
        raise TypeError(f"a {spec.media_type} view must return str, not {result!r}")
    return idempotency.Answer(spec.status, spec.media_type, encoded)


async def _until_shutdown(svc: Services, work: Awaitable[None]) -> None:
    """Run a WebSocket view; when the server shuts down, close its socket with 1001."""
    shutting_down = False
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            nonlocal shutting_down
            await svc.closing.wait()
            shutting_down = True
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        await work
        nursery.cancel_scope.cancel()
    if shutting_down:
        await websocket.close(1001, "server shutting down")
