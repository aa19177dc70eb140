"""Lua scripts that change a job atomically. Each takes the same KEYS (see JobStore._keys).

KEYS: 1 job, 2 chunks, 3 inputs, 4 results, 5 errors, 6 done, 7 running, 8 attempts, 9 sent, 10 active-jobs set,
11 committers, 12 refusals.
"""

_PRELUDE = r"""
local job, chunks, inputs, results, errors, done, running, attempts, sent, active =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local committers, refusals = KEYS[11], KEYS[12]

local TERMINAL = {succeeded=true, partially_succeeded=true, failed=true, cancelled=true}

local function num(key, field)
  return tonumber(redis.call('HGET', key, field) or '0') or 0
end

-- Mark one chunk committed as skipped (never processed): its rows count as skipped.
local function skip_chunk(idx)
  if redis.call('SADD', done, idx) == 0 then return end
  redis.call('HINCRBY', job, 'skipped', num(chunks, idx))
  redis.call('HINCRBY', job, 'chunks_done', 1)
  redis.call('HDEL', inputs, idx)
  redis.call('HDEL', running, idx)
end

-- Skip every chunk that is neither committed nor claimed by a worker in the last stale_after seconds.
local function skip_idle_chunks(now, stale_after)
  local all = redis.call('HKEYS', chunks)
  for _, idx in ipairs(all) do
    if redis.call('SISMEMBER', done, idx) == 0 then
      local claimed = tonumber(redis.call('HGET', running, idx) or '0')
      if claimed == 0 or now - claimed > stale_after then skip_chunk(idx) end
    end
  end
end

-- Mark chunks sent, in input order, while fewer than the job's window of them are in the broker; a job
-- thus never floods the queue, and jobs submitted later interleave with it. Returns the indexes to send.
local function feed(now)
  local out = {}
  if redis.call('HGET', job, 'stop') then return out end
  local window, upto, seen, queued = num(job, 'window'), num(job, 'sent_upto'), num(job, 'chunks_seen'), num(job, 'queued')
  while queued < window and upto < seen do
    local idx = tostring(upto)
    upto = upto + 1
    if redis.call('SISMEMBER', done, idx) == 0 then
      redis.call('HSET', sent, idx, now)
      queued = queued + 1
      out[#out + 1] = idx
    end
  end
  redis.call('HSET', job, 'sent_upto', upto, 'queued', queued)
  return out
end

-- A sent chunk has left the broker for good (committed or skipped): it frees a place in the window, and its
-- send time goes, so that `sent` holds only the chunks on their way (what a /metrics scrape reads).
local function settle(idx)
  if tonumber(idx) < num(job, 'sent_upto') then
    redis.call('HSET', job, 'queued', math.max(num(job, 'queued') - 1, 0))
  end
  redis.call('HDEL', sent, idx)
end

-- Prepend a status to a list of chunk indexes to send.
local function with_sends(status, sends)
  table.insert(sends, 1, status)
  return sends
end

-- The one place a job becomes terminal: when its input is fully read and every chunk is committed.
local function finalise_if_complete(now, ttl)
  if redis.call('HGET', job, 'ingesting') == '1' then return 'open' end
  local total = tonumber(redis.call('HGET', job, 'chunks_total') or '-1')
  if total < 0 or num(job, 'chunks_done') < total then return 'open' end
  local status = redis.call('HGET', job, 'status')
  if TERMINAL[status] then return status end
  local ok, bad = num(job, 'succeeded'), num(job, 'failed')
  local stop = redis.call('HGET', job, 'stop')
  if stop == 'cancel' then status = 'cancelled'
  elseif stop == 'fail' then status = 'failed'
  elseif ok == 0 and bad > 0 then
    status = 'failed'
    redis.call('HSET', job, 'error_code', 'all_rows_failed',
      'error_message', 'Every row failed; see the errors of this job.')
  elseif bad > 0 then status = 'partially_succeeded'
  else status = 'succeeded' end
  redis.call('HSET', job, 'status', status, 'finished_at', now)
  if redis.call('HGET', job, 'started_at') == false then redis.call('HSET', job, 'started_at', now) end
  redis.call('DEL', inputs, running, attempts, sent, refusals)
  for _, key in ipairs({job, chunks, results, errors, done, committers}) do redis.call('EXPIRE', key, ttl) end
  redis.call('SREM', active, redis.call('HGET', job, 'id'))
  return status
end
"""

