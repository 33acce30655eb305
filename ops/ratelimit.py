"""Per-key rate limits by tier, shared by every process and replica through Redis.

Each limit is a sliding-window counter: a count for the current fixed window plus the
previous window's count weighted by how much of it still overlaps the sliding window. It
is O(1) per limit, close to a true moving window without one entry per unit of cost (a
moving window stored 256 entries for a 256-row batch and stalled batch requests for
seconds in the benchmark).

All of a tier's windows (free: 5/minute and 100/hour) are checked and charged by one Lua
script, as a pair: a request is charged to every window or to none, so a refusal by the
minute window costs the hour window nothing and two processes cannot interleave between the
windows. The clock is Redis's (``TIME``), so replicas with skewed clocks agree. The script
runs through ``redis.asyncio`` on the worker's event loop, and the charges that arrive in
one tick of the loop go to Redis in one pipeline: one round trip for all of them.

The store is a setting (RATE_LIMIT_STORAGE_URI, by default REDIS_URL): ``redis://``,
``rediss://`` or ``unix://``. Without either (the embedded default) it is ``memory://``:
the same counters in-process, exact for one worker and per-worker otherwise.

When Redis is unreachable RATE_LIMIT_POLICY decides: ``fail-open`` keeps serving with the
in-process counters (and reports itself degraded) or ``fail-closed`` refuses the request.
After a failure Redis is left alone for a few seconds, so an outage costs one timeout per
pause rather than one per request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis_asyncio
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError, RedisError

from core.errors import ConfigurationError, DependencyUnavailableError
from core.settings import Settings, get_settings

logger = logging.getLogger(__name__)

DEFAULT_KEY_PREFIX = "flood-ratelimit"
_REDIS_RETRY_AFTER_S = 5.0
_REDIS_SCHEMES = ("redis", "rediss", "unix")
# The in-process store forgets idle keys once it holds this many.
_MEMORY_PRUNE_AT = 10_000

_UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_LIMIT = re.compile(r"^\s*(\d+)\s*(?:/|\s+per\s+)\s*(\d+)?\s*(second|minute|hour|day)s?\s*$", re.IGNORECASE)

# KEYS: one hash per window ({i: window index, c: its count, p: the previous window's}).
# ARGV: cost, then amount and length in ms of each window. Returns the 1-based position of
# the first window that refuses (0: charged to all), Redis's clock in ms, then each
# window's current and previous count as they were before the charge.
_CHARGE_LUA = """
local cost = tonumber(ARGV[1])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local refused = 0
local result = {0, now}
local states = {}
for i, key in ipairs(KEYS) do
  local amount = tonumber(ARGV[2 * i])
  local length = tonumber(ARGV[2 * i + 1])
  local index = math.floor(now / length)
  local stored = redis.call('HMGET', key, 'i', 'c', 'p')
  local current, previous = 0, 0
  if tonumber(stored[1]) == index then
    current = tonumber(stored[2]) or 0
    previous = tonumber(stored[3]) or 0
  elseif tonumber(stored[1]) == index - 1 then
    previous = tonumber(stored[2]) or 0
  end
  local weighted = math.floor(previous * (length - (now - index * length)) / length) + current
  if refused == 0 and weighted + cost > amount then
    refused = i
  end
  states[i] = {index, current, previous}
  result[2 * i + 1] = current
  result[2 * i + 2] = previous
end
if refused == 0 then
  for i, key in ipairs(KEYS) do
    local state = states[i]
    redis.call('HSET', key, 'i', state[1], 'c', state[2] + cost, 'p', state[3])
    redis.call('PEXPIRE', key, 2 * tonumber(ARGV[2 * i + 1]))
  end
