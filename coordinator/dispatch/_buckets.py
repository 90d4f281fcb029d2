"""Token buckets for per-task-type rate limits: atomic Lua scripts in Redis (shared by all
replicas), falling back to per-process buckets while Redis is unset or unreachable.

A bucket holds up to ``size`` tokens (it starts full) and gains ``rate`` tokens per
second; tokens are fractional, a grant is whole. In Redis a bucket is the hash
``<prefix><bucket>`` {tokens, ts (ms, Redis's own clock)}, expiring once it would be full
again anyway; the script reads Redis's ``TIME`` so replicas' clocks do not matter.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio
from redis.commands.core import AsyncScript

from coordinator.dispatch._redis import RedisLink, RedisUnavailable

KEY_PREFIX = "trellis:bucket:"

# How long past "full again" a bucket's hash lives (ms).
_EXPIRY_MARGIN_MS = 1000

# KEYS[1] the bucket; ARGV rate (tokens/s), size, n. Returns {granted, ms until the next
# token (0 when all n were granted)}.
_TAKE = """
local rate = tonumber(ARGV[1])
local size = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local stored = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(stored[1])
local ts = tonumber(stored[2])
if tokens == nil or ts == nil then
  tokens = size
  ts = now
end
if now > ts then
  tokens = tokens + (now - ts) * rate / 1000
  ts = now
end
if tokens > size then
  tokens = size
end
local granted = math.floor(tokens)
if granted > n then
  granted = n
end
if granted < 0 then
  granted = 0
end
tokens = tokens - granted
local wait = 0
if granted < n then
  wait = math.ceil((1 - tokens) * 1000 / rate)
  if wait < 1 then
    wait = 1
  end
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'ts', ts)
redis.call('PEXPIRE', KEYS[1], math.ceil((size - tokens) * 1000 / rate) + tonumber(ARGV[4]))
return {granted, wait}
"""

# KEYS[1] the bucket; ARGV rate, size, n. A missing bucket is full: nothing to give back.
_REFUND = """
local rate = tonumber(ARGV[1])
local size = tonumber(ARGV[2])
local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens'))
if tokens == nil then
  return 0
end
tokens = tokens + tonumber(ARGV[3])
if tokens > size then
  tokens = size
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens))
redis.call('PEXPIRE', KEYS[1], math.ceil((size - tokens) * 1000 / rate) + tonumber(ARGV[4]))
return 1
"""

# Per-process buckets kept before the full ones are dropped (a full bucket is the same as
# a missing one).
_LOCAL_PRUNE_AT = 10_000


@dataclass(frozen=True)
class Grant:
    granted: int
    # When fewer than asked were granted: seconds until the next token (else 0).
    wait: float = 0.0


@dataclass
class _Local:
    tokens: float
    at: float
    rate: float
    size: int


class TokenBuckets:
    def __init__(
        self,
        link: RedisLink,
        *,
        key_prefix: str = KEY_PREFIX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` (seconds, monotonic) drives the per-process buckets only."""
        self._link = link
        self._prefix = key_prefix
        self._clock = clock
        self._local: dict[str, _Local] = {}
        self._scripts: tuple[redis.asyncio.Redis, AsyncScript, AsyncScript] | None = None

    async def take(self, bucket: str, rate: float, size: int, n: int) -> Grant:
        """Take up to ``n`` tokens from ``bucket`` (refilled at ``rate``/s up to ``size``).

        A ``rate`` of 0 or less means no limit: all ``n`` are granted."""
        if n <= 0:
            return Grant(0)
        if rate <= 0:
            return Grant(n)
        size = max(1, size)

        async def shared(client: redis.asyncio.Redis) -> Grant:
            take, _refund = self._scripts_for(client)
            granted, wait_ms = await take(
                keys=[self._prefix + bucket], args=[rate, size, n, _EXPIRY_MARGIN_MS]
            )
            return Grant(int(granted), int(wait_ms) / 1000)

        try:
            return await self._link.call(shared)
        except RedisUnavailable:
            return self._take_local(bucket, rate, size, n)

    async def refund(self, bucket: str, rate: float, size: int, n: int) -> None:
        """Give back tokens taken for tasks that were not handed out after all."""
        if n <= 0 or rate <= 0:
            return
        size = max(1, size)

        async def shared(client: redis.asyncio.Redis) -> None:
            _take, refund = self._scripts_for(client)
            await refund(keys=[self._prefix + bucket], args=[rate, size, n, _EXPIRY_MARGIN_MS])

        try:
            await self._link.call(shared)
        except RedisUnavailable:
            self._refund_local(bucket, rate, size, n)

    def _scripts_for(self, client: redis.asyncio.Redis) -> tuple[AsyncScript, AsyncScript]:
        if self._scripts is None or self._scripts[0] is not client:
            self._scripts = (client, client.register_script(_TAKE), client.register_script(_REFUND))
        return self._scripts[1], self._scripts[2]

    # -- per process: the same algorithm as the scripts ------------------------------

    def _refill(self, bucket: str, rate: float, size: int) -> _Local:
        now = self._clock()
        state = self._local.get(bucket)
        if state is None:
            if len(self._local) >= _LOCAL_PRUNE_AT:
                self._prune(now)
            state = self._local[bucket] = _Local(float(size), now, rate, size)
        elif now > state.at:
            state.tokens += (now - state.at) * rate
            state.at = now
        state.rate, state.size = rate, size
        state.tokens = min(state.tokens, float(size))
        return state

    def _take_local(self, bucket: str, rate: float, size: int, n: int) -> Grant:
        state = self._refill(bucket, rate, size)
        granted = max(0, min(n, math.floor(state.tokens)))
        state.tokens -= granted
        if granted < n:
            return Grant(granted, (1 - state.tokens) / rate)
        return Grant(granted)

    def _refund_local(self, bucket: str, rate: float, size: int, n: int) -> None:
        state = self._refill(bucket, rate, size)
        state.tokens = min(float(size), state.tokens + n)

    def _prune(self, now: float) -> None:
        """Forget the buckets that are full again (the same as missing ones)."""
        for name, state in list(self._local.items()):
            if state.tokens + (now - state.at) * state.rate >= state.size:
                del self._local[name]