# ARGV: idx, nrows, blob (or its name in the chunk store), now -> {'gone'} | {'stored', idx to send...} | {'skipped'}
ADD_CHUNK = _PRELUDE + r"""
local idx, nrows, blob, now = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
if redis.call('EXISTS', job) == 0 then return {'gone'} end
redis.call('HSET', chunks, idx, nrows)
redis.call('HINCRBY', job, 'rows_read', nrows)
redis.call('HINCRBY', job, 'chunks_seen', 1)
redis.call('HSET', job, 'read_at', now)
if redis.call('HGET', job, 'stop') then skip_chunk(idx) return {'skipped'} end
redis.call('HSET', inputs, idx, blob)
return with_sends('stored', feed(now))
"""

# ARGV: now -> chunk indexes to send now (the reconciler's top-up of a job's window)
FEED = _PRELUDE + r"""
if redis.call('EXISTS', job) == 0 then return {} end
return feed(tonumber(ARGV[1]))
"""

# ARGV: total_rows, chunks_total, now, ttl -> status or 'open' | 'gone'
FINISH_INGEST = _PRELUDE + r"""
if redis.call('EXISTS', job) == 0 then return 'gone' end
redis.call('HSET', job, 'total', ARGV[1], 'chunks_total', ARGV[2])
redis.call('HDEL', job, 'ingesting')
return finalise_if_complete(tonumber(ARGV[3]), tonumber(ARGV[4]))
"""

# ARGV: idx, now, max_attempts -> {'gone'} | {'done'} | {'stop'} | {'poison', attempts, blob} | {'run', attempts, blob}
#   (blob: the input blob, or its name in the chunk store)
CLAIM_CHUNK = _PRELUDE + r"""
local idx, now, max_attempts = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('EXISTS', job) == 0 then return {'gone'} end
if redis.call('SISMEMBER', done, idx) == 1 then return {'done'} end
if TERMINAL[redis.call('HGET', job, 'status')] then return {'done'} end
if redis.call('HGET', job, 'stop') then return {'stop'} end
local blob = redis.call('HGET', inputs, idx)
if not blob then return {'gone'} end
local n = redis.call('HINCRBY', attempts, idx, 1)
redis.call('HSET', running, idx, now)
if redis.call('HGET', job, 'status') == 'queued' then
  redis.call('HSET', job, 'status', 'running', 'started_at', now)
end
if n > max_attempts then return {'poison', n, blob} end
return {'run', n, blob}
"""

# ARGV: idx, succeeded, failed, result_blob, error_blob, now, ttl, stale_after, worker (always the last)
#   (result_blob, error_blob: the blobs, or their names in the chunk store; only the first commit records them)
#   -> {'gone'} | {'duplicate'} | {'open' or terminal status, chunk indexes to send next...}
COMMIT_CHUNK = _PRELUDE + r"""
local idx = ARGV[1]
local ok, bad = tonumber(ARGV[2]), tonumber(ARGV[3])
local now, ttl, stale_after = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
if redis.call('EXISTS', job) == 0 then return {'gone'} end
if TERMINAL[redis.call('HGET', job, 'status')] then return {'duplicate'} end
if redis.call('SADD', done, idx) == 0 then return {'duplicate'} end
settle(idx)
redis.call('HDEL', inputs, idx)
redis.call('HDEL', running, idx)
redis.call('HSET', committers, idx, ARGV[#ARGV])
if ok > 0 then redis.call('HSET', results, idx, ARGV[4]) end
if bad > 0 then redis.call('HSET', errors, idx, ARGV[5]) end
redis.call('HINCRBY', job, 'succeeded', ok)
local failed = redis.call('HINCRBY', job, 'failed', bad)
redis.call('HINCRBY', job, 'chunks_done', 1)
local rate = tonumber(redis.call('HGET', job, 'max_error_rate') or '')
if rate and not redis.call('HGET', job, 'stop') then
  local processed = num(job, 'succeeded') + failed
  if failed > rate * processed then
    redis.call('HSET', job, 'stop', 'fail', 'error_code', 'error_budget_exceeded', 'error_message',
      string.format('%d of the %d rows processed so far failed, more than max_error_rate %s allows.', failed, processed, tostring(rate)))
    skip_idle_chunks(now, stale_after)
  end
end
local sends = feed(now)
return with_sends(finalise_if_complete(now, ttl), sends)
"""