end
result[1] = refused
return result
"""
# Redis names a loaded script by its SHA-1.
_CHARGE_SHA = hashlib.sha1(_CHARGE_LUA.encode()).hexdigest()


@dataclass(frozen=True)
class Window:
    """One limit of a tier: ``amount`` per ``seconds``."""

    amount: int
    seconds: int

    @property
    def length_ms(self) -> int:
        return self.seconds * 1000

    def __str__(self) -> str:
        return f"{self.amount}/{self.seconds}s"


@dataclass(frozen=True)
class RateLimitDecision:
    """The outcome for one request, reported against its tightest limit."""

    allowed: bool
    limit: int
    remaining: int
    reset_at: float  # epoch seconds: when the window ends, or when a refused request may pass
    retry_after: int | None  # seconds; set only when denied and waiting can help
    degraded: bool = False  # decided by the in-process fallback while Redis was down
    cost_too_high: bool = False  # the cost exceeds the limit itself; waiting cannot help

    def headers(self) -> dict[str, str]:
        headers = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(max(self.remaining, 0)),
            "X-RateLimit-Reset": str(math.ceil(self.reset_at)),
        }
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        return headers


def parse_limits(notation: str) -> list[Window]:
    """``"5/minute;100/hour"`` (also ``10 per 2 hours``, ``,`` between limits), shortest first."""
    windows = []
    for part in re.split(r"[;,]", notation):
        if not part.strip():
            continue
        match = _LIMIT.match(part)
        if match is None or int(match[1]) < 1:
            raise ValueError(f"{part.strip()!r} is not a limit such as 5/minute")
        count = int(match[2]) if match[2] else 1
        windows.append(Window(amount=int(match[1]), seconds=count * _UNIT_SECONDS[match[3].lower()]))
    if not windows:
        raise ValueError("no limit given")
    return sorted(windows, key=lambda window: window.seconds)


def parse_tiers(settings: Settings) -> dict[str, list[Window]]:
    """Every configured tier's limits, shortest window first; bad notation fails at start."""
    tiers: dict[str, list[Window]] = {}
    for name, notation in {**settings.rate_limit_tiers, "": settings.rate_limit_default}.items():
        variable = "RATE_LIMIT_DEFAULT" if name == "" else "RATE_LIMIT_TIERS"
        tiers[name] = parse_limit_setting(variable, notation, subject=f"tier {name or 'default'}")
    return tiers


def parse_limit_setting(variable: str, notation: str, *, subject: str = "") -> list[Window]:
    """:func:`parse_limits` for a setting: bad notation fails at start, naming ``variable``."""
    try:
        return parse_limits(notation)
    except ValueError as exc:
        where = f" for {subject}" if subject else ""
        raise ConfigurationError(
            f'{variable}: cannot parse {notation!r}{where} ({exc}); use the form "5/minute;100/hour"'
        ) from exc


