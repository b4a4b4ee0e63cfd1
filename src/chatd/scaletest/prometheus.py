"""Read Prometheus text exposition: the load driver's view of the server's ``/metrics``."""

from __future__ import annotations

import math

import httpx2

METRICS_PATH = "/api/v1/metrics"


class ServerMetrics:
    """``GET /api/v1/metrics`` as text, on a connection of its own (the SDK reads JSON only;
    and a sample waits for no simulated client's request)."""

    def __init__(self, url: str, token: str, *, timeout_s: float) -> None:
        self._http = httpx2.AsyncClient(
            base_url=url,
            headers={"authorization": f"Bearer {token}"},
            timeout=timeout_s,
            limits=httpx2.Limits(max_connections=1),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def text(self) -> str | None:
        """The server's metrics, or None when it has none or refuses."""
        try:
            response = await self._http.get(METRICS_PATH)
        except httpx2.HTTPError:
            return None
        return response.text if response.status_code == 200 else None


def parse_metrics(text: str) -> dict[str, float]:
    """Samples by series (``name`` or ``name{labels}`` as written); comments skipped.

    A line that does not parse is skipped rather than failing the run: the driver reports
    what it could read, and a missing series shows as absent.
    """
    samples: dict[str, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        series, _, rest = line.rpartition("}") if "}" in line else ("", "", line)
        if series:
            series += "}"
            value_text = rest.split()
        else:
            parts = line.split()
            series, value_text = parts[0], parts[1:]
        if not value_text:
            continue
        try:
            value = float(value_text[0])
        except ValueError:
            continue
        if not math.isnan(value):
            samples[series] = value
    return samples


def total(samples: dict[str, float], name: str) -> float | None:
    """The sum over every series of metric ``name`` (all label sets), or None if absent."""
    values = [v for k, v in samples.items() if k == name or k.startswith(name + "{")]
    return sum(values) if values else None
