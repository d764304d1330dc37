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
- Bounded: a body is streamed and refused with :class:`ResponseTooLarge` (a PayloadError naming the
  limit, counted per source in :data:`TOO_LARGE`) once it passes ``max_bytes``; a body shorter than its
  ``Content-Length`` (a dropped connection) is retried up to ``max_attempts`` and then raised as
  :class:`UpstreamUnavailable`; :func:`within_deadline` ends a whole poll after ``poll_deadline_s``
  with the retriable :class:`PollDeadlineExceeded`.
- Event times pass :class:`TimeWindow` (default: not before 1970, not more than a day ahead of the
  injected clock); a time outside it, or one ``datetime`` cannot represent, is the
  :class:`ImplausibleTime` record error (dead-letter reason ``implausible_time``).
- Secrets: URLs in error messages go through :func:`mask_url` (key-like query values and the given
  secrets become ``***``), and the ``httpx``/``httpcore`` loggers, which log every request URL at
  INFO, are set to WARNING when this module is imported (:func:`quiet_http_loggers`).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
from collections import Counter, deque
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import orjson

from wildfire.clock import SYSTEM_CLOCK, Clock
from wildfire.records import EncodedBatch, Record, RecordError, parse_time

T = TypeVar("T")

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


class ResponseTooLarge(PayloadError):
    """The body passed the source's ``max_response_bytes``; reading stopped there."""

    retriable = False

    def __init__(self, source: str, message: str, limit: int) -> None:
        self.limit = limit
        super().__init__(source, message)


class PollDeadlineExceeded(UpstreamUnavailable):
    """A whole poll ran past ``poll_deadline_s``; the next poll may be faster."""

    retriable = True


# ---------------------------------------------------------------- secrets

_HTTP_LOGGERS = ("httpx", "httpcore")


def quiet_http_loggers() -> None:
    """httpx logs every request URL at INFO (a FIRMS URL holds the MAP_KEY): keep both loggers at WARNING.

    Called at import of this module; processes that configure logging call it again afterwards.
    """
    for name in _HTTP_LOGGERS:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.WARNING or logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)


quiet_http_loggers()

# Query parameters whose value is a credential, whatever the API calls them (api_key, MAP_KEY, token, ...).
_SECRET_PARAM = re.compile(r"key|token|secret|passw|auth|signature|credential|session", re.IGNORECASE)


def mask_url(url: str | httpx.URL, secrets: Iterable[str | None] = ()) -> str:
    """``url`` safe to log: credential-like query values, userinfo passwords and ``secrets`` become ``***``."""
    text = str(url)
    try:
        parts = urlsplit(text)
        changed = False
        query = parse_qsl(parts.query, keep_blank_values=True)
        if any(_SECRET_PARAM.search(k) for k, _ in query):
            masked = urlencode([(k, "***" if _SECRET_PARAM.search(k) else v) for k, v in query], safe="*,")
            parts, changed = parts._replace(query=masked), True
        if parts.password:
            parts, changed = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")), True
        if changed:  # otherwise leave the text exactly as it was
            text = urlunsplit(parts)
    except ValueError:
        pass  # not a URL: the explicit secrets below are still masked
    return mask_secrets(text, secrets)