def _decide(windows: Sequence[Window], answer: Sequence[int], cost: int) -> RateLimitDecision:
    """The decision from what the charge script (or its in-process twin) answered."""
    refused, now_ms = int(answer[0]), int(answer[1])
    states = [(int(answer[2 + 2 * i]), int(answer[3 + 2 * i])) for i in range(len(windows))]
    if refused:
        window = windows[refused - 1]
        current, previous = states[refused - 1]
        wait_ms = _wait_ms(window, now_ms, current=current, previous=previous, cost=cost)
        # What is left for a smaller request: a refusal charges nothing.
        left = window.amount - _weighted(window, now_ms, current=current, previous=previous)
        return RateLimitDecision(
            allowed=False,
            limit=window.amount,
            remaining=max(left, 0),
            reset_at=(now_ms + wait_ms) / 1000,
            retry_after=max(1, math.ceil(wait_ms / 1000)),
        )
    tightest: tuple[int, Window] | None = None
    for window, (current, previous) in zip(windows, states, strict=True):
        left = window.amount - _weighted(window, now_ms, current=current + cost, previous=previous)
        if tightest is None or left < tightest[0]:
            tightest = (left, window)
    assert tightest is not None  # parse_limits never returns an empty list
    left, window = tightest
    return RateLimitDecision(
        allowed=True,
        limit=window.amount,
        remaining=max(left, 0),
        reset_at=(now_ms // window.length_ms + 1) * window.length_ms / 1000,
        retry_after=None,
    )


def _weighted(window: Window, now_ms: int, *, current: int, previous: int) -> int:
    length = window.length_ms
    elapsed = now_ms - (now_ms // length) * length
    return math.floor(previous * (length - elapsed) / length) + current


def _wait_ms(window: Window, now_ms: int, *, current: int, previous: int, cost: int) -> int:
    """How long until a request of ``cost`` fits: the previous window's weight decays first,
    and if the current count alone is too high, the next window must start and decay it."""
    length = window.length_ms
    elapsed = now_ms - (now_ms // length) * length
    room = window.amount - cost  # the weighted count this request needs, at most
    if current <= room:
        # floor(previous * (length - e) / length) <= room - current once e passes this
        passes_at = math.ceil(length * (1 - (room - current + 1) / previous)) if previous else 0
        return max(passes_at - elapsed, 0) + 1
    # The current count becomes the previous one; it must decay to room.
    passes_at = max(math.ceil(length * (1 - (room + 1) / current)), 0)
    return length - elapsed + passes_at + 1


class _MemoryCounters:
    """The charge script's twin in-process: the same counters, this worker's clock."""

    def __init__(self) -> None:
        # key -> [window index, current, previous, window length in ms]
        self._states: dict[str, list[int]] = {}

    def charge(self, keys: Sequence[str], windows: Sequence[Window], cost: int) -> list[int]:
        now_ms = time.time_ns() // 1_000_000
        if len(self._states) > _MEMORY_PRUNE_AT:
            self._prune(now_ms)
        answer = [0, now_ms]
        states = []
        for position, (key, window) in enumerate(zip(keys, windows, strict=True), start=1):
            index = now_ms // window.length_ms
            stored = self._states.get(key)
            current = previous = 0
            if stored is not None and stored[0] == index:
                current, previous = stored[1], stored[2]
            elif stored is not None and stored[0] == index - 1:
                previous = stored[1]
            weighted = _weighted(window, now_ms, current=current, previous=previous)
            if not answer[0] and weighted + cost > window.amount:
                answer[0] = position
            states.append([index, current, previous])
            answer += [current, previous]
        if not answer[0]:
            for key, window, (index, current, previous) in zip(keys, windows, states, strict=True):
                self._states[key] = [index, current + cost, previous, window.length_ms]
        return answer

    def _prune(self, now_ms: int) -> None:
        # A counter older than the previous window of its own length counts nothing any more.
        self._states = {
            key: state for key, state in self._states.items() if state[0] >= now_ms // state[3] - 1
        }


class _RedisCounters:
    """The charge script on Redis; charges made in one event-loop tick share one pipeline."""

    def __init__(self, url: str, *, timeout_s: float) -> None:
        self._url = url
        self._timeout_s = timeout_s
        self._client: redis_asyncio.Redis | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[tuple[Sequence[str], list[int], asyncio.Future[list[int]]]] = []
        self._sending: set[asyncio.Task[None]] = set()
        self.round_trips = 0

    def _client_for_loop(self) -> redis_asyncio.Redis:
        # A client's connections belong to one event loop: one client per loop (a worker
        # has one; tests may run several in turn).
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = redis_asyncio.Redis.from_url(
                self._url,
                socket_timeout=self._timeout_s,
                socket_connect_timeout=self._timeout_s,
            )
            self._loop, self._pending = loop, []
        return self._client

    async def charge(self, keys: Sequence[str], windows: Sequence[Window], cost: int) -> list[int]:
        self._client_for_loop()
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[list[int]] = loop.create_future()
        args = [cost]
        for window in windows:
            args += [window.amount, window.length_ms]
        self._pending.append((keys, args, answer))
        if len(self._pending) == 1:
            # After the callbacks already due this tick: the requests they run join this batch.
            loop.call_soon(self._send_pending)
        return await answer

    def _send_pending(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[Sequence[str], list[int], asyncio.Future[list[int]]]]) -> None:
        client = self._client_for_loop()
        try:
            answers = await self._evalsha(client, batch)
            missing = [i for i, outcome in enumerate(answers) if isinstance(outcome, NoScriptError)]
            if missing:
                # A new or restarted Redis: load the script once and send those charges again.
                # (redis-py's Script objects instead ask SCRIPT EXISTS before every pipeline,
                # a second round trip per charge batch.)
                await client.script_load(_CHARGE_LUA)
                again = await self._evalsha(client, [batch[i] for i in missing])
                for i, outcome in zip(missing, again, strict=True):
                    answers[i] = outcome
        except (TimeoutError, RedisError, OSError) as exc:
            answers = [exc] * len(batch)
        for (_, _, answer), outcome in zip(batch, answers, strict=True):
            if answer.done():  # its request was cancelled (the client went away)
                continue
            if isinstance(outcome, BaseException):
                answer.set_exception(outcome)
            else:
                answer.set_result(outcome)

    async def _evalsha(
        self,
        client: redis_asyncio.Redis,
        batch: Sequence[tuple[Sequence[str], list[int], asyncio.Future[list[int]]]],
    ) -> list[Any]:
        self.round_trips += 1
        pipe: Pipeline
        async with client.pipeline(transaction=False) as pipe:
            for keys, args, _ in batch:
                pipe.evalsha(_CHARGE_SHA, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))

    async def ping(self) -> bool:
        client = self._client_for_loop()
        try:
            return bool(await client.ping())  # type: ignore[misc]  # redis-py types sync and async as one
        except (TimeoutError, RedisError, OSError):
            return False


class RateLimiter:
    """Takes ``cost`` from every limit of a key's tier, all of them or none."""

    def __init__(
        self,
        *,
        settings: Settings | None = None,
        storage_uri: str | None = None,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        policy: str | None = None,
        redis_retry_seconds: float = _REDIS_RETRY_AFTER_S,
    ) -> None:
        self._settings = settings or get_settings()
        self._tiers = parse_tiers(self._settings)
        self._policy = policy or self._settings.rate_limit_policy
        self._prefix = key_prefix
        uri = storage_uri if storage_uri is not None else self._settings.effective_rate_limit_storage_uri
        self.backend = uri.split("://", 1)[0]
        if self.backend != "memory" and self.backend not in _REDIS_SCHEMES:
            raise ConfigurationError(
                f"RATE_LIMIT_STORAGE_URI: {self.backend}:// is not a supported store; "
                "use redis://, rediss://, unix:// or memory://"
            )
        self._memory = _MemoryCounters()
        self._redis = (
            _RedisCounters(uri, timeout_s=self._settings.rate_limit_redis_timeout_ms / 1000)
            if self.backend != "memory"
            else None
        )
        self._redis_down_until = 0.0
        self._redis_retry_s = redis_retry_seconds
        self.fallback_decisions = 0
        self.redis_failures = 0
        self.last_error: str | None = None

    def cost_for(self, route: str, rows: int = 1) -> int:
        """A batch costs by rows, times the route's RATE_LIMIT_ROUTE_WEIGHTS weight."""
        weight = self._settings.rate_limit_route_weights.get(route, 1)
        return max(1, weight * max(rows, 1))

    def _keys(self, identity: str, windows: Sequence[Window]) -> list[str]:
        # The braces keep a key's windows in one Redis Cluster slot, as one script needs.
        return [f"{self._prefix}:{{{identity}}}:{window}" for window in windows]

    async def hit(self, identity: str, tier: str, *, cost: int = 1) -> RateLimitDecision:
        """Charge ``cost`` to ``identity`` (a key id, never the key) under ``tier``'s limits."""
        return await self.hit_windows(identity, self._tiers.get(tier) or self._tiers[""], cost=cost)

    async def hit_windows(
        self, identity: str, windows: Sequence[Window], *, cost: int = 1
    ) -> RateLimitDecision:
        """Charge ``cost`` to ``identity`` under ``windows`` (``parse_limits``), all or none."""
        for window in windows:
            if cost > window.amount:
                return RateLimitDecision(
                    allowed=False,
                    limit=window.amount,
                    remaining=0,
                    reset_at=time.time(),
                    retry_after=None,
                    cost_too_high=True,
                )
        keys = self._keys(identity, windows)
        if self._redis is not None and time.monotonic() >= self._redis_down_until:
            try:
                answer = await self._redis.charge(keys, windows, cost)
            except (TimeoutError, RedisError, OSError) as exc:
                self._note_redis_failure(exc)
            else:
                self._note_redis_ok()
                return _decide(windows, answer, cost)
        if self._redis is not None and self._policy == "fail-closed":
            raise DependencyUnavailableError(
                "rate limits cannot be checked: Redis is unreachable and RATE_LIMIT_POLICY=fail-closed"
            )
        decision = _decide(windows, self._memory.charge(keys, windows, cost), cost)
        if self._redis is None:
            return decision
        self.fallback_decisions += 1
        return dataclasses.replace(decision, degraded=True)

    def _note_redis_failure(self, exc: BaseException) -> None:
        was_up = self._redis_down_until == 0.0
        self._redis_down_until = time.monotonic() + self._redis_retry_s
        self.redis_failures += 1
        self.last_error = f"{exc.__class__.__name__}: {exc}"
        if was_up:
            logger.error("Redis rate-limit store unreachable (%s); policy %s", self.last_error, self._policy)

    def _note_redis_ok(self) -> None:
        if self._redis_down_until == 0.0:
            return
        self._redis_down_until = 0.0
        logger.warning("Redis rate-limit store reachable again")

    @property
    def redis_round_trips(self) -> int:
        """Pipelines sent to Redis: fewer than charges when requests arrive together."""
        return 0 if self._redis is None else self._redis.round_trips

    @property
    def degraded(self) -> bool:
        return self._redis is not None and self._redis_down_until != 0.0

    async def health(self) -> dict[str, Any]:
        """For ``/health/detailed``: ``degraded`` while Redis is down. Pings Redis, so an
        idle service notices recovery (and an outage) without waiting for traffic."""
        if self._redis is not None:
            if await self._redis.ping():
                self._note_redis_ok()
            else:
                self._note_redis_failure(ConnectionError("PING failed"))
        return {
            "status": "degraded" if self.degraded else "ok",
            "backend": self.backend,
            "policy": self._policy,
            "redis_failures": self.redis_failures,
            "fallback_decisions": self.fallback_decisions,
            "last_error": self.last_error if self.degraded else None,
        }