# ARGV: idx, now, worker, worker_sha256, max_refusals
#   -> {'gone'} | {'done'} | {'stop'} | {'refused', refusals} | {'exhausted', refusals}
# A worker whose copy of the job's model differs hands a chunk back without claiming it: its attempts (meant for
# crashes) stay as they were, and the chunk counts as sent again, since the worker puts its message back.
REFUSE_CHUNK = _PRELUDE + r"""
local idx, now, max_refusals = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[5])
if redis.call('EXISTS', job) == 0 then return {'gone'} end
if redis.call('SISMEMBER', done, idx) == 1 then return {'done'} end
if TERMINAL[redis.call('HGET', job, 'status')] then return {'done'} end
if redis.call('HGET', job, 'stop') then return {'stop'} end
if redis.call('HEXISTS', inputs, idx) == 0 then return {'gone'} end
local n = redis.call('HINCRBY', refusals, idx, 1)
redis.call('HSET', refusals, 'by:' .. ARGV[3], ARGV[4])
if n > max_refusals then return {'exhausted', n} end
redis.call('HSET', sent, idx, now)
return {'refused', n}
"""

# ARGV: worker, worker_sha256, max_refusals -> {'refused'|'exhausted', n} | {'gone'} | {'done'} | {'stop'}
#   A source job's read handed back before it began (this worker's model copy differs); n counts the read's
#   refusals, under the field 'source' of the refusals hash, beside the chunks' own.
REFUSE_SOURCE = _PRELUDE + r"""
if redis.call('EXISTS', job) == 0 then return {'gone'} end
if TERMINAL[redis.call('HGET', job, 'status')] then return {'done'} end
if redis.call('HGET', job, 'stop') then return {'stop'} end
if redis.call('HEXISTS', job, 'read_started') == 1 then return {'done'} end
local n = redis.call('HINCRBY', refusals, 'source', 1)
redis.call('HSET', refusals, 'by:' .. ARGV[1], ARGV[2])
if n > tonumber(ARGV[3]) then return {'exhausted', n} end
return {'refused', n}
"""

# ARGV: idx -> 1 when a claim's attempt was given back (the chunk store failed, not the chunk), else 0
RELEASE_CHUNK = _PRELUDE + r"""
if redis.call('HEXISTS', attempts, ARGV[1]) == 0 then return 0 end
redis.call('HINCRBY', attempts, ARGV[1], -1)
redis.call('HDEL', running, ARGV[1])
return 1
"""

# ARGV: idx, now, ttl -> like COMMIT_CHUNK; for a chunk found while the job is stopping.
SKIP_CHUNK = _PRELUDE + r"""
if redis.call('EXISTS', job) == 0 then return {'gone'} end
if redis.call('SISMEMBER', done, ARGV[1]) == 0 then settle(ARGV[1]) end
skip_chunk(ARGV[1])
return {finalise_if_complete(tonumber(ARGV[2]), tonumber(ARGV[3]))}
"""

# ARGV: stop ('cancel'|'fail'), now, ttl, stale_after, error_code, error_message
#   -> 'gone' | 'finished' | 'open' | terminal status
STOP_JOB = _PRELUDE + r"""
if redis.call('EXISTS', job) == 0 then return 'gone' end
if TERMINAL[redis.call('HGET', job, 'status')] then return 'finished' end
local now, ttl, stale_after = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if not redis.call('HGET', job, 'stop') then
  redis.call('HSET', job, 'stop', ARGV[1])
  if ARGV[5] ~= '' then redis.call('HSET', job, 'error_code', ARGV[5], 'error_message', ARGV[6]) end
end
skip_idle_chunks(now, stale_after)
return finalise_if_complete(now, ttl)
"""
