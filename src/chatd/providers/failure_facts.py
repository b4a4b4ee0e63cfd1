"""Read the facts of a provider failure off whatever exception reported it.

The SDKs and httpx2 report the same failure in different shapes, and where it happens changes
the shape too (found in openai 3.54 / anthropic 2.12 / httpx2 2.16):

- an HTTP error status: ``openai.APIStatusError`` (``body`` is the inner ``error`` object) or
  ``anthropic.APIStatusError`` (``body`` is the whole ``{"type": "error", "error": {...}}``);
- an error event inside an SSE stream: openai raises a bare ``openai.APIError`` whose ``body`` is
  the ``error`` object; anthropic raises an ``APIStatusError`` built on the 200 response of the
  stream, so its ``status_code`` is 200 and only ``type`` tells what happened;
- a transport failure: before the response both SDKs raise ``APITimeoutError`` /
  ``APIConnectionError`` chained (``__cause__``) to the httpx2 exception; during the stream
  openai wraps the same way, while anthropic lets the raw httpx2 exception through. A body cut
  mid-stream is ``httpx2.RemoteProtocolError`` ("peer closed connection without sending complete
  message body").

``classify`` (pure, in ``chatd.domain.failure_classifier``) decides what the facts mean.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import anthropic
import httpx2
import openai

from chatd.domain.failure_classifier import FailureFacts, Transport, classify
from chatd.providers.errors import ProviderError, StreamInterrupted, StreamSilence


class StreamErrorEvent(Exception):
    """The provider's stream carried an error event.

    Raised by an adapter that parses SSE itself (the fast path); the SDK paths raise their own
    exceptions, read below. ``error_type`` is the provider's, e.g. ``overloaded_error``.
    """

    def __init__(
        self, error_type: str | None, message: str, *, error_code: str | None = None
    ) -> None:
        super().__init__(f"{error_type or 'error'}: {message}")
        self.error_type = error_type
        self.error_code = error_code
        self.message = message


def facts_from_exception(exc: BaseException, provider: str) -> FailureFacts:  # noqa: PLR0911, PLR0912
    """The facts of ``exc``, raised while talking to ``provider``. Never raises."""
    exc = _single_leaf(exc)
    match exc:
        case StreamSilence():
            return FailureFacts(provider, Transport.STREAM_SILENCE, message=str(exc))
        case StreamInterrupted():
            return FailureFacts(provider, Transport.STREAM_INTERRUPTED, message=str(exc))
        case StreamErrorEvent():
            return FailureFacts(
                provider,
                Transport.MIDSTREAM_ERROR,
                error_type=exc.error_type,
                error_code=exc.error_code,
                message=exc.message,
            )
        case openai.ContentFilterFinishReasonError():
            return FailureFacts(
                provider, Transport.OTHER, error_code="content_filter", message=str(exc)
            )
        case openai.APIStatusError() | anthropic.APIStatusError():
            return _status_facts(exc, provider)
        case openai.APITimeoutError() | anthropic.APITimeoutError():
            return FailureFacts(provider, Transport.TIMEOUT, message=exc.message)
        case openai.APIConnectionError() | anthropic.APIConnectionError():
            cause = _httpx_cause(exc)
            if cause is not None:
                return _transport_facts(cause, provider)
            return FailureFacts(provider, Transport.CONNECTION, message=exc.message)
        case openai.APIResponseValidationError() | anthropic.APIResponseValidationError():
            return FailureFacts(provider, Transport.OTHER, message=exc.message)
        case openai.APIError() | anthropic.APIError():
            # openai: an error event inside the stream (see the module docstring).
            error_type, error_code, message = _body_fields(exc.body)
            return FailureFacts(
                provider,
                Transport.MIDSTREAM_ERROR,
                error_type=error_type,
                error_code=error_code,
                message=message or exc.message,
            )
        case httpx2.HTTPStatusError():
            return FailureFacts(
                provider,
                Transport.HTTP_STATUS,
                status_code=exc.response.status_code,
                headers=_headers(exc.response.headers),
                message=str(exc),
            )
        case httpx2.TransportError():
            return _transport_facts(exc, provider)
        case TimeoutError():
            return FailureFacts(provider, Transport.TIMEOUT, message=str(exc))
        case ConnectionError():
            return FailureFacts(provider, Transport.CONNECTION, message=str(exc))
        case _:
            return FailureFacts(provider, Transport.OTHER, message=f"{type(exc).__name__}: {exc}")


def provider_error(
    exc: BaseException,
    provider: str,
    *,
    secrets: Iterable[str] = (),
    now: datetime | None = None,
) -> ProviderError:
    """Classify ``exc`` into the ``ProviderError`` callers see; ``raise ... from exc`` it.

    Pass the API key in use as a secret: it is redacted from the detail even where it does not
    look like a key.
    """
    when = datetime.now(UTC) if now is None else now
    return ProviderError(classify(facts_from_exception(exc, provider), now=when, secrets=secrets))


def _status_facts(
    exc: openai.APIStatusError | anthropic.APIStatusError, provider: str
) -> FailureFacts:
    error_type, error_code, message = _body_fields(exc.body)
    if isinstance(exc, anthropic.APIStatusError):
        error_code = error_code or exc.error_code
    status = exc.status_code
    if status < 400:
        # anthropic: an error event inside a stream that had answered 200.
        return FailureFacts(
            provider,
            Transport.MIDSTREAM_ERROR,
            error_type=error_type,
            error_code=error_code,
            message=message or exc.message,
        )
    return FailureFacts(
        provider,
        Transport.HTTP_STATUS,
        status_code=status,
        headers=_headers(exc.response.headers),
        error_type=error_type,
        error_code=error_code,
        message=message or exc.message,
    )


def _transport_facts(exc: httpx2.TransportError, provider: str) -> FailureFacts:
    message = f"{type(exc).__name__}: {exc}"
    match exc:
        case httpx2.TimeoutException():
            return FailureFacts(provider, Transport.TIMEOUT, message=message)
        case httpx2.RemoteProtocolError() if "without sending a response" not in str(exc):
            # The body stopped short ("peer closed connection without sending complete message
            # body"); a disconnect before any response is a plain connection failure.
            return FailureFacts(provider, Transport.STREAM_INTERRUPTED, message=message)
        case httpx2.NetworkError() | httpx2.RemoteProtocolError() | httpx2.ProxyError():
            return FailureFacts(provider, Transport.CONNECTION, message=message)
        case _:
            # LocalProtocolError, UnsupportedProtocol: our request or base URL is wrong.
            return FailureFacts(provider, Transport.OTHER, message=message)


def _httpx_cause(exc: BaseException) -> httpx2.TransportError | None:
    """The httpx2 transport error an SDK connection error was raised from, if any."""
    seen: set[int] = set()
    current = exc.__cause__
    while current is not None and id(current) not in seen:
        if isinstance(current, httpx2.TransportError):
            return current
        seen.add(id(current))
        current = current.__cause__
    return None


def _body_fields(body: object) -> tuple[str | None, str | None, str]:
    """(type, code, message) from an error body in either provider's shape."""
    if isinstance(body, str):
        return None, None, body
    if not isinstance(body, Mapping):
        return None, None, ""
    inner: Any = body.get("error", body)
    if isinstance(inner, str):
        return None, None, inner
    if not isinstance(inner, Mapping):
        return None, None, ""
    details = inner.get("details")
    code = inner.get("code")
    if code is None and isinstance(details, Mapping):
        code = details.get("error_code")
    return _text(inner.get("type")), _text(code), _text(inner.get("message")) or ""


def _text(value: object) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def _headers(headers: httpx2.Headers) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def _single_leaf(exc: BaseException) -> BaseException:
    """A group holding exactly one exception (a nursery's) is read as that exception."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
