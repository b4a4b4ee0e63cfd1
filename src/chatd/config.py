"""One settings object for the whole process.

Every limit is a named field with its unit in the name. Values come from defaults, then
``CHATD_*`` environment variables, then command-line flags (the CLI passes those as overrides).
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "CHATD_"
# The idempotency_keys table's bound on a key's length (migration 0002).
IDEMPOTENCY_KEY_MAX_CHARS_LIMIT = 1024


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names it and the rule."""


@dataclass(frozen=True, slots=True)
class Settings:
    # Where chatd keeps its own files (embedded PostgreSQL data, the dev admin token).
    home: Path = field(default_factory=lambda: Path(".chatd"))
    # An external PostgreSQL server; empty means "run the embedded one under `home`".
    database_url: str = ""
    # Directory of initdb/pg_ctl for the embedded server; empty means "find them".
    pg_bin: str = ""
    host: str = "127.0.0.1"
    port: int = 8080

    # Database access.
    db_pool_min_size: int = 2
    db_pool_max_size: int = 16
    db_connect_timeout_s: float = 10.0
    db_command_timeout_s: float = 30.0
    db_listen_reconnect_delay_s: float = 1.0

    # Embedded PostgreSQL.
    embedded_pg_start_timeout_s: float = 60.0
    embedded_pg_stop_timeout_s: float = 30.0

    # Sharding and leases. Empty worker_id: a stable identity kept in `home` (chatd.identity),
    # so a restarted process takes its own leases back at once.
    worker_id: str = ""
    shard_count: int = 64
    lease_ttl_s: float = 15.0

    # Several workers (README, "Running several workers"). `chatd serve --workers N` starts N
    # worker processes on one listening socket ("auto": one per core) and restarts a crashed one
    # unless more than worker_restart_limit crashed in worker_restart_window_s (then it stops,
    # saying so). A worker that does not say it is ready within worker_ready_timeout_s counts as
    # crashed; at a stop each has worker_stop_timeout_s to end before it is killed.
    workers: str = "1"
    worker_restart_limit: int = 5
    worker_restart_window_s: float = 60.0
    worker_ready_timeout_s: float = 60.0
    worker_stop_timeout_s: float = 15.0
    # The listening socket a parent process hands its workers (a file descriptor); -1: bind
    # host:port. Set by `chatd serve --workers`, not by hand.
    listen_fd: int = -1
    # A worker's end of its control socket to the parent (it reports readiness there; the
    # socket's end means the parent died, and the worker stops); -1: no parent. Set by
    # `chatd serve --workers`, not by hand.
    parent_fd: int = -1
    # The internal link between workers (forwarded commands, relayed streams): it listens on
    # link_host:link_port (0: any free port) and peers reach it at link_advertise_host (empty:
    # link_host). Requests carry the cluster's secret (kept in PostgreSQL). A forwarded command
    # is answered within ask_timeout_s + link_timeout_s or fails as retryable (503).
    link_host: str = "127.0.0.1"
    link_port: int = 0
    link_advertise_host: str = ""
    link_timeout_s: float = 10.0
    # A shard handed to a joining worker: its actors finish their turn in progress for at most
    # handover_timeout_s (new commands meanwhile get 503 + Retry-After), then it is released.
    handover_timeout_s: float = 10.0
    # A relayed stream whose owner went away looks for the new owner this long before closing
    # (1013, "try again later"); the client may reconnect with its cursor.
    relay_reconnect_timeout_s: float = 30.0

    # Chat actors.
    mailbox_capacity: int = 256
    actor_idle_timeout_s: float = 300.0
    # A chat whose actor crashes more than restart_limit times in restart_window_s goes to error.
    restart_limit: int = 3
    restart_window_s: float = 60.0
    ask_timeout_s: float = 30.0
    # A database outage is waited out, never counted as a crash: an actor it stopped restarts
    # after min(base * 2^n, max) seconds (jittered), and a failed lease check is retried as
    # often; the held shards are swept for runnable chats with no actor after an outage, and
    # every resume_sweep_interval_s.
    db_retry_base_delay_s: float = 0.25
    db_retry_max_delay_s: float = 2.0
    resume_sweep_interval_s: float = 60.0
    max_queue_length: int = 16
    action_timeout_s: float = 300.0

    # The agent half (README, "Tools, compaction, titles and usage"). Built-in file and command
    # tools work in <workspace_root>/<chat id> (empty: <home>/workspaces); what a read, a search
    # or a command returns is cut to tool_output_max_bytes (head and tail), write_file and
    # edit_file leave at most tool_write_max_bytes, and `execute` runs at most
    # execute_timeout_s (the tools' other bounds: chatd.tools.workspace.WorkspaceLimits).
    # A chat without a title gets one from a model after its first answer (titles=false:
    # never), made with the model config title_model_config_id (empty: the chat's own) within
    # title_timeout_s.
    workspace_root: str = ""
    tool_output_max_bytes: int = 65_536
    tool_write_max_bytes: int = 4_194_304
    execute_timeout_s: float = 30.0
    titles: bool = True
    title_model_config_id: str = ""
    title_timeout_s: float = 60.0

    # Providers, model configs and user prompts are re-read at most this often.
    config_cache_ttl_s: float = 30.0
    # A bearer token is re-checked against the database at most this often (0: at every
    # request). Revoking through this process applies at once; through another, after this.
    auth_cache_ttl_s: float = 10.0

    # Stream subscribers.
    subscriber_queue_size: int = 1024
    slow_consumer_timeout_s: float = 10.0

    # Model providers.
    # A stream silent this long (also before its first chunk) fails as a retryable timeout.
    stream_silence_timeout_s: float = 120.0
    provider_connect_timeout_s: float = 10.0
    # Retries of a failed model step: min(base * 2^n, max), or Retry-After when longer.
    retry_base_delay_s: float = 1.0
    retry_max_delay_s: float = 60.0
    provider_max_attempts: int = 25

    # HTTP edge: requests. Texts are counted in characters (code points).
    max_body_bytes: int = 1_048_576
    max_json_depth: int = 64
    max_message_chars: int = 100_000
    max_title_chars: int = 500
    max_system_prompt_chars: int = 100_000
    max_user_prompt_chars: int = 100_000
    max_tools_per_chat: int = 250
    max_tool_description_chars: int = 4096
    max_tool_schema_bytes: int = 32_768
    max_tool_schema_depth: int = 32
    max_page_size: int = 200
    default_page_size: int = 50

    # Idempotency-Key on mutating requests: a key and its first result are kept this long
    # per user; keys are 1..idempotency_key_max_chars of [A-Za-z0-9._:~+/=-]. A retry that
    # finds the first attempt still running waits for it up to idempotency_wait_s (then 409);
    # another worker's pending key whose attempt has not answered after
    # idempotency_pending_timeout_s is presumed dead (crashed) and a retry takes it over (it
    # must exceed ask_timeout_s); the same worker, restarted, takes its own over at once.
    idempotency_key_ttl_s: float = 86_400.0
    idempotency_key_max_chars: int = 255
    idempotency_wait_s: float = 10.0
    idempotency_pending_timeout_s: float = 60.0

    # HTTP edge: WebSockets. Origins allowed besides the server's own (comma-separated, or *);
    # the same list is the HTTP API's CORS allow-list (chatd.web.cors).
    ws_allowed_origins: str = ""
    # How long a browser may keep a CORS preflight's answer.
    cors_max_age_s: float = 600.0
    ws_ping_interval_s: float = 20.0  # 0: no pings
    # Per user, admins included (`make run` hands people an admin token): WebSockets open at
    # once on this process, stream, watch and inbox watch together (one more: 429 at the
    # handshake); and chats running at once (running, interrupting or waiting to retry; a
    # command that would start one more run: 429, nothing written), counted in PostgreSQL
    # across every worker. 0: no limit, and no cost (a load test driving thousands of chats as
    # one user turns both off).
    max_websockets_per_user: int = 64
    max_running_chats_per_user: int = 32
    # A client that accepts none of our data for this long is disconnected (HTTP and WebSocket).
    client_send_timeout_s: float = 30.0
    shutdown_grace_s: float = 5.0
    # Connections the kernel holds for us before accept (capped by net.core.somaxconn): a
    # burst of clients connecting at once beyond it is dropped and retried a second later.
    listen_backlog: int = 4096
    # Open client connections (HTTP and WebSocket) this process serves at once; one more is
    # answered 503 with Retry-After and closed, and the open ones are not disturbed.
    max_connections: int = 20_000
    # A connection the server closes (after a Connection: close answer, a refusal at
    # max_connections, an idle timeout) is still read, its bytes discarded, at most this long,
    # so that the close does not reset the connection before the client read the last answer.
    close_linger_s: float = 1.0

    # Logs (chatd.logs): the level (DEBUG, INFO, WARNING, ERROR) and the format of the lines
    # on stderr: text, or json (one object per line). An access line per request at INFO.
    log_level: str = "INFO"
    log_format: str = "text"
    # Metrics for scrapers without a token: the text of /api/v1/metrics at /metrics on
    # metrics_host:metrics_port (0: off). With several workers, each takes the first free
    # port from metrics_port up (and logs it).
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0

    def __post_init__(self) -> None:
        positive = (
            "db_pool_min_size",
            "db_pool_max_size",
            "db_connect_timeout_s",
            "db_command_timeout_s",
            "db_listen_reconnect_delay_s",
            "embedded_pg_start_timeout_s",
            "embedded_pg_stop_timeout_s",
            "shard_count",
            "lease_ttl_s",
            "mailbox_capacity",
            "actor_idle_timeout_s",
            "restart_window_s",
            "ask_timeout_s",
            "db_retry_base_delay_s",
            "db_retry_max_delay_s",
            "resume_sweep_interval_s",
            "max_queue_length",
            "action_timeout_s",
            "subscriber_queue_size",
            "slow_consumer_timeout_s",
            "config_cache_ttl_s",
            "stream_silence_timeout_s",
            "provider_connect_timeout_s",
            "retry_base_delay_s",
            "retry_max_delay_s",
            "provider_max_attempts",
            "max_body_bytes",
            "max_json_depth",
            "max_message_chars",
            "max_title_chars",
            "max_system_prompt_chars",
            "max_user_prompt_chars",
            "max_tools_per_chat",
            "max_tool_description_chars",
            "max_tool_schema_bytes",
            "max_tool_schema_depth",
            "max_page_size",
            "default_page_size",
            "idempotency_key_ttl_s",
            "idempotency_key_max_chars",
            "idempotency_wait_s",
            "idempotency_pending_timeout_s",
            "client_send_timeout_s",
            "shutdown_grace_s",
            "listen_backlog",
            "max_connections",
            "close_linger_s",
            "worker_restart_window_s",
            "worker_ready_timeout_s",
            "worker_stop_timeout_s",
            "link_timeout_s",
            "handover_timeout_s",
            "relay_reconnect_timeout_s",
            "tool_output_max_bytes",
            "tool_write_max_bytes",
            "execute_timeout_s",
            "title_timeout_s",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(f"{_label(name)} must be greater than 0")
        if self.ws_ping_interval_s < 0:
            raise SettingsError(f"{_label('ws_ping_interval_s')} must not be negative (0: off)")
        if self.auth_cache_ttl_s < 0:
            raise SettingsError(f"{_label('auth_cache_ttl_s')} must not be negative (0: off)")
        limits = ("max_websockets_per_user", "max_running_chats_per_user")
        if negative := [name for name in limits if getattr(self, name) < 0]:
            raise SettingsError(f"{_label(negative[0])} must be 0 (no limit) or more")
        if self.restart_limit < 0:
            raise SettingsError(f"{_label('restart_limit')} must not be negative")
        self._check_workers()
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"{_label('port')} must be between 0 (any free port) and 65535")
        if self.default_page_size > self.max_page_size:
            raise SettingsError(
                f"{_label('default_page_size')} must not exceed {_label('max_page_size')}"
            )
        if self.db_retry_base_delay_s > self.db_retry_max_delay_s:
            raise SettingsError(
                f"{_label('db_retry_base_delay_s')} must not exceed "
                f"{_label('db_retry_max_delay_s')}"
            )
        if self.idempotency_key_max_chars > IDEMPOTENCY_KEY_MAX_CHARS_LIMIT:
            raise SettingsError(
                f"{_label('idempotency_key_max_chars')} must not exceed "
                f"{IDEMPOTENCY_KEY_MAX_CHARS_LIMIT} (the database's bound)"
            )
        if self.idempotency_pending_timeout_s <= self.ask_timeout_s:
            raise SettingsError(
                f"{_label('idempotency_pending_timeout_s')} must exceed {_label('ask_timeout_s')}"
            )
        self._check_agent()
        self._check_observability()
        if self.db_pool_min_size > self.db_pool_max_size:
            raise SettingsError(
                f"{_label('db_pool_min_size')} must not exceed {_label('db_pool_max_size')}"
            )

    def _check_agent(self) -> None:
        if self.title_model_config_id:
            try:
                uuid.UUID(self.title_model_config_id)
            except ValueError:
                raise SettingsError(
                    f"{_label('title_model_config_id')} must be a model config's id (a UUID)"
                    " or empty (the chat's own)"
                ) from None

    def _check_observability(self) -> None:
        if self.log_level.strip().upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise SettingsError(
                f"{_label('log_level')} must be DEBUG, INFO, WARNING, ERROR or CRITICAL"
            )
        if self.log_format.strip().lower() not in ("text", "json"):
            raise SettingsError(f"{_label('log_format')} must be text or json")
        if not 0 <= self.metrics_port <= 65535:
            raise SettingsError(f"{_label('metrics_port')} must be between 0 (off) and 65535")

    def _check_workers(self) -> None:
        if self.worker_restart_limit < 0:
            raise SettingsError(f"{_label('worker_restart_limit')} must not be negative")
        self.worker_count()  # validates `workers`
        if not 0 <= self.link_port <= 65535:
            raise SettingsError(
                f"{_label('link_port')} must be between 0 (any free port) and 65535"
            )

    def worker_count(self) -> int:
        """The number of worker processes: ``workers`` as a number, or the cores for "auto"."""
        text = self.workers.strip().lower()
        if text == "auto":
            return max(1, len(os.sched_getaffinity(0)))
        if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 256:
            raise SettingsError(
                f"{_label('workers')} must be a number from 1 to 256, or auto (one per core)"
            )
        return int(text)

    @property
    def link_url_host(self) -> str:
        """The host peers use to reach this worker's internal link."""
        return self.link_advertise_host or self.link_host

    @property
    def workspace_path(self) -> Path:
        return Path(self.workspace_root) if self.workspace_root else self.home / "workspaces"

    @property
    def uses_embedded_database(self) -> bool:
        return not self.database_url

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def load(
        cls,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Settings:
        """Defaults, then ``CHATD_<FIELD>`` variables, then explicit overrides (CLI flags)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f.name, f.type, raw)
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls(**values)


def _label(name: str) -> str:
    return f"{name} ({ENV_PREFIX}{name.upper()})"


def _parse(name: str, type_name: Any, raw: str) -> Any:
    env_name = ENV_PREFIX + name.upper()
    kind = str(type_name)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            lowered = raw.strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off"}:
                return False
            raise ValueError(raw)
        if kind == "Path":
            return Path(raw)
    except ValueError:
        raise SettingsError(f"{env_name}={raw!r} is not a valid {kind}") from None
    return raw
