"""What a load run is asked to do, and what it saw: the options and the recorder."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

_ERROR_SAMPLES = 10
DEFAULT_PROMPT = "Tell me a story about a load test."


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatLoad:
    """The options of ``chatd scaletest chat`` (see its ``--help`` for each one)."""

    url: str
    token: str
    chats: int
    turns: int
    run_id: str
    ramp_s: float = 0.0
    rate: float | None = None  # turns started per second (open loop); None: closed loop
    llm_url: str | None = None  # None: serve the fake LLM in this process
    llm_kind: Literal["openai", "anthropic"] = "openai"
    chunks: int = 20
    first_chunk_delay_ms: float = 50.0
    chunk_interval_ms: float = 0.0
    prompt: str = DEFAULT_PROMPT
    timeout_s: float = 1800.0
    turn_timeout_s: float = 120.0
    http_connections: int = 256
    http_timeout_s: float = 60.0
    http_max_attempts: int = 5
    metrics_interval_s: float = 1.0
    keep: bool = False  # keep the provider, model config and user token the run made (--keep)

    def __post_init__(self) -> None:
        for name in ("chats", "turns", "http_connections", "http_max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} must be at least 1")
        for name in ("timeout_s", "turn_timeout_s", "http_timeout_s", "metrics_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{_flag(name)} must be greater than 0")
        for name in ("ramp_s", "first_chunk_delay_ms", "chunk_interval_ms"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"--{_flag(name)} must be a number >= 0")
        if self.rate is not None and not 0 < self.rate < float("inf"):
            raise ValueError("--rate must be greater than 0 (turns started per second)")
        if self.chunks < 1:
            raise ValueError("--chunks must be at least 1 (first output is the first chunk)")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"--url {self.url!r} must start with http:// or https://")

    @property
    def planned_turns(self) -> int:
        return self.chats * self.turns


def _flag(name: str) -> str:
    return name.replace("_", "-")


@dataclass(slots=True)
class Recorder:
    """Everything the simulated clients measured, in milliseconds."""

    create_ms: list[float] = field(default_factory=list)
    accept_ms: list[float] = field(default_factory=list)
    first_output_ms: list[float] = field(default_factory=list)
    turn_ms: list[float] = field(default_factory=list)
    turns_completed: int = 0
    turns_failed: int = 0
    chats_ready: int = 0
    arrivals_missed: int = 0  # open loop: an arrival found no idle chat
    provider_retries: int = 0  # ``retry`` events on the streams
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    events: Counter[str] = field(default_factory=Counter)

    def error(self, stage: str, message: str) -> None:
        self.errors[stage] += 1
        if len(self.error_samples) < _ERROR_SAMPLES:
            self.error_samples.append(f"{stage}: {message}")

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())
