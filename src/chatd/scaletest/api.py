"""The driver's HTTP side of chatd's public API: setup, chat creation, sends, metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal
from uuid import uuid4

import httpx2
import trio

API = "/api/v1"
# Answers a loaded server may give to a request it could serve a moment later.
_RETRYABLE = frozenset({429, 503})
_RETRY_BASE_DELAY_S = 0.1
_RETRY_MAX_DELAY_S = 2.0


class RequestFailed(Exception):
    """A request the run needed failed: the HTTP status (0: no answer) and what was said."""

    def __init__(self, what: str, status: int, detail: str) -> None:
        super().__init__(f"{what}: {'HTTP ' + str(status) if status else 'no answer'}: {detail}")
        self.status = status


@dataclass(slots=True)
class Retries:
    """Requests tried again after a 429 or 503 from the server."""

    http: int = 0


class ChatdApi:
    """One connection pool to the server, shared by every simulated client."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        connections: int,
        timeout_s: float,
        max_attempts: int,
    ) -> None:
        self._http = httpx2.AsyncClient(
            base_url=url,
            headers={"authorization": f"Bearer {token}"},
            limits=httpx2.Limits(
                max_connections=connections, max_keepalive_connections=connections
            ),
            # Thousands of simulated clients share these connections: waiting for a free one
            # is the driver's own queue, not the server's slowness, and is bounded by the
            # run's timeout; connecting, sending and reading each get timeout_s.
            timeout=httpx2.Timeout(timeout_s, pool=None),
        )
        self._max_attempts = max_attempts
        self.retries = Retries()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def check_admin(self) -> None:
        """Fail early, in words, when the server is unreachable or the token is not an admin's."""
        me = await self._json("read the token's user", "GET", f"{API}/users/me", retry=False)
        if not me.get("is_admin"):
            raise RequestFailed(
                "check the token",
                403,
                "the load driver needs an admin token (chatd token create --user NAME --admin)",
            )

    async def add_model(
        self, *, name: str, llm_url: str, kind: Literal["openai", "anthropic"]
    ) -> str:
        """A provider pointing at the fake LLM and a model config on it (not the default):
        the model config's id."""
        _provider_id, config_id = await self.add_provider_and_model(
            name=name, llm_url=llm_url, kind=kind
        )
        return config_id

    async def add_provider_and_model(
        self, *, name: str, llm_url: str, kind: Literal["openai", "anthropic"]
    ) -> tuple[str, str]:
        """``add_model``, answering both ids, provider first (to remove them afterwards)."""
        base_url = llm_url.rstrip("/") + ("/v1" if kind == "openai" else "")
        provider_kind = "openai-compatible" if kind == "openai" else "anthropic"
        provider = await self._json(
            "create the provider",
            "POST",
            f"{API}/providers",
            {"name": name, "kind": provider_kind, "base_url": base_url, "api_key": "scaletest"},
        )
        config = await self._json(
            "create the model config",
            "POST",
            f"{API}/model-configs",
            {
                "provider_id": provider["id"],
                "name": name,
                "model": "fake-model",
                "context_limit": 1_000_000,
            },
        )
        return str(provider["id"]), str(config["id"])

    async def remove_model(self, provider_id: str, config_id: str) -> None:
        """Delete what ``add_model`` made: the model config, then its provider (chats that
        used the config are left without one, and follow the default)."""
        await self._delete("delete the model config", f"{API}/model-configs/{config_id}")
        await self._delete("delete the provider", f"{API}/providers/{provider_id}")

    async def _delete(self, what: str, path: str) -> None:
        try:
            response = await self._http.delete(path)
        except httpx2.HTTPError as exc:
            raise RequestFailed(what, 0, f"{type(exc).__name__}: {exc}") from None
        if not response.is_success and response.status_code != 404:
            raise RequestFailed(what, response.status_code, response.text[:300])

    async def create_chat(self, text: str, *, title: str, model_config_id: str) -> dict[str, Any]:
        return await self._json(
            "create a chat",
            "POST",
            f"{API}/chats",
            {"text": text, "title": title, "model_config_id": model_config_id},
        )

    async def send_message(self, chat_id: str, text: str) -> dict[str, Any]:
        return await self._json(
            "send a message", "POST", f"{API}/chats/{chat_id}/messages", {"text": text}
        )

    async def metrics(self) -> str | None:
        """The server's ``/metrics`` text, or None when it has none or refuses."""
        try:
            response = await self._http.get(f"{API}/metrics")
        except httpx2.HTTPError:
            return None
        return response.text if response.status_code == 200 else None

    async def _json(
        self,
        what: str,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        retry: bool = True,
    ) -> dict[str, Any]:
        attempt = 1
        # A command retried after a 503 may have been done the first time (a worker lost
        # mid-command): its key makes the retry answer as done instead of doing it twice.
        headers = {"Idempotency-Key": str(uuid4())} if retry and method == "POST" else None
        while True:
            try:
                response = await self._http.request(method, path, json=body, headers=headers)
            except httpx2.HTTPError as exc:
                raise RequestFailed(what, 0, f"{type(exc).__name__}: {exc}") from None
            if response.is_success:
                answer: dict[str, Any] = response.json()
                return answer
            if not retry or response.status_code not in _RETRYABLE:
                raise RequestFailed(what, response.status_code, response.text[:300])
            if attempt >= self._max_attempts:
                raise RequestFailed(
                    what, response.status_code, f"still refused after {attempt} attempts"
                )
            self.retries.http += 1
            await trio.sleep(_retry_delay_s(response, attempt))
            attempt += 1


def _retry_delay_s(response: httpx2.Response, attempt: int) -> float:
    backoff = min(_RETRY_BASE_DELAY_S * 2.0 ** (attempt - 1), _RETRY_MAX_DELAY_S)
    header: str = response.headers.get("retry-after", "0")
    try:
        asked = float(header)
    except ValueError:
        asked = 0.0
    return max(backoff, asked) if math.isfinite(asked) else backoff
