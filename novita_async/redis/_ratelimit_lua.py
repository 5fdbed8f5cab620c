"""The Lua script behind :class:`~novita_async.redis.RedisRateLimiter` (one EVALSHA per call).

KEYS: the admission log (a sorted set: member ``"<seq>:<weight>"``, score = the Redis
time the admission is *reserved for*), the state hash, the pending reservations
(members of the log whose owner has not been told "go" yet: a 429 moves only those),
and the reservation tokens (a hash: the caller's token -> its member; a sorted set:
token -> when it was used, to forget tokens after ``token_ttl``).
Times are Redis ``TIME`` (Unix seconds, float), so every process reads one clock.

ARGV: ceiling ("" = none), burst ("" = none), min, recovery period, window, margin,
max pause, default quota, due (a reservation this close is due now), token_ttl, the
number of queued reports N, then N reports of 4 values (``"refund", member, "", ""`` or
``"429", age, retry_after | "", seq | ""``), then the operation and its token:
``"reserve", weight, token`` | ``"check", member, ""`` | ``"peek", "", ""``.

A reserve whose token is known answers that token's reservation (if it still stands)
instead of making another: a call whose reply was lost (the script ran, the
connection dropped) is sent again as it was, and must not reserve twice.

Reply: ``{wait, member, weight, limit, paused, seq}`` (strings; ``wait`` is seconds from
now until the reservation is due, ``"-1"`` if a checked member is gone; ``limit`` ""
= unlimited; ``paused`` is seconds from now until the pause ends, may be negative).
"""

from __future__ import annotations

__all__ = ["LIMITER_LUA"]

