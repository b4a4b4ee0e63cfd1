"""Exceptions of the provider layer. Callers see only ``ProviderError``, already classified."""

from __future__ import annotations

from chatd.domain.provider_failure import ProviderFailure


class ProviderError(Exception):
    """A model step failed; ``failure`` says how, and whether a retry may help."""

    def __init__(self, failure: ProviderFailure) -> None:
        super().__init__(f"{failure.provider}: {failure.kind.value}: {failure.message}")
        self.failure = failure


class StreamSilence(Exception):
    """The provider sent nothing for too long (before the first chunk, or between chunks)."""

    def __init__(self, waited_s: float, *, before_first_chunk: bool) -> None:
        where = "before the first chunk" if before_first_chunk else "between chunks"
        super().__init__(f"no data from the provider for {waited_s:g} s {where}")
        self.waited_s = waited_s
        self.before_first_chunk = before_first_chunk


class StreamInterrupted(Exception):
    """The stream ended without the provider's terminal event: the answer is incomplete."""
