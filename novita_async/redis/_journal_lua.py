"""Lua scripts behind :class:`~novita_async.redis.RedisJournal`.

KEYS[1] is the lease (a string holding the writer's token), KEYS[2] the records (a
hash: field = index, value = the record's JSON). Every write checks the lease token
first, in the same script, so a writer that lost its lease cannot write. Times are
the Redis server's ``TIME`` (Unix seconds).

Replies: ``{"ok", ...}`` or ``{"lease"}`` | ``{"missing"}`` | ``{"state", current}`` |
``{"has_task", task_id}`` | ``{"mismatch", index, stored_key}``.
"""

from __future__ import annotations

__all__ = ["BEGIN_LUA", "MARK_LUA", "RELEASE_LUA", "RENEW_LUA"]

_PRELUDE = r"""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {'lease'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

#: ARGV: token, then pairs of (index, key). Inserts the missing ones as "new" and
#: returns {"ok", json, json, ...} in the given order, or the first mismatch.
BEGIN_LUA = (
    _PRELUDE
    + r"""
local stored = {}
for i = 2, #ARGV, 2 do
  local raw = redis.call('HGET', KEYS[2], ARGV[i])
  if raw then
    local record = cjson.decode(raw)
    if record.key ~= ARGV[i + 1] then return {'mismatch', ARGV[i], record.key} end
    stored[i] = raw
  end
end
local out = {'ok'}
for i = 2, #ARGV, 2 do
  local raw = stored[i]
  if not raw then
    raw = cjson.encode({key = ARGV[i + 1], state = 'new', attempts = 0,
                        created_at = now, updated_at = now})
    redis.call('HSET', KEYS[2], ARGV[i], raw)
  end
  out[#out + 1] = raw
end
return out
"""
)

#: ARGV: token, index, target state, allowed source states (space separated),
#: task_id, message, result JSON ("" = none each). "submitting" counts an attempt
#: and clears the error; "submitted" records the task id (idempotent for the same
#: one, refused if another is recorded); a finished record gets result and error.
MARK_LUA = (
    _PRELUDE
    + r"""
local raw = redis.call('HGET', KEYS[2], ARGV[2])
if not raw then return {'missing'} end
local r = cjson.decode(raw)
local target, task_id, message, result = ARGV[3], ARGV[5], ARGV[6], ARGV[7]
local function str(v) if v == nil or v == cjson.null then return '' end return v end
if target == 'submitted' then
  if r.state == 'submitted' and str(r.task_id) == task_id then return {'ok'} end
  if str(r.task_id) ~= '' then return {'has_task', r.task_id} end
end
if (target == 'succeeded' or target == 'failed') and r.state == target
   and str(r.result) == result and str(r.error) == message then
  return {'ok'}  -- the same outcome again (a retried call whose first reply was lost)
end
local allowed = false
for state in string.gmatch(ARGV[4], '%S+') do
  if state == r.state then allowed = true end
end
if not allowed then return {'state', r.state} end
r.state = target
r.updated_at = now
if target == 'submitting' then
  r.attempts = (r.attempts or 0) + 1
  r.error = nil
elseif target == 'submitted' then
  r.task_id = task_id
  r.error = nil
elseif target == 'succeeded' or target == 'failed' then
  if result ~= '' then r.result = result else r.result = nil end
  if message ~= '' then r.error = message else r.error = nil end
else
  r.error = message
end
redis.call('HSET', KEYS[2], ARGV[2], cjson.encode(r))
return {'ok'}
"""
)

#: ARGV: token, lease ms. 1 if renewed, 0 if the lease is not ours any more.
RENEW_LUA = r"""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

#: ARGV: token. Deletes the lease if it is still ours.
RELEASE_LUA = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