LIMITER_LUA = r"""
local log, st, pending, tokens, token_times = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ceiling = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local minimum = tonumber(ARGV[3])
local recovery = tonumber(ARGV[4])
local span = tonumber(ARGV[5]) + tonumber(ARGV[6])  -- window + margin
local max_pause = tonumber(ARGV[7])
local default_quota = tonumber(ARGV[8])
local window = tonumber(ARGV[5])
local due = tonumber(ARGV[9])
local token_ttl = tonumber(ARGV[10])
local eps = 1e-9

local function fmt(x) return string.format('%.17g', x) end

local s = {}
local raw = redis.call('HGETALL', st)
for i = 1, #raw, 2 do s[raw[i]] = tonumber(raw[i + 1]) end

local function weight_of(member) return tonumber(string.match(member, ':(.+)$')) end
local function seq_of(member) return tonumber(string.match(member, '^(%d+):')) end

-- The effective limit at time `at` (nil = unlimited): a lowered limit doubles back
-- per quiet recovery period, up to the ceiling (or the quota learned in unlimited mode).
local function limit_at(at)
  local top = ceiling or s.target
  if s.limit == nil then return top end
  local k = math.min(math.floor(math.max(at - (s.quiet or 0), 0) / recovery), 60)
  local l = s.limit * 2 ^ k
  if top ~= nil and l > top then return top end
  return l
end

-- Earliest time >= at when `w` more images fit every window (all entries are <= at).
local function fit(at, w, lim)
  local need = math.min(w, lim)
  local es = redis.call('ZRANGEBYSCORE', log, '(' .. fmt(at - span), '+inf', 'WITHSCORES')
  local total = 0
  for i = 1, #es, 2 do total = total + weight_of(es[i]) end
  if total + need > lim + eps then
    local excess = total + need - lim
    for i = 1, #es, 2 do
      excess = excess - weight_of(es[i])
      if excess <= eps then
        at = math.max(at, tonumber(es[i + 1]) + span)
        break
      end
    end
  end
  if burst ~= nil then
    local rate = lim / window
    local want = math.min(need, burst)
    local tokens = burst
    if s.tokens_at ~= nil then
      tokens = math.min(burst, s.tokens + math.max(at - s.tokens_at, 0) * rate)
    end
    if tokens + eps < want then
      at = at + (want - tokens) / rate
      tokens = want
    end
    s.tokens = math.max(tokens - want, 0)
    s.tokens_at = at
  end
  return at
end

-- Reserve the earliest slot for `w`, first come first served: never before the latest
-- reservation, nor during a pause.
local function place(member, w)
  local lim = limit_at(now)
  local at = math.max(now, s.paused or 0, s.last_at or 0)
  if lim ~= nil then at = fit(at, w, lim) end
  redis.call('ZADD', log, at, member)
  s.last_at = at
  return at
end

local function report_429(age, retry_after, seq)
  local at = now - age
  local cur = limit_at(at)
  local fresh = (seq == nil or seq > (s.dec_seq or 0)) and at >= (s.slow_until or 0)
  if fresh then
    local new
    if cur == nil then
      -- First 429 while unlimited: what was accepted just before is the quota.
      local accepted = 0
      local es = redis.call('ZRANGEBYSCORE', log, '(' .. fmt(at - span), fmt(at))
      for i = 1, #es do
        if seq == nil or seq_of(es[i]) < seq then accepted = accepted + weight_of(es[i]) end
      end
      new = math.max(minimum, accepted > 0 and accepted or default_quota)
      s.target = new
    else
      new = math.max(minimum, cur / 2)
    end
    s.limit = new
    s.dec_seq = s.seq or 0
  elseif cur ~= nil then
    s.limit = cur
  end
  local pause = retry_after or math.max(window / 60, window / (s.limit or default_quota))
  pause = math.min(math.max(pause, 0), max_pause)
  if fresh then s.slow_until = at + math.max(pause, window / 60) end
  s.paused = math.max(s.paused or 0, at + pause)
  s.quiet = math.max(s.quiet or 0, s.paused)
end

local function last_reservation()
  local last = redis.call('ZRANGE', log, -1, -1, 'WITHSCORES')
  if #last > 0 then return tonumber(last[2]) end
  return nil
end

-- Move every pending reservation behind the pause, at the new limit, in order.
local function reschedule()
  local later = redis.call('ZRANGE', pending, 0, -1)
  for i = 1, #later do redis.call('ZREM', log, later[i]) end
  s.last_at = last_reservation()
  if burst ~= nil then
    s.tokens = 0
    s.tokens_at = now
  end
  for i = 1, #later do
    redis.call('ZADD', pending, place(later[i], weight_of(later[i])), later[i])
  end
end

redis.call('ZREMRANGEBYSCORE', log, '-inf', fmt(now - span))
redis.call('ZREMRANGEBYSCORE', pending, '-inf', fmt(now - span))
-- Tokens past their time, a bounded number per call (more would stall Redis after a lull).
local stale = redis.call(
  'ZRANGEBYSCORE', token_times, '-inf', fmt(now - token_ttl), 'LIMIT', 0, 500)
if #stale > 0 then
  redis.call('HDEL', tokens, unpack(stale))
  redis.call('ZREM', token_times, unpack(stale))
end
local n = tonumber(ARGV[11])
local moved = false
for i = 0, n - 1 do
  local kind, a, b, c = ARGV[12 + 4 * i], ARGV[13 + 4 * i], ARGV[14 + 4 * i], ARGV[15 + 4 * i]
  if kind == 'refund' then
    local score = redis.call('ZSCORE', log, a)
    redis.call('ZREM', log, a)
    redis.call('ZREM', pending, a)
    if score and s.last_at ~= nil and tonumber(score) >= s.last_at then
      s.last_at = last_reservation()  -- the latest went away: the next may come earlier
    end
  else
    report_429(tonumber(a), tonumber(b), tonumber(c))
    moved = true
  end
end
if moved then reschedule() end

local op, arg, token = ARGV[12 + 4 * n], ARGV[13 + 4 * n], ARGV[14 + 4 * n]
local wait, member, weight = 0, '', ''
local known = op == 'reserve' and token ~= '' and redis.call('HGET', tokens, token)
local known_at = known and redis.call('ZSCORE', log, known)
if known_at then  -- this call ran before and its reply was lost: the same answer
  member = known
  weight = fmt(weight_of(known))
  wait = math.max(tonumber(known_at) - now, 0)
  if wait <= due then redis.call('ZREM', pending, known) end
elseif op == 'reserve' then
  local w = tonumber(arg)
  local lim = limit_at(now)
  if lim ~= nil then w = math.min(w, lim) end
  s.seq = (s.seq or 0) + 1
  member = s.seq .. ':' .. fmt(w)
  weight = fmt(w)
  local at = place(member, w)
  wait = at - now
  if wait > due then redis.call('ZADD', pending, at, member) end
  if token ~= '' then
    redis.call('HSET', tokens, token, member)
    redis.call('ZADD', token_times, now, token)
  end
elseif op == 'check' then
  local score = redis.call('ZSCORE', log, arg)
  if not score then
    wait = -1
  else
    wait = math.max(tonumber(score) - now, 0)
    if wait <= due then redis.call('ZREM', pending, arg) end
  end
end

local fields = {}
for name, value in pairs(s) do
  fields[#fields + 1] = name
  fields[#fields + 1] = fmt(value)
end
if #fields > 0 then redis.call('HSET', st, unpack(fields)) end
if s.last_at == nil then redis.call('HDEL', st, 'last_at') end
local horizon = math.max(s.last_at or now, s.paused or now) - now + span + 600
redis.call('PEXPIRE', st, math.ceil(horizon * 1000))
redis.call('PEXPIRE', log, math.ceil(horizon * 1000))
redis.call('PEXPIRE', pending, math.ceil(horizon * 1000))
local keep = math.ceil(math.max(horizon, token_ttl) * 1000)
redis.call('PEXPIRE', tokens, keep)
redis.call('PEXPIRE', token_times, keep)
local lim = limit_at(now)
return {fmt(wait), member, weight, lim and fmt(lim) or '', fmt((s.paused or 0) - now),
        tostring(s.seq or 0)}
"""
