"""What every connector shares: errors, dead letters, run summaries, a rate limiter, one HTTP GET.

Guarantees:

- Bad input never crashes a run. A row or message that fails validation becomes a
  :class:`DeadLetter` (source, reason, raw bytes, error text) and is counted by reason in the
  :class:`RunSummary`; only failures of the upstream itself (HTTP errors, unreachable host) raise.
- Every raised error is a :class:`ConnectorError` whose ``retriable`` flag tells the caller
  (retry loop, circuit breaker, Airflow) whether trying again can help::

      ConnectorError                  retriable=False
      ├── UpstreamRejected            retriable=False  4xx other than 429: bad key, bad request
      ├── UpstreamUnavailable         retriable=True   5xx, connection refused, timeout
      │   └── RateLimited             retriable=True   429 / 503 with Retry-After still set after retries
      └── PayloadError                retriable=False  the whole response is unusable (not JSON, wrong shape)

- 429 and 503 are answered by waiting ``Retry-After`` seconds (on the injected clock) and retrying,
  up to ``max_attempts``; the wait is capped so a hostile header cannot stall a run for hours.
- :class:`RateLimiter` never lets more than ``max_calls`` through in any window of ``period_s``
  seconds of the injected clock (a sliding log, so bursts at a window edge cannot double the rate).
"""

from __future__ import annotations

import asyncio
import email.utils
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx

from wildfire.clock import SYSTEM_CLOCK, Clock
from wildfire.records import EncodedBatch, Record

# A Retry-After beyond this is treated as this: one poll must not hang for an upstream's whim.
MAX_RETRY_AFTER_S = 120.0
DEFAULT_RETRY_AFTER_S = 5.0  # api.weather.gov documents no value; its staff suggest ~5 s


class ConnectorError(Exception):
    """Base of every error a connector raises; ``retriable`` tells the caller whether to try again."""

    retriable: ClassVar[bool] = False

    def __init__(self, source: str, message: str) -> None:
        self.source = source
        super().__init__(f"{source}: {message}")