def mask_secrets(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with every non-empty secret (and its URL-quoted form) replaced by ``***``."""
    from urllib.parse import quote

    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
            quoted = quote(secret, safe="")
            if quoted != secret:
                text = text.replace(quoted, "***")
    return text


# ---------------------------------------------------------------- event-time plausibility

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class ImplausibleTime(RecordError):
    """An event time outside the plausibility window, or one ``datetime`` cannot represent."""


@dataclass(slots=True, frozen=True)
class TimeWindow:
    """Event times a source may carry: not before ``earliest``, not more than ``max_ahead_s`` after now.

    ``TimeWindow.from_config(src).check(when, clock.time())`` raises :class:`ImplausibleTime`.
    """

    earliest: datetime = _EPOCH
    """Oldest plausible event time (timezone-aware)."""
    max_ahead_s: float = 86_400.0
    """How far past the injected clock's now an event time may lie (clock skew, time zones)."""

    @classmethod
    def from_config(cls, config: Any) -> TimeWindow:
        return cls(getattr(config, "event_time_earliest", _EPOCH), float(getattr(config, "event_time_max_ahead_s",
                                                                                  86_400.0)))

    def latest(self, now_epoch: float) -> datetime:
        return datetime.fromtimestamp(now_epoch, UTC) + timedelta(seconds=self.max_ahead_s)

    def check(self, when: datetime, now_epoch: float) -> datetime:
        """``when`` if plausible, else :class:`ImplausibleTime` naming the window."""
        latest = self.latest(now_epoch)
        if when < self.earliest or when > latest:
            raise ImplausibleTime(
                f"event time {when.isoformat()} outside the plausible window "
                f"{self.earliest.isoformat()} .. {latest.isoformat()}"
            )
        return when


def utc_time(value: Any) -> datetime:
    """An ISO-8601 text with offset -> aware UTC datetime; RecordError / ImplausibleTime if unusable.

    ``parse_time`` raises OverflowError for a time that moves past year 9999 or before year 1 when
    converted to UTC (``9999-12-31T23:59:59-05:00``): that is an implausible time, not a crash.
    """
    if not isinstance(value, str):
        raise RecordError(f"time {value!r} is not a string")
    try:
        return parse_time(value)
    except OverflowError:
        raise ImplausibleTime(f"time {value[:64]!r} is outside the representable range") from None


def epoch_time(seconds: Any) -> datetime:
    """Unix seconds -> aware UTC datetime; ImplausibleTime if ``datetime`` cannot represent it."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise RecordError(f"time {seconds!r} is not a number of seconds")
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        raise ImplausibleTime(f"time {seconds!r} s since 1970 is outside the representable range") from None


def raw_json(obj: Any, limit: int = 8192) -> bytes:
    """The dead-letter bytes of a decoded JSON item; never raises (a value orjson refuses is repr'd)."""
    try:
        return orjson.dumps(obj)[:limit]
    except (TypeError, ValueError):
        return repr(obj).encode("utf-8", "backslashreplace")[:limit]


def reason_for(exc: BaseException, default: str) -> str:
    """Dead-letter reason of a per-item failure: ``implausible_time`` or the source's ``default``."""
    return "implausible_time" if isinstance(exc, ImplausibleTime) else default


def describe(exc: BaseException) -> str:
    """Error text of a per-item failure: a RecordError's own message, else the exception's type and text."""
    if isinstance(exc, RecordError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"[:1000]


async def within_deadline(aw: Awaitable[T], *, source: str, deadline_s: float) -> T:
    """``await aw`` but for at most ``deadline_s`` seconds; past it raise :class:`PollDeadlineExceeded`."""
    try:
        async with asyncio.timeout(deadline_s) as cm:
            return await aw
    except TimeoutError:
        if not cm.expired():
            raise
        raise PollDeadlineExceeded(
            source, f"poll did not finish within poll_deadline_s={deadline_s:g} s; abandoned, retry on the next poll"
        ) from None


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


DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
TOO_LARGE: Counter[str] = Counter()
"""Responses refused for passing ``max_bytes`` since the process started, by source name."""


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
    max_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
) -> httpx.Response:
    """GET with Retry-After honoured on 429/503; returns a 2xx response or raises a ConnectorError.

    ``describe_error(response) -> str | None`` lets a connector turn its API's error body into the
    message (PurpleAir's ``{"error", "description"}``). ``secret`` (a key embedded in the URL, as
    FIRMS does) is masked in every error message, as are credential-like query values, so no key
    reaches logs. The body is streamed and refused past ``max_bytes`` (:class:`ResponseTooLarge`).
    """
    try:
        return await _http_get(client, url, source=source, clock=clock, params=params, headers=headers,
                               max_attempts=max_attempts, summary=summary, describe_error=describe_error,
                               max_bytes=max_bytes, secrets=(secret,))
    except ConnectorError as exc:
        masked = mask_secrets(str(exc), (secret,))
        if masked != str(exc):
            exc.args = (masked,)
        raise


class _ShortBody(Exception):
    """The connection ended before the announced Content-Length (or chunked end) arrived."""


async def _read_bounded(client: httpx.AsyncClient, url: str, *, params: dict[str, Any] | None,
                        headers: dict[str, str] | None, source: str, max_bytes: int, safe_url: str) -> httpx.Response:
    """One GET whose (decoded) body is read in chunks and abandoned past ``max_bytes``."""
    async with client.stream("GET", url, params=params, headers=headers) as resp:
        announced = resp.headers.get("Content-Length")
        if announced and announced.isdigit() and int(announced) > max_bytes and not resp.headers.get(
            "Content-Encoding"
        ):
            raise ResponseTooLarge(source, f"GET {safe_url}: body of {announced} bytes announced, over the "
                                           f"max_response_bytes limit of {max_bytes}", max_bytes)
        buf = bytearray()
        try:
            async for chunk in resp.aiter_bytes():
                buf += chunk
                if len(buf) > max_bytes:
                    raise ResponseTooLarge(source, f"GET {safe_url}: body passed the max_response_bytes limit of "
                                                   f"{max_bytes} bytes; reading stopped", max_bytes)
        except httpx.RemoteProtocolError as exc:
            # h11 raises this when the peer closes before Content-Length bytes (or the last chunk) came.
            raise _ShortBody(f"{len(buf)} bytes received, then the connection ended ({exc})") from None
        except httpx.ReadError as exc:
            raise _ShortBody(f"{len(buf)} bytes received, then the read failed ({exc!r})") from None
        if announced and announced.isdigit() and not resp.headers.get("Content-Encoding") and len(buf) < int(
            announced
        ):
            raise _ShortBody(f"{len(buf)} of {announced} announced bytes received")
        # A plain Response holding the decoded body: callers use .content/.json()/.text/.headers as before.
        kept = [(k, v) for k, v in resp.headers.multi_items() if k.lower() not in ("content-encoding",
                                                                                  "transfer-encoding")]
        return httpx.Response(resp.status_code, headers=kept, content=bytes(buf), request=resp.request)


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
    max_bytes: int,
    secrets: tuple[str | None, ...],
) -> httpx.Response:
    sleep = _clock_sleep(clock)
    last_wait = 0.0
    safe_url = mask_url(url, secrets)
    for attempt in range(1, max_attempts + 1):
        if summary is not None:
            summary.requests += 1
        try:
            resp = await _read_bounded(client, url, params=params, headers=headers, source=source,
                                       max_bytes=max_bytes, safe_url=safe_url)
        except ResponseTooLarge:
            # Counted per source for the process (the poll's own summary is lost with the raised error).
            TOO_LARGE[source] += 1
            raise
        except _ShortBody as exc:
            # A dropped connection mid-body: the answer is incomplete, never parsed. Transient: try again.
            if attempt < max_attempts:
                continue
            raise UpstreamUnavailable(source, f"GET {safe_url}: truncated body after {attempt} attempts: "
                                              f"{mask_secrets(str(exc), secrets)}") from None
        except httpx.TimeoutException as exc:
            raise UpstreamUnavailable(source, f"GET {safe_url} timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise UpstreamUnavailable(source, f"GET {safe_url} failed: {mask_secrets(repr(exc), secrets)}") from None
        if resp.is_success:
            return resp
        detail = describe_error(resp) if describe_error is not None else None
        detail = mask_secrets(detail or _body_excerpt(resp), secrets)
        shown = mask_url(resp.request.url, secrets)
        if resp.status_code in (429, 503):
            last_wait = parse_retry_after(resp.headers.get("Retry-After"), clock.time())
            if attempt < max_attempts:
                await sleep(last_wait)
                continue
            raise RateLimited(
                source,
                f"GET {shown} answered {resp.status_code} {attempt} times "
                f"(Retry-After {last_wait:g} s): {detail}",
                retry_after_s=last_wait,
                status=resp.status_code,
            )
        if 400 <= resp.status_code < 500:
            raise UpstreamRejected(source, f"GET {shown} answered {resp.status_code}: {detail}", resp.status_code)
        raise UpstreamUnavailable(source, f"GET {shown} answered {resp.status_code}: {detail}", resp.status_code)
    raise AssertionError("unreachable")  # the loop returns or raises


def _body_excerpt(resp: httpx.Response, limit: int = 200) -> str:
    text = resp.content[: limit * 4].decode("utf-8", "replace").strip().replace("\n", " ")
    return (text[:limit] + "...") if len(text) > limit else (text or "<empty body>")