class UpstreamRejected(ConnectorError):
    """The upstream refused the request (bad credentials, bad parameters): retrying will not help."""

    retriable = False

    def __init__(self, source: str, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(source, message)


class UpstreamUnavailable(ConnectorError):
    """The upstream failed or could not be reached; a later attempt may succeed."""

    retriable = True

    def __init__(self, source: str, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(source, message)


class RateLimited(UpstreamUnavailable):
    """Still throttled after honouring Retry-After ``max_attempts`` times."""

    retriable = True

    def __init__(self, source: str, message: str, retry_after_s: float, status: int | None = None) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(source, message, status)


class PayloadError(ConnectorError):
    """The response as a whole cannot be used (not JSON, wrong shape)."""

    retriable = False


@dataclass(slots=True, frozen=True)
class DeadLetter:
    """One input that could not become a record; goes to the dead-letter topic with its raw bytes."""

    source: str
    """Configured source name."""
    reason: str
    """Short machine-readable reason (``bad_latitude``, ``schema``, ...); the RunSummary key."""
    raw: bytes
    """The offending input exactly as received (a CSV line, a JSON object, an MQTT payload)."""
    error: str
    """Human-readable explanation naming what is wrong."""


@dataclass(slots=True)
class RunSummary:
    """Counts for one fetch: how many records were accepted, deduplicated and rejected (by reason)."""

    source: str
    """Configured source name."""
    accepted: int = 0
    """Records handed on (new or changed)."""
    deduplicated: int = 0
    """Inputs dropped because the same natural key was already seen (in this response or an earlier poll)."""
    rejected: Counter[str] = field(default_factory=Counter)
    """Rejected inputs by reason; each has a DeadLetter."""
    requests: int = 0
    """HTTP requests made (including retries)."""

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def reject(self, reason: str, count: int = 1) -> None:
        self.rejected[reason] += count

    def merge(self, other: RunSummary) -> None:
        self.accepted += other.accepted
        self.deduplicated += other.deduplicated
        self.rejected.update(other.rejected)
        self.requests += other.requests

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``rejected`` is by reason, ``rejected_total`` their sum."""
        return {
            "source": self.source,
            "accepted": self.accepted,
            "deduplicated": self.deduplicated,
            "rejected": dict(sorted(self.rejected.items())),
            "rejected_total": self.rejected_total,
            "requests": self.requests,
        }

    def __str__(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.rejected.items())) or "none"
        return (
            f"{self.source}: accepted {self.accepted}, deduplicated {self.deduplicated}, "
            f"rejected {self.rejected_total} ({reasons})"
        )


@dataclass(slots=True)
class ConnectorResult:
    """What one ``fetch`` returns: records, dead letters, counts and the cursor for the next poll."""

    batch: EncodedBatch | list[Record]
    """Accepted records, serialized column-wise (vectorized connectors) or as Record values."""
    dead_letters: list[DeadLetter]
    """Rejected inputs with their raw bytes."""
    summary: RunSummary
    """Counts accepted / deduplicated / rejected by reason."""
    cursor: dict[str, Any]
    """JSON-serializable state to pass to the next ``fetch`` (seen keys, modified_since, ...)."""


def _clock_sleep(clock: Clock):  # noqa: ANN202 - returns an async callable
    # Clock (the protocol) has no sleep; SystemClock and ManualClock both do.
    return getattr(clock, "sleep", asyncio.sleep)


class RateLimiter:
    """At most ``max_calls`` acquisitions in any ``period_s`` window of the injected clock.

    ``RateLimiter(5000, 600)  # FIRMS: 5,000 transactions per 10 minutes per MAP_KEY``
    """

    def __init__(self, max_calls: int, period_s: float, *, clock: Clock = SYSTEM_CLOCK) -> None:
        if max_calls < 1:
            raise ValueError(f"max_calls must be >= 1, got {max_calls}")
        if period_s <= 0:
            raise ValueError(f"period_s must be > 0, got {period_s}")
        self.max_calls = max_calls
        self.period_s = period_s
        self._clock = clock
        self._calls: deque[float] = deque()
        self._lock = asyncio.Lock()

    def _expire(self, now: float) -> None:
        while self._calls and self._calls[0] <= now - self.period_s:
            self._calls.popleft()

    def wait_time(self) -> float:
        """Seconds until one more call is allowed (0 if now)."""
        now = self._clock.monotonic()
        self._expire(now)
        if len(self._calls) < self.max_calls:
            return 0.0
        return self._calls[0] + self.period_s - now

    def try_acquire(self) -> bool:
        """Take a slot if one is free now; never waits."""
        if self.wait_time() > 0:
            return False
        self._calls.append(self._clock.monotonic())
        return True

    async def acquire(self) -> None:
        """Wait (on the injected clock) until a slot is free, then take it."""
        sleep = _clock_sleep(self._clock)
        async with self._lock:
            while (delay := self.wait_time()) > 0:
                await sleep(delay)
            self._calls.append(self._clock.monotonic())

    @property
    def in_window(self) -> int:
        self._expire(self._clock.monotonic())
        return len(self._calls)


def parse_retry_after(value: str | None, now_epoch: float) -> float:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date), capped and >= 0."""
    if not value:
        return DEFAULT_RETRY_AFTER_S
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return DEFAULT_RETRY_AFTER_S
        seconds = when.timestamp() - now_epoch
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


async def http_get(
    client: httpx.AsyncClient,
    url: str,
    *,
    source: str,
    clock: Clock = SYSTEM_CLOCK,
    params: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    max_attempts: int = 3,
    summary: RunSummary | None = None,
    describe_error: Any = None,
    secret: str | None = None,
) -> httpx.Response:
    """GET with Retry-After honoured on 429/503; returns a 2xx response or raises a ConnectorError.

    ``describe_error(response) -> str | None`` lets a connector turn its API's error body into the
    message (PurpleAir's ``{"error", "description"}``). ``secret`` (a key embedded in the URL, as
    FIRMS does) is masked in every error message so it never reaches logs.
    """
    try:
        return await _http_get(client, url, source=source, clock=clock, params=params, headers=headers,
                               max_attempts=max_attempts, summary=summary, describe_error=describe_error)
    except ConnectorError as exc:
        if secret and secret in str(exc):
            exc.args = (str(exc).replace(secret, "***"),)
        raise


async def _http_get(
    client: httpx.AsyncClient,
    url: str,
    *,
    source: str,
    clock: Clock,
    params: dict[str, Any] | None,
    headers: dict[str, str] | None,
    max_attempts: int,
    summary: RunSummary | None,
    describe_error: Any,
) -> httpx.Response:
    sleep = _clock_sleep(clock)
    last_wait = 0.0
    for attempt in range(1, max_attempts + 1):
        if summary is not None:
            summary.requests += 1
        try:
            resp = await client.get(url, params=params, headers=headers)
        except httpx.TimeoutException as exc:
            raise UpstreamUnavailable(source, f"GET {url} timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise UpstreamUnavailable(source, f"GET {url} failed: {exc!r}") from None
        if resp.is_success:
            return resp
        detail = describe_error(resp) if describe_error is not None else None
        detail = detail or _body_excerpt(resp)
        if resp.status_code in (429, 503):
            last_wait = parse_retry_after(resp.headers.get("Retry-After"), clock.time())
            if attempt < max_attempts:
                await sleep(last_wait)
                continue
            raise RateLimited(
                source,
                f"GET {resp.request.url} answered {resp.status_code} {attempt} times "
                f"(Retry-After {last_wait:g} s): {detail}",
                retry_after_s=last_wait,
                status=resp.status_code,
            )
        if 400 <= resp.status_code < 500:
            raise UpstreamRejected(
                source, f"GET {resp.request.url} answered {resp.status_code}: {detail}", resp.status_code
            )
        raise UpstreamUnavailable(
            source, f"GET {resp.request.url} answered {resp.status_code}: {detail}", resp.status_code
        )
    raise AssertionError("unreachable")  # the loop returns or raises


def _body_excerpt(resp: httpx.Response, limit: int = 200) -> str:
    text = resp.text.strip().replace("\n", " ")
    return (text[:limit] + "...") if len(text) > limit else (text or "<empty body>")
